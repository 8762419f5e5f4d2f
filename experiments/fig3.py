"""Fig. 3: the ablation of the three levels of knowledge.

CE (none), LS (universe), KD-sim (universe + domain), KD-pt (universe + instance), KD-pt+sim
(all three, synthetic), KD (the real teacher) and KD-topk, over class-relationship strengths
(delta) and seeds. Writes results/fig3/{fig3.csv, fig3.png, fig3.pdf, fig3.md}.

    python -m experiments.fig3                      # synthetic, the default (make reproduce-fig3)
    python -m experiments.fig3 --seeds 0 1 2 3 4 -- trainer.max_epochs=100   # any override after --
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from kd.report import publish
from kd.runner import run_jobs
from kd.stats import paired_gaps

METHODS = ["ce", "ls", "kd_sim", "kd_pt", "kd_pt_sim", "kd", "kd_topk"]
LABELS = {"ce": "CE (none)", "ls": "LS (universe)", "kd_sim": "KD-sim (domain)", "kd_pt": "KD-pt (instance)",
          "kd_pt_sim": "KD-pt+sim", "kd": "KD", "kd_topk": "KD-topk"}
# The paper's reported order of benefit, each level against the one below it.
ORDERING = [("kd_pt", "kd_sim"), ("kd_sim", "ls"), ("ls", "ce")]
DATA = {"synthetic": "fig3_synthetic"}
QUICK = ["trainer.max_epochs=3", "teacher.trainer.max_epochs=2", "data.test_per_class=50", "data.val_per_class=10"]


def build_jobs(data: str, deltas, seeds, methods, overrides) -> dict[str, list[str]]:
    return {
        f"{m}-delta{d}-s{s}": [f"experiment={DATA[data]}", f"objective={m}", f"data.delta={d}", f"seed={s}", *overrides]
        for d in deltas for s in seeds for m in methods
    }


def collect(records: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, rec in records.items():
        cfg = rec.get("config", {})
        metrics = rec.get("metrics", {})
        method, delta, seed = name.split("-delta")[0], *name.split("-delta")[1].split("-s")
        rows.append({"method": method, "delta": float(delta), "seed": int(seed), "status": rec["status"],
                     "test_acc_last": metrics.get("test/acc_last"), "test_acc_best": metrics.get("test/acc_best"),
                     "val_acc_best": metrics.get("val/acc_best"), "seconds": rec.get("seconds"),
                     "error": rec.get("error", ""), "objective": str(cfg.get("objective", ""))})
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, metric: str = "test_acc_last"):
    ok = df[df.status == "completed"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in [m for m in METHODS if m in set(ok.method)]:
        stats = ok[ok.method == method].groupby("delta")[metric].agg(["mean", "std"]).fillna(0.0)
        line = ax.plot(stats.index, stats["mean"], marker="o", label=LABELS[method])[0]
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                        color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("delta (subclass spread; small = strongly related classes)")
    ax.set_ylabel(f"student {metric.replace('_', ' ')} (mean ± std over seeds)")
    ax.set_title("Fig. 3: knowledge levels ablation (synthetic)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def summarise(df: pd.DataFrame, seconds: float, metric: str = "test_acc_last") -> str:
    ok = df[df.status == "completed"]
    failed = df[df.status != "completed"]
    by = ok.groupby(["method", "delta"])[metric].agg(["mean", "std", "count"]).reset_index()
    lines = [f"# Fig. 3: ablation of the knowledge levels ({metric}, mean ± std over seeds)", "",
             f"{len(ok)} runs completed, {len(failed)} failed; {ok.seed.nunique()} seeds; "
             f"wall time {seconds / 60:.1f} min.", ""]
    pivot = by.assign(cell=by["mean"].map("{:.3f}".format) + " ± " + by["std"].fillna(0).map("{:.3f}".format))
    pivot = pivot.pivot(index="method", columns="delta", values="cell").reindex([m for m in METHODS if m in set(by.method)])
    lines += ["| method | " + " | ".join(f"delta={d:g}" for d in pivot.columns) + " |",
              "|---|" + "---|" * len(pivot.columns)]
    lines += [f"| {LABELS[m]} | " + " | ".join(pivot.loc[m]) + " |" for m in pivot.index]
    lines += ["", "## The paper's ordering: instance > domain > universe > none", "",
              "Gap = mean over seeds of the paired difference (same seed = same data and teacher); "
              "it *exceeds the seed spread* when |gap| > the std of the paired differences.", ""]
    gaps = paired_gaps(ok, ORDERING, metric, by="delta")
    for (a, b), rows in gaps.groupby(["a", "b"], sort=False):
        held = rows[rows.gap > 0]
        clear = rows[(rows.gap > 0) & rows.exceeds_spread]
        detail = ", ".join(f"delta={r.delta:g}: {r.gap:+.3f} ± {r.spread:.3f}" for r in rows.itertuples())
        lines.append(f"- {LABELS[a]} > {LABELS[b]}: holds at {len(held)}/{len(rows)} deltas, beyond the seed "
                     f"spread at {len(clear)}/{len(rows)} ({detail}).")
    if len(failed):
        lines += ["", "## Failed runs", ""] + [f"- {r.method} delta={r.delta:g} seed={r.seed}: {r.error}"
                                                 for r in failed.itertuples()]
    lines += ["", "Re-run: `make reproduce-fig3` (see README for settings and time)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", default="results/fig3")
    parser.add_argument("--runs", default="logs/fig3", help="run folders (checkpoints, results.json)")
    parser.add_argument("--quick", action="store_true", help="a few epochs: checks the pipeline, not the science")
    parser.add_argument("--no-wandb", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.data not in DATA:
        raise SystemExit(f"error: --data={args.data} is not supported by fig3 yet; choose one of: {', '.join(DATA)}")
    start = time.time()
    jobs = build_jobs(args.data, args.deltas, args.seeds, args.methods, (QUICK if args.quick else []) + args.overrides)
    records = run_jobs(jobs, args.runs, desc="fig3")
    df = collect(records)
    seconds = time.time() - start
    out = publish("fig3", args.out, {"fig3": df.drop(columns=["objective"])}, {"fig3": plot(df)},
                  summarise(df, seconds), wandb=not args.no_wandb, config=vars(args))
    print(f"[kd] fig3 written to {out} in {seconds / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
