"""Every config file composes, and every experiment resolves to a runnable config."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kd import objectives
from kd.runner import compose_config
from kd.train import CONFIG_DIR, validate

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name not in ("hydra",))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "teacher" and option == "checkpoint":
        overrides.append("teacher.path=/nonexistent.ckpt")
    if group == "teacher" and option == "cnn":  # Fashion-MNIST's teacher: every training image (no train_per_class)
        overrides.append("data=fashion_mnist")
    if group == "objective" and objectives.needs_teacher(option):
        overrides.append("teacher=oracle")
    if group == "data" and option != "synthetic":
        overrides.append("model=mlp")
    cfg = compose_config(overrides, tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["paths"]["output_dir"] == str(tmp_path)
    if group in ("objective", "teacher"):
        validate(cfg)


def test_objective_configs_cover_every_objective():
    names = {f.stem for f in (Path(CONFIG_DIR) / "objective").glob("*.yaml")}
    assert names == set(objectives.NAMES)
