"""Nothing silently wrong on a re-run: a run folder is reused only for the run that made it, the
teacher cache is keyed by what defines a teacher, a checkpoint teacher is checked against the data
it was trained on, every driver writes under paths.root_dir ($KD_ROOT), the cache's lock works
without flock, and a driver's workers each get a GPU of their own. Every run is tiny and on CPU."""

import errno
import fcntl
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd import diagnose, results, runner
from kd.errors import UserError
from kd.runner import compose_config, run_jobs
from kd.teachers import teacher_config
from kd.train import run
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent


def test_a_finished_run_of_other_settings_is_refused_not_reported(tmp_path):
    """The issue's case: the same job name with an extra override, in the same runs folder."""
    job = {"ce-s0": [*TINY, f"paths.root_dir={tmp_path}"]}
    first = run_jobs(job, tmp_path / "runs", population=False)["ce-s0"]
    with pytest.raises(
        UserError,
        match=r"^job ce-s0: .*ce-s0 holds a finished run of other settings "
        r"\(.*trainer.max_epochs: 2 there, 1 now\); it is not reused",
    ):
        run_jobs({"ce-s0": [*job["ce-s0"], "trainer.max_epochs=1"]}, tmp_path / "runs", population=False)
    # Paths, logging, devices and where the data lie define nothing: the finished run stands for the job.
    moved = run_jobs(
        {"ce-s0": [*TINY, f"paths.root_dir={tmp_path}/elsewhere", "trainer.log_every_n_steps=1", "trainer.devices=2"]},
        tmp_path / "runs",
        population=False,
    )["ce-s0"]
    assert moved == first


def test_an_option_an_objective_declared_since_a_run_reads_as_its_default_there(tmp_path):
    """fig3's KD-pt runs, made before kd_pt took true_class_power, are KD-pt at its default (1), not at 4."""
    made = {"objective": {"name": "kd_pt", "temperature": 4.0}, "seed": 0}
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "config": made}))
    asked = {**made, "objective": {**made["objective"], "true_class_power": 1.0}}
    results.check_same_run(tmp_path, asked)
    for changed, shown in (("true_class_power", "'<absent>' there, 4.0 now"), ("temperature", "4.0 there, 2.0 now")):
        other = {**asked, "objective": {**asked["objective"], changed: 4.0 if changed != "temperature" else 2.0}}
        with pytest.raises(UserError, match=rf"\(objective.{changed}: {shown}\)"):
            results.check_same_run(tmp_path, other)


def test_a_driver_stops_in_one_line_and_writes_under_kd_root(tmp_path, monkeypatch):
    """fig3 with KD_ROOT set writes its runs and results there, not in the current folder; the same
    command with an extra override stops before any work, naming the key."""
    from experiments import fig3

    monkeypatch.setenv("KD_ROOT", str(tmp_path / "root"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    flags = ["--seeds", "0", "--deltas", "0.5", "--methods", "ce", "--quick", "--no-wandb", "--jobs", "1"]
    tiny = ["--", "data.test_per_class=20", "data.train_per_class=5"]
    fig3.main([*flags, *tiny])
    assert (tmp_path / "root" / "logs" / "fig3" / "runs" / "ce-delta0.5-s0" / "results.json").is_file()
    assert (tmp_path / "root" / "results" / "fig3" / "fig3.csv").is_file()
    assert not list((tmp_path / "cwd").iterdir())
    with pytest.raises(SystemExit, match=r"^error: job ce-delta0.5-s0: .* \(.*trainer.max_epochs: 3 there, 2 now\)"):
        fig3.main([*flags, "--out", str(tmp_path / "B"), *tiny, "trainer.max_epochs=2"])
    assert not (tmp_path / "B").exists()


def test_kd_train_refuses_to_resume_or_retest_a_run_of_other_settings(tmp_path):
    run(compose_config(TINY, tmp_path / "run"))
    with pytest.raises(
        UserError,
        match=r"holds a finished run of other settings \(optimizer.lr: 0.003 there, "
        r"0.01 now\)",
    ):
        run(compose_config([*TINY, "optimizer.lr=0.01"], tmp_path / "run"))


def test_teacher_cache_is_keyed_by_the_data_not_where_they_lie(tmp_path):
    def teacher(*overrides):
        cfg = compose_config(["experiment=fig3_fashion_mnist", *overrides], tmp_path / "run")
        return Path(teacher_config(cfg).paths.output_dir).name

    staged = teacher()
    assert teacher("paths.data_dir=/scratch/job7/data") == staged
    assert teacher("data.root=/scratch/job8/fashion_mnist") == staged
    assert teacher("teacher.trainer.max_epochs=1") != staged


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A teacher trained on synthetic data at delta 2, seed 5: its checkpoint and run record."""
    root = tmp_path_factory.mktemp("teacher")
    record = run(compose_config([*TINY, "data.delta=2.0", "seed=5", f"paths.root_dir={root}"], root / "teacher"))
    return Path(record["checkpoints"]["last"]), record


def test_kd_diagnose_uses_the_data_a_checkpoint_teacher_was_trained_on(tiny_teacher, tmp_path, monkeypatch, capsys):
    ckpt, record = tiny_teacher
    monkeypatch.setenv("KD_ROOT", str(tmp_path))
    found = diagnose.main(["teacher=checkpoint", f"teacher.path={ckpt}"])
    out = capsys.readouterr().out
    assert f"[kd] data: the teacher's own, from {ckpt.parent.parent / 'results.json'}" in out
    assert found["acc"] == pytest.approx(record["metrics"]["test/acc_last"])
    # Data overrides that agree with the record where it matters (not in the split sizes) are used.
    told = diagnose.main(
        ["teacher=checkpoint", f"teacher.path={ckpt}", *TINY, "data.delta=2.0", "seed=5", "data.train_per_class=3"]
    )
    assert told["acc"] == found["acc"]
    with pytest.raises(
        SystemExit,
        match=r"^error: teacher checkpoint .* was trained on other data \(data.delta=2.0, "
        r"not 0.5, data.seed=5, not 0\); give the data overrides of its run, or "
        r"teacher.data_check=false",
    ):
        diagnose.main(["teacher=checkpoint", f"teacher.path={ckpt}", *TINY])
    assert diagnose.main(["teacher=checkpoint", f"teacher.path={ckpt}", *TINY, "teacher.data_check=false"])


def test_a_student_with_a_checkpoint_teacher_of_other_data_is_refused(tiny_teacher, tmp_path):
    ckpt, _ = tiny_teacher
    student = [*TINY, "objective=kd", "teacher=checkpoint", f"teacher.path={ckpt}", "data.delta=2.0"]
    with pytest.raises(UserError, match=r"was trained on other data \(data.seed=5, not 0\)"):
        run(compose_config(student, tmp_path / "s0"))
    assert run(compose_config([*student, "seed=5"], tmp_path / "s5"))["status"] == "completed"


def _hold(path: str, seconds: float) -> None:
    with results.lock(path):
        Path(path + ".held").write_text(str(os.getpid()))
        time.sleep(seconds)


def _count(path: str, rounds: int) -> None:
    """Read-modify-write a counter under the lock: any two writers at once lose an increment."""
    for _ in range(rounds):
        with results.lock(path + ".lock"):
            value = int(Path(path).read_text())
            time.sleep(0.001)
            Path(path).write_text(str(value + 1))


def test_the_lock_works_where_flock_fails_with_enosys(tmp_path, monkeypatch):
    """A file system mounted without locks: flock raises ENOSYS. Writers still take turns."""

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")  # the children keep the patched flock
    writers = [ctx.Process(target=_count, args=(str(counter), 30)) for _ in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert counter.read_text() == "90"
    assert not (tmp_path / "counter.lock").exists()  # released


def test_the_lock_waits_for_its_holder_and_takes_over_from_a_dead_one(tmp_path, monkeypatch):
    path = str(tmp_path / ".lock")
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(path, 1.5))
    holder.start()
    while not Path(path + ".held").exists():
        time.sleep(0.05)
    start = time.monotonic()
    with results.lock(path):
        assert time.monotonic() - start > 0.5  # waited for the holder
    holder.join(timeout=10)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    Path(path).write_text(f"{socket.gethostname()} {dead.stdout.strip()} x\n")  # killed while holding it
    with results.lock(path):
        pass
    Path(path).write_text("")  # an earlier version's flock file
    with results.lock(path):
        pass
    monkeypatch.setattr(results, "STALE_S", 0.5)  # another node's owner, its heartbeat stopped
    Path(path).write_text("other-node 1 x\n")
    start = time.monotonic()
    with results.lock(path):
        assert time.monotonic() - start >= 0.5


def _visible_device(_):
    time.sleep(0.5)  # every worker gets a task
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_driver_workers_each_get_their_own_gpu(monkeypatch):
    """--jobs 2 on a machine with two GPUs: each worker sees one, not both starting on cuda:0."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with runner.executor(2, multiprocessing.get_context("spawn"), runner._reports_address()) as pool:
        seen = dict(pool.map(_visible_device, range(4)))
    assert len(seen) == 2 and set(seen.values()) == {"0", "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # SLURM's grant: the workers share out these
    assert runner.gpus() == ["4", "6"]
