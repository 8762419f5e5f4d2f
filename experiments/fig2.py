"""Fig. 2: the domain level -- class relationships in the teacher and in the students' logit layers.

Top row: the K x K correlation across examples of the teacher's class probabilities at tau = 1 and
at a high tau, classes ordered by superclass. Then the cosine similarity of the logit-layer class
templates w_k of the teacher and of CE, LS and KD students. Each matrix is scored by its mean
within-superclass off-diagonal entry minus its mean between-superclass entry. The paper reports
strong within-superclass correlation at high temperature, not at tau = 1, and that KD imposes the
teacher's class relationships on the student's logit layer.
Writes results/fig2/{fig2.csv, fig2_matrices.csv, fig2.png, fig2.pdf, fig2.md}.

    python -m experiments.fig2                       # synthetic, delta 0.5 (fig3's teacher), seeds 0 1 2
    python -m experiments.fig2 --tau 8 -- trainer.max_epochs=100
    python -m experiments.fig2 --data fashion_mnist  # our class hierarchy (make reproduce-fig2 DATA=fashion_mnist)
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from experiments.drivers import (
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
from kd.analysis import domain, universe
from kd.report import publish
from kd.runner import load_job
from kd.stats import paired_gaps

STUDENTS = ["ce", "ls", "kd"]


def matrix_labels(tau: float) -> dict[str, str]:
    return {
        "teacher_probs_tau1": "teacher probabilities, tau = 1",
        f"teacher_probs_tau{tau:g}": f"teacher probabilities, tau = {tau:g}",
        "weights_teacher": "teacher logit-layer cosine",
        **{f"weights_{m}": f"{m.upper()} student logit-layer cosine" for m in STUDENTS},
    }


def seed_matrices(loaded: dict, tau: float, split: str):
    """The six matrices of one seed, and its teacher's effective smoothing at tau = 1 and at tau."""
    _, _, teacher, dm = next(iter(loaded.values()))
    matrices = {f"teacher_probs_tau{t:g}": domain.class_correlation(teacher, dm, split, t) for t in (1.0, tau)}
    matrices["weights_teacher"] = domain.weight_cosine(teacher)
    matrices.update({f"weights_{m}": domain.weight_cosine(student) for m, (_, student, _, _) in loaded.items()})
    smoothing = {t: universe.summary(teacher, dm, split, t)["effective_smoothing"] for t in (1.0, tau)}
    return matrices, dm.superclass_of, dm.class_names, smoothing


def plot(matrices: dict, superclass_of: torch.Tensor, names: list[str], labels: dict, seed: int, at: str):
    """The six matrices, classes ordered by superclass and named on both axes."""
    order = domain.superclass_order(superclass_of)
    bounds = (torch.nonzero(superclass_of[order][1:] != superclass_of[order][:-1]).flatten() + 0.5).tolist()
    ticks = [names[k] for k in order.tolist()]
    fig, axes = plt.subplots(2, 3, figsize=(13, 9.4), constrained_layout=True)
    for ax, (name, matrix) in zip(axes.flat, matrices.items()):
        image = ax.imshow(matrix[order][:, order].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        for b in bounds:
            ax.axhline(b, color="k", lw=0.6)
            ax.axvline(b, color="k", lw=0.6)
        score = domain.superclass_score(matrix, superclass_of)["score"]
        ax.set_title(f"{labels[name]}\nwithin - between = {score:+.2f}", fontsize=9)
        ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=6)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=6)
    for ax in list(axes.flat)[len(matrices) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="correlation / cosine")
    fig.suptitle(f"Fig. 2: domain knowledge, classes ordered by superclass ({at}, seed {seed})")
    return fig


def long_form(matrices: dict, seed: int) -> pd.DataFrame:
    """Every entry of every matrix: seed, matrix, row, col, value (for re-plotting)."""
    frames = []
    for name, matrix in matrices.items():
        k = matrix.shape[0]
        frames.append(
            pd.DataFrame(
                {
                    "seed": seed,
                    "matrix": name,
                    "row": torch.arange(k).repeat_interleave(k).numpy(),
                    "col": torch.arange(k).repeat(k).numpy(),
                    "value": matrix.flatten().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def summarise(
    scores: pd.DataFrame,
    smoothing: pd.DataFrame,
    failed: pd.DataFrame,
    labels: dict,
    tau: float,
    split: str,
    seconds: float,
    at: str = "synthetic",
    rerun: str = "`make reproduce-fig2`",
) -> str:
    stats = scores.groupby("matrix", sort=False)[["within", "between", "score"]].agg(["mean", "std"]).fillna(0.0)
    lines = [
        f"# Fig. 2: domain knowledge ({at}; within- vs between-superclass similarity, mean ± std over seeds)",
        "",
        f"{scores.seed.nunique()} seeds; teacher probabilities on the {split} split; wall time {seconds / 60:.1f} min.",
        "",
        "| matrix | within superclass | between | within - between |",
        "|---|---|---|---|",
    ]
    for name in stats.index:
        row = stats.loc[name]
        lines.append(
            f"| {labels[name]} | "
            + " | ".join(f"{row[(c, 'mean')]:+.3f} ± {row[(c, 'std')]:.3f}" for c in ("within", "between", "score"))
            + " |"
        )
    lines += [
        "",
        "## The paper's claims, seed by seed",
        "",
        "Gap = mean over seeds of the paired difference of within - between scores, with its 95% paired-t "
        "interval over seeds; *holds* when the interval is above 0, *reversed* below, *unresolved* when it "
        "contains 0 (fig3's verdicts).",
        "",
    ]
    pairs = [
        (f"teacher_probs_tau{tau:g}", "teacher_probs_tau1"),
        ("weights_kd", "weights_ce"),
        ("weights_kd", "weights_ls"),
    ]
    for r in paired_gaps(scores.assign(method=scores.matrix, delta=0), pairs, "score", by="delta").itertuples():
        judged = (
            f"the same in each of {r.n} seeds (one teacher): exact"
            if r.spread == 0
            else f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}] {r.verdict} over {r.n} seeds"
        )
        lines.append(f"- {labels[r.a]} > {labels[r.b]}: {r.gap:+.3f} {judged}.")
    eps = smoothing.groupby("tau").effective_smoothing.agg(["mean", "std"]).fillna(0.0)
    lines += [
        "",
        "Universe level: the teacher acts on average like label smoothing with eps = "
        + ", ".join(f"{r['mean']:.3f} ± {r['std']:.3f} at tau = {t:g}" for t, r in eps.iterrows())
        + ".",
    ]
    return ending(lines, failed, f"{rerun} (see README for settings and time).")


def main(argv=None) -> Path:
    cli = parser("fig2", __doc__)
    axis_arguments(cli, delta=0.5, per_class=60)
    cli.add_argument("--tau", type=float, default=4.0, help="the high temperature")
    cli.add_argument("--split", default="test", help="examples over which the teacher's probabilities correlate")
    args = cli.parse_args(argv)
    check_data(args.data, "fig2")
    start = time.time()
    jobs = build_jobs(args.data, axis_points(args), args.seeds, STUDENTS, run_overrides(args))
    require_data(next(iter(jobs.values())).overrides)
    at = where(args.data, axis_points(args))
    runs = collect(jobs, sweep(jobs, args, "fig2")).assign(job=list(jobs))
    labels = matrix_labels(args.tau)
    scores, matrices, smoothing, figure = [], [], [], None
    for seed, rows in runs[runs.status == "completed"].groupby("seed"):
        loaded = {r.method: load_job(args.runs, r.job, jobs[r.job].overrides) for r in rows.itertuples()}
        found, superclass_of, names, eps = seed_matrices(loaded, args.tau, args.split)
        if superclass_of is None:
            raise SystemExit("error: fig2 orders and scores classes by superclass; this data set has none")
        scores += [
            {"seed": seed, "matrix": name, **domain.superclass_score(m, superclass_of)} for name, m in found.items()
        ]
        smoothing += [{"seed": seed, "tau": t, "effective_smoothing": e} for t, e in eps.items()]
        matrices.append(long_form(found, seed))
        figure = figure or plot(found, superclass_of, names, labels, seed, at)
    if figure is None:
        raise SystemExit(f"error: no fig2 run completed; see {args.runs}/runs/*/results.json")
    scores, smoothing = pd.DataFrame(scores), pd.DataFrame(smoothing)
    seconds = time.time() - start
    summary = summarise(
        scores,
        smoothing,
        runs[runs.status != "completed"],
        labels,
        args.tau,
        args.split,
        seconds,
        at,
        rerun("fig2", args.data),
    )
    out = publish(
        "fig2",
        args.out,
        {"fig2": scores, "fig2_matrices": pd.concat(matrices, ignore_index=True)},
        {"fig2": figure},
        summary,
        wandb=not args.no_wandb,
        config=vars(args),
    )
    print(f"[kd] fig2 written to {out} in {seconds / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
