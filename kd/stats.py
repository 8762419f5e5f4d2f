"""Seed statistics for the summaries: paired gaps between methods, their confidence and a verdict."""

from __future__ import annotations

import pandas as pd
from scipy import stats

LEVEL = 0.95
COLUMNS = ["a", "b", "gap", "spread", "n", "exceeds_spread", "ci_low", "ci_high", "p", "verdict"]


def verdict(low: float, high: float) -> str:
    """``holds`` when the whole interval is above zero, ``reversed`` below, ``unresolved`` otherwise."""
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "unresolved"


def paired_gaps(df: pd.DataFrame, pairs, metric: str, by: str) -> pd.DataFrame:
    """For each (a, b) and each value of ``by``: mean and std over seeds of metric(a) - metric(b),
    and a 95% paired-t interval for the mean gap.

    Runs are paired by seed (the same seed draws the same data and teacher), which removes the
    spread the two methods share. ``exceeds_spread`` is |gap| > std of the paired differences; the
    interval is gap ± t(0.975, n - 1) std / sqrt(n) (NaN for one seed), ``p`` the two-sided paired
    t-test's p-value (0 for a nonzero difference the same in every seed, as scipy's), and ``verdict``
    says whether the interval excludes zero.
    """
    wide = df.pivot_table(index=[by, "seed"], columns="method", values=metric)
    rows = []
    for a, b in pairs:
        if a not in wide or b not in wide:
            continue
        diff = (wide[a] - wide[b]).dropna().groupby(level=by)
        for key, d in diff:
            n, mean = len(d), d.mean()
            spread = d.std() if n > 1 else float("nan")
            half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * spread / n**0.5 if n > 1 else float("nan")
            low, high = mean - half, mean + half
            if n > 1 and spread > 0:
                p = 2 * stats.t.sf(abs(mean) / (spread / n**0.5), n - 1)
            else:  # the same difference in every seed (one teacher on real data): scipy's limit, t = inf
                p = 0.0 if n > 1 and mean != 0 else float("nan")
            rows.append(
                {
                    "a": a,
                    "b": b,
                    by: key,
                    "gap": mean,
                    "spread": spread,
                    "n": n,
                    "exceeds_spread": bool(n > 1 and abs(mean) > spread),
                    "ci_low": low,
                    "ci_high": high,
                    "p": p,
                    "verdict": verdict(low, high) if n > 1 else "one seed",
                }
            )
    return pd.DataFrame(rows, columns=[*COLUMNS[:2], by, *COLUMNS[2:]])


def holm(p: pd.Series, level: float = 1 - LEVEL) -> pd.Series:
    """Which of a family of tests reject at family-wise error ``level`` (Holm's step-down): the
    i-th smallest of m p-values rejects while every smaller one did and p <= level / (m - i + 1).
    A NaN p-value (one seed, no spread) rejects nothing and counts in m."""
    order = p.fillna(1.0).sort_values(kind="stable")
    m = len(order)
    passed = (order.to_numpy() <= level / (m - pd.RangeIndex(m).to_numpy())).cumprod().astype(bool)
    return pd.Series(passed, index=order.index).reindex(p.index)
