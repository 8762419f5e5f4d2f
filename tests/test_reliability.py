"""Faults and resume: broken teacher checkpoints and data, divergence, SIGTERM and SIGKILL, runs
that share a folder, concurrent writers. Every run is tiny and on CPU."""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from kd.errors import TrainingDiverged, UserError
from kd.results import write_json_atomic, write_text_atomic
from kd.runner import compose_config
from kd.teachers import load_checkpoint
from kd.train import main, run
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
# Enough epochs to stop in the middle; dropout so that a resume must restore the random state too.
LONG = [
    *TINY,
    "trainer.max_epochs=4",
    "data.batch_size=8",
    "model.dropout=0.2",
    "deterministic=true",
    "callbacks.last_checkpoint.every_s=0",
]  # last.ckpt after every epoch


class SignalAt(L.Callback):
    """Sends ``signum`` to this process after batch ``batch`` of epoch ``epoch``, unless the run was
    resumed from a checkpoint: the relaunched command is the same and must not be stopped again."""

    def __init__(self, signum: int, epoch: int, batch: int = 0):
        self.signum, self.epoch, self.batch = signum, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.ckpt_path is None and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)


class SignalInStepAt(SignalAt):
    """Like ``SignalAt``, but inside the training step, between its backward pass and the weight update."""

    def on_train_batch_end(self, *args):
        pass

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_train_batch_end(trainer, pl_module, None, None, trainer.fit_loop.epoch_loop.batch_idx)


class PoisonAt(L.Callback):
    """Makes one weight NaN after batch ``batch`` of epoch ``epoch``: a run that diverges there."""

    def __init__(self, epoch: int, batch: int = 0):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("nan")


def callback(name: str, cls, **kwargs) -> list[str]:
    """Overrides that add a callback of this module to a run, as a user would add their own."""
    return [
        f"+callbacks.{name}._target_=tests.test_reliability.{cls.__name__}",
        *(f"+callbacks.{name}.{k}={v}" for k, v in kwargs.items()),
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed run must match exactly."""
    return run(compose_config(LONG, tmp_path_factory.mktemp("reference")))


def test_same_seed_same_metrics(reference, tmp_path):
    assert run(compose_config(LONG, tmp_path))["metrics"] == reference["metrics"]


def test_sigterm_stops_at_a_checkpoint_and_the_same_run_resumes_identically(reference, root):
    cfg = compose_config(
        [*LONG, "logger=wandb", *callback("stop", SignalAt, signum=int(signal.SIGTERM), epoch=2, batch=1)], root / "run"
    )
    with pytest.raises(
        SystemExit,
        match=r"error: stopped by SIGTERM at step \d+; run the same command again to "
        r"resume from .*last.ckpt",
    ) as stopped:
        run(cfg)
    assert stopped.value.code != 0  # a message, so exit status 1, not Lightning's bare exit 0
    record = json.loads((root / "run" / "results.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
    assert record["epochs"] == 2 and "val/acc" in record["metrics"]  # how far it got
    # Saved at the end of the batch it stopped after (epoch 2, batch 1 of 5 per epoch), where it goes on from.
    ckpt = torch.load(record["checkpoints"]["resume"], weights_only=False)
    assert (ckpt["epoch"], ckpt["global_step"]) == (2, 12)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 2, "taken": 16}]  # 2 batches of 8

    resumed = run(cfg)
    assert resumed["status"] == "completed"
    assert resumed["metrics"] == reference["metrics"]
    # One W&B run, continued: the id comes from the run folder. (W&B names a folder
    # offline-run-<date>_<time>-<id>, adding "-1" when both runs start within the same second.)
    ids = {
        re.fullmatch(r"offline-run-\d{8}_\d{6}-([^-]+)(-\d+)?", p.name)[1]
        for p in (root / "run" / "wandb").glob("offline-run-*")
    }
    assert len(list((root / "run" / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1


def test_slurm_requeue_signal_in_a_step_checkpoints_at_its_end_and_the_requeued_job_resumes_identically(
    reference, root
):
    """SLURM's SIGUSR1 lands inside a training step: Lightning's hpc_ckpt_1.ckpt is written when the
    step ends, and the requeued job (the same command) goes on from it, mid-epoch, exactly."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    # Stands in for the requeue: SLURM kills the job (KillWait later with SIGKILL, here at once).
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/requeued"\nkill -KILL $PPID\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "kd",
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{bin_dir}:/usr/bin:/bin",
    }
    command = [*LONG, *callback("usr1", SignalInStepAt, signum=int(signal.SIGUSR1), epoch=2, batch=1)]
    killed = _cli(*command, root=root, env=slurm)
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err[-2000:]
    assert (bin_dir / "requeued").read_text() == "requeue 7\n"
    (run_dir,) = (root / "logs" / "train" / "runs").iterdir()
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)  # removed once the run completes
    assert (hpc["epoch"], hpc["global_step"]) == (2, 12)  # after the step the signal landed in, 5 steps per epoch
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10  # epoch 1's end

    again = _cli(*command, root=root, env=slurm)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-2000:]
    assert "Restored all states from the checkpoint at " + str(run_dir / "hpc_ckpt_1.ckpt") in err
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["data_parallel"]["environment"] == "SLURMEnvironment"
    assert record["metrics"] == reference["metrics"]
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # superseded by the final last.ckpt


def _cli(*overrides, root, env=None, **kwargs):
    env = {"KD_ROOT": str(root), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "kd.train", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sigkill_then_the_same_command_resumes_identically(reference, root):
    command = [*LONG, *callback("kill", SignalAt, signum=int(signal.SIGKILL), epoch=2, batch=1)]
    killed = _cli(*command, root=root)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = (root / "logs" / "train" / "runs").iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert not (run_dir / "results.json").exists()

    again = _cli(*command, root=root)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-2000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed"
    assert record["metrics"] == reference["metrics"]


def test_two_processes_given_the_same_run_take_turns(reference, root):
    """Launched twice at once, the run is trained once; the second waits, then re-tests it."""
    procs = [_cli(*LONG, root=root) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    (run_dir,) = (root / "logs" / "train" / "runs").iterdir()
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["metrics"] == reference["metrics"]
    for ckpt in (run_dir / "checkpoints").iterdir():  # 4 epochs (the final last.ckpt counts them all)
        assert torch.load(ckpt, weights_only=True)["epoch"] <= 4


@pytest.mark.parametrize(
    "epoch, batch, last_good_epoch",
    [
        (2, 0, 1),  # the loss turns NaN in epoch 2: the checkpoint of epoch 1 stays
        (1, 4, 0),  # NaN weights at the end of epoch 1: they are never saved, epoch 0's checkpoint stays
    ],
)
def test_divergence_keeps_the_last_good_checkpoint_and_the_results_so_far(root, epoch, batch, last_good_epoch):
    cfg = compose_config([*LONG, *callback("nan", PoisonAt, epoch=epoch, batch=batch)], root / "run")
    with pytest.raises(TrainingDiverged, match=r"at step \d+ \(epoch \d\).*; the last good checkpoint is .*last.ckpt"):
        run(cfg)
    record = json.loads((root / "run" / "results.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("TrainingDiverged: ")
    assert 0 <= record["metrics"]["val/acc"] <= 1  # the epochs before it
    ckpt = torch.load(record["checkpoints"]["last"], weights_only=True)
    assert ckpt["epoch"] == last_good_epoch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_divergence_on_the_command_line_is_one_line(root, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kd.train", *LONG, "optimizer=sgd", "optimizer.lr=1e10"])
    with pytest.raises(
        SystemExit,
        match=r"^error: loss is nan at step \d+ \(epoch 0\); lower the learning rate "
        r"or check the data; the last good checkpoint is the start \(no checkpoint "
        r"yet\)$",
    ):
        main()


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return Path(run(compose_config(TINY, tmp_path_factory.mktemp("teacher")))["checkpoints"]["last"])


def test_teacher_checkpoint_missing(tmp_path):
    with pytest.raises(UserError, match="does not exist; give teacher.path of a finished run's checkpoints"):
        load_checkpoint(tmp_path / "nope.ckpt", 4, (8,))


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_teacher_checkpoint_unreadable(teacher_ckpt, tmp_path, damage):
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        bad.write_bytes(teacher_ckpt.read_bytes()[: teacher_ckpt.stat().st_size // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="is unreadable or not a kd run checkpoint .*; delete it and train the teacher"):
        load_checkpoint(bad, 4, (8,))


def test_teacher_checkpoint_for_other_data(teacher_ckpt):
    with pytest.raises(UserError, match="predicts 4 classes but the data has 6; use a teacher trained on this data"):
        load_checkpoint(teacher_ckpt, 6, (8,))
    with pytest.raises(UserError, match=r"takes inputs of shape \[8\] but the data gives \[16\]"):
        load_checkpoint(teacher_ckpt, 4, (16,))


def test_data_missing_or_corrupt(tmp_path):
    from kd.data.cifar import CIFARDataModule

    with pytest.raises(UserError, match="cifar10 not found or corrupted in .*; fetch it with `make data DATA=cifar10`"):
        CIFARDataModule(name="cifar10", root=str(tmp_path)).setup()
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (batches / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not found or corrupted"):
        CIFARDataModule(name="cifar10", root=str(tmp_path)).setup()


def _hammer(path: str, worker: int, rounds: int) -> None:
    for i in range(rounds):
        write_json_atomic(path, {"worker": worker, "round": i, "rows": [worker] * 20000})
        write_text_atomic(Path(path).with_suffix(".csv"), "\n".join([f"{worker},{i}"] * 20000))


def test_concurrent_writers_corrupt_nothing(tmp_path):
    """Two processes rewrite the same results.json and table while this one reads them."""
    path = tmp_path / "results.json"
    write_json_atomic(path, {"worker": -1, "round": 0, "rows": []})
    write_text_atomic(path.with_suffix(".csv"), "-1,0")
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_hammer, args=(str(path), w, 60)) for w in range(2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads == 0:
        record = json.loads(path.read_text())  # never half a file
        assert record["rows"] == [record["worker"]] * len(record["rows"])
        rows = set(path.with_suffix(".csv").read_text().splitlines())
        assert len(rows) == 1
        reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]  # no temporary files left
