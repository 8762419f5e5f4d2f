"""The paper's claims on synthetic data and on Fashion-MNIST, side by side, corrected for the family.

Reads the per-run tables fig3 and sensitivity published (no training) and judges each claim at
every point of each data set's axis with fig3's paired intervals: instance > domain, domain >
universe, universe > none, KD > each synthetic target, and KD-topk against KD (two-sided). A data
set's comparisons are one family: each verdict that holds or is reversed is checked again by Holm's
step-down correction of the family's paired-t p-values (family-wise error 5%). For the three
ordering claims, the sensitivity variants say how many of their verdicts differ from fig3's.
Writes results/claims/{claims.csv, claims.png, claims.pdf, claims.md}.

    python -m experiments.claims      # after make reproduce-fig3 and reproduce-sensitivity on both data sets
    python -m experiments.claims --fig3 results/fig3 results/fig3_fashion_mnist_10seeds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from experiments.drivers import position
from experiments.fig3 import LABELS, ORDERING, axis
from experiments.sensitivity import DEFAULT, claims, variants, with_values
from kd.report import publish
from kd.stats import holm, paired_gaps

# (claim, its comparisons (a, b): a > b, or a vs b when two-sided).
CLAIMS = [
    *((f"{LABELS[a]} > {LABELS[b]}", [(a, b)]) for a, b in ORDERING),
    ("KD > every synthetic target", [("kd", m) for m in ("kd_pt", "kd_sim", "kd_pt_sim", "ls")]),
    ("KD-topk vs KD (two-sided)", [("kd_topk", "kd")]),
]
MARKS = {"holds": "✓", "reversed": "✗", "unresolved": "·"}


def judged(runs: pd.DataFrame) -> pd.DataFrame:
    """Every comparison of ``CLAIMS`` at every point of the data set's axis, with ``holm``: whether
    its verdict survives Holm's correction of the data set's family."""
    by = axis(runs)
    ok = runs[runs.status == "completed"]
    frames = [
        paired_gaps(ok, pairs, "test_acc_last", by=by).assign(claim=claim, point=lambda d: d[by])
        for claim, pairs in CLAIMS
    ]
    gaps = pd.concat(frames, ignore_index=True).drop(columns=by)
    gaps["holm"] = holm(gaps.p) & (gaps.verdict != "unresolved")
    return gaps.assign(data=runs.data.iloc[0], axis=by)


def moved(sensitivity: pd.DataFrame) -> dict[str, str]:
    """Per ordering claim: in how many (variant, point) cells of the sensitivity study the verdict
    differs from fig3's settings' at that point."""
    data = sensitivity.data.iloc[0]
    by = axis(sensitivity)
    gaps = claims(with_values(sensitivity, data), variants(data))
    base = gaps[gaps.variant == DEFAULT].set_index(["a", "b", by]).verdict
    found = {}
    for (a, b), rows in gaps[gaps.variant != DEFAULT].groupby(["a", "b"], sort=False):
        changed = rows.verdict.to_numpy() != base.loc[[(a, b, p) for p in rows[by]]].to_numpy()
        found[f"{LABELS[a]} > {LABELS[b]}"] = f"{changed.sum()} of {len(rows)}"
    return found


def cell(rows: pd.DataFrame) -> str:
    """A claim at one point: each comparison's gap and verdict, ``*`` where it survives Holm; a
    claim of several comparisons holds where all of them do."""
    marks = " ".join(f"{r.gap:+.3f}{MARKS[r.verdict]}{'*' if r.holm else ''}" for r in rows.itertuples())
    return marks


def table(gaps: pd.DataFrame, movement: dict[str, dict[str, str]]) -> list[str]:
    columns = [
        (data, point) for data, rows in gaps.groupby("data", sort=False) for point in sorted(rows.point.unique())
    ]
    header = [f"{data}: {position(gaps[gaps.data == data].axis.iloc[0], point)}" for data, point in columns]
    lines = ["| claim | " + " | ".join(header) + " | sensitivity: verdicts moved |", "|---" * (len(header) + 2) + "|"]
    for claim, _ in CLAIMS:
        cells = [cell(gaps[(gaps.claim == claim) & (gaps.data == d) & (gaps.point == p)]) for d, p in columns]
        moves = "; ".join(f"{d}: {m[claim]}" for d, m in movement.items() if claim in m) or "not varied"
        lines.append(f"| {claim} | " + " | ".join(cells) + f" | {moves} |")
    return lines


def plot(gaps: pd.DataFrame):
    """One panel per data set: each comparison's paired gap and 95% interval at each point, filled
    where its verdict survives Holm's correction."""
    sets = list(dict.fromkeys(gaps.data))
    fig, axes = plt.subplots(1, len(sets), figsize=(7.5 * len(sets), 5), constrained_layout=True, squeeze=False)
    comparisons = list(dict.fromkeys(zip(gaps.a, gaps.b)))
    for ax, data in zip(axes[0], sets):
        rows = gaps[gaps.data == data]
        points = sorted(rows.point.unique())
        for i, (a, b) in enumerate(comparisons):
            pair = rows[(rows.a == a) & (rows.b == b)]
            x = [points.index(p) + 0.09 * (i - (len(comparisons) - 1) / 2) for p in pair.point]
            ax.errorbar(
                x,
                pair.gap,
                yerr=[pair.gap - pair.ci_low, pair.ci_high - pair.gap],
                fmt="none",
                ecolor=f"C{i}",
                capsize=2,
            )
            ax.scatter(
                x,
                pair.gap,
                color=f"C{i}",
                label=f"{LABELS[a]} − {LABELS[b]}",
                zorder=3,
                facecolors=[f"C{i}" if h else "white" for h in pair.holm],
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(points)), [position(rows.axis.iloc[0], p) for p in points])
        ax.set_title(f"{data}: {len(rows)} comparisons, {int(rows.holm.sum())} survive Holm (filled)")
        ax.set_ylabel("paired gap in test acc last (95% paired-t interval)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def summarise(gaps: pd.DataFrame, movement: dict, sources: list[str]) -> str:
    lines = [
        "# The paper's claims on synthetic data and Fashion-MNIST (test_acc_last, paired over seeds)",
        "",
        "Each cell: per comparison, the mean paired gap over seeds and its verdict from the 95% paired-t "
        "interval (✓ holds, ✗ reversed, · unresolved); * where the verdict survives Holm's correction of "
        "the data set's family of comparisons (family-wise error 5%). *KD > every synthetic target* lists "
        "KD − KD-pt, − KD-sim, − KD-pt+sim, − LS in that order; *KD-topk vs KD* is two-sided (✗: KD-topk below KD).",
        "",
        *table(gaps, movement),
        "",
    ]
    for data, rows in gaps.groupby("data", sort=False):
        decided = rows[rows.verdict != "unresolved"]
        lost = decided[~decided.holm]
        seeds = rows.n.min() if rows.n.min() == rows.n.max() else f"{rows.n.min()} to {rows.n.max()}"
        lines.append(
            f"- {data}: {len(rows)} comparisons ({seeds} seeds each); "
            f"{len(decided)} decided by their own interval, {int(rows.holm.sum())} of them survive Holm"
            + (
                "; lost: "
                + ", ".join(f"{LABELS[r.a]} − {LABELS[r.b]} at {position(r.axis, r.point)}" for r in lost.itertuples())
                if len(lost)
                else ""
            )
            + "."
        )
    lines += [
        "",
        "Sensitivity: of the variants' (variant, point) cells of `make reproduce-sensitivity` on each data set, how "
        "many give a verdict other than fig3's settings at that point (results/sensitivity*/sensitivity.md has each).",
        "",
        f"From: {', '.join(sources)}.",
        "",
        "Re-run: `python -m experiments.claims` (see README).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    cli = argparse.ArgumentParser(
        prog="python -m experiments.claims", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_argument(
        "--fig3",
        nargs="+",
        default=["results/fig3", "results/fig3_fashion_mnist_10seeds"],
        help="fig3's results folders, one per data set (10 seeds each)",
    )
    cli.add_argument(
        "--sensitivity",
        nargs="*",
        default=["results/sensitivity", "results/sensitivity_fashion_mnist"],
        help="sensitivity's results folders, one per data set",
    )
    cli.add_argument("--out", default="results/claims")
    cli.add_argument("--no-wandb", action="store_true")
    args = cli.parse_args(argv)
    tables = [Path(f) / "fig3.csv" for f in args.fig3] + [Path(f) / "sensitivity.csv" for f in args.sensitivity]
    missing = [str(t) for t in tables if not t.is_file()]
    if missing:
        raise SystemExit(f"error: no {missing[0]}; run fig3 and sensitivity first (README: 'The claims side by side')")
    gaps = pd.concat([judged(pd.read_csv(Path(f) / "fig3.csv")) for f in args.fig3], ignore_index=True)
    movement = {}
    for folder in args.sensitivity:
        runs = pd.read_csv(Path(folder) / "sensitivity.csv")
        movement[runs.data.iloc[0]] = moved(runs)
    out = publish(
        "claims",
        args.out,
        {"claims": gaps},
        {"claims": plot(gaps)},
        summarise(gaps, movement, [str(t) for t in tables]),
        wandb=not args.no_wandb,
        config=vars(args),
    )
    print(f"[kd] claims written to {out}")
    return out


if __name__ == "__main__":
    main()
