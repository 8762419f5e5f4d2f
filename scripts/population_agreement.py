"""Does a population give the single runs' results? fig3 run twice, compared method by method.

    make reproduce-fig3                                                     # populations (the default)
    make reproduce-fig3 ARGS="--population off --runs logs/fig3-single --out results/fig3-single"
    python scripts/population_agreement.py results/fig3/fig3.csv results/fig3-single/fig3.csv

On Fashion-MNIST the same with ``DATA=fashion_mnist`` and ``--out results/fig3_fashion_mnist/...``.
For each method and point of the figure's axis (delta, or images per class): the mean test accuracy over seeds of both paths, their difference and
the seed spread (std over seeds of the single runs); the two agree when the difference is within
that spread. Writes results/fig3/population_agreement.md (``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kd.results import write_text_atomic

METRIC = "test_acc_last"


def axis(runs: pd.DataFrame) -> str:
    """The figure's axis: synthetic data's delta, or real images' training images per class."""
    return "delta" if "delta" in runs and runs.delta.notna().any() else "per_class"


def compare(population: pd.DataFrame, single: pd.DataFrame) -> pd.DataFrame:
    by = ["method", axis(single)]
    stats = {
        name: df[df.status == "completed"].groupby(by)[METRIC].agg(["mean", "std", "count"])
        for name, df in (("population", population), ("single", single))
    }
    both = stats["population"].merge(
        stats["single"], left_index=True, right_index=True, suffixes=("_population", "_single")
    )
    both["difference"] = both.mean_population - both.mean_single
    both["within_spread"] = both.difference.abs() <= both.std_single
    return both.reset_index().rename(columns={by[1]: "point"})


def main(argv=None) -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("population", type=Path, help="fig3.csv of the population run")
    cli.add_argument("single", type=Path, help="fig3.csv of the --population off run")
    cli.add_argument("--out", type=Path, default=Path("results/fig3/population_agreement.md"))
    args = cli.parse_args(argv)
    single = pd.read_csv(args.single)
    table = compare(pd.read_csv(args.population), single)
    lines = [
        f"# Populations against single runs (fig3, {METRIC}, mean over seeds)",
        "",
        f"{args.population} (populations) against {args.single} (`--population off`); "
        f"{int(table.count_single.min())} to {int(table.count_single.max())} seeds per cell. "
        f"Agreement within the seed spread (std of the single runs): {int(table.within_spread.sum())}/"
        f"{len(table)} cells; largest difference {table.difference.abs().max():.4f}.",
        "",
        f"| method | {axis(single)} | population | single | difference | seed spread | within |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.method} | {r.point:g} | {r.mean_population:.4f} | {r.mean_single:.4f} | {r.difference:+.4f} | "
        f"{r.std_single:.4f} | {'yes' if r.within_spread else 'no'} |"
        for r in table.itertuples()
    ]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
