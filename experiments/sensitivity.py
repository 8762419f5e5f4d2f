"""How fig3's conclusions move with our reconstruction of the paper's synthetic targets.

The paper's KD-sim, KD-pt and LS settings on synthetic data are ours (README: "What is our
reconstruction"): KD-sim's class similarity (``similarity_source``, its temperature ``beta``), LS's
``eps`` and the temperature ``tau`` of the synthetic targets. Each variant changes one choice and
re-trains only the methods it touches, at fig3's deltas and seeds; the other methods are fig3's own
runs (the same run folders, so nothing is trained twice). For every variant, each of fig3's
ordering claims gets its paired gaps, 95% paired-t intervals and verdicts.
Writes results/sensitivity/{sensitivity.csv, sensitivity_claims.csv, sensitivity.png, sensitivity.pdf,
sensitivity.md}.

    python -m experiments.sensitivity                  # after (or instead of) make reproduce-fig3
    python -m experiments.sensitivity --seeds 0 1 2 -- trainer.max_epochs=100
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from experiments.fig3 import LABELS, METHODS, ORDERING, claim_lines, position
from kd.drivers import build_jobs, check_data, collect, ending, parser, require_data, run_overrides, sweep
from kd.report import publish
from kd.stats import paired_gaps

# variant -> (what it changes, the methods of the ordering it changes, their extra overrides).
# Defaults (fig3): similarity_source=teacher_weights_cosine, beta=0.2, eps=0.1, tau=1.
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
    "tau2": ("tau 2 for KD-pt and KD-sim", ["kd_pt", "kd_sim"], ["objective.temperature=2"]),
    "tau4": ("tau 4 for KD-pt and KD-sim", ["kd_pt", "kd_sim"], ["objective.temperature=4"]),
}
DEFAULT = "default"
CLAIMED = sorted({m for pair in ORDERING for m in pair}, key=METHODS.index)


def variant_label(method: str, variant: str) -> str:
    return method if variant == DEFAULT else f"{method}+{variant}"


def methods() -> dict[str, list[str]]:
    """fig3's runs of the claimed methods and every variant's, as ``build_jobs`` methods."""
    found = {m: [f"objective={m}"] for m in CLAIMED}
    for variant, (_, changed, extra) in VARIANTS.items():
        found.update({variant_label(m, variant): [f"objective={m}", *extra] for m in changed})
    return found


def under(df: pd.DataFrame, variant: str) -> pd.DataFrame:
    """The runs as the variant sees them: its own runs of the methods it changes, fig3's of the rest."""
    changed = VARIANTS[variant][1] if variant != DEFAULT else []
    keep = df.method.isin([m for m in CLAIMED if m not in changed] + [variant_label(m, variant) for m in changed])
    return df[keep].assign(method=df.method.str.split("+").str[0])


def claims(df: pd.DataFrame, metric: str = "test_acc_last") -> pd.DataFrame:
    ok = df[df.status == "completed"]
    return pd.concat(
        [paired_gaps(under(ok, v), ORDERING, metric, by="delta").assign(variant=v) for v in [DEFAULT, *VARIANTS]],
        ignore_index=True,
    )


def plot(gaps: pd.DataFrame):
    """One panel per claim: its paired gap and 95% interval at each delta, under every variant that
    changes one of its two methods (and the defaults)."""
    fig, axes = plt.subplots(1, len(ORDERING), figsize=(15, 4.4), constrained_layout=True, sharey=True)
    deltas = sorted(gaps.delta.unique())
    for ax, (a, b) in zip(axes, ORDERING):
        shown = [DEFAULT] + [v for v, (_, changed, _) in VARIANTS.items() if {a, b} & set(changed)]
        for i, variant in enumerate(shown):
            rows = gaps[(gaps.a == a) & (gaps.b == b) & (gaps.variant == variant)]
            x = [deltas.index(d) + 0.1 * (i - (len(shown) - 1) / 2) for d in rows.delta]
            label = "fig3's settings" if variant == DEFAULT else VARIANTS[variant][0]
            color = "k" if variant == DEFAULT else f"C{list(VARIANTS).index(variant)}"  # the same in every panel
            ax.errorbar(
                x,
                rows.gap,
                yerr=[rows.gap - rows.ci_low, rows.ci_high - rows.gap],
                fmt="o",
                capsize=3,
                label=label,
                color=color,
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(deltas)), [position("delta", d) for d in deltas])
        ax.set_title(f"{LABELS[a]} − {LABELS[b]}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("paired gap in test acc last (95% paired-t interval)")
    fig.suptitle("Sensitivity of fig3's ordering to our reconstruction of the synthetic targets")
    return fig


def summarise(df: pd.DataFrame, gaps: pd.DataFrame, seconds: float) -> str:
    ok = df[df.status == "completed"]
    failed = df[df.status != "completed"]
    header = [f"{LABELS[a]} > {LABELS[b]}" for a, b in ORDERING]
    lines = [
        "# Sensitivity of fig3's ordering to our reconstruction (test_acc_last)",
        "",
        f"{len(ok)} runs completed, {len(failed)} failed; {ok.seed.nunique()} seeds; wall time "
        f"{seconds / 60:.1f} min for this invocation (fig3's runs are reused). Each cell: at how many of the "
        f"{gaps.delta.nunique()} deltas the 95% paired-t interval of the gap is above 0 (holds) / contains 0 / "
        "is below 0 (reversed), and the gap's range over deltas.",
        "",
        "| variant | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for variant in [DEFAULT, *VARIANTS]:
        cells = []
        for a, b in ORDERING:
            rows = gaps[(gaps.a == a) & (gaps.b == b) & (gaps.variant == variant)]
            counts = rows.verdict.value_counts()
            cells.append(
                f"{counts.get('holds', 0)} / {counts.get('unresolved', 0)} / {counts.get('reversed', 0)} "
                f"({rows.gap.min():+.3f} to {rows.gap.max():+.3f})"
            )
        name = "fig3's settings" if variant == DEFAULT else VARIANTS[variant][0]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Each variant in detail", ""]
    for variant in VARIANTS:
        lines += [
            f"### {VARIANTS[variant][0]}",
            "",
            *claim_lines(gaps[gaps.variant == variant].drop(columns="variant"), "delta"),
            "",
        ]
    return ending(
        lines,
        failed,
        "`make reproduce-sensitivity` (see README for settings and time).",
        describe=lambda r: f"{r.method} delta={r.delta:g} seed={r.seed}",
    )


def main(argv=None) -> Path:
    cli = parser("sensitivity", __doc__, seeds=range(10))
    cli.set_defaults(runs="logs/fig3")  # fig3's runs: its defaults are not trained again
    cli.add_argument("--deltas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    args = cli.parse_args(argv)
    check_data(args.data, "sensitivity", supported=("synthetic",))
    start = time.time()
    jobs = build_jobs(args.data, args.deltas, args.seeds, methods(), run_overrides(args))
    require_data(next(iter(jobs.values())))
    df = collect(sweep(jobs, args, "sensitivity")).assign(data=args.data)
    gaps = claims(df)
    seconds = time.time() - start
    out = publish(
        "sensitivity",
        args.out,
        {"sensitivity": df.drop(columns=["objective"]), "sensitivity_claims": gaps},
        {"sensitivity": plot(gaps)},
        summarise(df, gaps, seconds),
        wandb=not args.no_wandb,
        config=vars(args),
    )
    print(f"[kd] sensitivity written to {out} in {seconds / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
