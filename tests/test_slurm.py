"""Sweeps on a live SLURM cluster (scripts/slurm_local.sh start: one node on this machine): the real
sbatch, srun and scontrol, hydra-submitit-launcher, and Lightning's SLURMEnvironment and requeue.

Skipped when no cluster answers; `.ci/run` starts one before the tests and stops it after."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from kd import aggregate
from kd.runner import compose_config
from kd.train import run
from tests.conftest import SLURM_CONF, TINY, cluster_down
from tests.test_cluster import sbatch_script
from tests.test_sweeps import REPO, WITH_WANDB, job_env, wandb_runs

pytestmark = pytest.mark.slurm
# What the one local node has room for: no GPU, 2 cores; short jobs.
# A CPU trainer asks for no GPU (tests/test_cluster.py): nothing to set for a cluster without any.
LOCAL = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", "threads=1"]
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def slurm_env():
    reason = cluster_down()
    if reason:
        pytest.skip(reason)
    return {"SLURM_CONF": SLURM_CONF}


def job_ids(sweep: Path) -> list[str]:
    """The jobs submitit submitted into ``sweep``: ``<id>``, or ``<array id>_<index>`` for an array's elements."""
    folders = {p.name for p in (sweep / ".submitit").glob("*") if p.name[0].isdigit()}
    return sorted(f for f in folders if f"{f}_0" not in folders)  # an array's own folder holds only its sbatch file


def job_logs(sweep: Path, tail: int | None = 1500) -> str:
    """Every job's stdout and stderr (by default their ends: what a failing test shows)."""
    logs = sorted((sweep / ".submitit").glob("*/*_log.*"))
    text = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-(tail or 0) :]}" for log in logs)
    return text or "(no job logs)"


def cancel(sweep: Path) -> None:
    """Leave no job of this test behind, whatever happened."""
    ids = {i.split("_")[0] for i in job_ids(sweep)}
    if ids:
        subprocess.run(["scancel", *ids], env={**os.environ, "SLURM_CONF": SLURM_CONF}, capture_output=True)


def launch(*overrides, sweep: Path, root: Path, slurm_env: dict, wait: bool = True, stdout=None):
    """``python -m kd.train -m`` with the SLURM launcher into ``sweep``: it submits, then waits for the jobs."""
    command = [sys.executable, "-m", "kd.train", "-m", *LOCAL, f"hydra.sweep.dir={sweep}", *overrides]
    env = {**job_env(root), **slurm_env}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)
    try:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        cancel(sweep)
        pytest.fail(f"the sweep did not finish in {LAUNCH_TIMEOUT_S} s\n{job_logs(sweep)}")


def until(condition, timeout: float, what: str, sweep: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    cancel(sweep)
    pytest.fail(f"no {what} after {timeout} s\n{job_logs(sweep)}")


def squeue_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"],
        env={**os.environ, "SLURM_CONF": SLURM_CONF},
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def sweep(slurm_env, tmp_path_factory):
    """objective=kd,kd_pt x seed=0,1 in populations of two: one job array of two elements through the
    scheduler, each training two members, W&B offline."""
    root = tmp_path_factory.mktemp("slurm")
    sweep = root / "sweep"
    result = launch(
        "objective=kd,kd_pt",
        "teacher=oracle",
        "seed=0,1",
        "hydra.launcher.population_size=2",
        *WITH_WANDB,
        sweep=sweep,
        root=root,
        slurm_env=slurm_env,
    )
    cancel(sweep)
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{job_logs(sweep)}"
    return sweep


def test_a_sweep_is_one_job_array_of_populations_with_a_record_and_a_wandb_run_per_job_grouped_by_the_sweep(
    sweep, capsys
):
    (array,) = {job.split("_")[0] for job in job_ids(sweep)}
    assert len(job_ids(sweep)) == 2, job_ids(sweep)  # one array, two elements of two jobs each
    script = (sweep / ".submitit" / array / f"{array}_submission.sh").read_text()
    for flag in (
        "--array=0-1%2",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--time=10",
        "--signal=USR1@120",
        "--requeue",
        "--export=ALL,SLURM_KILL_BAD_EXIT=1",
    ):
        assert f"#SBATCH {flag}\n" in script, script
    assert "--gpus-per-node" not in script and "--gres" not in script  # a CPU trainer on a cluster without GPUs
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(jobs) == 4, job_logs(sweep)
    for job in jobs:
        record = json.loads((job / "results.json").read_text())
        assert record["status"] == "completed", record.get("error")
        assert record["data_parallel"]["environment"] == "SLURMEnvironment"
        assert record["population"]["members"] == 2
        (wandb_run,) = wandb_runs(job)
        assert b"train-sweep" in next(wandb_run.glob("run-*.wandb")).read_bytes()  # the group: task and sweep folder

    aggregate.main([str(sweep), "--by", "objective"])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(("| kd ", "| kd_pt "))]
    assert len(rows) == 2 and all(line.endswith("| 2 | 0 |") for line in rows), table  # n=2, incomplete=0 each


def test_a_failing_job_leaves_the_others_and_aggregate_names_it_with_its_error(sweep, slurm_env, capsys):
    """One more point of the same sweep, with a bad config: its job fails before training."""
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    result = launch(
        "objective=kd",
        "teacher=oracle",
        "seed=0",
        "optimizer.lr=-1",
        *TINY,
        sweep=sweep,
        root=sweep.parent,
        slurm_env=slurm_env,
    )
    cancel(sweep)
    assert result.returncode == 1, f"{result.stderr[-3000:]}\n{job_logs(sweep)}"
    assert result.stderr.strip().splitlines()[-1].startswith("error: optimizer (torch.optim.Adam) rejects its config")
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the first four jobs' records untouched

    runs = aggregate.collect(sweep)
    assert sorted(runs.status) == ["completed"] * 4 + ["failed"], job_logs(sweep)
    failed = runs[runs.status == "failed"].iloc[0]
    assert failed["optimizer.lr"] == -1 and failed["error"] == (
        "UserError: optimizer (torch.optim.Adam) rejects its config: Invalid learning rate: -1"
    )
    aggregate.main([str(sweep), "--by", "objective,optimizer.lr"])
    assert f"`{failed['dir']}` failed: {failed['error']}" in capsys.readouterr().out


def test_a_two_task_job_runs_ddp_over_srun_with_lightnings_slurm_environment(slurm_env, tmp_path):
    sweep = tmp_path / "sweep"
    result = launch(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=16",
        *WITH_WANDB,
        sweep=sweep,
        root=tmp_path,
        slurm_env=slurm_env,
    )
    cancel(sweep)
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{job_logs(sweep)}"
    (job,) = job_ids(sweep)
    assert {p.name for p in (sweep / ".submitit" / job).glob("*_log.out")} == {f"{job}_0_log.out", f"{job}_1_log.out"}
    (record_path,) = sweep.rglob("results.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "completed", record.get("error")
    assert record["data_parallel"] == {
        "world_size": 2,
        "global_batch": 32,
        "device_batch": 16,
        "lr": pytest.approx(0.003),
        "environment": "SLURMEnvironment",
    }
    assert len(wandb_runs(record_path.parent)) == 1  # rank 0's only


def test_a_rank_that_fails_ends_its_jobs_other_ranks_at_once(slurm_env, tmp_path):
    """The launcher's script for a two-task job (tests/test_cluster.py renders it), submitted with a
    command whose task 1 fails at once while task 0 would run a minute (a rank waiting in a collective)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    command = "bash -c 'if [ $SLURM_PROCID = 1 ]; then exit 3; fi; sleep 60; echo survived'"
    script = tmp_path / "job.sh"
    script.write_text(
        sbatch_script(
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "hydra.launcher.cpus_per_task=1",
            f"hydra.launcher.submitit_folder={logs}",
            sweep=tmp_path,
            command=command,
        )
    )
    env = {**os.environ, **slurm_env}
    array = subprocess.run(
        ["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        until(
            lambda: not squeue_state(array),
            45,
            f"end of job array {array} (a task waited for the failed one)",
            tmp_path,
        )
    finally:
        subprocess.run(["scancel", array], env=env, capture_output=True)
    errors = sorted(logs.glob("*_0_log.err"))  # srun's messages, one file per array element
    assert len(errors) == 2, sorted(logs.iterdir())
    for log in errors:
        text = log.read_text()
        assert "task 1: Exited with exit code 3" in text and "task 0: Terminated" in text, text


class PauseAt(L.Callback):
    """Holds a run that was not resumed at the end of batch ``batch`` of epoch ``epoch`` (writing
    ``paused`` in its folder) until SIGTERM reaches it, for at most a minute: where a test preempts it."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.ckpt_path is None and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            (Path(trainer.default_root_dir) / "paused").touch()
            deadline = time.monotonic() + 60
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.05)  # signal handlers run in between


# Four epochs of five batches, dropout: a resume must restore the data position and the random state.
PREEMPTED = [
    *TINY,
    "trainer.max_epochs=4",
    "data.batch_size=8",
    "model.dropout=0.2",
    "deterministic=true",
    "callbacks.last_checkpoint.every_s=0",
    "threads=1",
]


def test_a_requeue_signal_checkpoints_mid_epoch_and_the_requeued_job_resumes_exactly(slurm_env, tmp_path):
    """SIGUSR1, as SLURM sends it before the time limit: Lightning saves hpc_ckpt_1.ckpt and runs
    `scontrol requeue`; the job restarts in the same folder and W&B run and ends as an
    uninterrupted run does."""
    reference = run(compose_config(PREEMPTED, tmp_path / "reference"))
    sweep = tmp_path / "sweep"
    pause = [
        "+callbacks.pause._target_=tests.test_slurm.PauseAt",
        "+callbacks.pause.epoch=2",
        "+callbacks.pause.batch=1",
    ]
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = launch(
            *PREEMPTED, *pause, "logger=wandb", sweep=sweep, root=tmp_path, slurm_env=slurm_env, wait=False, stdout=log
        )
    try:
        paused = until(lambda: next(sweep.glob("*/paused"), None), 120, "paused run", sweep)
        run_dir = paused.parent
        (job,) = job_ids(sweep)
        subprocess.run(["scancel", "--signal=USR1", job], env={**os.environ, **slurm_env}, check=True)
        until(lambda: squeue_state(job) == "PENDING", 60, "requeued job", sweep)
        interrupted = json.loads((run_dir / "results.json").read_text())
        assert interrupted["status"] == "interrupted" and "stopped by SIGTERM at step 12" in interrupted["error"]
        hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
        assert (hpc["epoch"], hpc["global_step"]) == (2, 12)  # mid-epoch: epoch 2 after its batches 0 and 1
        # A requeued job waits two minutes (SLURM's BeginTime); start it now.
        subprocess.run(
            ["scontrol", "update", f"JobId={job}", "StartTime=now"], env={**os.environ, **slurm_env}, check=True
        )
        launcher.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        launcher.kill()
        cancel(sweep)
    assert launcher.returncode == 0, f"{(tmp_path / 'launcher.log').read_text()[-3000:]}\n{job_logs(sweep)}"
    logs = job_logs(sweep, tail=None)
    assert "Handling auto-requeue signal" in logs and "Requeued SLURM job" in logs, logs  # Lightning's requeue
    assert "Restored all states from the checkpoint at" in logs, logs
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed", record.get("error")
    assert record["metrics"] == reference["metrics"]
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # superseded by the final last.ckpt
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-([^-]+)(-\d+)?", p.name)[1] for p in wandb_runs(run_dir)}
    assert len(wandb_runs(run_dir)) == 2 and len(ids) == 1  # one W&B run, continued by the requeued job
