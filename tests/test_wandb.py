"""What reaches W&B, read back from the offline run folders: a driver's figures and tables, a
distillation run's instance-level histograms and its final numbers in the summary."""

import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest

pytest.importorskip("wandb")

from kd.analysis import instance
from kd.report import publish
from kd.runner import compose_config
from kd.train import run
from tests.conftest import TINY, assert_published_to_wandb, wandb_records, wandb_run

WITH_WANDB = [o for o in TINY if o != "logger=none"] + ["logger=wandb"]


def test_a_figure_and_a_table_of_the_same_name_both_reach_wandb(root):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    tables = {"fig9": pd.DataFrame({"method": ["kd", "ce"], "acc": [0.5, 0.4]}), "fig9_more": pd.DataFrame({"k": [1]})}
    out = publish("fig9", root / "out", tables, {"fig9": fig}, "# fig9\n")
    assert_published_to_wandb(out, root)


def test_a_drivers_wandb_run_is_named_after_its_results_folder(root):
    """fig3 on Fashion-MNIST (results/fig3_fashion_mnist) is a W&B run of its own name, not "fig3"."""
    fig, ax = plt.subplots()
    publish("fig3", root / "results" / "fig3_fashion_mnist", {"fig3": pd.DataFrame({"k": [1]})}, {"fig3": fig}, "")
    (found,) = [r.run for r in wandb_records(root) if r.WhichOneof("record_type") == "run"]
    assert (found.display_name, found.run_group) == ("fig3_fashion_mnist", "fig3_fashion_mnist")


@pytest.mark.parametrize("objective, histograms", [("kd", 3), ("ce", 0)])
def test_a_run_logs_the_instance_level_and_its_final_numbers(root, objective, histograms):
    """KD: w and q_c at the first (0), a middle (1) and the last (2) epoch; CE does not distil (the
    teacher is there for the agreement metric only): none."""
    record = run(
        compose_config([*WITH_WANDB, f"objective={objective}", "teacher=oracle", "trainer.max_epochs=3"], root / "run")
    )
    history, summary = wandb_run(root / "run")
    rows = [row for row in history if "val/w/_type" in row]  # W&B logs a histogram's parts as nested keys
    assert [row["epoch"] for row in rows] == [0, 1, 2][:histograms]
    for row in rows:
        for key in ("val/w", "val/q_c"):
            assert row[f"{key}/_type"] == "histogram" and sum(row[f"{key}/values"]) == 4 * 5  # every val example
    assert all(0 <= edge <= 1 for row in rows for edge in row["val/q_c/bins"])
    for key in ("test/acc_last", "test/acc_best"):
        assert summary[key] == pytest.approx(record["metrics"][key])


def test_instance_histograms_cost_nothing_without_wandb(root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("instance histograms computed without a W&B logger")

    monkeypatch.setattr(instance, "of_objective", refuse)
    record = run(compose_config([*TINY, "logger=csv", "objective=kd", "teacher=oracle"], root / "run"))
    assert record["status"] == "completed"
    assert json.loads((root / "run" / "results.json").read_text())["status"] == "completed"


def test_each_member_of_a_population_is_a_wandb_run_of_its_own(root):
    """Its own name, config, history (histograms for KD only) and summary, in its own folder."""
    jobs = {"kd": 0, "ce": 1}
    records = run(
        [
            compose_config(
                [*WITH_WANDB, f"objective={o}", f"seed={s}", "teacher=oracle", "trainer.max_epochs=3"], root / o
            )
            for o, s in jobs.items()
        ]
    )
    assert [r["population"]["member"] for r in records] == [0, 1]
    for (objective, seed), record in zip(jobs.items(), records):
        records_ = wandb_records(root / objective)
        (found,) = [r.run for r in records_ if r.WhichOneof("record_type") == "run"]
        assert found.display_name == f"train-{objective}-s{seed}"
        config = {
            item.key: json.loads(item.value_json)
            for r in records_
            if r.WhichOneof("record_type") == "config"
            for item in r.config.update
        }
        assert config["objective"]["name"] == objective
        history, summary = wandb_run(root / objective)
        assert len([row for row in history if "val/w/_type" in row]) == (3 if objective == "kd" else 0)
        assert [row["val/acc"] for row in history if "val/acc" in row] != []
        for key in ("test/acc_last", "test/acc_best"):
            assert summary[key] == pytest.approx(record["metrics"][key])
