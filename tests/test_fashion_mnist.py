"""Fashion-MNIST on tiny IDX files written by the tests (tests/fakes.py): the data module, our class
hierarchy, the splits, the errors, and every driver's jobs on it down to a two-step CNN run."""

import importlib.util
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from experiments import failures, fig1, fig2, fig3, fig4
from experiments.drivers import AXES, build_jobs, collect, rerun
from kd.data.fashion import CLASSES, FashionMNISTDataModule
from kd.errors import UserError
from kd.runner import compose_config
from kd.train import run, validate
from tests.fakes import FASHION_TEST_PER_CLASS, FASHION_TRAIN_PER_CLASS, fashion_mnist, write_fashion_mnist  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 10 * FASHION_TRAIN_PER_CLASS, 10 * FASHION_TEST_PER_CLASS


def as_set(x: torch.Tensor) -> set:
    return {bytes(image.numpy()) for image in x.reshape(len(x), -1)}


def module(root, **kwargs) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(str(root), **{"val_size": 20, **kwargs})
    dm.setup()
    return dm


def test_gzipped_flat_files_and_torchvision_layout_load_alike(fashion_mnist, tmp_path):
    write_fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)  # what torchvision's download leaves
    flat, tv = module(fashion_mnist), module(tmp_path / "tv")
    for split in ("train", "val", "test"):
        assert torch.equal(flat.splits[split].x, tv.splits[split].x) and torch.equal(
            flat.splits[split].y, tv.splits[split].y
        )
    test = flat.splits["test"]
    assert test.x.dtype == torch.uint8 and test.x.shape == (N_TEST, 1, 28, 28) and flat.input_shape == (1, 28, 28)
    assert torch.equal(test.y, torch.arange(10).repeat(FASHION_TEST_PER_CLASS)) and flat.num_classes == 10
    x, y, index = next(iter(flat.loader("test", batch_size=8)))
    assert torch.equal(index, torch.arange(8)) and flat.prepare_eval_batch(x).dtype == torch.float32


def test_the_config_gives_our_hierarchy(fashion_mnist):
    dm = instantiate(compose_config(["data=fashion_mnist", f"data.root={fashion_mnist}", "data.val_size=20"]).data)
    dm.setup()
    by_name = dict(zip(CLASSES, dm.superclass_of.tolist()))
    tops, footwear, trouser, bag = 0, 1, 2, 3  # numbered in the order the config lists them
    assert by_name == {
        "T-shirt/top": tops,
        "Trouser": trouser,
        "Pullover": tops,
        "Dress": tops,
        "Coat": tops,
        "Sandal": footwear,
        "Shirt": tops,
        "Sneaker": footwear,
        "Bag": bag,
        "Ankle boot": footwear,
    }
    assert FashionMNISTDataModule(str(fashion_mnist)).superclasses() is None  # no hierarchy unless given one


@pytest.mark.parametrize(
    "hierarchy, message",
    [
        ({"tops": ["T-shirt", *CLASSES[1:]]}, "names 'T-shirt', not a Fashion-MNIST class"),
        ({"most": CLASSES[:-1]}, "every class exactly once; 'Ankle boot' is missing"),
        ({"all": CLASSES, "again": ["Bag"]}, "'Bag' is named twice"),
    ],
)
def test_a_bad_hierarchy_is_one_line(hierarchy, message):
    with pytest.raises(UserError, match=re.escape(message)):
        FashionMNISTDataModule(hierarchy=hierarchy)


def test_validation_is_carved_from_train_and_never_touches_test(fashion_mnist):
    dm = module(fashion_mnist)
    train, val, test = (as_set(dm.splits[s].x) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (N_TRAIN - 20, 20, N_TEST)
    assert not train & val and not (train | val) & test
    other_seed = module(fashion_mnist, seed=1)
    assert torch.equal(other_seed.splits["val"].x, dm.splits["val"].x)  # split_seed 0: one split for every seed
    assert not torch.equal(module(fashion_mnist, split_seed=1).splits["val"].x, dm.splits["val"].x)


def test_a_data_limited_student_gets_a_seeded_nested_subset_per_class(fashion_mnist):
    small, large = module(fashion_mnist, train_per_class=2), module(fashion_mnist, train_per_class=4)
    assert torch.equal(torch.bincount(small.splits["train"].y), torch.full((10,), 2))
    assert as_set(small.splits["train"].x) < as_set(large.splits["train"].x)
    assert as_set(small.splits["train"].x) != as_set(module(fashion_mnist, train_per_class=2, seed=1).splits["train"].x)
    assert torch.equal(small.splits["val"].x, large.splits["val"].x)
    with pytest.raises(UserError, match=r"data.train_per_class=50 is more than the \d training images of class"):
        module(fashion_mnist, train_per_class=50)


def test_a_tiny_subset_is_passed_over_again_to_fill_a_training_epoch(fashion_mnist):
    def indices(dm, split="train"):
        return torch.cat([index for _, _, index in dm.loader(split, shuffle=split == "train")])

    plain = indices(module(fashion_mnist, train_per_class=2, batch_size=8))
    assert sorted(plain.tolist()) == list(range(20))
    filled = module(fashion_mnist, train_per_class=2, batch_size=8, min_epoch_size=50)
    index = indices(filled)
    assert len(index) == 50 and len(filled.train_dataloader()) == 7  # 2.5 passes of 20, reshuffled each time
    assert torch.equal(index[:20], plain) and torch.bincount(index, minlength=20).min() >= 2
    assert len(indices(filled, "val")) == 20  # evaluation: one pass
    assert len(indices(module(fashion_mnist, train_per_class=8, min_epoch_size=50))) == 80  # already larger


def test_missing_or_damaged_files_are_one_line(fashion_mnist, tmp_path):
    absent = tmp_path / "absent"
    looked = f"in {absent} or {absent / 'FashionMNIST' / 'raw'}"
    with pytest.raises(UserError, match=re.escape(looked) + ".*`make data DATA=fashion_mnist`.*dataset-fashion-mnist"):
        module(absent)
    (fashion_mnist / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="are damaged.*make data DATA=fashion_mnist"):
        module(fashion_mnist)


def load_prepare_data():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, attribute, address, files",
    [
        ("cifar100", "url", "http://127.0.0.1:9/cifar-100-python.tar.gz", "cifar-100-python.tar.gz"),
        ("fashion_mnist", "mirrors", ["http://127.0.0.1:9/"], "train-images-idx3-ubyte.gz"),
    ],
)
def test_a_download_that_cannot_connect_is_one_line(name, attribute, address, files, tmp_path, monkeypatch):
    """Port 9 on this machine refuses at once: the error of a machine that cannot reach the host."""
    cls = {"cifar100": "CIFAR100", "fashion_mnist": "FashionMNIST"}[name]
    monkeypatch.setattr(f"torchvision.datasets.{cls}.{attribute}", address)
    tried = "http://127.0.0.1:9/" + files
    with pytest.raises(
        SystemExit,
        match=f"^error: downloading {cls} failed .*; tried {re.escape(tried)}; .*"
        f"download .*{re.escape(files)}.* by hand into {re.escape(str(tmp_path))}",
    ):
        load_prepare_data().main([name, "--root", str(tmp_path)])


# Every driver's jobs on Fashion-MNIST at seed 0, as its main builds them with its defaults.
POINT = 60
JOBS = {
    "fig3": build_jobs("fashion_mnist", [20, 60, 200], [0], fig3.METHODS, []),
    "fig1": build_jobs("fashion_mnist", [POINT], [0], list(fig1.METHODS), []),
    "fig2": build_jobs("fashion_mnist", [POINT], [0], fig2.STUDENTS, []),
    "fig4": build_jobs("fashion_mnist", [POINT], [0], fig4.variants(fig4.KS["fashion_mnist"], ["uniform"]), []),
    "failures": build_jobs(
        "fashion_mnist",
        [POINT],
        [0],
        failures.variants(
            failures.TEACHERS["fashion_mnist"], failures.DEFAULT_METHODS["fashion_mnist"], failures.TEMPERATURES
        ),
        [],
    ),
}


def test_every_driver_job_list_builds_and_composes(tmp_path):
    """Each job names its point of the axis; every distinct job at one point and one temperature (the
    others differ only in data.train_per_class or objective.temperature) composes into a valid config."""
    distinct = {}
    for jobs in JOBS.values():
        points = collect(jobs, {name: {"status": "completed"} for name in jobs})[AXES["fashion_mnist"].column]
        for (name, job), point in zip(jobs.items(), points):
            overrides = job.overrides
            assert f"data.train_per_class={point}" in overrides and overrides[0] == "experiment=fig3_fashion_mnist"
            if point == POINT and job.values.get("tau") not in (2.0, 4.0):
                distinct[tuple(overrides)] = name
    assert len(distinct) == 7 + 4 + 5  # fig3's methods (fig1's and fig2's among them), fig4's k, failures' teachers
    for overrides, name in distinct.items():
        cfg = compose_config(list(overrides), tmp_path / name)
        validate(cfg)
        assert cfg.data.train_per_class == POINT and cfg.model.name == "cnn"
        assert cfg.data._target_ == "kd.data.fashion.FashionMNISTDataModule"


def test_failures_distils_each_teacher_at_each_temperature_and_ce_at_none():
    jobs = JOBS["failures"]
    assert jobs["ce-per_class60-s0"].overrides == [
        "experiment=fig3_fashion_mnist",
        "objective=ce",
        "data.train_per_class=60",
        "seed=0",
    ]
    cfg = compose_config(jobs["kd-tau2@cnn32-per_class60-s0"].overrides, "/unused")
    assert cfg.objective.temperature == 2 and list(cfg.teacher.model.widths) == [32, 64, 128]
    assert compose_config(jobs["kd-tau4@cnn16-ls0.2-per_class60-s0"].overrides, "/unused").teacher.objective == {
        "name": "ls",
        "eps": 0.2,
    }
    runs = collect(jobs, {name: {"status": "completed"} for name in jobs})
    assert set(runs.tau.dropna()) == {1, 2, 4} and set(runs.teacher) == {"", *failures.TEACHERS["fashion_mnist"]}
    assert len(runs) == 1 + 5 * 3


def test_a_two_step_cnn_job_of_fig3_completes(root, tmp_path):
    data = tmp_path / "data"
    write_fashion_mnist(data, gz=True)
    ((name, job),) = build_jobs("fashion_mnist", [3], [0], ["kd"], []).items()
    # One epoch of 2 batches of 15 (3 images of each class, no epoch filling); the teacher: one epoch of all 110.
    two_steps = [
        "data.batch_size=15",
        "data.min_epoch_size=0",
        "trainer.max_epochs=1",
        "teacher.trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]
    record = run(compose_config([*job.overrides, f"data.root={data}", "data.val_size=10", *two_steps], root / name))
    assert record["status"] == "completed" and record["global_step"] == 2
    assert 0 <= record["metrics"]["test/acc_last"] <= 1 and record["config"]["objective"]["temperature"] == 4


def test_fig3_summary_reads_the_per_class_axis_and_keeps_failed_cells():
    rows = [
        {
            "method": m,
            "per_class": n,
            "seed": s,
            "status": "completed",
            "test_acc_last": acc + 0.01 * s,
            "seconds": 1.0,
            "error": "",
            "data": "fashion_mnist",
        }
        for m, acc in (("ce", 0.70), ("ls", 0.71), ("kd_sim", 0.72), ("kd_pt", 0.73))
        for n in (20, 60)
        for s in (0, 1)
    ]
    rows[-1].update(status="failed", error="RuntimeError: boom")
    rows[-2].update(status="failed", error="RuntimeError: boom")  # kd_pt at 60: every seed failed
    df = pd.DataFrame(rows)
    summary = fig3.summarise(df, 60.0, teachers={"cnn-ce-0123": 0.9}, rerun=rerun("fig3", "fashion_mnist"))
    assert "| method | 20 per class | 60 per class |" in summary
    assert "| KD-pt (instance) | 0.735 ± 0.007 | n/a |" in summary
    assert "- KD-pt (instance) > KD-sim (domain): holds at 1/1 per_class values" in summary
    assert "- kd_pt 60 per class seed=1: RuntimeError: boom" in summary
    assert (
        "Teacher (cnn-ce-0123): test accuracy 0.900" in summary
        and "`make reproduce-fig3 DATA=fashion_mnist`" in summary
    )
    assert fig3.axis(df) == "per_class" and fig3.plot(df) is not None
