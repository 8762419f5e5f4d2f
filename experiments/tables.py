"""Tables 1 and 2: the ablation of the knowledge levels on real data (entry points: ``table1``, ``table2``).

Table 1 is CIFAR-100 under the CRD recipe (resnet56 -> resnet20, resnet32x4 -> resnet8x4), table 2
ImageNet (resnet34 -> resnet18). Each cell is one experiment config,
``configs/experiment/<table>/<teacher>_<student>_<method>.yaml``, run once per seed. Reported: test
top-1 accuracy (%) at the last epoch and at the best epoch (chosen on the validation split carved
from train), mean ± std over seeds, with the teacher's accuracy and the published numbers of
reference/anchors.md beside ours. Writes results/<table>/{<table>.csv, <table>_runs.csv, <table>.md}.

    python -m experiments.table1                            # make reproduce-table1 (data: make data DATA=cifar100)
    python -m experiments.table2 --seeds 0 -- trainer=gpu  # any override after --
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from experiments.drivers import Job, collect, ending, parser, require_data, run_overrides, sweep
from experiments.fig3 import LABELS, METHODS, ORDERING
from kd import objectives, teachers
from kd.report import publish
from kd.results import completed_record
from kd.runner import QUIET, compose_config
from kd.stats import paired_gaps

METRICS = ("test_acc_last", "test_acc_best")  # test accuracy of the last and of the best-on-validation epoch


@dataclass(frozen=True)
class Table:
    data: str
    title: str
    pairs: tuple[tuple[str, str], ...]
    # Published top-1 (%) per pair (reference/anchors.md), keyed by our method: ce = the student alone.
    published: dict
    source: str


TABLES = {
    "table1": Table(
        "cifar100",
        "CIFAR-100, CRD recipe",
        (("resnet56", "resnet20"), ("resnet32x4", "resnet8x4")),
        {
            ("resnet56", "resnet20"): {"teacher": 72.34, "ce": 69.06, "kd": 70.66},
            ("resnet32x4", "resnet8x4"): {"teacher": 79.42, "ce": 72.50, "kd": 73.33},
        },
        "the CRD benchmark (RepDistiller), last epoch, single run",
    ),
    "table2": Table(
        "imagenet",
        "ImageNet",
        (("resnet34", "resnet18"),),
        {("resnet34", "resnet18"): {"teacher": 73.31, "ce": 69.76, "kd": 71.03}},
        "torchvision's teacher and student; KD under this recipe (batch 512, lr 0.2)",
    ),
}


def cells(table: str, methods=METHODS) -> dict[str, tuple[str, str, str]]:
    """``<teacher>_<student>_<method> -> (teacher, student, method)``: the table's experiment configs."""
    return {f"{t}_{s}_{m}": (t, s, m) for t, s in TABLES[table].pairs for m in methods}


def sets_teacher(override: str) -> bool:
    """``teacher=...``, ``teacher.<key>=...`` (with + or ~) or ``<group>@teacher.<key>=...``."""
    return override.split("=")[0].lstrip("+~").split("@")[-1].split(".")[0] == "teacher"


def cell_overrides(table: str, cell: str, overrides) -> list[str]:
    """``experiment=<table>/<cell>`` and the overrides for every run, less the teacher's in the cells
    without a teacher (CE, LS), which have nothing there to override."""
    keep = objectives.needs_teacher(cells(table)[cell][2])
    return [f"experiment={table}/{cell}", *[o for o in overrides if keep or not sets_teacher(o)]]


def cell_config(table: str, cell: str, overrides) -> DictConfig:
    """A cell's run config, as ``python -m kd.train experiment=<table>/<cell>`` builds it; read, not
    run, so its output folder is only a placeholder that lets the config resolve."""
    return compose_config([*QUIET, *cell_overrides(table, cell, overrides)], Path(table, cell))


def teacher_configs(table: str, overrides) -> dict[Path, DictConfig]:
    """A config of a student of each teacher the table distils from, keyed by the teacher's folder in
    the cache (``kd.teachers``): ``ensure_trained`` on it trains the very teacher the students load."""
    found = {}
    for cell in cells(table):
        cfg = cell_config(table, cell, overrides)
        if cfg.teacher.kind == "trained":
            found.setdefault(Path(teachers.teacher_config(cfg).paths.output_dir), cfg)
    return found


def teacher_run(cfg: DictConfig) -> Path:
    """The run folder of a student's teacher: its folder in the cache, or the run whose checkpoint
    ``teacher=checkpoint teacher.path=<run>/checkpoints/<name>.ckpt`` names."""
    if cfg.teacher.kind == "checkpoint":
        return Path(cfg.teacher.path).parent.parent
    return Path(teachers.teacher_config(cfg).paths.output_dir)


def teacher_rows(table: str, overrides) -> pd.DataFrame:
    """Each pair's teacher accuracy, read from the teacher's run (status missing if it has none)."""
    rows = []
    for t, s in TABLES[table].pairs:
        record = completed_record(teacher_run(cell_config(table, f"{t}_{s}_kd", overrides))) or {}
        metrics = record.get("metrics", {})
        rows.append(
            {
                "teacher": t,
                "student": s,
                "method": "teacher",
                "seed": record.get("config", {}).get("seed"),
                "status": "completed" if record else "missing",
                **{m: metrics.get(m.replace("test_", "test/")) for m in METRICS},
            }
        )
    return pd.DataFrame(rows)


def summary_table(table: str, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per pair and method (the teacher first): accuracy in %, mean and std over seeds, beside
    the published number."""
    ok = runs[runs.status == "completed"]
    stats = ok.groupby(["teacher", "student", "method"], sort=False)[list(METRICS)].agg(["mean", "std"]) * 100
    stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
    stats = stats.join(ok.groupby(["teacher", "student", "method"], sort=False).seed.nunique().rename("seeds"))
    order = [(t, s, m) for t, s in TABLES[table].pairs for m in ["teacher", *METHODS]]
    stats = stats.reindex([key for key in order if key in stats.index]).reset_index()
    published = TABLES[table].published
    stats["published_test_acc"] = [published[(r.teacher, r.student)].get(r.method) for r in stats.itertuples()]
    return stats


def cell_text(mean, std) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def summarise(table: str, stats: pd.DataFrame, runs: pd.DataFrame, seconds: float) -> str:
    spec = TABLES[table]
    students = runs[runs.method != "teacher"]
    ok, failed = students[students.status == "completed"], students[students.status != "completed"]
    lines = [
        f"# {table.replace('table', 'Table ')}: ablation of the knowledge levels, {spec.title}",
        "",
        "Metric: **test top-1 accuracy (%)** at the last epoch and at the best epoch (best chosen on the "
        "validation split carved from train), mean ± std over seeds. Teacher: one CE run (its seed), shared "
        f"by every student. Published: {spec.source} (reference/anchors.md); its CE row is the student "
        "trained alone.",
        "",
        f"{len(ok)} student runs completed, {len(failed)} failed; seeds {sorted(ok.seed.unique().tolist())}; "
        f"wall time {seconds / 60:.1f} min.",
        "",
    ]
    labels = {"teacher": "teacher (CE)", **LABELS}
    for (t, s), rows in stats.groupby(["teacher", "student"], sort=False):
        lines += [
            f"## {t} -> {s}",
            "",
            "| method | test top-1 (%), last epoch | test top-1 (%), best epoch | seeds | published test top-1 (%) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {labels[r.method]} | {cell_text(r.test_acc_last_mean, r.test_acc_last_std)} | "
            f"{cell_text(r.test_acc_best_mean, r.test_acc_best_std)} | {r.seeds} | "
            f"{'' if pd.isna(r.published_test_acc) else f'{r.published_test_acc:.2f}'} |"
            for r in rows.itertuples()
        ]
        lines.append("")
    gaps = paired_gaps(ok.assign(pair=ok.teacher + " -> " + ok.student), ORDERING, "test_acc_last", by="pair")
    if len(gaps):
        lines += [
            "## The paper's ordering: instance > domain > universe > none (last epoch)",
            "",
            "Gap = mean over seeds of the paired difference (same seed = same validation split and batch "
            "order); it *exceeds the seed spread* when |gap| > the std of the paired differences.",
            "",
        ]
    for r in gaps.itertuples():
        lines.append(
            f"- {r.pair}: {LABELS[r.a]} - {LABELS[r.b]} = {100 * r.gap:+.2f} ± {100 * r.spread:.2f} points "
            f"({'beyond' if r.exceeds_spread else 'within'} the seed spread, {r.n} seeds)"
        )
    return ending(
        lines,
        failed,
        f"`make reproduce-{table}` (teachers first: `make teachers DATA={spec.data}`; see docs/real_data.md).",
        describe=lambda r: f"{r.teacher} -> {r.student} {r.method} seed={r.seed}",
    )


def main(table: str, argv=None) -> Path:
    cli = parser(table, __doc__, data=TABLES[table].data)
    cli.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = cli.parse_args(argv)
    start = time.time()
    overrides = run_overrides(args)
    table_cells = cells(table, args.methods)
    require_data(cell_overrides(table, next(iter(table_cells)), overrides))
    jobs = {
        f"{cell}-s{seed}": Job(
            [*cell_overrides(table, cell, overrides), f"seed={seed}"],
            {"method": method, "seed": seed, "teacher": teacher, "student": student},
        )
        for cell, (teacher, student, method) in table_cells.items()
        for seed in args.seeds
    }
    runs = collect(jobs, sweep(jobs, args, table))
    runs = pd.concat([teacher_rows(table, overrides), runs], ignore_index=True)
    stats = summary_table(table, runs)
    seconds = time.time() - start
    out = publish(
        table,
        args.out,
        {table: stats, f"{table}_runs": runs},
        {},
        summarise(table, stats, runs, seconds),
        wandb=not args.no_wandb,
        config=vars(args),
    )
    print(f"[kd] {table} written to {out} in {seconds / 60:.1f} min")
    return out
