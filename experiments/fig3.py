"""Fig. 3: the ablation of the three levels of knowledge.

CE (none), LS (universe), KD-sim (universe + domain), KD-pt (universe + instance), KD-pt+sim
(all three, synthetic), KD (the real teacher) and KD-topk, over seeds and along the data set's axis:
class-relationship strength (delta) on synthetic data, the student's training images per class on
Fashion-MNIST; on a data set without an axis (CIFAR-100), the methods side by side. Writes
results/fig3/{fig3.csv, fig3.png, fig3.pdf, fig3.md} (results/fig3_<data>/ on real data).

    python -m experiments.fig3                      # synthetic, the default (make reproduce-fig3)
    python -m experiments.fig3 --data fashion_mnist # real images on a CPU (make reproduce-fig3 DATA=fashion_mnist)
    python -m experiments.fig3 --data cifar100      # resnet56 -> resnet20, CRD recipe (make reproduce-fig3 DATA=cifar100)
    python -m experiments.fig3 --seeds 0 1 2 -- trainer.max_epochs=100   # any override after --
    python -m experiments.fig3 --population off     # every run alone (same results, slower)
    python -m experiments.fig3 --methods ce kd_pt kd dkd   # DKD, the peer, beside the levels (not by default)
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from hydra.utils import instantiate

from experiments.drivers import (
    AXES,
    DATA,
    Job,
    axis_arguments,
    axis_points,
    build_jobs,
    check_data,
    collect,
    ending,
    parser,
    position,
    require_data,
    rerun,
    run_overrides,
    sweep,
    teacher_accuracy,
)
from kd import objectives
from kd.analysis.domain import sibling_mass
from kd.predict import probabilities
from kd.report import publish
from kd.runner import compose_config
from kd.stats import holm, paired_gaps

METHODS = ["ce", "ls", "kd_sim", "kd_pt", "kd_pt_sim", "kd", "kd_topk"]
# Every objective --methods takes, by its declared label (kd.objectives), in the order of plots and
# tables: the default ones, then the others as declared (DKD, the peer, with its own defaults:
# mdistiller's CIFAR-100 recipe; the controls; a new one: docs/extending.md).
LABELS = {name: objectives.REGISTRY[name].label for name in [*METHODS, *objectives.REGISTRY]}
# fig3's points of each data set's axis (sensitivity re-trains its variants at the same ones).
DELTAS = [0.5, 1.0, 2.0, 4.0]
PER_CLASS = [20, 60, 200]
# The paper's reported order of benefit, each level against the one below it.
ORDERING = [("kd_pt", "kd_sim"), ("kd_sim", "ls"), ("ls", "ce")]


def axis(df: pd.DataFrame) -> str:
    """What the runs are compared along: the data set's axis (a column of ``collect``: delta,
    per_class); on a data set without one, the data set: one position."""
    return next((a.column for a in AXES.values() if a.column in df), "data")


def plot(df: pd.DataFrame, metric: str = "test_acc_last"):
    """Left: each method's accuracy (mean ± std over seeds). Right: the paper's ordering, each
    claim's paired gap with its 95% interval over seeds."""
    ok = df[df.status == "completed"]
    by = axis(df)
    methods = [m for m in LABELS if m in set(ok.method)]
    stats = ok.groupby(["method", by])[metric].agg(["mean", "std"]).fillna(0.0)
    fig, (ax, right) = plt.subplots(1, 2, figsize=(12.4, 4.4), constrained_layout=True)
    if by != "data":
        for method in methods:
            s = stats.loc[method]
            line = ax.plot(s.index, s["mean"], marker="o", label=LABELS[method])[0]
            ax.fill_between(s.index, s["mean"] - s["std"], s["mean"] + s["std"], color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        swept = sorted(ok[by].unique())
        ax.set_xticks(swept, [f"{v:g}" for v in swept])
        ax.minorticks_off()
        ax.set_xlabel(next(a.title for a in AXES.values() if a.column == by))
    else:  # no axis to sweep: the methods side by side, one series per data set
        for key, rows in stats.groupby(level=by):
            rows = rows.droplevel(by).reindex(methods)
            ax.errorbar(range(len(methods)), rows["mean"], yerr=rows["std"], fmt="o", capsize=4, label=key)
        ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=30, ha="right")
    ax.set_ylabel(f"student {metric.replace('_', ' ')} (mean ± std over seeds)")
    ax.set_title(f"Fig. 3: knowledge levels ablation ({', '.join(df.data.unique())})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    gaps = paired_gaps(ok, ORDERING, metric, by=by)
    positions = sorted(gaps[by].unique())
    for i, ((a, b), rows) in enumerate(gaps.groupby(["a", "b"], sort=False)):
        x = [positions.index(v) + 0.12 * (i - 1) for v in rows[by]]
        right.errorbar(
            x,
            rows.gap,
            yerr=[rows.gap - rows.ci_low, rows.ci_high - rows.gap],
            fmt="o",
            capsize=4,
            label=f"{LABELS[a]} − {LABELS[b]}",
        )
    right.axhline(0, color="k", lw=0.8)
    right.set_xticks(range(len(positions)), [position(by, v) for v in positions])
    right.set_ylabel(f"paired gap in {metric.replace('_', ' ')} (95% paired-t interval)")
    right.set_title("The paper's ordering: each level minus the one below it")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return fig


def generator(jobs: dict[str, Job]) -> pd.DataFrame:
    """What the synthetic data offer at each delta, read off the exact Bayes posterior (the oracle
    teacher) on the test split: how hard the task is and how related the classes are."""
    rows, seen = [], set()
    for job in jobs.values():
        key = job.values["delta"], job.values["seed"]  # the same data for every method
        if key in seen:
            continue
        seen.add(key)
        dm = instantiate(compose_config(job.overrides).data)
        dm.setup()
        out = probabilities(dm.oracle_teacher(), dm, "test")
        m, k = dm.hparams.subclasses, dm.num_classes
        rows.append(
            {
                "delta": dm.hparams.delta,
                "seed": dm.hparams.seed,
                "bayes_acc": (out["probs"].argmax(1) == out["labels"]).float().mean().item(),
                "sibling_mass": sibling_mass(out["probs"], out["labels"], dm.superclass_of),
                "sibling_chance": (m - 1) / (k - 1),
            }
        )
    return pd.DataFrame(rows)


def generator_lines(gen: pd.DataFrame) -> list[str]:
    stats = gen.groupby("delta")[["bayes_acc", "sibling_mass"]].agg(["mean", "std"])
    lines = [
        "",
        "## The data at each delta (oracle teacher = exact Bayes posterior, test split)",
        "",
        f"Sibling mass: share of the oracle's wrong-class mass on the true class's superclass siblings "
        f"(chance {gen.sibling_chance.iloc[0]:.3f}).",
        "",
        "| delta | Bayes accuracy | sibling mass |",
        "|---|---|---|",
    ]
    lines += [
        f"| {d:g} | {r[('bayes_acc', 'mean')]:.3f} ± {r[('bayes_acc', 'std')]:.3f} | "
        f"{r[('sibling_mass', 'mean')]:.3f} ± {r[('sibling_mass', 'std')]:.3f} |"
        for d, r in stats.iterrows()
    ]
    return lines


def claim_lines(gaps: pd.DataFrame, by: str) -> list[str]:
    """One line per ordering claim: its verdict counts and, per position, gap [interval] verdict."""
    lines = []
    for (a, b), rows in gaps.groupby(["a", "b"], sort=False):
        counts = rows.verdict.value_counts()
        tally = ", ".join(
            f"{verdict} at {counts[verdict]}/{len(rows)}"
            for verdict in ("holds", "unresolved", "reversed")
            if verdict in counts
        )
        detail = "; ".join(
            f"{position(by, r[by])}: {r.gap:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] {r.verdict}"
            for _, r in rows.iterrows()
        )
        lines.append(f"- {LABELS[a]} > {LABELS[b]}: {tally} {by} values ({detail}).")
    return lines


def family_line(gaps: pd.DataFrame, name_of, shape: str = "") -> str:
    """How many comparisons a verdict table makes at once (``shape`` says how they are made up), and
    which of its decided verdicts survive Holm's correction of that family (family-wise error 5%);
    ``name_of`` names a row of ``gaps``."""
    decided = gaps[gaps.verdict.isin(["holds", "reversed"])]
    kept = holm(gaps.p)[decided.index]
    lost = [name_of(r) for _, r in decided[~kept].iterrows()]
    made = f"These verdicts make {len(gaps)} comparisons at once{f' ({shape})' if shape else ''}."
    if decided.empty:
        return f"{made} None is decided, so Holm's correction of that family (family-wise error 5%) has none to undo."
    return (
        f"{made} With Holm's correction of that family (family-wise error 5%), {int(kept.sum())} of the "
        f"{len(decided)} decided verdicts survive" + (f"; lost: {', '.join(lost)}." if lost else ".")
    )


def summarise(
    df: pd.DataFrame,
    seconds: float,
    metric: str = "test_acc_last",
    gen: pd.DataFrame | None = None,
    teachers: dict[str, float] | None = None,
    rerun: str = "`make reproduce-fig3`",
) -> str:
    ok = df[df.status == "completed"]
    failed = df[df.status != "completed"]
    by = axis(df)
    stats = ok.groupby(["method", by])[metric].agg(["mean", "std", "count"]).reset_index()
    lines = [
        f"# Fig. 3: ablation of the knowledge levels ({metric}, mean ± std over seeds)",
        "",
        f"{len(ok)} runs completed, {len(failed)} failed; {ok.seed.nunique()} seeds; "
        f"wall time {seconds / 60:.1f} min for this invocation (finished runs are reused), "
        f"{ok.seconds.sum() / 60:.1f} min summed over the runs (teacher training included).",
        "",
    ]
    cells = stats["mean"].map("{:.3f}".format) + " ± " + stats["std"].fillna(0).map("{:.3f}".format)
    pivot = stats.assign(cell=cells).pivot(index="method", columns=by, values="cell")
    pivot = pivot.reindex([m for m in LABELS if m in set(stats.method)]).fillna("n/a")  # n/a: every seed failed
    lines += [
        "| method | " + " | ".join(position(by, d) for d in pivot.columns) + " |",
        "|---|" + "---|" * len(pivot.columns),
    ]
    lines += [f"| {LABELS[m]} | " + " | ".join(pivot.loc[m]) + " |" for m in pivot.index]
    lines += [
        "",
        "## The paper's ordering: instance > domain > universe > none",
        "",
        "Gap = mean over seeds of the paired difference (same seed = same data and teacher), with its 95% "
        "paired-t interval over seeds (gap ± t(0.975, n - 1) · std / √n). Verdict: *holds* when the interval "
        "is above 0, *reversed* when below, *unresolved* when it contains 0.",
        "",
    ]
    gaps = paired_gaps(ok, ORDERING, metric, by=by)
    shape = f"{gaps.groupby(['a', 'b']).ngroups} claims x {gaps[by].nunique()} {by} values"
    name_of = lambda r: f"{LABELS[r.a]} > {LABELS[r.b]} at {position(by, r[by])}"  # noqa: E731
    lines += [*claim_lines(gaps, by), "", family_line(gaps, name_of, shape)]
    if gen is not None:
        lines += generator_lines(gen)
    if teachers:
        accs = pd.Series(teachers)
        lines += [
            "",
            f"Teacher ({accs.index[0]}): test accuracy {accs.iloc[0]:.3f} (last epoch)."
            if len(accs) == 1
            else f"{len(accs)} teachers: test accuracy {accs.mean():.3f} ± {accs.std():.3f}, "
            f"{accs.min():.3f} to {accs.max():.3f} (last epoch).",
        ]
    return ending(lines, failed, f"{rerun} (see README for settings and time).")


def main(argv=None) -> Path:
    cli = parser("fig3", __doc__, seeds={"synthetic": range(10), None: (0, 1, 2)})
    axis_arguments(cli, delta=DELTAS, per_class=PER_CLASS)
    cli.add_argument("--methods", nargs="+", default=METHODS, choices=list(LABELS))
    args = cli.parse_args(argv)
    check_data(args.data, "fig3", supported=tuple(DATA))
    start = time.time()
    jobs = build_jobs(args.data, axis_points(args), args.seeds, args.methods, run_overrides(args))
    require_data(next(iter(jobs.values())).overrides)
    df = collect(jobs, sweep(jobs, args, "fig3")).assign(data=args.data)
    seconds = time.time() - start
    tables = {"fig3": df}
    if args.data == "synthetic":
        tables["fig3_generator"] = generator(jobs)
    summary = summarise(
        df, seconds, gen=tables.get("fig3_generator"), teachers=teacher_accuracy(jobs), rerun=rerun("fig3", args.data)
    )
    out = publish("fig3", args.out, tables, {"fig3": plot(df)}, summary, wandb=not args.no_wandb, config=vars(args))
    print(f"[kd] fig3 written to {out} in {seconds / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
