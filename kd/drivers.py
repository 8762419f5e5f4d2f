"""What the figure drivers (``experiments/fig*.py``) share: the data sets they support, the job
grid, the command line and reloading a finished job's student, teacher and data.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pandas as pd
from hydra.utils import instantiate

from kd import teachers
from kd.errors import UserError
from kd.runner import QUIET, compose_config, run_jobs
from kd.train import run

# The experiment config each data set runs under.
DATA = {"synthetic": "fig3_synthetic", "cifar100": "fig3_cifar100"}
# Data sets with the class-relationship axis data.delta (the generator's); a real data set is one
# fixed point, so its jobs sweep no delta.
DELTA_AXIS = ("synthetic",)
# Data sets whose runs are small one-thread CPU jobs: a driver runs several at once by default
# (--jobs); on real data one run holds the accelerator, so they run one after another.
PARALLEL = ("synthetic",)
# --quick: a few epochs, and small evaluation splits where the data is generated; checks the
# pipeline, not the science.
QUICK = ["trainer.max_epochs=3", "teacher.trainer.max_epochs=2"]
QUICK_DATA = {"synthetic": ["data.test_per_class=50", "data.val_per_class=10"]}
# A job's name: <label>[-delta<d>]-s<seed> (see build_jobs).
JOB_NAME = re.compile(r"(?P<label>.+?)(?:-delta(?P<delta>.+?))?-s(?P<seed>\d+)")


def parser(name: str, doc: str, seeds=(0, 1, 2), data: str | None = None) -> argparse.ArgumentParser:
    """The flags every driver takes; Hydra overrides for every run go after ``--``. A driver
    bound to one data set passes ``data`` and gets no ``--data`` flag."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if data is None:
        p.add_argument("--data", default="synthetic", help=f"one of: {', '.join(DATA)}")
    else:
        p.set_defaults(data=data)
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    p.add_argument("--out", default=f"results/{name}")
    p.add_argument("--runs", default=f"logs/{name}", help="run folders (checkpoints, results.json)")
    p.add_argument("--quick", action="store_true", help="a few epochs: checks the pipeline, not the science")
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: one per core, at most 8, on synthetic data; 1 on real data); "
                        "results do not depend on it")
    p.add_argument("--population", choices=("on", "off"), default="on",
                   help="on: runs that share an architecture and data shapes train at once as one stacked model "
                        "(kd.population); off: every run alone")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    return p


def check_data(data: str, name: str, supported=("synthetic",)) -> None:
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


def sweep(jobs: dict[str, list[str]], args, desc: str) -> dict[str, dict]:
    """``kd.runner.run_jobs`` with the driver's --runs, --jobs and --population."""
    return run_jobs(jobs, args.runs, desc=desc, workers=workers(args), population=args.population == "on")


def run_overrides(args) -> list[str]:
    """The overrides every job of a driver gets: --quick's, then the user's."""
    return (QUICK + QUICK_DATA.get(args.data, []) if args.quick else []) + args.overrides


def build_jobs(data: str, deltas, seeds, methods, overrides) -> dict[str, list[str]]:
    """``<method>-delta<d>-s<seed> -> overrides``, or ``<method>-s<seed>`` on data without a delta
    axis (``deltas`` then unused); ``methods`` are objective names or ``{label: overrides}`` for
    variants of one objective (e.g. KD-topk at several k)."""
    variants = methods if isinstance(methods, dict) else {m: [f"objective={m}"] for m in methods}
    axis = [(f"-delta{d}", [f"data.delta={d}"]) for d in deltas] if data in DELTA_AXIS else [("", [])]
    return {
        f"{label}{tag}-s{s}": [f"experiment={DATA[data]}", *extra, *delta, f"seed={s}", *overrides]
        for tag, delta in axis for s in seeds for label, extra in variants.items()
    }


def collect(records: dict[str, dict]) -> pd.DataFrame:
    """One row per job of ``build_jobs``: method, delta (NaN without a delta axis), seed, status,
    accuracies, time, error."""
    rows = []
    for name, rec in records.items():
        cfg = rec.get("config", {})
        metrics = rec.get("metrics", {})
        job = JOB_NAME.fullmatch(name)
        rows.append({"method": job["label"], "delta": float(job["delta"] or "nan"), "seed": int(job["seed"]),
                     "status": rec["status"],
                     "test_acc_last": metrics.get("test/acc_last"), "test_acc_best": metrics.get("test/acc_best"),
                     "val_acc_best": metrics.get("val/acc_best"), "seconds": rec.get("seconds"),
                     "error": rec.get("error", ""), "objective": str(cfg.get("objective", ""))})
    return pd.DataFrame(rows)


def load_teacher(overrides: list[str], output_dir):
    """``(cfg, teacher, datamodule)`` of a run config: its data set up, its teacher found in the cache
    (or trained there on first use); ``output_dir`` is the run's folder, which the config's paths need."""
    cfg = compose_config([*QUIET, *overrides], output_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return cfg, teachers.resolve(cfg, datamodule, train=run), datamodule


def load_job(root, name: str, overrides: list[str]):
    """``(cfg, student, teacher, datamodule)`` of a finished ``run_jobs`` job, rebuilt from its overrides.

    The config is composed again (not read back resolved from results.json, whose paths point into
    the student's folder), so a trained teacher is found in its cache, never retrained.
    """
    out = Path(root) / "runs" / name
    cfg, teacher, datamodule = load_teacher(overrides, out)
    student = teachers.load_checkpoint(teachers.checkpoint_in(out, "last"), datamodule.num_classes,
                                       datamodule.input_shape)
    return cfg, student, teacher, datamodule


def ending(lines: list[str], failed: pd.DataFrame, rerun: str, describe=lambda r: f"{r.method} seed={r.seed}") -> str:
    """A summary's markdown: ``lines``, then every failed run with its error (never dropped
    silently) and how to re-run; ``describe`` names a failed run (a row of ``failed``)."""
    if len(failed):
        lines = [*lines, "", "## Failed runs", "", *(f"- {describe(r)}: {r.error}" for r in failed.itertuples())]
    return "\n".join([*lines, "", f"Re-run: {rerun}"]) + "\n"
