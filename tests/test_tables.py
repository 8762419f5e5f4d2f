"""Tables 1 and 2: every cell config follows the published recipe; the teachers and table drivers run
end to end on tiny fake CIFAR-100 and ImageNet files; fig3 runs on a data set without a delta axis."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from experiments import fig3, tables, teachers
from experiments.drivers import Job, build_jobs, collect
from kd import objectives
from kd.runner import compose_config
from kd.teachers import teacher_config
from kd.train import CONFIG_DIR, validate
from tests.fakes import cifar100, write_png_folder  # noqa: F401 (fixtures)

# reference/anchors.md: optimizer, schedule, epochs, batch and KD settings of each table's recipe.
RECIPES = {
    "table1": {
        "data": "kd.data.cifar.CIFARDataModule",
        "lr": 0.05,
        "weight_decay": 5e-4,
        "milestones": [150, 180, 210],
        "max_epochs": 240,
        "batch_size": 64,
        "kd": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
        "k": 0.25,
    },
    "table2": {
        "data": "kd.data.folder.ImageFolderDataModule",
        "lr": 0.2,
        "weight_decay": 1e-4,
        "milestones": [30, 60, 90],
        "max_epochs": 100,
        "batch_size": 512,
        "kd": {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5},
        "k": 0.5,
    },
}
CELLS = [(table, cell) for table in tables.TABLES for cell in tables.cells(table)]
# Two steps of 16 images for everything, with the smallest CIFAR net for student and teacher.
TINY_CIFAR = [
    "data.val_size=50",
    "data.batch_size=16",
    "teacher.data.batch_size=16",
    "model=resnet8",
    "teacher.model.name=resnet8",
    "trainer.max_epochs=1",
    "teacher.trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "logger=none",
]


def check_recipe(run: dict, recipe: dict) -> None:
    """A run config (a student's or a teacher's) trains with the recipe's optimizer, schedule, epochs and batch."""
    assert run["optimizer"]["_target_"] == "torch.optim.SGD" and run["optimizer"]["momentum"] == 0.9
    assert (run["optimizer"]["lr"], run["optimizer"]["weight_decay"]) == (recipe["lr"], recipe["weight_decay"])
    assert run["scheduler"]["milestones"] == recipe["milestones"] and run["scheduler"]["gamma"] == 0.1
    assert run["trainer"]["max_epochs"] == recipe["max_epochs"] and run["data"]["batch_size"] == recipe["batch_size"]
    assert run["data"]["_target_"] == recipe["data"]


@pytest.mark.parametrize("table, cell", CELLS, ids=[f"{t}/{c}" for t, c in CELLS])
def test_every_cell_composes_with_its_pair_objective_and_recipe(table, cell, tmp_path):
    teacher, student, method = tables.cells(table)[cell]
    cfg = compose_config([f"experiment={table}/{cell}"], tmp_path)
    validate(cfg)
    recipe = RECIPES[table]
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["model"]["name"] == student and plain["objective"]["name"] == method
    assert plain["task_name"] == table
    check_recipe(plain, recipe)
    objective = {k: v for k, v in plain["objective"].items() if k in recipe["kd"]}
    if not objectives.needs_teacher(method):
        assert plain["teacher"] == {"kind": "none"}
        assert objective == {} and plain["objective"].get("eps", 0.1) == 0.1
        return
    assert objective == recipe["kd"] and plain["objective"]["t2_scale"] is True
    if method == "kd_topk":
        assert plain["objective"]["k"] == recipe["k"]
    teacher_run = OmegaConf.to_container(teacher_config(cfg), resolve=True)
    assert teacher_run["model"]["name"] == teacher and teacher_run["objective"] == {"name": "ce"}
    assert teacher_run["seed"] == 0
    check_recipe(teacher_run, recipe)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml")))
def test_every_setting_a_recipe_gives_reaches_its_objectives(recipe, tmp_path):
    """recipe.kd reaches every KD-family objective (a new one too: none falls back to tau 1 under a
    recipe), recipe.<name> objective <name>; a run's own value wins."""
    settings = OmegaConf.to_container(compose_config([f"recipe={recipe}"]).recipe)
    assert "kd" in settings
    follows = {name: [name] for name in settings}
    follows["kd"] = [n for n, o in objectives.REGISTRY.items() if o.loss is objectives.registry.KD]
    for name, given in settings.items():
        for objective in follows[name]:
            found = compose_config([f"recipe={recipe}", f"objective={objective}"]).objective
            assert {k: found[k] for k in given} == given, (recipe, objective)
    own = compose_config([f"recipe={recipe}", "objective=kd_pt", "objective.temperature=3"], tmp_path)
    assert own.objective.temperature == 3


def test_a_pair_shares_one_teacher_across_objectives_seeds_and_fig3(tmp_path):
    def folder(*overrides):
        return teacher_config(compose_config(list(overrides), tmp_path)).paths.output_dir

    same = {
        folder(f"experiment=table1/resnet56_resnet20_{m}", f"seed={s}") for m in ("kd", "kd_pt_sim") for s in (0, 1)
    }
    same.add(folder("experiment=fig3_cifar100", "objective=kd_topk", "seed=2"))
    assert len(same) == 1
    assert folder("experiment=table1/resnet32x4_resnet8x4_kd") not in same
    # A student's recipe override does not retrain its teacher.
    assert folder("experiment=table1/resnet56_resnet20_kd", "optimizer.lr=0.01", "trainer.max_epochs=5") in same


def test_job_names_with_and_without_an_axis():
    synthetic = build_jobs("synthetic", [0.5], [0], {"kd_topk-k0.25-uniform": Job(["objective=kd_topk"])}, [])
    assert list(synthetic) == ["kd_topk-k0.25-uniform-delta0.5-s0"]
    real = build_jobs("cifar100", [0.5, 1.0], [3], ["kd_pt"], ["x=1"])
    assert real == {
        "kd_pt-s3": Job(
            ["experiment=fig3_cifar100", "objective=kd_pt", "seed=3", "x=1"], {"method": "kd_pt", "seed": 3}
        )
    }
    fashion = build_jobs("fashion_mnist", [20], [1], ["ce"], [])
    assert fashion == {
        "ce-per_class20-s1": Job(
            ["experiment=fig3_fashion_mnist", "objective=ce", "data.train_per_class=20", "seed=1"],
            {"method": "ce", "per_class": 20, "seed": 1},
        )
    }
    jobs = {**synthetic, **real, **fashion}
    df = collect(jobs, {name: {"status": "completed"} for name in jobs})
    assert df.method.tolist() == ["kd_topk-k0.25-uniform", "kd_pt", "ce"] and df.seed.tolist() == [0, 3, 1]
    assert df.delta.iloc[0] == 0.5 and math.isnan(df.delta.iloc[1]) and df.per_class.iloc[2] == 20


def test_a_rows_values_are_its_jobs_never_read_back_from_its_name():
    """A label that looks like an axis point (``kd-delta0.5`` on CIFAR-100, whose runs have no delta)
    and a name that says nothing at all: each row holds what its job carries, in the CSV's order (what
    the run is, how it went, then the driver's own values)."""
    jobs = build_jobs("cifar100", [], [2], {"kd-delta0.5": Job(["objective=kd"], {"teacher": "resnet56"})}, [])
    jobs["anything"] = Job(["objective=ce"], {"teacher": "", "seed": 7, "method": "ce", "delta": 4.0})
    records = {
        "kd-delta0.5-s2": {"status": "completed", "metrics": {"test/acc_last": 0.5}, "seconds": 3.0},
        "anything": {"status": "failed", "error": "RuntimeError: boom"},
    }
    df = collect(jobs, records)
    assert list(jobs) == ["kd-delta0.5-s2", "anything"]
    assert list(collect({"anything": jobs["anything"]}, records).columns) == [
        "method",
        "delta",
        "seed",
        "status",
        "test_acc_last",
        "test_acc_best",
        "val_acc_best",
        "seconds",
        "error",
        "teacher",
    ]
    assert df.method.tolist() == ["kd-delta0.5", "ce"] and df.seed.tolist() == [2, 7]
    assert math.isnan(df.delta.iloc[0]) and df.delta.iloc[1] == 4.0 and df.teacher.tolist() == ["resnet56", ""]
    assert df.test_acc_last.iloc[0] == 0.5 and df.error.tolist() == ["", "RuntimeError: boom"]


def test_drivers_stop_on_missing_data_with_the_fetch_command(root):
    where = ["--no-wandb", "--out", str(root / "results"), "--runs", str(root / "logs")]
    for main in (
        lambda: tables.main("table1", where),
        lambda: teachers.main(["--data", "cifar100"]),
        lambda: fig3.main(["--data", "cifar100", *where]),
    ):
        with pytest.raises(SystemExit, match=r"^error: cifar100 not found .*make data DATA=cifar100"):
            main()
    assert not (root / "results").exists() and not (root / "logs").exists()


def test_teachers_then_table1_then_fig3_on_fake_cifar100(root, cifar100):
    tiny = [f"data.root={cifar100}", *TINY_CIFAR]
    assert set(teachers.main(["--data", "cifar100", *tiny]).values()) == {"trained"}
    (teacher_dir,) = (root / "teachers").iterdir()  # both pairs' teachers are resnet8 here: one teacher
    stamp = (teacher_dir / "results.json").stat().st_mtime_ns

    out = tables.main(
        "table1",
        [
            "--seeds",
            "1",
            "--methods",
            "ce",
            "kd",
            "--no-wandb",
            "--out",
            str(root / "results"),
            "--runs",
            str(root / "logs"),
            *tiny,
        ],
    )
    runs = pd.read_csv(out / "table1_runs.csv")
    assert (runs.status == "completed").all() and len(runs) == 2 + 2 * 2  # teachers + pairs x methods
    columns = "teacher student method seed status test_acc_last test_acc_best val_acc_best seconds error"
    assert list(runs.columns) == columns.split()
    assert runs.method.tolist() == ["teacher", "teacher", "ce", "kd", "ce", "kd"]
    stats = pd.read_csv(out / "table1.csv").set_index(["teacher", "student", "method"])
    assert stats.loc[("resnet56", "resnet20", "kd"), "published_test_acc"] == 70.66
    assert stats.loc[("resnet32x4", "resnet8x4", "teacher"), "published_test_acc"] == 79.42
    assert 0 <= stats.loc[("resnet56", "resnet20", "kd"), "test_acc_best_mean"] <= 100
    summary = (out / "table1.md").read_text()
    assert "test top-1 accuracy (%)" in summary and "| KD | " in summary and "70.66" in summary
    record = json.loads((root / "logs" / "runs" / "resnet56_resnet20_kd-s1" / "results.json").read_text())
    assert record["config"]["objective"]["temperature"] == 4.0 and record["config"]["seed"] == 1
    assert (teacher_dir / "results.json").stat().st_mtime_ns == stamp  # the students reused it

    out = fig3.main(
        [
            "--data",
            "cifar100",
            "--seeds",
            "0",
            "--methods",
            "kd",
            "dkd",
            "--no-wandb",
            "--out",
            str(root / "fig3"),
            "--runs",
            str(root / "fig3_logs"),
            *tiny,
        ]
    )
    df = pd.read_csv(out / "fig3.csv")
    assert df.method.tolist() == ["kd", "dkd"] and "delta" not in df and (df.status == "completed").all()
    summary = (out / "fig3.md").read_text()
    assert "| method | cifar100 |" in summary and "| DKD (peer) |" in summary and (out / "fig3.png").is_file()
    dkd = json.loads((root / "fig3_logs" / "runs" / "dkd-s0" / "results.json").read_text())["config"]["objective"]
    assert (dkd["temperature"], dkd["ce_weight"], dkd["tckd_weight"], dkd["nckd_weight"]) == (4.0, 1.0, 1.0, 8.0)

    assert set(teachers.main(["--data", "cifar100", *tiny]).values()) == {"done"}
    assert (teacher_dir / "results.json").stat().st_mtime_ns == stamp


def test_table2_two_steps_on_a_fake_image_folder(root):
    write_png_folder(root / "imagenet" / "train", per_class=4, seed=0)
    write_png_folder(root / "imagenet" / "val", per_class=2, seed=1)
    tiny = [
        f"data.root={root / 'imagenet'}",
        "data.image_size=8",
        "data.num_workers=0",
        "data.pin_memory=false",
        "data.val_per_class=1",
        "data.batch_size=4",
        "teacher.data.batch_size=4",
        "model.small_input=true",
        "teacher.model.name=resnet18",
        "teacher.model.small_input=true",
        "trainer.max_epochs=1",
        "teacher.trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "logger=none",
    ]
    out = tables.main(
        "table2",
        [
            "--seeds",
            "0",
            "--methods",
            "kd",
            "--no-wandb",
            "--out",
            str(root / "results"),
            "--runs",
            str(root / "logs"),
            *tiny,
        ],
    )
    stats = pd.read_csv(out / "table2.csv").set_index("method")
    assert stats.loc["kd", "seeds"] == 1 and stats.loc["kd", "published_test_acc"] == 71.03
    assert stats.loc["teacher", "published_test_acc"] == 73.31 and stats.loc["teacher", "seeds"] == 1
    record = json.loads((root / "logs" / "runs" / "resnet34_resnet18_kd-s0" / "results.json").read_text())
    assert record["status"] == "completed" and record["config"]["objective"]["kd_weight"] == 0.5


def test_table_reports_mean_and_std_over_seeds_beside_the_published_numbers():
    runs = pd.DataFrame(
        [
            {
                "teacher": "resnet56",
                "student": "resnet20",
                "method": "teacher",
                "seed": 0,
                "status": "completed",
                "test_acc_last": 0.72,
                "test_acc_best": 0.73,
            },
            *[
                {
                    "teacher": "resnet56",
                    "student": "resnet20",
                    "method": m,
                    "seed": s,
                    "status": "completed",
                    "test_acc_last": acc + s / 100,
                    "test_acc_best": acc + 0.01,
                    "error": "",
                }
                for m, acc in (("ce", 0.69), ("kd", 0.70))
                for s in (0, 2)
            ],
            {
                "teacher": "resnet56",
                "student": "resnet20",
                "method": "kd",
                "seed": 1,
                "status": "failed",
                "test_acc_last": None,
                "test_acc_best": None,
                "error": "RuntimeError: boom",
            },
        ]
    )
    stats = tables.summary_table("table1", runs).set_index("method")
    assert stats.index.tolist() == ["teacher", "ce", "kd"]  # the teacher first, then the table's method order
    assert stats.loc["kd", "test_acc_last_mean"] == pytest.approx(71.0)
    assert stats.loc["kd", "test_acc_last_std"] == pytest.approx(2**0.5)
    assert stats.loc["kd", "seeds"] == 2 and stats.loc["ce", "published_test_acc"] == 69.06
    summary = tables.summarise("table1", stats.reset_index(), runs, 60.0)
    assert "| KD | 71.00 ± 1.41 | 71.00 ± 0.00 | 2 | 70.66 |" in summary
    assert "| teacher (CE) | 72.00 | 73.00 | 1 | 72.34 |" in summary
    assert "KD - LS" not in summary and "kd seed=1: RuntimeError: boom" in summary
