"""kd.stats: the paired gaps every verdict rests on, against scipy's paired t-test, and Holm's
correction on families whose answer is known."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kd.stats import holm, paired_gaps


def test_paired_gaps_are_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    rows = []
    for delta, shift in ((0.5, 0.05), (1.0, 0.0), (2.0, -0.04)):
        base = rng.normal(0.7, 0.03, 10)  # shared by both methods of a seed: pairing removes it
        for seed in range(10):
            rows += [
                {"method": "a", "delta": delta, "seed": seed, "acc": base[seed] + shift + rng.normal(0, 0.01)},
                {"method": "b", "delta": delta, "seed": seed, "acc": base[seed] + rng.normal(0, 0.01)},
            ]
    df = pd.DataFrame(rows)
    gaps = paired_gaps(df, [("a", "b")], "acc", by="delta").set_index("delta")
    for delta, rows in df.groupby("delta"):
        a, b = (rows[rows.method == m].sort_values("seed").acc.to_numpy() for m in ("a", "b"))
        test = stats.ttest_rel(a, b)
        interval = test.confidence_interval(0.95)
        assert gaps.loc[delta, "p"] == pytest.approx(test.pvalue, rel=1e-9)
        assert (gaps.loc[delta, "ci_low"], gaps.loc[delta, "ci_high"]) == pytest.approx(
            (interval.low, interval.high), rel=1e-9
        )
    assert gaps.verdict.tolist() == ["holds", "unresolved", "reversed"]
    assert ((gaps.p < 0.05) == (gaps.verdict != "unresolved")).all()  # the interval and the test agree


def test_a_gap_the_same_in_every_seed_has_scipys_limit():
    """One teacher serves every seed on real data: its differences are exact, p = 0 as scipy's (t = inf);
    no difference at all stays unresolved with no p."""
    df = pd.DataFrame(
        [
            {"method": m, "delta": 0, "seed": s, "acc": v + s}
            for s in range(3)
            for m, v in (("a", 0.5), ("b", 0.25), ("c", 0.5))
        ]
    )
    gaps = paired_gaps(df, [("a", "b"), ("a", "c")], "acc", by="delta")
    assert gaps.p[0] == stats.ttest_rel(df.acc[df.method == "a"], df.acc[df.method == "b"]).pvalue == 0.0
    assert gaps.verdict.tolist() == ["holds", "unresolved"] and np.isnan(gaps.p[1])


@pytest.mark.parametrize(
    "p, rejected",
    [
        ([0.01, 0.04, 0.03, 0.005], [True, False, False, True]),  # 0.005 <= .05/4, 0.01 <= .05/3, 0.03 > .05/2
        ([0.001, 0.015, 0.024, 0.6], [True, True, True, False]),  # 0.015 <= .05/3, 0.024 <= .05/2
        ([0.03, float("nan")], [False, False]),  # a NaN counts in the family: 0.03 > .05/2
        ([0.04], [True]),
    ],
)
def test_holm_step_down(p, rejected):
    assert holm(pd.Series(p, index=list("wxyz")[: len(p)])).tolist() == rejected
