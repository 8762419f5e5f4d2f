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


def test_objective_configs_are_the_declared_objectives_with_their_defaults():
    """configs/objective/<name>.yaml, without a recipe, is objective <name>'s declaration (kd.objectives)."""
    names = {f.stem for f in (Path(CONFIG_DIR) / "objective").glob("*.yaml")}
    assert names == set(objectives.REGISTRY)
    for name, objective in objectives.REGISTRY.items():
        found = OmegaConf.to_container(compose_config([f"objective={name}"]).objective, resolve=True)
        assert found == {"name": name, **{k: p.default for k, p in objective.parameters.items()}}, name


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=fig3_synthetic", "objective=kd_topk", "objective.k=0.1", "seed=2", "teacher.trainer.max_epochs=2"],
        ["experiment=fig3_synthetic", "objective=kd", "model@teacher.model=resnet20", "teacher.model.hidden=[32]"],
        ["objective=ls", "objective.eps=0.2", "+trainer.limit_val_batches=0", "~callbacks.resume_state", "logger=csv"],
        ["data=cifar100", "model=resnet8", "++trainer.max_epochs=7", "teacher=checkpoint", "teacher.path=/x.ckpt"],
        ["objective=ce", "objective.temperature=4"],  # fails alike
    ],
    ids=["values", "package", "add-delete", "force-add", "bad"],
)
def test_composing_once_per_structure_gives_hydras_config(overrides):
    """kd.runner composes a structure once and applies the value overrides itself with Hydra's own step:
    the config (or the error) is Hydra's."""
    from hydra import compose, initialize_config_dir

    def outcome(build):
        try:
            return OmegaConf.to_container(build())
        except Exception as err:  # noqa: BLE001  (the same error either way)
            return type(err), str(err)

    def hydra():
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=overrides)

    assert outcome(lambda: compose_config(overrides)) == outcome(hydra)
    assert outcome(lambda: compose_config(overrides)) == outcome(hydra)  # the cached structure is not changed
