"""End to end on synthetic data: teacher -> student, the run record, W&B offline, bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from kd.objectives import REGISTRY
from kd.runner import compose_config
from kd.train import run
from tests.conftest import TINY, TINY_TEACHER

REPO = Path(__file__).resolve().parent.parent


def test_teacher_then_student_end_to_end(root, capsys):
    record = run(compose_config([*TINY, *TINY_TEACHER, "objective=kd_pt_sim"], root / "student"))
    assert record["status"] == "completed"
    # The teacher, trained outside any progress bar, said how far it was and how long it had left.
    assert re.search(r"\[kd\] 1 teacher \(mlp-ce-\w+\): epoch (\d+)/\1, about 0\.0 min left", capsys.readouterr().out)
    saved = json.loads((root / "student" / "results.json").read_text())
    for key in ("test/acc_last", "test/acc_best", "val/acc_best", "test/agreement_last", "test/ece_last"):
        assert 0.0 <= saved["metrics"][key] <= 1.0
    assert saved["config"]["objective"]["name"] == "kd_pt_sim"
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0] or saved["versions"]["torch"]
    assert saved["hardware"]["cpus"] >= 1

    # The teacher was trained once, into the cache, by the same entry point.
    (teacher_dir,) = (root / "teachers").iterdir()
    teacher_record = json.loads((teacher_dir / "results.json").read_text())
    assert teacher_record["config"]["objective"]["name"] == "ce"
    assert teacher_record["config"]["data"]["train_per_class"] == 30

    # The student's checkpoint holds no teacher weights.
    ckpt = torch.load(saved["checkpoints"]["last"], map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("net.") for k in ckpt["state_dict"])

    # A second student asking for the same teacher reuses it.
    stamp = (teacher_dir / "results.json").stat().st_mtime_ns
    run(compose_config([*TINY, *TINY_TEACHER, "objective=kd"], root / "student2"))
    assert (teacher_dir / "results.json").stat().st_mtime_ns == stamp
    assert len(list((root / "teachers").iterdir())) == 1


def test_teacher_from_checkpoint_and_class_count_check(root):
    teacher = run(compose_config([*TINY], root / "teacher"))
    ckpt = teacher["checkpoints"]["best"]
    student = run(compose_config([*TINY, "objective=kd", "teacher=checkpoint", f"teacher.path={ckpt}"], root / "s"))
    assert student["metrics"]["test/agreement_last"] > 0
    from kd.errors import UserError

    other = [*TINY, "data.subclasses=3", "objective=kd", "teacher=checkpoint", f"teacher.path={ckpt}"]
    with pytest.raises(UserError, match=r"was trained on other data \(data.subclasses=2, not 3\)"):
        run(compose_config(other, root / "s2"))
    with pytest.raises(UserError, match="predicts 4 classes but the data has 6"):
        run(compose_config([*other, "teacher.data_check=false"], root / "s2"))


@pytest.mark.parametrize(
    "callbacks, last_writes",
    [
        (["callbacks.last_checkpoint.every_s=0"], 4),  # after each of the 3 epochs, and at the end
        (["callbacks.last_checkpoint.every_s=3600"], 1),  # only at the end
        (["callbacks=none"], 1),  # only at the end, and none of Lightning's default checkpoints
    ],
)
def test_a_run_always_ends_with_its_final_checkpoint(root, monkeypatch, callbacks, last_writes):
    """``last.ckpt`` holds the final weights whatever the checkpoint schedule (a teacher trained with
    any callbacks can be loaded); between epochs it is written every ``every_s`` seconds at most."""
    writes = []
    save = L.Trainer.save_checkpoint
    monkeypatch.setattr(
        L.Trainer,
        "save_checkpoint",
        lambda self, path, *a, **k: (writes.append(Path(path).name), save(self, path, *a, **k))[1],
    )
    record = run(compose_config([*TINY, "trainer.max_epochs=3", *callbacks], root / "run"))
    assert writes.count("last.ckpt") == last_writes
    assert torch.load(record["checkpoints"]["last"], weights_only=True)["global_step"] == record["global_step"]
    # The best epoch's weights, kept by the module whatever the callbacks, written once at the end.
    best = {p.name for p in (root / "run" / "checkpoints").iterdir()} - {"last.ckpt"}
    assert best == {Path(record["checkpoints"]["best"]).name} and writes.count(best.pop()) == 0


def test_oracle_teacher_is_the_bayes_posterior(root):
    record = run(compose_config([*TINY, "objective=kd", "teacher=oracle"], root / "s"))
    assert record["status"] == "completed"


def test_wandb_offline_run_directory_appears(root):
    cfg = compose_config([*TINY, "logger=wandb"], root / "run")
    run(cfg)
    runs = list((root / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((root / "run").iterdir())


def _cli(*overrides, root):
    env = {"KD_ROOT": str(root), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "kd.train", *TINY, *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_trains_and_reports(root):
    result = _cli("seed=3", root=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test/acc_last=" in result.stdout
    (run_dir,) = (root / "logs" / "train" / "runs").iterdir()  # named by the overrides (shortened)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.name=foo", f"error: objective='foo' is not valid; choose one of: {', '.join(REGISTRY)}"),
        ("objective=kd objective.temperature=0", "error: objective.temperature=0 is out of range; allowed: (0, inf)"),
        ("objective=kd objective.kd_weight=2", "error: objective.kd_weight=2 is out of range; allowed: [0, 1]"),
        ("objective=kd", "error: objective=kd distils from a teacher but teacher=none"),
    ],
)
def test_cli_bad_input_is_one_line(root, override, message):
    result = _cli(*override.split(), root=root)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message), result.stderr[-2000:]
