"""Bad input fails before any work, in one line that names the key, the bad value and what is allowed."""

import json
import sys
from pathlib import Path

import pytest

from kd import aggregate
from kd.errors import UserError
from kd.objectives import REGISTRY
from kd.runner import compose_config
from kd.train import CONFIG_DIR, main, run, validate
from tests.conftest import TINY


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("seed=abc", "seed='abc' is not valid; give an integer in [0, 2**32 - 1]"),
        ("seed=-1", "seed=-1 is not valid"),
        ("deterministic=maybe", "deterministic='maybe' is not valid; choose one of: True, False, warn"),
        # every key of a component is one its signature takes, of a type its annotation allows
        ("+data.foo=1", "data.foo is not an option of SyntheticDataModule; valid: superclasses, subclasses, dim,"),
        (
            "+model.foo=1",
            "model.foo is not an option of mlp; valid: name, num_classes, input_shape, in_channels, hidden",
        ),
        ("model.name=nope", "model.name='nope' is not valid; choose one of: cnn, mlp,"),
        ("model.hidden=abc", "model.hidden='abc' has the wrong type for mlp; expected list"),
        ("+trainer.foo=1", "trainer.foo is not an option of Trainer; valid: accelerator,"),
        (
            "trainer.precision=33",
            "trainer.precision=33 has the wrong type for Trainer; expected Union[Literal[64, 32, 16]",
        ),
        (
            "trainer.max_epochs=abc",
            "scheduler.T_max='abc' (from ${trainer.max_epochs}) has the wrong type for CosineAnnealingLR; expected int",
        ),
        ("+optimizer.foo=1", "optimizer.foo is not an option of Adam; valid: params, lr,"),
        ("optimizer.lr=-1", "optimizer (torch.optim.Adam) rejects its config: Invalid learning rate: -1"),
        (
            "optimizer=sgd optimizer.momentum=-0.5",
            "optimizer (torch.optim.SGD) rejects its config: Invalid momentum value",
        ),
        # objectives
        ("+objective.foo=1", "objective 'ce' takes no parameter 'foo'; valid parameters: none"),
        (
            "objective=kd teacher=oracle objective.temperature=0",
            "objective.temperature=0 is out of range; allowed: (0,",
        ),
        ("objective=kd teacher=oracle objective.temperature=nan", "objective.temperature=nan is out of range"),
        (
            "objective=kd teacher=oracle objective.kd_weight=1.5",
            "objective.kd_weight=1.5 is out of range; allowed: [0, 1]",
        ),
        (
            "objective=kd teacher=oracle objective.ce_weight=-1",
            "objective.ce_weight=-1 is out of range; allowed: [0, 1]",
        ),
        ("objective=ls objective.eps=true", "objective.eps=True is not a number; allowed: [0, 1]"),
        ("objective=kd_topk teacher=oracle objective.k=0", "objective.k=0 is out of range; allowed: (0, 1]"),
        ("objective=kd_topk teacher=oracle objective.k=1.5", "objective.k=1.5 is out of range; allowed: (0, 1]"),
        ("objective=kd_sim", "objective=kd_sim distils from a teacher but teacher=none; use teacher=mlp"),
        ("objective=kd_sim teacher=oracle objective.beta=0", "objective.beta=0 is out of range; allowed: (0, inf)"),
        (
            "objective=kd_pt_sim teacher=oracle objective.similarity_source=x",
            "objective.similarity_source='x' is not valid; choose one of: teacher_weights_cosine, mean_teacher_probs",
        ),
        # a recipe's settings for objectives, whichever objective runs
        ("recipe=imagenet recipe.kd_topk.k=0", "recipe.kd_topk.k=0 is out of range; allowed: (0, 1]"),
        (
            "recipe=fashion_mnist +recipe.kd.tau=2",
            "objective 'kd' takes no parameter 'tau' (in recipe.kd); valid parameters: temperature, kd_weight,",
        ),
        ("+recipe.kd_tpok.k=0.5", "recipe.<objective>='kd_tpok' is not valid; choose one of: ce, ls,"),
        ("+recipe.kd=4", "recipe.kd=4 is not valid; give its parameters: recipe.kd.<parameter>=..."),
        # teachers
        (
            "objective=kd teacher=checkpoint",
            "teacher.path has no usable value (Missing mandatory value: path); "
            "set it on the command line: teacher.path=...",
        ),
        (
            "objective=kd teacher=oracle +teacher.path=x",
            "teacher.path is not a key of teacher kind 'oracle'; valid: kind",
        ),
        ("objective=kd teacher=mlp +teacher.epochs=3", "teacher.epochs is not a key of teacher kind 'trained'; valid:"),
        ("objective=kd teacher=mlp teacher.model.hidden=abc", "teacher.model.hidden='abc' has the wrong type"),
        (
            "objective=kd teacher=mlp teacher.trainer.max_epochs=-1.5",
            "in the teacher's config (teacher.*): scheduler.T_max=-1.5 (from ${trainer.max_epochs}) has the wrong type",
        ),
    ],
)
def test_bad_config_is_rejected_before_any_work(tmp_path, overrides, message):
    with pytest.raises(UserError) as err:
        validate(compose_config(overrides.split(), tmp_path))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_a_run_rejected_by_the_check_leaves_a_failed_record_that_aggregate_lists(tmp_path):
    """A sweep job with a bad config is listed as failed, and why, not as missing."""
    with pytest.raises(UserError):
        run(compose_config([*TINY, "optimizer.lr=-1"], tmp_path / "bad"))
    record = json.loads((tmp_path / "bad" / "results.json").read_text())
    error = "UserError: optimizer (torch.optim.Adam) rejects its config: Invalid learning rate: -1"
    assert record["status"] == "failed" and record["error"] == error
    (row,) = aggregate.collect(tmp_path).to_dict("records")
    assert (row["status"], row["error"], row["optimizer.lr"]) == ("failed", error, -1)


def _options(group: str) -> list[str]:
    return sorted(
        str(p.relative_to(Path(CONFIG_DIR) / group).with_suffix("")) for p in (Path(CONFIG_DIR) / group).rglob("*.yaml")
    )


@pytest.mark.parametrize(
    "override",
    [
        *(
            f"{group}={option}"
            for group in (
                "data",
                "model",
                "optimizer",
                "scheduler",
                "trainer",
                "logger",
                "callbacks",
                "experiment",
                "recipe",
            )
            for option in _options(group)
        ),
        *(f"objective={option} teacher=oracle" for option in _options("objective")),
        *(
            f"teacher={option} objective=kd"
            for option in _options("teacher")
            if option not in ("checkpoint", "none", "cnn")
        ),
        "teacher=cnn objective=kd data=fashion_mnist",  # Fashion-MNIST's teacher: every training image (no train_per_class)
    ],
)
def test_every_shipped_config_passes(tmp_path, override):
    """The checks know every component the configs use: no valid config is refused."""
    validate(compose_config(override.split(), tmp_path))


def test_data_sizes_are_checked_by_the_data_module(tmp_path):
    from kd.data.synthetic import SyntheticDataModule

    with pytest.raises(UserError, match=r"data.train_per_class=0 is out of range; allowed: \[1, inf\)"):
        SyntheticDataModule(train_per_class=0)


def test_teacher_on_other_classes_fails_before_it_is_trained(root):
    cfg = compose_config([*TINY, "objective=kd", "teacher=mlp", "+teacher.data.subclasses=3"], root / "student")
    with pytest.raises(UserError, match="teacher.data gives the teacher 6 classes but the student's data has 4; drop"):
        run(cfg)
    assert not (root / "teachers").exists()


@pytest.mark.parametrize(
    "overrides, line",
    [
        ("foo=1", "error: Could not override 'foo'. To append to your config use +foo=1 (Key 'foo' is not in struct)"),
        ("objective.tau=2", "error: Could not override 'objective.tau'. To append to your config use +objective.tau=2"),
        ("objective=kd_typo", f"error: objective=kd_typo is not valid; choose one of: {', '.join(sorted(REGISTRY))}"),
        ("trainer.max_epochs=[1", "error: cannot parse the override 'trainer.max_epochs=[1': no viable alternative"),
        ("data.dim=0", "error: data.dim=0 is out of range; allowed: [1, inf)"),  # raised inside Hydra's instantiate
        (
            "model.dropout=1.5",
            "error: Error in call to target 'kd.models.get': ValueError('dropout probability has to "
            "be between 0 and 1, but got 1.5') full_key: model",
        ),
    ],
)
def test_command_line_errors_are_one_line(root, monkeypatch, overrides, line):
    monkeypatch.setattr(sys, "argv", ["kd.train", *TINY, *overrides.split()])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert str(exit_.value.code).startswith(line), exit_.value.code
    assert "\n" not in str(exit_.value.code)


def test_students_that_differ_only_in_objective_share_one_teacher_config(tmp_path):
    """validate builds a teacher's config once for the members of a population that can share it,
    and it is the config each of them would build alone."""
    from omegaconf import OmegaConf

    from kd.teachers import teacher_config
    from tests.conftest import TINY_TEACHER

    cfgs = [
        compose_config([*TINY, *TINY_TEACHER, f"objective={o}", f"seed={s}"], tmp_path / f"{o}{s}")
        for o, s in (("kd", 0), ("kd_pt", 0), ("kd", 1))
    ]
    shared = {}
    (_, first), (_, second), (_, other) = (validate(cfg, shared) for cfg in cfgs)
    assert first is second and other is not first and len(shared) == 2
    for cfg, found in zip(cfgs, (first, second, other)):
        assert OmegaConf.to_container(found, resolve=True) == OmegaConf.to_container(teacher_config(cfg), resolve=True)
