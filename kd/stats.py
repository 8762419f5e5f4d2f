"""Seed statistics for the summaries: paired gaps between methods and whether they beat the spread."""

from __future__ import annotations

import pandas as pd


def paired_gaps(df: pd.DataFrame, pairs, metric: str, by: str) -> pd.DataFrame:
    """For each (a, b) and each value of ``by``: mean and std over seeds of metric(a) - metric(b).

    Runs are paired by seed (the same seed draws the same data and teacher), which removes the
    spread the two methods share. ``exceeds_spread`` is |gap| > std of the paired differences.
    """
    wide = df.pivot_table(index=[by, "seed"], columns="method", values=metric)
    rows = []
    for a, b in pairs:
        if a not in wide or b not in wide:
            continue
        diff = (wide[a] - wide[b]).dropna().groupby(level=by)
        for key, d in diff:
            spread = d.std() if len(d) > 1 else float("nan")
            rows.append({"a": a, "b": b, by: key, "gap": d.mean(), "spread": spread, "n": len(d),
                         "exceeds_spread": bool(len(d) > 1 and abs(d.mean()) > spread)})
    return pd.DataFrame(rows, columns=["a", "b", by, "gap", "spread", "n", "exceeds_spread"])
