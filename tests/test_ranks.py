"""Two ranks of DDP on the CPU (gloo), started as srun starts them: one process per task, each with
SLURM's variables, so Lightning's SLURMEnvironment (and its requeue) joins them. Locally the tasks
are started here, with an ``scontrol`` that records the requeue and kills the job; the tests marked
slurm run the same through the live local cluster (``srun -n 2``). Signals reach the ranks at
different steps, or one rank only, as they do on a cluster; every test is bounded in time, and a hang
is a failure."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from kd import callbacks
from kd.callbacks import LastCheckpoint
from kd.results import Lock
from tests.conftest import TINY
from tests.test_slurm import cancel, job_ids, job_logs, launch, slurm_env, squeue_state, until  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
# Four epochs of five batches per rank (40 examples, 2 ranks, batches of 4), dropout: a resume must
# restore the data position and the random state.
RANKED = [
    *TINY,
    "trainer.max_epochs=4",
    "data.batch_size=4",
    "model.dropout=0.2",
    "deterministic=true",
    "callbacks.last_checkpoint.every_s=0",
    "threads=1",
    "trainer=ddp",
    "trainer.accelerator=cpu",
]
TIMEOUT_S = 120  # for one launch of the ranks: seconds of work each, so a rank past it hangs


class SignalInStep(L.Callback):
    """Sends ``signum`` to this process inside the training step (between its backward pass and the
    weight update) of batch ``batches[rank]`` of epoch ``epoch`` (none where that is -1), unless the
    run was resumed: the requeued command is the same and must not be stopped again."""

    def __init__(self, signum: int, epoch: int, batches: list[int]):
        self.signum, self.epoch, self.batches = signum, epoch, batches

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        at = (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx)
        if trainer.ckpt_path is None and at == (self.epoch, self.batches[trainer.global_rank]):
            os.kill(os.getpid(), self.signum)


class SavedAt(L.Callback):
    """Appends the step of every checkpoint this rank takes part in to ``saves-<rank>`` in the run folder."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        with open(Path(trainer.default_root_dir) / f"saves-{trainer.global_rank}", "a") as saves:
            saves.write(f"{trainer.global_step}\n")


class NonFiniteAt(L.Callback):
    """Makes the inputs of batch ``batch`` of epoch ``epoch`` NaN on rank ``rank`` only: a loss that
    is non-finite there and finite on the other ranks."""

    def __init__(self, epoch: int, batch: int, rank: int):
        self.epoch, self.batch, self.rank = epoch, batch, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx, trainer.global_rank) == (self.epoch, self.batch, self.rank):
            batch[0].fill_(float("nan"))


class ClockAhead(L.Callback):
    """Makes rank ``rank``'s clock of last.ckpt an hour ahead of the others': a rank that, alone,
    finds a checkpoint due at an epoch's end."""

    def __init__(self, rank: int):
        self.rank = rank

    def on_train_epoch_start(self, trainer, pl_module):  # after LastCheckpoint has started its clock
        if trainer.global_rank == self.rank and trainer.current_epoch == 0:
            for checkpoint in trainer.checkpoint_callbacks:
                if isinstance(checkpoint, LastCheckpoint):
                    checkpoint._written -= 3600


def callback(name: str, cls, **kwargs) -> list[str]:
    return [
        f"+callbacks.{name}._target_=tests.test_ranks.{cls.__name__}",
        *(f"+callbacks.{name}.{k}={v}" for k, v in kwargs.items()),
    ]


SAVED = callback("saved", SavedAt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tasks(*overrides, run_dir: Path, world: int = 2) -> list[subprocess.Popen]:
    """``python -m kd.train`` once per task, with the variables srun gives a task of job 7; the
    requeue is an ``scontrol`` that records it and kills every task (SLURM's KillWait, here 0)."""
    bin_dir = run_dir.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {bin_dir}/requeued\nkill -KILL $(cat {bin_dir}/pids)\n')
    (bin_dir / "scontrol").chmod(0o755)
    port = free_port()
    tasks = []
    for rank in range(world):
        env = {
            "KD_ROOT": str(run_dir.parent),
            "WANDB_MODE": "disabled",
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "SLURM_JOB_ID": "7",
            "SLURM_JOB_NAME": "kd",
            "SLURM_NTASKS": str(world),
            "SLURM_NTASKS_PER_NODE": str(world),
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost",
            "MASTER_PORT": str(port),
        }
        tasks.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kd.train",
                    *RANKED,
                    f"trainer.devices={world}",
                    *overrides,
                    f"hydra.run.dir={run_dir}",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    (bin_dir / "pids").write_text(" ".join(str(task.pid) for task in tasks))
    return tasks


def finish(tasks: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Each task's exit status and stderr; a task still running after TIMEOUT_S fails the test."""
    deadline, ended = time.monotonic() + TIMEOUT_S, []
    try:
        for task in tasks:
            _, err = task.communicate(timeout=max(deadline - time.monotonic(), 1))
            ended.append((task.returncode, err))
    except subprocess.TimeoutExpired:
        for task in tasks:
            task.kill()
        errs = "\n".join(f"--- rank {rank}\n{task.communicate()[1][-2000:]}" for rank, task in enumerate(tasks))
        pytest.fail(f"the ranks hung: still running after {TIMEOUT_S} s\n{errs}")
    return ended


def saves(run_dir: Path, world: int = 2) -> list[list[int]]:
    return [[int(s) for s in (run_dir / f"saves-{rank}").read_text().split()] for rank in range(world)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted two-rank run that a resumed one must match exactly."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    for code, err in finish(start_tasks(run_dir=run_dir)):
        assert code == 0, err[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def test_a_requeue_signal_a_step_apart_checkpoints_every_rank_at_one_step_and_the_job_resumes_exactly(
    reference, tmp_path
):
    """SIGUSR1 inside epoch 2's step 1 on rank 1 and step 2 on rank 0 (the late one, which requeues):
    both write hpc_ckpt_1.ckpt at step 1's end, rank 0 requeues once, and the requeued job (the same
    command) ends as the uninterrupted run does."""
    run_dir = tmp_path / "run"
    command = [*SAVED, *callback("usr1", SignalInStep, signum=int(signal.SIGUSR1), epoch=2, batches="[2,1]")]
    ended = finish(start_tasks(*command, run_dir=run_dir))
    assert [code for code, _ in ended] == [-signal.SIGKILL] * 2, ended  # killed by the requeue
    assert (tmp_path / "bin" / "requeued").read_text() == "requeue 7\n"
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
    assert (hpc["epoch"], hpc["global_step"]) == (2, 12)  # 5 steps per epoch: epoch 2 after its batches 0 and 1
    first, second = saves(run_dir)
    assert first == second and first[-1] == 12  # the epochs' checkpoints and the requeue's, on both ranks alike

    ended = finish(start_tasks(*command, run_dir=run_dir))
    assert [code for code, _ in ended] == [0, 0], ended
    assert "Restored all states from the checkpoint at " + str(run_dir / "hpc_ckpt_1.ckpt") in ended[0][1]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["data_parallel"]["environment"] == "SLURMEnvironment"
    assert record["metrics"] == reference["metrics"]


def test_sigterm_on_one_rank_stops_every_rank_at_one_checkpoint_and_one_rank_resumes_it(tmp_path):
    """SIGTERM inside epoch 2's step 1 of rank 1 only (a preemption reaching one task first): both
    ranks save last.ckpt at that step's end and stop with the one-line error; the run then resumes
    on one rank (a smaller allocation) and completes."""
    run_dir = tmp_path / "run"
    command = [*SAVED, *callback("term", SignalInStep, signum=int(signal.SIGTERM), epoch=2, batches="[-1,1]")]
    ended = finish(start_tasks(*command, run_dir=run_dir))
    for code, err in ended:
        assert code == 1, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM at step 12"), err[-3000:]
    first, second = saves(run_dir)
    assert first == second and first[-1] == 12
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "interrupted"
    assert record["checkpoints"]["resume"] == str(run_dir / "checkpoints" / "last.ckpt")

    ((code, err),) = finish(start_tasks(*command, run_dir=run_dir, world=1))
    assert code == 0, err[-3000:]
    assert "Restored all states from the checkpoint at " + str(run_dir / "checkpoints/last.ckpt") in err
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["data_parallel"]["world_size"] == 1
    # Epoch 2 had 2 of its 5 two-rank steps (4 of its 10 one-rank batches): the one rank trains the other
    # 6 (the loader's position is in examples, kd.data.base), then epoch 3's 10.
    assert (record["epochs"], record["global_step"]) == (4, 12 + 6 + 10)


def test_last_checkpoints_clock_is_rank_zeros_for_every_rank(tmp_path):
    """every_s=60 on a run of seconds: no last.ckpt before the final one, though rank 1's clock says
    one is due at every epoch's end (alone, it would wait in the save's barrier)."""
    run_dir = tmp_path / "run"
    ended = finish(
        start_tasks(
            *SAVED, *callback("clock", ClockAhead, rank=1), "callbacks.last_checkpoint.every_s=60", run_dir=run_dir
        )
    )
    assert [code for code, _ in ended] == [0, 0], ended
    first, second = saves(run_dir)
    assert first == second


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_one_line_error(tmp_path):
    run_dir = tmp_path / "run"
    ended = finish(start_tasks(*callback("nan", NonFiniteAt, epoch=1, batch=2, rank=1), run_dir=run_dir))
    for code, err in ended:
        assert code == 1, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("error: loss is nan at step 7"), err[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "failed" and "TrainingDiverged: loss is nan at step 7" in record["error"]


def test_a_requeue_signal_outside_training_is_deferred_to_the_next_training(tmp_path):
    """SIGUSR1 while the job waits on its run's lock (as on a teacher's) would have killed it: it is
    noted on stderr, and the training that follows checkpoints at its first step and requeues."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Lock(run_dir / ".run.lock"):
        (task,) = start_tasks(run_dir=run_dir, world=1)
        deadline = time.monotonic() + 60
        while not list(run_dir.glob("..run.lock.*")):  # a waiter's own file, beside the lock while it waits
            assert task.poll() is None and time.monotonic() < deadline, "the task did not reach the run's lock"
            time.sleep(0.1)
        task.send_signal(signal.SIGUSR1)
        time.sleep(1)  # handled while waiting, before the lock is released
    ((code, err),) = finish([task])
    assert code == -signal.SIGKILL, err[-3000:]  # by the requeue
    assert "[kd] SIGUSR1 (SLURM's requeue signal) outside training: deferred" in err
    assert (tmp_path / "bin" / "requeued").read_text() == "requeue 7\n"
    assert torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 1


class WaitInStep(L.Callback):
    """Holds rank ``rank`` inside the training step of batch ``batch`` of epoch ``epoch`` (writing
    ``paused`` in the run folder) until a signal has reached it, for at most a minute; the other rank
    goes on to wait for it at the step's end. Not in a resumed run."""

    def __init__(self, epoch: int, batch: int, rank: int):
        self.epoch, self.batch, self.rank = epoch, batch, rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        at = (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx, trainer.global_rank)
        if trainer.ckpt_path is None and at == (self.epoch, self.batch, self.rank):
            (Path(trainer.default_root_dir) / "paused").touch()
            deadline = time.monotonic() + 60
            while not callbacks._received and time.monotonic() < deadline:
                time.sleep(0.05)  # signal handlers run in between


@contextlib.contextmanager
def signalled_job(signame: str, slurm_env: dict, sweep: Path):
    """A two-task job on the live cluster, paused inside epoch 2's step 1 on rank 1 (rank 0 waits at
    that step's end), then sent ``scancel --signal=<signame>``: yields (the launcher, the run folder,
    the job id); the launcher and the job are ended afterwards, however the test went."""
    command = [*RANKED, "trainer.devices=2", *SAVED, *callback("wait", WaitInStep, epoch=2, batch=1, rank=1)]
    with open(sweep.parent / "launcher.log", "w") as log:
        launcher = launch(*command, sweep=sweep, root=sweep.parent, slurm_env=slurm_env, wait=False, stdout=log)
    try:
        run_dir = until(lambda: next(sweep.glob("*/paused"), None), 180, "paused run", sweep).parent
        (job,) = job_ids(sweep)
        subprocess.run(["scancel", f"--signal={signame}", job], env={**os.environ, **slurm_env}, check=True)
        yield launcher, run_dir, job
    finally:
        launcher.kill()
        cancel(sweep)


@pytest.mark.slurm
def test_through_srun_a_requeue_signal_checkpoints_both_ranks_at_one_step_and_the_job_resumes_exactly(
    slurm_env, reference, tmp_path
):
    """The same through the live cluster: ``scancel --signal=USR1`` reaches rank 1 inside epoch 2's
    step 1 and rank 0 waiting at that step's end; SLURM requeues the job once and it ends as the
    uninterrupted run does."""
    sweep = tmp_path / "sweep"
    with signalled_job("USR1", slurm_env, sweep) as (launcher, run_dir, job):
        until(lambda: squeue_state(job) == "PENDING", 60, "requeued job", sweep)
        hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
        assert (hpc["epoch"], hpc["global_step"]) == (2, 12)
        first, second = saves(run_dir)
        assert first == second and 12 in first, job_logs(sweep)  # both ranks saved it (and any later one) alike
        subprocess.run(
            ["scontrol", "update", f"JobId={job}", "StartTime=now"], env={**os.environ, **slurm_env}, check=True
        )
        launcher.wait(timeout=TIMEOUT_S * 2)
    assert launcher.returncode == 0, f"{(tmp_path / 'launcher.log').read_text()[-3000:]}\n{job_logs(sweep)}"
    logs = job_logs(sweep, tail=None)
    assert logs.count("Requeued SLURM job") == 1, logs
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed", record.get("error")
    assert record["metrics"] == reference["metrics"]


@pytest.mark.slurm
def test_through_srun_sigterm_stops_both_ranks_at_one_checkpoint(slurm_env, tmp_path):
    """``scancel --signal=TERM`` (a preemption's first signal) reaches rank 1 inside epoch 2's step 1
    and rank 0 waiting at that step's end: both save last.ckpt there and stop, nothing hangs."""
    sweep = tmp_path / "sweep"
    with signalled_job("TERM", slurm_env, sweep) as (_, run_dir, job):
        # Its tasks exit with status 1 and no result for submitit, which without sacct (the local
        # cluster) would wait on: the job leaving the queue is the end.
        until(lambda: not squeue_state(job), TIMEOUT_S, "end of the job", sweep)
    first, second = saves(run_dir)
    assert first == second and first[-1] == 12, job_logs(sweep)
    assert job_logs(sweep).count("error: stopped by SIGTERM at step 12") == 2  # one line from each rank
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "interrupted" and record["global_step"] == 12
