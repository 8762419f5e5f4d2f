"""docs/extending.md followed to the letter, in a copy of the repository: each of its blocks written
where its first line says, then the new soft target trained by ``python -m kd.train`` under a recipe
and by ``python -m experiments.fig3``, and the page's own tests (objective, network, data set) run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# A block of the page: its language, then "# <path>" (a new file) or "# append to <path>", then the text.
BLOCK = re.compile(r"```(?:python|yaml)\n# (append to )?(\S+)\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> Path:
    """A copy of the repository with every block of docs/extending.md written where it says."""
    copy = tmp_path_factory.mktemp("extended")
    for name in ("kd", "configs", "experiments", "tests", "hydra_plugins"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy)
    blocks = BLOCK.findall((REPO / "docs" / "extending.md").read_text())
    assert [path for _, path, _ in blocks] == [
        "kd/objectives/targets.py",
        "configs/objective/kd_sharp.yaml",
        "tests/test_objectives.py",
        "kd/models/cifar.py",
        "configs/model/tiny.yaml",
        "tests/test_models.py",
        "kd/data/tensorfile.py",
        "configs/data/tensorfile.yaml",
        "tests/test_tensorfile.py",
    ]
    for append, path, text in blocks:
        with open(copy / path, "a" if append else "x") as f:
            f.write(f"\n\n{text}" if append else text)
    return copy


def python(copy: Path, *args: str) -> None:
    """``python *args`` in the copy, as a user runs it there; fails the test with its error output."""
    env = {**os.environ, "PYTHONPATH": str(copy), "KD_ROOT": str(copy / "root"), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_a_new_soft_target_trains_under_a_recipe_and_in_fig3(extended):
    # The recipe's optimizer, schedule and KD settings (recipe.kd); synthetic data and the oracle teacher for speed.
    run = extended / "run"
    python(
        extended,
        "-m",
        "kd.train",
        "recipe=fashion_mnist",
        "data=synthetic",
        "model=mlp",
        "teacher=oracle",
        "objective=kd_sharp",
        "objective.gamma=3",
        *TINY,
        f"hydra.run.dir={run}",
    )
    record = json.loads((run / "results.json").read_text())
    assert record["status"] == "completed"
    assert record["config"]["objective"] == {
        "name": "kd_sharp",
        "temperature": 4.0,
        "kd_weight": 0.9,
        "ce_weight": 0.1,
        "t2_scale": True,
        "gamma": 3,
    }
    toy = [
        "data.train_per_class=5",
        "data.val_per_class=5",
        "data.test_per_class=10",
        "model.hidden=[16]",
        "teacher.model.hidden=[16]",
        "teacher.data.train_per_class=20",
        "trainer.max_epochs=1",
        "teacher.trainer.max_epochs=1",
    ]
    flags = ["--seeds", "0", "--deltas", "1.0", "--quick", "--no-wandb", "--jobs", "1", "--out", str(extended / "fig3")]
    python(extended, "-m", "experiments.fig3", "--methods", "ce", "kd_sharp", *flags, "--", *toy)
    table = pd.read_csv(extended / "fig3" / "fig3.csv")
    assert sorted(table.method) == ["ce", "kd_sharp"] and (table.status == "completed").all()
    assert "| KD-sharp |" in (extended / "fig3" / "fig3.md").read_text()


def test_the_pages_tests_of_its_objective_network_and_data_set_pass(extended):
    python(
        extended,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_objectives.py::test_kd_sharp_is_kd_towards_the_sharpened_teacher",
        "tests/test_configs.py::test_objective_configs_are_the_declared_objectives_with_their_defaults",
        "tests/test_models.py::test_every_image_model_has_a_standard_size",
        "tests/test_models.py::test_model_size_training_step_and_features_protocol[tiny]",
        "tests/test_tensorfile.py",
    )
