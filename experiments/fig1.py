"""Fig. 1: the instance level -- KD rescales each example's gradient by the teacher's confidence.

A KD and an LS student (fig3's setting at one point of its axis: one delta on synthetic data, one
number of training images per class on Fashion-MNIST; several seeds). For every example:
the teacher's confidence q_c and the factor w by which the student's objective rescales the CE
gradient on the true-class logit, at the trained student: w = 1 - lam (1 - q_c) / (1 - p_c) for KD,
w = 1 - eps (1 - 1/K) / (1 - p_c) for LS, where the teacher plays no part (kd.analysis.instance).
Left: the training examples. A trained KD student sits near its optimum p = (1 - lam) y + lam q,
where w = 0: what is left is how far it is from fitting each soft target. Right: held-out
(validation) examples the student has not fit: the rescaling KD applies to an example while
learning it. Writes results/fig1/{fig1.csv (per example), fig1_binned.csv, fig1.png, fig1.pdf, fig1.md}.

    python -m experiments.fig1                                   # synthetic, delta 1.0, seeds 0 1 2
    python -m experiments.fig1 --delta 0.5 -- trainer.max_epochs=100
    python -m experiments.fig1 --data fashion_mnist              # 60 images per class (DATA=fashion_mnist)
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
    require_data,
    rerun,
    run_overrides,
    sweep,
    where,
)
from kd.analysis import instance
from kd.objectives import targets
from kd.report import publish
from kd.runner import load_job

# objective -> (its config key that plays kd_weight, the soft target whose rho_c enters w)
METHODS = {"kd": ("kd_weight", targets.teacher), "ls": ("eps", targets.uniform)}
LABELS = {"kd": "KD", "ls": "LS"}
SPLITS = {"train": "training examples", "val": "held-out examples (validation)"}
# w is unbounded below (students more confident than their target) and, at tau > 1, above (a student
# confident at tau 1 has a tiny CE gradient while its tempered distribution is far from the teacher's):
# the plots clip to the range the paper reads, [0, 1] and a margin, and count what they clip.
W_RANGE = (-1.0, 1.05)


def per_example(runs: pd.DataFrame, jobs: dict[str, Job], root: str) -> pd.DataFrame:
    """q_c, rho_c, p_c and w of every example of every split, for every completed job."""
    frames = []
    for r in runs[runs.status == "completed"].itertuples():
        cfg, student, teacher, dm = load_job(root, r.job, jobs[r.job].overrides)
        weight_key, target = METHODS[r.method]
        for split in SPLITS:
            rows = instance.per_example(
                student, teacher, dm, cfg.objective[weight_key], split, cfg.objective.get("temperature", 1.0), target
            )
            frames.append(rows.assign(method=r.method, seed=r.seed, split=split))
    return pd.concat(frames, ignore_index=True)


def binned(examples: pd.DataFrame, bins: int) -> pd.DataFrame:
    """``instance.binned`` per method and split, over all seeds."""
    return pd.concat(
        [
            instance.binned(g.q_c, g.w, bins).assign(method=m, split=s)
            for (m, s), g in examples.groupby(["method", "split"])
        ],
        ignore_index=True,
    )


def per_seed(examples: pd.DataFrame) -> pd.DataFrame:
    """Per method, split and seed: Spearman correlation of w with q_c, median and spread of w."""

    def stats(g):
        return pd.Series(
            {
                "spearman": g.w.rank().corr(g.q_c.rank()),
                "median": g.w.median(),
                "iqr": g.w.quantile(0.75) - g.w.quantile(0.25),
                "near_zero": (g.w.abs() < 0.1).mean(),
            }
        )

    return examples.groupby(["method", "split", "seed"])[["w", "q_c"]].apply(stats).reset_index()


def plot(examples: pd.DataFrame, curves: pd.DataFrame, at: str):
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(11, 4.2), sharey=True, constrained_layout=True)
    for ax, (split, title) in zip(axes, SPLITS.items()):
        for i, method in enumerate(METHODS):
            rows = examples[(examples.split == split) & (examples.method == method)]
            curve = curves[(curves.split == split) & (curves.method == method)]
            below, above = (rows.w < W_RANGE[0]).sum(), (rows.w > W_RANGE[1]).sum()
            clipped = f"{below} points below {W_RANGE[0]:g}" + (f", {above} above {W_RANGE[1]:g}" if above else "")
            ax.scatter(rows.q_c, rows.w.clip(*W_RANGE), s=4, alpha=0.25, color=f"C{i}")
            ax.plot(
                curve.q_c,
                curve.w_median,
                color=f"C{i}",
                marker="o",
                label=f"{LABELS[method]} (median per bin; {clipped} drawn at the edge)",
            )
            ax.fill_between(curve.q_c, curve.w_q25, curve.w_q75, color=f"C{i}", alpha=0.2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(W_RANGE[0] - 0.05, W_RANGE[1])
        ax.set_xlabel("teacher confidence on the true class q_c")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("gradient rescaling factor w (KD or LS grad / CE grad)")
    fig.suptitle(f"Fig. 1: instance-level knowledge at the trained student ({at}, all seeds)")
    return fig


def summarise(
    seeds: pd.DataFrame,
    curves: pd.DataFrame,
    runs: pd.DataFrame,
    at: str,
    seconds: float,
    rerun: str = "`make reproduce-fig1`",
) -> str:
    failed = runs[runs.status != "completed"]
    ends = curves.sort_values("q_c").groupby(["method", "split"]).w_median.agg(["first", "last"])
    agg = (
        seeds.groupby(["method", "split"])[["spearman", "median", "iqr", "near_zero"]].agg(["mean", "std"]).fillna(0.0)
    )
    lines = [
        f"# Fig. 1: gradient rescaling factor w against the teacher's confidence q_c ({at})",
        "",
        f"{len(runs) - len(failed)} runs completed, {len(failed)} failed; {seeds.seed.nunique()} seeds; "
        f"wall time {seconds / 60:.1f} min. Mean ± std over seeds of per-seed statistics.",
        "",
        "| method | examples | Spearman(w, q_c) | median w | IQR of w | share with abs(w) < 0.1 "
        "| median w, lowest / highest q_c bin (all seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, split), row in agg.iterrows():
        lines.append(
            f"| {LABELS[method]} | {split} | "
            + " | ".join(
                f"{row[(c, 'mean')]:.3f} ± {row[(c, 'std')]:.3f}" for c in ("spearman", "median", "iqr", "near_zero")
            )
            + f" | {ends.loc[(method, split), 'first']:.3f} / {ends.loc[(method, split), 'last']:.3f} |"
        )
    lines += [
        "",
        "How to read it: KD's w uses the teacher's q_c; LS's w uses only the student's own p_c, so any "
        "correlation of LS's w with q_c comes from the student being confident where the teacher is. A "
        "trained student near its optimum (p_c = 1 - lam (1 - q_c) for KD, 1 - eps (1 - 1/K) for LS) has "
        "w near 0 on the examples it fits; w < 0 where it is more confident than its target.",
    ]
    return ending(lines, failed, f"{rerun} (see README for settings and time).")


def main(argv=None) -> Path:
    cli = parser("fig1", __doc__)
    axis_arguments(cli, delta=1.0, per_class=60)
    cli.add_argument("--bins", type=int, default=10, help="equal-width bins of q_c for the curves")
    args = cli.parse_args(argv)
    check_data(args.data, "fig1")
    start = time.time()
    jobs = build_jobs(args.data, axis_points(args), args.seeds, list(METHODS), run_overrides(args))
    require_data(next(iter(jobs.values())).overrides)
    runs = collect(jobs, sweep(jobs, args, "fig1")).assign(job=list(jobs))
    if not (runs.status == "completed").any():
        raise SystemExit(f"error: no fig1 run completed; see {args.runs}/runs/*/results.json")
    examples = per_example(runs, jobs, args.runs)
    curves = binned(examples, args.bins)
    seconds = time.time() - start
    at = where(args.data, axis_points(args))
    out = publish(
        "fig1",
        args.out,
        {"fig1": examples, "fig1_binned": curves},
        {"fig1": plot(examples, curves, at)},
        summarise(per_seed(examples), curves, runs, at, seconds, rerun("fig1", args.data)),
        wandb=not args.no_wandb,
        config=vars(args),
    )
    print(f"[kd] fig1 written to {out} in {seconds / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
