"""What the figure drivers (``experiments/fig*.py``) share: the data sets they support, the job
grid, the command line, the rows of their CSVs and the endings of their summaries.

A job (``Job``) carries the values its CSV row reports: method, the axis value, seed and the
driver's own (a teacher, a temperature, fig4's k). Its name, the run folder's, is a label only:
finished runs are found by it, and nothing reads values back from it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from hydra.utils import instantiate

from kd import teachers
from kd.errors import UserError
from kd.results import completed_record
from kd.runner import compose_config, override_key, run_jobs

# The experiment config each data set runs under.
DATA = {"synthetic": "fig3_synthetic", "cifar100": "fig3_cifar100", "fashion_mnist": "fig3_fashion_mnist"}


class Axis(NamedTuple):
    """What fig3 sweeps on a data set, and the other drivers fix at one point (their flag of the same name)."""

    column: str  # the CSV column, the job-name tag and the driver flag's dest
    key: str  # the override it sets
    kind: type  # its values' type
    label: str  # a value in figures and summaries
    title: str  # the axis of a figure


# Synthetic data: the generator's class-relationship strength; Fashion-MNIST: the students' training
# images per class (data-limited students). A data set without an axis (CIFAR-100) is one point.
AXES = {
    "synthetic": Axis(
        "delta", "data.delta", float, "delta={:g}", "delta (subclass spread; small = strongly related classes)"
    ),
    "fashion_mnist": Axis(
        "per_class", "data.train_per_class", int, "{:d} per class", "the student's training images per class"
    ),
}
# Data sets whose runs are small one-thread CPU jobs: a driver runs several at once by default
# (--jobs); on the other real data one run holds the accelerator, so they run one after another.
PARALLEL = ("synthetic", "fashion_mnist")
# --quick: a few epochs, and small evaluation splits where the data is generated, a small teacher set on
# real images; checks the pipeline, not the science.
QUICK = ["trainer.max_epochs=3", "teacher.trainer.max_epochs=2"]
QUICK_DATA = {
    "synthetic": ["data.test_per_class=50", "data.val_per_class=10"],
    "fashion_mnist": ["teacher.data.train_per_class=50", "data.val_size=200"],
}
# The leading columns of a job's row, what the run is: its other values follow its outcome (collect).
IDENTITY = ("method", *(a.column for a in AXES.values()), "seed")


@dataclass(frozen=True)
class Job:
    """A driver's run: the Hydra overrides it trains with and the values its CSV row carries as they
    are (method, the axis value, seed, and the driver's own, e.g. the teacher). ``build_jobs`` takes
    a method's variants as Jobs too: the overrides and values the variant adds."""

    overrides: list[str]
    values: dict[str, Any] = field(default_factory=dict)


def overrides_of(jobs: dict[str, Job]) -> dict[str, list[str]]:
    """``name -> overrides``, what ``kd.runner.run_jobs`` runs."""
    return {name: job.overrides for name, job in jobs.items()}


class DriverParser(argparse.ArgumentParser):
    """Fills the defaults that depend on the data set: ``--out <results>/<name>`` and ``--runs
    <logs>/<name>`` on synthetic data (and for a driver bound to one data set), ``<results>/<name>_<data>``
    and ``<logs>/<name>_<data>`` on the others, so the data sets never overwrite one another, where
    ``<results>`` and ``<logs>`` are ``paths.results_dir`` and ``paths.log_dir``: under
    ``paths.root_dir`` ($KD_ROOT, else the current folder), as the runs' teachers are; and the
    seeds, ``seeds[data]`` (``seeds[None]`` for the others). ``runs_of`` / ``out_of``: the driver
    whose run folders / results folder this one shares (its <name> in ``--runs`` / ``--out``)."""

    def __init__(self, name: str, bound: bool, seeds: dict, runs_of=None, out_of=None, **kwargs):
        super().__init__(**kwargs)
        self.name, self.bound, self.seeds = name, bound, seeds
        self.runs_of, self.out_of = runs_of or name, out_of or name

    def tag(self, name: str, data: str) -> str:
        return name if self.bound or data == "synthetic" else f"{name}_{data}"

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        paths = compose_config([o for o in parsed.overrides if override_key(o).startswith("paths.")]).paths
        parsed.out = parsed.out or str(Path(paths.results_dir) / self.tag(self.out_of, parsed.data))
        parsed.runs = parsed.runs or str(Path(paths.log_dir) / self.tag(self.runs_of, parsed.data))
        if parsed.seeds is None:
            parsed.seeds = list(self.seeds.get(parsed.data, self.seeds[None]))
        return parsed


def parser(
    name: str, doc: str, seeds=(0, 1, 2), data: str | None = None, runs_of: str | None = None, out_of: str | None = None
) -> argparse.ArgumentParser:
    """The flags every driver takes; Hydra overrides for every run go after ``--``. A driver
    bound to one data set passes ``data`` and gets no ``--data`` flag. ``seeds``: the default
    seeds, or ``{data set: seeds}`` with ``None`` for the others. ``runs_of`` / ``out_of``: the driver
    whose run folders / results folder it shares by default (sensitivity: fig3's runs; targets: both)."""
    defaults = seeds if isinstance(seeds, dict) else {None: seeds}
    p = DriverParser(
        name,
        data is not None,
        defaults,
        runs_of,
        out_of,
        prog=f"python -m experiments.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if data is None:
        p.add_argument("--data", default="synthetic", help=f"one of: {', '.join(DATA)}")
    else:
        p.set_defaults(data=data)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="default: " + "; ".join(f"{' '.join(map(str, v))}{f' on {k}' if k else ''}" for k, v in defaults.items()),
    )
    p.add_argument(
        "--out",
        help=f"where the figures and tables go (default: results/{out_of or name}, "
        f"results/{out_of or name}_<data> on real data, under $KD_ROOT if set)",
    )
    p.add_argument(
        "--runs",
        help=f"run folders: checkpoints, results.json (default: logs/{runs_of or name}, "
        f"logs/{runs_of or name}_<data> on real data, under $KD_ROOT if set)",
    )
    p.add_argument("--quick", action="store_true", help="a few epochs: checks the pipeline, not the science")
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes (default: one per core, at most 8, on synthetic data and "
        "Fashion-MNIST; 1 on the others); results do not depend on it",
    )
    p.add_argument(
        "--population",
        choices=("on", "off"),
        default="on",
        help="on: runs that share an architecture and data shapes train at once as one stacked model "
        "(kd.population); off: every run alone",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    return p


def rerun(name: str, data: str) -> str:
    """The command that re-runs a driver, for its summary."""
    return f"`make reproduce-{name}{'' if data == 'synthetic' else f' DATA={data}'}`"


def check_data(data: str, name: str, supported=tuple(AXES)) -> None:
    """Stop unless the driver ``name`` supports ``data`` (the drivers that run on real data say so)."""
    if data not in supported:
        raise SystemExit(f"error: --data={data} is not supported by {name}; choose one of: {', '.join(supported)}")


def require_data(overrides: list[str]) -> None:
    """Stop with the data module's one-line error (it says how to fetch the data) before any job runs,
    rather than fail every job alike."""
    try:
        instantiate(compose_config(overrides).data).setup()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


def workers(args) -> int:
    """How many runs a driver runs at once (``--jobs``, else its data set's default)."""
    if args.jobs is not None:
        if args.jobs < 1:
            raise SystemExit(f"error: --jobs={args.jobs} must be at least 1")
        return args.jobs
    return min(os.cpu_count() or 1, 8) if args.data in PARALLEL else 1


def sweep(jobs: dict[str, Job], args, desc: str) -> dict[str, dict]:
    """``kd.runner.run_jobs`` with the driver's --runs, --jobs and --population; a sweep that cannot
    start (an override no job takes, a run folder of other settings) ends in one line."""
    try:
        return run_jobs(
            overrides_of(jobs), args.runs, desc=desc, workers=workers(args), population=args.population == "on"
        )
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


def run_overrides(args) -> list[str]:
    """The overrides every job of a driver gets: --quick's, then the user's."""
    return (QUICK + QUICK_DATA.get(args.data, []) if args.quick else []) + args.overrides


def axis_arguments(cli: argparse.ArgumentParser, delta, per_class, whose: str = "") -> None:
    """The data set's axis on the command line: ``--delta`` and ``--per-class`` at one point, or
    ``--deltas`` and ``--per-class`` at several where the defaults are lists; ``whose`` says whose
    points they are (fig3's, for a driver that reuses fig3's runs)."""
    many = {"nargs": "+"} if isinstance(delta, list) else {}
    cli.add_argument(
        "--deltas" if many else "--delta",
        dest="delta",
        type=float,
        default=delta,
        help=f"synthetic data: {whose or 'the'} class-relationship strength{'s' if many else ''}",
        **many,
    )
    cli.add_argument(
        "--per-class",
        type=int,
        default=per_class,
        help=f"fashion_mnist: {whose or 'the students'} training images per class",
        **many,
    )


def axis_points(args) -> list:
    """The points of the data set's axis a driver runs at: its ``--delta(s)`` or ``--per-class`` values
    (one or several); [] on a data set without an axis."""
    if args.data not in AXES:
        return []
    value = getattr(args, AXES[args.data].column)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def where(data: str, points=()) -> str:
    """A data set and the axis points of its runs, for titles: "synthetic, delta=0.5", "cifar100"."""
    axis = AXES.get(data)
    return ", ".join([data, *(axis.label.format(axis.kind(p)) for p in points)] if axis else [data])


def build_jobs(data: str, points, seeds, methods, overrides) -> dict[str, Job]:
    """``<method>-<axis><value>-s<seed> -> Job`` (e.g. ``kd-delta0.5-s0``, ``kd-per_class60-s0``), or
    ``<method>-s<seed>`` on data without an axis (``points`` then unused). Each job's values: its
    method (the label), axis value and seed, then its variant's. ``methods`` are objective names or
    ``{label: Job}`` for variants of one objective (e.g. KD-topk at several k: their overrides, and
    values such as k and tail)."""
    variants = methods if isinstance(methods, dict) else {m: Job([f"objective={m}"]) for m in methods}
    axis = AXES.get(data)
    at = [(f"-{axis.column}{p}", [f"{axis.key}={p}"], {axis.column: axis.kind(p)}) for p in points] if axis else []
    return {
        f"{label}{tag}-s{s}": Job(
            [f"experiment={DATA[data]}", *variant.overrides, *point, f"seed={s}", *overrides],
            {"method": label, **value, "seed": s, **variant.values},
        )
        for tag, point, value in at or [("", [], {})]
        for s in seeds
        for label, variant in variants.items()
    }


def collect(jobs: dict[str, Job], records: dict[str, dict]) -> pd.DataFrame:
    """One row per job, from its values, never from its name: method, the axis value (a ``delta`` or
    ``per_class`` column, none without an axis) and seed; status, accuracies, time, error; then the
    job's other values (e.g. fig4's k and tail)."""
    rows = []
    for name, job in jobs.items():
        record = records[name]
        metrics = record.get("metrics", {})
        rows.append(
            {
                **{key: job.values[key] for key in IDENTITY if key in job.values},
                "status": record["status"],
                "test_acc_last": metrics.get("test/acc_last"),
                "test_acc_best": metrics.get("test/acc_best"),
                "val_acc_best": metrics.get("val/acc_best"),
                "seconds": record.get("seconds"),
                "error": record.get("error", ""),
                **{key: value for key, value in job.values.items() if key not in IDENTITY},
            }
        )
    return pd.DataFrame(rows)


def teacher_accuracy(jobs: dict[str, Job]) -> dict[str, float]:
    """Test accuracy (last epoch) of each trained teacher the jobs distil from, by its cache folder
    (jobs that differ only in their objective share a teacher)."""
    found = {}
    for group in {
        tuple(o for o in job.overrides if not o.startswith(("objective=", "objective."))) for job in jobs.values()
    }:
        cfg = compose_config(list(group), "unused")  # a run folder: the trainer config refers to one
        if cfg.teacher.kind == "trained":
            record = completed_record(teachers.teacher_config(cfg).paths.output_dir)
            if record is not None:
                found[Path(record["output_dir"]).name] = record["metrics"]["test/acc_last"]
    return dict(sorted(found.items()))


def position(by: str, key) -> str:
    """A point ``key`` of the axis whose column is ``by``, as figures and summaries show it ("delta=0.5",
    "60 per class"); any other key as itself."""
    found = next((a for a in AXES.values() if a.column == by), None)
    return found.label.format(found.kind(key)) if found else str(key)


def named(r) -> str:
    """A run (a row of a driver's table) by its method, its point of the data set's axis, and its seed."""
    at = [position(a.column, getattr(r, a.column)) for a in AXES.values() if pd.notna(getattr(r, a.column, None))]
    return " ".join([r.method, *at, f"seed={r.seed}"])


def ending(lines: list[str], failed: pd.DataFrame, rerun: str, describe=named) -> str:
    """A summary's markdown: ``lines``, then every failed run with its error (never dropped
    silently) and how to re-run; ``describe`` names a failed run (a row of ``failed``)."""
    if len(failed):
        lines = [*lines, "", "## Failed runs", "", *(f"- {describe(r)}: {r.error}" for r in failed.itertuples())]
    return "\n".join([*lines, "", f"Re-run: {rerun}"]) + "\n"
