"""The sensitivity driver's rows: each variant reads its own runs and fig3's others by the values their
jobs carry, and a published sensitivity.csv (which leaves those values out) gets them back by label."""

from experiments import sensitivity
from experiments.drivers import build_jobs, collect


def rows():
    """collect's rows of every sensitivity job at one delta and two seeds, each with its own accuracy."""
    jobs = build_jobs("synthetic", [1.0], [0, 1], sensitivity.methods("synthetic"), [])
    records = {
        name: {"status": "completed", "metrics": {"test/acc_last": 0.5 + i / 1000}} for i, name in enumerate(jobs)
    }
    return collect(jobs, records).assign(data="synthetic")


def test_a_variant_sees_its_own_runs_of_the_methods_it_changes_and_fig3s_of_the_others():
    df = rows()
    seen = sensitivity.under(df, "tau2", ["kd_pt", "kd_sim"])
    assert sorted(seen.method) == sorted(sensitivity.CLAIMED * 2)
    assert set(seen[seen.method.isin(["kd_pt", "kd_sim"])].variant) == {"tau2"}
    assert set(seen[~seen.method.isin(["kd_pt", "kd_sim"])].variant) == {sensitivity.DEFAULT}
    assert set(df[df.variant == "tau2"].method) == {"kd_pt+tau2", "kd_sim+tau2"}  # the labels, in the CSV


def test_a_published_table_gets_its_jobs_values_back():
    df = rows()
    published = df.drop(columns=["objective", "variant"])  # what sensitivity.csv holds
    again = sensitivity.with_values(published, "synthetic")
    assert again[df.columns].equals(df)
    shown = sensitivity.variants("synthetic")
    assert sensitivity.claims(again, shown).equals(sensitivity.claims(df, shown))
