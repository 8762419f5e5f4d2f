"""Diagnose one teacher: what knowledge a student distilled from it would receive.

Prints ``kd.analysis.diagnose`` for the teacher a run config names: accuracy and ECE on the test
split; on the training split (the one KD distils on) the teacher's true-class confidence q_c and
the gradient rescaling factor w at the start of distillation, its effective label smoothing and,
where the data has superclasses, how much more its class probabilities correlate within a
superclass than between superclasses. Arguments are Hydra overrides of configs/train.yaml, as for
``python -m kd.train``. A checkpoint teacher is diagnosed on the data its run record (results.json
beside checkpoints/) says it was trained on, unless data overrides (data..., seed, experiment,
recipe) choose the data: then they must agree with the record where it matters (data set, classes,
generator and its draw), or teacher.data_check=false says they need not. KD's kd_weight and
temperature (for w) come from the objective (objective=kd unless given):

    python -m kd.diagnose teacher=checkpoint teacher.path=logs/.../checkpoints/last.ckpt [data overrides]
    python -m kd.diagnose experiment=fig3_synthetic data.delta=0.5         # fig3's teacher (trained on first use)
    python -m kd.diagnose experiment=fig3_synthetic objective@teacher.objective=ls teacher.objective.eps=0.1
    python -m kd.diagnose experiment=fig3_synthetic teacher=oracle         # the Bayes posterior
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from kd import teachers
from kd.analysis import diagnose
from kd.analysis.diagnosis import HIGH_TEMPERATURE, QUANTILES
from kd.errors import UserError, one_line
from kd.runner import QUIET, compose_config, override_key, setup_teacher
from kd.train import REPORTED

# Nothing is written for the diagnosed run itself; its paths still need an output folder.
NO_OUTPUT = "${paths.teacher_dir}"
# Overrides that choose the data, so that a checkpoint teacher's own data are not used instead.
CHOOSE_DATA = ("data", "seed", "experiment", "recipe")


def with_teachers_data(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with the data a checkpoint teacher was trained on (its run record's), where the
    overrides choose none; said in a line, since the command names no data."""
    if cfg.teacher.kind != "checkpoint" or any(override_key(o).split(".")[0] in CHOOSE_DATA for o in overrides):
        return cfg
    trained = teachers.trained_on(cfg.teacher.path)
    if trained is None:
        return cfg
    if "root" in trained:  # found by its folder's name under this run's paths.data_dir
        trained["root"] = "${paths.data_dir}/" + Path(trained["root"]).name
    with open_dict(cfg):
        cfg.data = OmegaConf.create(trained)
    print(
        f"[kd] data: the teacher's own, from {Path(cfg.teacher.path).parent.parent / 'results.json'} "
        "(data overrides choose other data)",
        flush=True,
    )
    return cfg


def describe(cfg: DictConfig) -> str:
    """Where the teacher comes from: its checkpoint, its cached run folder, or the oracle."""
    if cfg.teacher.kind == "checkpoint":
        return str(cfg.teacher.path)
    if cfg.teacher.kind == "trained":
        return str(teachers.teacher_config(cfg).paths.output_dir)
    return cfg.teacher.kind


def spread_line(found: dict, name: str) -> str:
    quantiles = "  ".join(f"q{round(100 * q)} {found[f'{name}_q{round(100 * q)}']:.4f}" for q in QUANTILES)
    return f"mean {found[f'{name}_mean']:.4f}  std {found[f'{name}_std']:.4f}  |  {quantiles}"


def report(
    found: dict, source: str, kd_weight: float, temperature: float, high_temperature: float = HIGH_TEMPERATURE
) -> str:
    """The diagnosis as the lines ``python -m kd.diagnose`` prints."""
    rows = {
        "accuracy (test)": f"{found['acc']:.4f}",
        "ECE (test, 15 bins)": f"{found['ece']:.4f}",
        f"q_c (training split, tau {temperature:g})": spread_line(found, "q_c"),
        f"w at the start of KD (kd_weight {kd_weight:g})": spread_line(found, "w_start"),
        "effective smoothing (LS eps)": f"{found['effective_smoothing']:.4f}  "
        f"(mean entropy {found['entropy']:.4f} nats)",
    }
    scores = {
        "superclass": f"probabilities, tau {temperature:g}",
        "superclass_high_tau": f"probabilities, tau {high_temperature:g}",
        "weights": "logit-layer cosine (KD-sim's)",
    }
    for key, what in scores.items():
        if f"{key}_score" in found:
            rows[f"superclass score, {what}"] = (
                f"within {found[f'{key}_within']:+.4f}  between "
                f"{found[f'{key}_between']:+.4f}  within - between "
                f"{found[f'{key}_score']:+.4f}"
            )
    if "superclass_score" not in found:
        rows["superclass score"] = "n/a (the data has no superclasses)"
    width = max(map(len, rows)) + 2
    return "\n".join([f"teacher: {source}", *(f"{label:<{width}}{value}" for label, value in rows.items())])


def main(argv=None) -> dict:
    """Print the diagnosis of the configured teacher and return it."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):
        print(__doc__)
        return {}
    if not any(o.startswith("objective=") for o in overrides):
        overrides.insert(0, "objective=kd")
    try:
        cfg = with_teachers_data(compose_config([*QUIET, *overrides], NO_OUTPUT), overrides)
        teacher, datamodule = setup_teacher(cfg)
        if teacher is None:
            raise UserError(
                "teacher=none: nothing to diagnose; use teacher=checkpoint teacher.path=..., "
                "a teacher config (teacher=mlp) or teacher=oracle"
            )
        if "kd_weight" not in cfg.objective:
            raise UserError(
                f"objective={cfg.objective.name} has no kd_weight for w; "
                "use objective=kd (the default) or another kd_* objective"
            )
        kd_weight, temperature = cfg.objective.kd_weight, cfg.objective.temperature
        found = diagnose(teacher, datamodule, kd_weight, temperature)
        print(report(found, describe(cfg), kd_weight, temperature))
    except REPORTED as err:
        raise SystemExit(f"error: {one_line(err)}") from None
    return found


if __name__ == "__main__":
    main()
