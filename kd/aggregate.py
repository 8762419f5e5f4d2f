"""Tables of mean ± std over seeds from a folder of runs (a sweep, or all of ``logs/``).

    python -m kd.aggregate logs/train/multiruns/2026-01-01_12-00-00 --by objective,data.delta \
        --metric test/acc_last,test/acc_best --out results/sweep.csv     # + results/sweep.md

A job is a folder with a ``results.json`` or a ``.hydra`` folder (Hydra writes it when the job
starts). Jobs that failed or left no results.json are counted per configuration and listed with
their error, never dropped silently. Figure drivers reuse ``collect`` and ``summarise``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Hashable
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kd.errors import UserError
from kd.results import write_text_atomic

METRICS = ("test/acc_last", "test/acc_best")
MISSING = "no results.json: killed, still running, or failed before training (see the job's .log)"


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"data": {"delta": 1}} -> {"data.delta": 1}``; lists stay values, empty dicts go."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def job_dirs(root: Path) -> list[Path]:
    """Every job folder under ``root``; a job folder holds no other jobs."""
    found = []
    for folder, subdirs, files in os.walk(root):
        if "results.json" in files or ".hydra" in subdirs:
            found.append(Path(folder))
            subdirs.clear()
        else:
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # .submitit: launcher files only
    return sorted(found)


def _hydra_config(path: Path) -> dict:
    """A job's unresolved ``.hydra/config.yaml`` with every value that resolves outside Hydra."""
    cfg = OmegaConf.load(path)
    keys = flatten(OmegaConf.to_container(cfg, resolve=False))
    values = {key: OmegaConf.select(cfg, key, throw_on_resolution_failure=False) for key in keys}
    return {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in values.items()}


def read_job(job: Path, root: Path) -> dict:
    """One row: dir, status, error, seconds, the metrics, the config keys (dotted), the config
    group choices (``objective``, ``teacher``, ...) and the job's command-line ``overrides``."""
    try:
        record = json.loads((job / "results.json").read_text())
    except (OSError, ValueError):
        record = None
    hydra_dir = job / ".hydra"
    if record is None:
        config = _hydra_config(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").is_file() else {}
        row = {"status": "missing", "error": MISSING}
    else:
        config = flatten(record.get("config") or {})
        row = {
            "status": record.get("status", "failed"),
            "error": record.get("error", ""),
            "seconds": record.get("seconds"),
            **(record.get("metrics") or {}),
        }
    row = {"dir": str(job.relative_to(root)) if job != root else ".", **row, **config}
    if (hydra_dir / "hydra.yaml").is_file():
        choices = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices
        row.update({g: c for g, c in choices.items() if not g.startswith("hydra/") and row.get(g) is None})
    if (hydra_dir / "overrides.yaml").is_file():
        row["overrides"] = list(OmegaConf.load(hydra_dir / "overrides.yaml"))
    return row


def collect(root) -> pd.DataFrame:
    """One row per job under ``root`` (recursively), completed or not."""
    root = Path(root)
    jobs = job_dirs(root)
    if not jobs:
        raise UserError(f"no job folders (with results.json or .hydra/) under {root}")
    return pd.DataFrame([read_job(job, root) for job in jobs])


def swept_keys(runs: pd.DataFrame) -> list[str]:
    """The override keys whose value differs between jobs, seed excepted: the default ``--by``."""
    overrides = runs["overrides"] if "overrides" in runs else []
    parsed = [
        dict(o.lstrip("+~").partition("=")[::2] for o in ovr) if isinstance(ovr, list) else {} for ovr in overrides
    ]
    keys = dict.fromkeys(key for job in parsed for key in job)
    return [key for key in keys if key != "seed" and len({job.get(key) for job in parsed}) > 1]


def summarise(runs: pd.DataFrame, by, metrics=METRICS) -> pd.DataFrame:
    """Per configuration (value of the ``by`` keys): ``n`` completed runs, ``incomplete`` (failed
    or missing) jobs, and the mean and std of each metric over the completed runs."""
    by, metrics = list(by), list(metrics)
    any_completed = (runs["status"] == "completed").any()  # else no run has metrics to check against
    unknown = [k for k in by if k not in runs] + [m for m in metrics if any_completed and m not in runs]
    if unknown:
        known = [c for c in runs.columns if "/" in c or c.startswith(("objective", "data.", "seed"))]
        raise UserError(
            f"{', '.join(unknown)}: no such config key or metric in these runs; some there are: {', '.join(known)}"
        )
    keyed = runs.assign(**{k: runs[k].map(lambda v: v if isinstance(v, Hashable) else str(v)) for k in by})
    groups = keyed.groupby(by, dropna=False, sort=True) if by else [((), keyed)]
    rows = []
    for key, group in groups:
        done = group[group["status"] == "completed"]
        row = {**dict(zip(by, key)), "n": len(done), "incomplete": len(group) - len(done)}
        for metric in metrics:
            values = pd.to_numeric(done[metric], errors="coerce") if metric in done else pd.Series(dtype=float)
            row[f"{metric} mean"], row[f"{metric} std"] = values.mean(), values.std()
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, "n", "incomplete", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))])


def incomplete(runs: pd.DataFrame) -> pd.DataFrame:
    """The jobs that did not complete, with their status and error."""
    return runs.loc[runs["status"] != "completed", ["dir", "status", "error"]]


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def to_markdown(table: pd.DataFrame, failures: pd.DataFrame, by, metrics=METRICS) -> str:
    """The table as markdown (mean ± std), then the list of incomplete jobs."""
    header = [*by, *metrics, "n", "incomplete"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in by]
        cells += [_mean_std(row[f"{m} mean"], row[f"{m} std"]) for m in metrics]
        lines.append("| " + " | ".join([*cells, str(row["n"]), str(row["incomplete"])]) + " |")
    if len(failures):
        lines += ["", f"## Incomplete jobs ({len(failures)})", ""]
        lines += [f"- `{r.dir}` {r.status}: {r.error or 'no error recorded'}" for r in failures.itertuples()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a sweep folder (or any folder of runs), searched recursively")
    parser.add_argument("--by", help="config keys, comma-separated (default: the swept overrides but seed)")
    parser.add_argument("--metric", default=",".join(METRICS), help="metrics, comma-separated")
    parser.add_argument("--out", help="write the table as this CSV and, beside it, as markdown (.md)")
    args = parser.parse_args(argv)
    try:
        runs = collect(args.root)
        by = args.by.split(",") if args.by else swept_keys(runs)
        metrics = args.metric.split(",")
        table = summarise(runs, by, metrics)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    failures = incomplete(runs)
    markdown = to_markdown(table, failures, by, metrics)
    if args.out:
        out = Path(args.out)
        write_text_atomic(out, table.to_csv(index=False))
        write_text_atomic(out.with_suffix(".md"), markdown)
    print(markdown, end="")
    if len(failures):
        print(f"[kd] {len(failures)} of {len(runs)} jobs did not complete (listed above)", file=sys.stderr)


if __name__ == "__main__":
    main()
