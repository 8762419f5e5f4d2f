"""The fig1 / fig2 / fig4 drivers end to end in --quick mode: every file they publish appears.

One root and one runs folder for the three: they share the teacher and the jobs they have in
common (kd, ls, ce at the same delta and seed), so the whole file trains one small teacher and
five students.
"""

import re

import pandas as pd
import pytest

wandb = pytest.importorskip("wandb")  # what the drivers publish is read back from W&B

from experiments import fig1, fig2, fig4, targets  # noqa: E402 (after the skip: they import wandb)
from tests.conftest import assert_published_to_wandb  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    flags = ["--quick", "--seeds", "0", "--runs", str(root / "logs"), "--no-wandb"]
    overrides = ["--", f"paths.root_dir={root}", "teacher.data.train_per_class=50", "data.train_per_class=10"]
    return root, flags, overrides


def publish_files(out, name, tables):
    for suffix in ("png", "pdf", "md"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    return {table: pd.read_csv(out / f"{table}.csv") for table in tables}


def test_fig1(dirs, monkeypatch):
    """With W&B (offline): its figure and both tables reach the run, although figure and table share a name."""
    root, flags, overrides = dirs
    monkeypatch.setenv("WANDB_DIR", str(root / "fig1_wandb"))
    wandb.teardown()  # a W&B service left by an earlier test would keep its own WANDB_DIR
    flags = [f for f in flags if f != "--no-wandb"]
    out = fig1.main([*flags, "--delta", "1.0", "--out", str(root / "fig1"), *overrides])
    assert_published_to_wandb(out, root / "fig1_wandb")
    tables = publish_files(out, "fig1", ["fig1", "fig1_binned"])
    examples = tables["fig1"]
    assert set(examples.method) == {"kd", "ls"} and set(examples.split) == {"train", "val"}
    assert len(examples) == 2 * (20 * 10 + 20 * 10)  # 20 classes x 10 train and 10 val (--quick) examples
    assert (examples.q_c.between(0, 1)).all() and examples.w.notna().all()
    assert (examples[examples.method == "ls"].rho_c == 1 / 20).all()
    assert "Spearman" in (out / "fig1.md").read_text()


def test_fig2(dirs):
    root, flags, overrides = dirs
    out = fig2.main([*flags, "--delta", "1.0", "--tau", "4", "--out", str(root / "fig2"), *overrides])
    scores = publish_files(out, "fig2", ["fig2", "fig2_matrices"])["fig2"]
    assert set(scores.matrix) == {
        "teacher_probs_tau1",
        "teacher_probs_tau4",
        "weights_teacher",
        "weights_ce",
        "weights_ls",
        "weights_kd",
    }
    assert (scores.score == scores.within - scores.between).all()
    assert "within - between" in (out / "fig2.md").read_text()


def test_fig4(dirs):
    root, flags, overrides = dirs
    out = fig4.main([*flags, "--delta", "1.0", "--ks", "0.25", "1.0", "--out", str(root / "fig4"), *overrides])
    runs = publish_files(out, "fig4", ["fig4"])["fig4"]
    assert (runs.status == "completed").all()
    assert set(runs.method) == {"ce", "kd", "kd_topk-k0.25-uniform", "kd_topk-k1-uniform"}
    assert "Best k with tail=uniform" in (out / "fig4.md").read_text()


def test_targets(dirs):
    """Every target of fig3 and every KD-pt+sim variant is profiled and trained; KD's target is the
    teacher's own distribution, KD-pt's and KD-pt+sim's carry the same q_c, and so does q_c at tau 1
    where the run's tau is 1 (synthetic data)."""
    root, flags, overrides = dirs
    out = targets.main([*flags, "--delta", "1.0", "--out", str(root / "targets"), *overrides])
    tables = publish_files(out, "targets", ["targets", "targets_runs", "targets_gaps"])
    profile = tables["targets"].set_index("method")
    assert set(profile.index) == set(targets.TARGETS) | set(targets.SHORT)
    assert profile.loc["kd", "kl_from_teacher"] == pytest.approx(0, abs=1e-9)
    assert profile.loc["kd_pt", "true"] == pytest.approx(profile.loc["kd_pt_sim", "true"])
    assert profile.loc["kd_pt_sim+qc_tau1", "true"] == pytest.approx(profile.loc["kd_pt_sim", "true"])
    assert (tables["targets_runs"].status == "completed").all()
    assert len(tables["targets_gaps"]) == 2 * len(targets.VARIANTS)
    assert "Why KD-pt+sim fails" in (out / "targets.md").read_text()


@pytest.mark.parametrize("driver", [fig1, fig2, fig4], ids=["fig1", "fig2", "fig4"])
def test_real_data_is_refused_in_one_line(driver, tmp_path):
    name = driver.__name__.rsplit(".", 1)[1]
    with pytest.raises(SystemExit, match=f"--data=cifar100 is not supported by {name}"):
        driver.main(["--data", "cifar100", "--out", str(tmp_path), "--runs", str(tmp_path)])


def test_fig2_says_a_teachers_gap_is_exact_where_every_seed_shares_one_teacher():
    """On real data one teacher serves every seed: its tau 4 - tau 1 gap has no spread to judge."""
    rows = [
        {"seed": s, "matrix": m, "within": w, "between": 0.0, "score": w}
        for s in (0, 1, 2)
        for m, w in (("teacher_probs_tau1", 0.1), ("teacher_probs_tau4", 0.4), ("weights_ce", 0.2 + s / 10))
        + (("weights_kd", 0.3 + s / 20), ("weights_ls", 0.1))
    ]
    labels = {m: m for m in {r["matrix"] for r in rows}}
    smoothing = pd.DataFrame({"tau": [1.0, 4.0], "effective_smoothing": [0.2, 0.6]})
    text = fig2.summarise(pd.DataFrame(rows), smoothing, pd.DataFrame(), labels, 4.0, "test", 60.0)
    assert "- teacher_probs_tau4 > teacher_probs_tau1: +0.300 the same in each of 3 seeds (one teacher): exact." in text
    assert re.search(r"- weights_kd > weights_ce: \+0\.050 \[[-+.0-9]+, [-+.0-9]+\] unresolved over 3 seeds\.", text)
