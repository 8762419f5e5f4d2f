"""How fig3's conclusions move with our reconstruction of the paper's synthetic targets.

The paper's KD-sim, KD-pt and LS settings on synthetic data are ours (README: "What is our
reconstruction"): KD-sim's class similarity (``similarity_source``, its temperature ``beta``), LS's
``eps`` and the temperature ``tau`` of the synthetic targets. Each variant changes one choice and
re-trains only the methods it touches, at the points of fig3's axis (synthetic data's deltas,
Fashion-MNIST's images per class) and its seeds; the other methods are fig3's own runs (the same run
folders, so nothing is trained twice). For every variant, each of fig3's ordering claims gets its
paired gaps, 95% paired-t intervals and verdicts. Writes results/sensitivity/{sensitivity.csv,
sensitivity_claims.csv, sensitivity.png, sensitivity.pdf, sensitivity.md}
(results/sensitivity_fashion_mnist/ on Fashion-MNIST).

    python -m experiments.sensitivity                  # after (or instead of) make reproduce-fig3
    python -m experiments.sensitivity --data fashion_mnist   # make reproduce-sensitivity DATA=fashion_mnist
    python -m experiments.sensitivity --seeds 0 1 2 -- trainer.max_epochs=100
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from experiments.drivers import (
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
)
from experiments.fig3 import DELTAS, LABELS, METHODS, ORDERING, PER_CLASS, axis, claim_lines
from kd.report import publish
from kd.stats import paired_gaps

# variant -> (what it changes, the methods of the ordering it changes, their extra overrides).
# Defaults (fig3): similarity_source=teacher_weights_cosine, beta=0.2, eps=0.1; tau 1 on synthetic data,
# the recipe's 4 on Fashion-MNIST (recipe.kd of configs/recipe/fashion_mnist.yaml).
VARIANTS = {
    "mean_probs": (
        "KD-sim's similarity: the teacher's mean probabilities",
        ["kd_sim"],
        ["objective.similarity_source=mean_teacher_probs"],
    ),
    "beta0.1": ("KD-sim's beta 0.1 (sharper)", ["kd_sim"], ["objective.beta=0.1"]),
    "beta0.5": ("KD-sim's beta 0.5 (flatter)", ["kd_sim"], ["objective.beta=0.5"]),
    "eps0.05": ("LS's eps 0.05", ["ls"], ["objective.eps=0.05"]),
    "eps0.2": ("LS's eps 0.2", ["ls"], ["objective.eps=0.2"]),
}
# The synthetic targets' temperature: two values besides the data set's default, the same two steps
# of 2x on either data set (synthetic tau 1 -> 2, 4; Fashion-MNIST's recipe tau 4 -> 2, 1, towards the
# hard targets: a flatter tau 8 would push KD-pt's q_c towards uniform, LS's own territory).
TEMPERATURES = {"synthetic": (2, 4), "fashion_mnist": (2, 1)}


def variants(data: str) -> dict[str, tuple[str, list[str], list[str]]]:
    """The variants run on ``data``: ``VARIANTS`` and its two temperatures."""
    taus = {
        f"tau{t}": (f"tau {t} for KD-pt and KD-sim", ["kd_pt", "kd_sim"], [f"objective.temperature={t}"])
        for t in TEMPERATURES[data]
    }
    return {**VARIANTS, **taus}


DEFAULT = "default"
CLAIMED = sorted({m for pair in ORDERING for m in pair}, key=METHODS.index)


def methods(data: str) -> dict[str, Job]:
    """fig3's runs of the claimed methods (named as in fig3, so they are its runs) and every
    variant's (``<method>+<variant>``), as ``build_jobs`` methods whose rows carry their objective
    and variant (``DEFAULT``: fig3's settings)."""
    found = {m: Job([f"objective={m}"], {"objective": m, "variant": DEFAULT}) for m in CLAIMED}
    for variant, (_, changed, extra) in variants(data).items():
        found.update(
            {f"{m}+{variant}": Job([f"objective={m}", *extra], {"objective": m, "variant": variant}) for m in changed}
        )
    return found


def with_values(df: pd.DataFrame, data: str) -> pd.DataFrame:
    """The rows of a published sensitivity.csv, which leaves them out, with the objective and variant
    their jobs carried: ``methods``' values, looked up by the method (the label ``methods`` gave)."""
    values = pd.DataFrame.from_dict({label: job.values for label, job in methods(data).items()}, orient="index")
    return df.join(values, on="method")


def under(df: pd.DataFrame, variant: str, changed: list[str]) -> pd.DataFrame:
    """The runs as the variant sees them, each named by its objective: its own runs of the ``changed``
    methods, fig3's of the rest."""
    own = df.objective.isin(changed)
    keep = ((df.variant == DEFAULT) & ~own) | ((df.variant == variant) & own)
    return df[keep].assign(method=df.objective)


def claims(df: pd.DataFrame, shown: dict, metric: str = "test_acc_last") -> pd.DataFrame:
    """Each ordering claim's paired gaps along fig3's axis, under fig3's settings and each of ``shown``."""
    ok = df[df.status == "completed"]
    changed = {DEFAULT: [], **{v: methods for v, (_, methods, _) in shown.items()}}
    return pd.concat(
        [paired_gaps(under(ok, v, m), ORDERING, metric, by=axis(df)).assign(variant=v) for v, m in changed.items()],
        ignore_index=True,
    )


def describe(variant: str, shown: dict) -> str:
    return "fig3's settings" if variant == DEFAULT else shown[variant][0]


def plot(gaps: pd.DataFrame, shown: dict, by: str, data: str):
    """One panel per claim: its paired gap and 95% interval at each point of fig3's axis, under every
    variant that changes one of its two methods (and the defaults)."""
    fig, axes = plt.subplots(1, len(ORDERING), figsize=(15, 4.4), constrained_layout=True, sharey=True)
    points = sorted(gaps[by].unique())
    for ax, (a, b) in zip(axes, ORDERING):
        variants_of = [DEFAULT] + [v for v, (_, changed, _) in shown.items() if {a, b} & set(changed)]
        for i, variant in enumerate(variants_of):
            rows = gaps[(gaps.a == a) & (gaps.b == b) & (gaps.variant == variant)]
            x = [points.index(d) + 0.1 * (i - (len(variants_of) - 1) / 2) for d in rows[by]]
            color = "k" if variant == DEFAULT else f"C{list(shown).index(variant)}"  # the same in every panel
            ax.errorbar(
                x,
                rows.gap,
                yerr=[rows.gap - rows.ci_low, rows.ci_high - rows.gap],
                fmt="o",
                capsize=3,
                label=describe(variant, shown),
                color=color,
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(points)), [position(by, d) for d in points])
        ax.set_title(f"{LABELS[a]} − {LABELS[b]}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("paired gap in test acc last (95% paired-t interval)")
    fig.suptitle(f"Sensitivity of fig3's ordering to our reconstruction of the synthetic targets ({data})")
    return fig


def summarise(df: pd.DataFrame, gaps: pd.DataFrame, shown: dict, seconds: float, rerun_line: str) -> str:
    ok = df[df.status == "completed"]
    failed = df[df.status != "completed"]
    by = axis(df)
    header = [f"{LABELS[a]} > {LABELS[b]}" for a, b in ORDERING]
    lines = [
        f"# Sensitivity of fig3's ordering to our reconstruction ({df.data.iloc[0]}, test_acc_last)",
        "",
        f"{len(ok)} runs completed, {len(failed)} failed; {ok.seed.nunique()} seeds; wall time "
        f"{seconds / 60:.1f} min for this invocation (fig3's runs are reused). Each cell: at how many of the "
        f"{gaps[by].nunique()} points of fig3's axis ({by}) the 95% paired-t interval of the gap is above 0 "
        "(holds) / contains 0 / is below 0 (reversed), and the gap's range over them.",
        "",
        "| variant | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for variant in [DEFAULT, *shown]:
        cells = []
        for a, b in ORDERING:
            rows = gaps[(gaps.a == a) & (gaps.b == b) & (gaps.variant == variant)]
            counts = rows.verdict.value_counts()
            cells.append(
                f"{counts.get('holds', 0)} / {counts.get('unresolved', 0)} / {counts.get('reversed', 0)} "
                f"({rows.gap.min():+.3f} to {rows.gap.max():+.3f})"
            )
        lines.append(f"| {describe(variant, shown)} | " + " | ".join(cells) + " |")
    lines += ["", "## Each variant in detail", ""]
    for variant in shown:
        lines += [
            f"### {describe(variant, shown)}",
            "",
            *claim_lines(gaps[gaps.variant == variant].drop(columns="variant"), by),
            "",
        ]
    return ending(lines, failed, f"{rerun_line} (see README for settings and time).")


def main(argv=None) -> Path:
    cli = parser("sensitivity", __doc__, seeds=range(10), runs_of="fig3")  # fig3's runs are not trained again
    axis_arguments(cli, delta=DELTAS, per_class=PER_CLASS, whose="fig3's")
    args = cli.parse_args(argv)
    check_data(args.data, "sensitivity", supported=tuple(TEMPERATURES))
    start = time.time()
    shown = variants(args.data)
    jobs = build_jobs(args.data, axis_points(args), args.seeds, methods(args.data), run_overrides(args))
    require_data(next(iter(jobs.values())).overrides)
    df = collect(jobs, sweep(jobs, args, "sensitivity")).assign(data=args.data)
    gaps = claims(df, shown)
    seconds = time.time() - start
    out = publish(
        "sensitivity",
        args.out,
        {"sensitivity": df.drop(columns=["objective", "variant"]), "sensitivity_claims": gaps},
        {"sensitivity": plot(gaps, shown, axis(df), args.data)},
        summarise(df, gaps, shown, seconds, rerun("sensitivity", args.data)),
        wandb=not args.no_wandb,
        config=vars(args),
    )
    print(f"[kd] sensitivity written to {out} in {seconds / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
