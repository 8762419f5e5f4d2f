"""Scale-out on CPU: a submitit multirun, DDP over two gloo processes, the SLURM launcher config
(with stand-ins for sbatch and srun; tests/test_slurm.py runs it on a live cluster), W&B groups and
tags, aggregation that lists failed and missing jobs, and Optuna searches."""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from kd import aggregate
from kd.errors import UserError
from kd.train import CONFIG_DIR, check_ddp_launch, optimized_value
from tests.conftest import TINY, cluster_down

REPO = Path(__file__).resolve().parent.parent
WITH_WANDB = [o for o in TINY if o != "logger=none"] + ["logger=wandb"]


def job_env(root: Path) -> dict:
    """Runs, teachers and W&B files (offline) under ``root``."""
    return {**os.environ, "KD_ROOT": str(root), "WANDB_DIR": str(root), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def kd_train(*args, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd.train", *args],
        cwd=REPO,
        env=job_env(root),
        capture_output=True,
        text=True,
        timeout=240,
    )


def wandb_runs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("offline-run-*"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two seeds through the submitit local launcher (one process per job), W&B offline."""
    root = tmp_path_factory.mktemp("sweep")
    result = kd_train(
        "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={root}/sweep", "seed=0,1", *WITH_WANDB, root=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sweep"


@pytest.mark.slow
def test_submitit_local_multirun_one_folder_and_one_finished_run_per_job(sweep):
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(jobs) == 2
    for job in jobs:
        record = json.loads((job / "results.json").read_text())
        assert record["status"] == "completed"
        (run,) = wandb_runs(job)
        data = next(run.glob("run-*.wandb")).read_bytes()  # group and tags as sent to W&B
        seed = record["config"]["seed"]
        assert b"train-sweep" in data and b"objective=ce" in data and f"seed={seed}".encode() in data
        assert "finishing run" in (run / "logs" / "debug.log").read_text()
    assert {json.loads((j / "results.json").read_text())["config"]["seed"] for j in jobs} == {0, 1}


@pytest.mark.slow
def test_aggregate_lists_failed_and_missing_jobs_and_keeps_the_rest(sweep, capsys, tmp_path):
    # A plain multirun into the same sweep: its first job fails in training, its second must still run.
    result = kd_train("-m", f"hydra.sweep.dir={sweep}", "seed=2", "optimizer.lr=1e38,0.003", *TINY, root=tmp_path)
    assert result.returncode != 0
    # A job killed before it wrote results.json: Hydra's .hydra folder only.
    started = next(sweep.glob("*/results.json")).parent
    shutil.copytree(started / ".hydra", sweep / "killed" / ".hydra")

    runs = aggregate.collect(sweep)
    assert sorted(runs.status) == ["completed"] * 3 + ["failed", "missing"]
    failed = runs[runs.status == "failed"].iloc[0]
    # One line naming what stopped it: TrainingDiverged (fused Adam writes inf) or RuntimeError (overflow).
    assert failed["optimizer.lr"] == 1e38 and re.match(r"(TrainingDiverged|RuntimeError): \S", failed["error"])
    assert runs[runs.status == "missing"].iloc[0]["seed"] in (0, 1)  # config read from .hydra/config.yaml
    assert set(runs.objective) == {"ce"}  # the config group choice, from .hydra/hydra.yaml

    assert aggregate.swept_keys(runs) == ["optimizer.lr", "logger"]  # the default --by: seed is not one
    table = aggregate.summarise(runs, ["optimizer.lr"])
    assert table.to_dict("list")["n"] == [3, 0] and table.to_dict("list")["incomplete"] == [1, 1]
    ok = runs[(runs.status == "completed")]["test/acc_last"]
    assert table["test/acc_last mean"].iloc[0] == pytest.approx(ok.mean())
    assert table["test/acc_last std"].iloc[0] == pytest.approx(ok.std())

    aggregate.main([str(sweep), "--by", "optimizer.lr", "--out", str(tmp_path / "t.csv")])
    markdown = (tmp_path / "t.md").read_text()
    assert capsys.readouterr().out == markdown
    assert "Incomplete jobs (2)" in markdown and "`killed` missing" in markdown and failed["error"] in markdown
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("optimizer.lr,n,incomplete,")
    with pytest.raises(SystemExit, match="no such config key"):
        aggregate.main([str(sweep), "--by", "nope"])


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_folder_one_record_one_run(tmp_path):
    result = kd_train(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "lr_scaling=linear",
        "data.batch_size=16",
        "optimizer.lr=0.01",
        *WITH_WANDB,
        root=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (record_path,) = tmp_path.rglob("results.json")
    (hydra_dir,) = tmp_path.rglob(".hydra")
    assert hydra_dir.parent == record_path.parent  # rank 1 ran in rank 0's folder, without its own .hydra
    assert (record_path.parent / "train_ddp_process_1.log").is_file()
    assert len(wandb_runs(tmp_path)) == 1
    record = json.loads(record_path.read_text())
    assert record["status"] == "completed"
    assert record["data_parallel"] == {
        "world_size": 2,
        "global_batch": 32,
        "device_batch": 16,
        "lr": pytest.approx(0.02),
        "environment": "LightningEnvironment",
    }


def test_slurm_launcher_config_resolves_from_the_trainer():
    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600",
        "hydra.launcher.array_parallelism=8",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmPopulationLauncher" and launcher.population_size == 1
    assert (launcher.partition, launcher.timeout_min, launcher.array_parallelism) == ("gpu", 600, 8)
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)  # one task per GPU
    # Before the time limit SLURM sends Lightning's requeue signal: it checkpoints and requeues the job.
    assert launcher.additional_parameters == {
        "signal": f"USR1@{launcher.signal_delay_s}",
        "requeue": True,
        "export": "ALL,SLURM_KILL_BAD_EXIT=1",
    }  # a failing rank ends the job


@pytest.mark.slow
def test_slurm_array_task_runs_ddp_over_its_srun_tasks(tmp_path):
    """The SLURM path without a cluster: stand-ins for sbatch / srun / sacct take the job array,
    then its first element is run the way srun would, as two tasks with SLURM's variables."""
    if cluster_down() is None:
        pytest.skip("a live SLURM cluster answers: tests/test_slurm.py runs this on it")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "sbatch": 'cp "${@: -1}" "$(dirname "$0")/submitted.sh"; echo "Submitted batch job 4242"',
        "srun": "exit 0",
        "sacct": "exit 0",
        "squeue": "exit 0",
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**job_env(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    sweep = tmp_path / "sweep"
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kd.train",
                "-m",
                "hydra/launcher=slurm",
                f"hydra.sweep.dir={sweep}",
                "hydra.launcher.partition=test",
                "hydra.launcher.array_parallelism=1",
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "seed=0,1",
                *WITH_WANDB,
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:  # the launcher would wait for the array to finish: stop it once the array is submitted
            for _ in range(600):
                if (sweep / ".submitit" / "4242_0" / "4242_0_submitted.pkl").is_file() or launcher.poll() is not None:
                    break
                time.sleep(0.2)
        finally:
            launcher.kill()
            launcher.wait()
    script = (bin_dir / "submitted.sh").read_text()
    for flag in (
        "--array=0-1%1",
        "--partition=test",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--signal=USR1@120",
        "--requeue",
    ):
        assert f"#SBATCH {flag}\n" in script, script
    assert "--gpus-per-node" not in script  # a CPU trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slurm = {
        "SLURM_JOB_ID": "4243",
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NODELIST": "localhost",
        "SLURM_JOB_NAME": "train",
        "SUBMITIT_EXECUTOR": "slurm",
        "MASTER_PORT": str(port),
    }
    logs = [tmp_path / f"task{rank}.log" for rank in range(2)]
    with contextlib.ExitStack() as files:
        tasks = [
            subprocess.Popen(
                [sys.executable, "-u", "-m", "submitit.core._submit", f"{sweep}/.submitit/%j"],
                cwd=REPO,
                env={**env, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                stdout=files.enter_context(log.open("w")),
                stderr=subprocess.STDOUT,
            )
            for rank, log in enumerate(logs)
        ]
        codes = [task.wait(timeout=240) for task in tasks]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    (record_path,) = sweep.rglob("results.json")  # array element 0 only: seed 0
    record = json.loads(record_path.read_text())
    assert record["status"] == "completed" and record["config"]["seed"] == 0
    assert record["data_parallel"]["world_size"] == 2
    assert len(wandb_runs(record_path.parent)) == 1


def search(root: Path, *overrides: str) -> tuple[list[dict], dict]:
    """An Optuna search (hparams_search=kd_optuna) of tiny runs distilling the oracle: the trials'
    records and the study's optimization_results.yaml."""
    result = kd_train(
        "hparams_search=kd_optuna", f"hydra.sweep.dir={root}/search", "teacher=oracle", *TINY, *overrides, root=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((root / "search").glob("*/results.json"))]
    return records, OmegaConf.to_container(OmegaConf.load(root / "search" / "optimization_results.yaml"))


def trial(record: dict) -> dict:
    return {f"objective.{k}": record["config"]["objective"][k] for k in ("temperature", "kd_weight")}


@pytest.mark.slow
def test_optuna_search_three_trials_maximise_the_validation_accuracy_each_run_returns(tmp_path):
    records, study = search(tmp_path, "hydra.sweeper.n_trials=3")
    assert len(records) == 3 and all(r["status"] == "completed" for r in records)
    assert len({tuple(trial(r).values()) for r in records}) == 3  # three different draws, inside the space
    assert all(
        1.0 <= t["objective.temperature"] <= 8.0 and 0.1 <= t["objective.kd_weight"] <= 0.99
        for t in map(trial, records)
    )
    (best,) = [r for r in records if trial(r) == study["best_params"]]
    assert study["best_value"] == best["metrics"]["val/acc_best"] == max(r["metrics"]["val/acc_best"] for r in records)


@pytest.mark.slow
def test_optuna_search_through_the_submitit_launcher_gets_each_jobs_value(tmp_path):
    """Two trials at once, each in its own process; minimising a metric no two trials share
    (train/loss) shows that the sweeper got each job's own value back."""
    records, study = search(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "optimized_metric=train/loss",
        "hydra.sweeper.direction=minimize",
    )
    assert len(records) == 2 and all(r["status"] == "completed" for r in records)
    (best,) = [r for r in records if trial(r) == study["best_params"]]
    assert study["best_value"] == best["metrics"]["train/loss"] == min(r["metrics"]["train/loss"] for r in records)
    assert len({r["metrics"]["train/loss"] for r in records}) == 2


def test_a_misnamed_optimized_metric_is_a_one_line_error_naming_the_metrics():
    with pytest.raises(
        UserError,
        match=r"^optimized_metric='val/accc' is not a metric of this run; choose one of: "
        r"train/loss, val/acc, val/acc_best$",
    ):
        optimized_value({"metrics": {"val/acc": 0.5, "val/acc_best": 0.6, "train/loss": 1.0}}, "val/accc")
    assert optimized_value({"metrics": {"val/acc_best": 0.6}}, "val/acc_best") == 0.6


def test_ddp_that_reruns_the_command_line_is_refused_outside_a_single_run():
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(UserError, match="python -m kd.train trainer=ddp"):
        check_ddp_launch(trainer)  # from Python (or a multirun) the children would re-run the driver


def test_run_jobs_in_parallel_workers_gives_the_same_records_and_isolates_a_failure(tmp_path):
    """What a figure driver's --jobs does: the same results as one job after another, in the order
    of the jobs, a failed job recorded with its error, and completed jobs skipped on a re-run."""
    from kd.runner import run_jobs

    jobs = {
        f"kd-s{s}": [*TINY, f"paths.root_dir={tmp_path}", "objective=kd", "teacher=oracle", f"seed={s}"] for s in (0, 1)
    }
    jobs["bad-s0"] = [*TINY, f"paths.root_dir={tmp_path}", "optimizer.lr=-1"]
    serial = run_jobs({k: v for k, v in jobs.items() if k != "bad-s0"}, tmp_path / "serial", population=False)
    parallel = run_jobs(jobs, tmp_path / "parallel", workers=2, population=False)
    assert list(parallel) == list(jobs)
    for name, record in serial.items():
        assert parallel[name]["metrics"] == record["metrics"]
    assert parallel["bad-s0"]["status"] == "failed" and "learning rate: -1" in parallel["bad-s0"]["error"]
    stamp = (tmp_path / "parallel" / "runs" / "kd-s0" / "results.json").stat().st_mtime_ns
    assert run_jobs(jobs, tmp_path / "parallel", workers=2, population=False)["kd-s1"]["status"] == "completed"
    assert (tmp_path / "parallel" / "runs" / "kd-s0" / "results.json").stat().st_mtime_ns == stamp


def test_run_jobs_interrupted_starts_no_more_jobs(tmp_path, monkeypatch):
    """Ctrl-C in a driver with workers: the jobs not yet started never start (a re-run does them)."""
    from tqdm import tqdm

    from kd import runner

    class Interrupted(tqdm):
        def update(self, n=1):
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "tqdm", Interrupted)
    jobs = {f"ce-s{s}": [*TINY, f"paths.root_dir={tmp_path}", f"seed={s}"] for s in range(10)}
    with pytest.raises(KeyboardInterrupt):
        runner.run_jobs(jobs, tmp_path, workers=2, population=False)
    # The first finished job, the one running beside it and the few already queued for the workers
    # (a ProcessPoolExecutor hands out up to workers + 1 at a time).
    assert 1 <= len(list((tmp_path / "runs").glob("*/results.json"))) <= 6


def test_packs_keep_the_sweeps_order_within_population_size_and_alone_what_cannot_share():
    from hydra_plugins.kd_launchers import packs
    from kd.runner import compose_config

    jobs = [[*TINY, f"objective={o}", f"seed={s}", "teacher=oracle"] for s in (0, 1) for o in ("ce", "kd")]
    jobs.insert(2, [*TINY, "model.hidden=[8]"])  # another network: another population
    jobs.append([*TINY, "compile=true"])  # trains alone
    configs = [compose_config(job) for job in jobs]
    assert packs(configs, 3) == [[0, 1, 3], [2], [4], [5]]
    assert packs(configs, 1) == [[i] for i in range(6)]


@pytest.mark.slow
def test_a_multirun_with_the_population_launcher_trains_its_jobs_as_populations(tmp_path):
    """Four jobs, packs of at most three: one population of three and one run alone, each job in its
    own sweep folder with Hydra's saved configs, its record and W&B run, and its value to the sweeper."""
    sweep = tmp_path / "sweep"
    result = kd_train(
        "-m",
        "hydra/launcher=population",
        "hydra.launcher.population_size=3",
        f"hydra.sweep.dir={sweep}",
        "objective=ce,kd",
        "seed=0,1",
        "teacher=oracle",
        "optimized_metric=val/acc_best",
        *WITH_WANDB,
        root=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    records = [json.loads((job / "results.json").read_text()) for job in jobs]
    assert sorted(r.get("population", {}).get("members", 1) for r in records) == [1, 3, 3, 3]
    for job, record in zip(jobs, records):
        assert record["status"] == "completed" and (job / ".hydra" / "config.yaml").is_file()
        assert len(wandb_runs(job)) == 1
    assert result.stdout.count("[kd] done:") == 4
