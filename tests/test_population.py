"""Populations: many small runs trained at once as one stacked model, each member exactly its own run."""

import copy
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from kd import population
from kd.data.synthetic import SyntheticDataModule
from kd.errors import UserError
from kd.models import get as get_model
from kd.results import completed_record
from kd.runner import compose_config, run_jobs, units
from kd.teachers import load_checkpoint
from kd.train import run
from tests.conftest import TINY, TINY_TEACHER

REPO = Path(__file__).resolve().parent.parent
# Five steps an epoch, four epochs: the first 20 steps are the whole run.
BASE = [*TINY, "data.batch_size=8", "trainer.max_epochs=4", "data.delta=1.0"]
STEPS = [*BASE, *TINY_TEACHER]
OBJECTIVES = ["ce", "ls", "kd", "kd_pt", "kd_sim", "kd_pt_sim", "kd_topk"]


class Record(L.Callback):
    """Each member's weights when training starts and its loss at every step (class attributes: a
    run instantiates its callbacks from the config)."""

    runs: dict[str, dict] = {}

    def on_train_start(self, trainer, pl_module):
        nets = [pl_module.net.member(g) for g in range(pl_module.members)]
        Record.runs[trainer.default_root_dir] = {"start": nets, "losses": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Record.runs[trainer.default_root_dir]["losses"].append(pl_module.step_loss.clone())


@pytest.mark.parametrize("strategy", sorted(population.STRATEGIES))
@pytest.mark.parametrize(
    "name, shape, kwargs", [("mlp", (8,), {"hidden": [16, 16]}), ("cnn", (1, 8, 8), {"widths": [4, 8]})]
)
def test_each_strategy_runs_each_member_through_its_own_network(strategy, name, shape, kwargs):
    """Outputs, a member's state and (batch norm) its running statistics after a training forward pass."""
    nets = [get_model(name, num_classes=5, input_shape=shape, **kwargs) for _ in range(3)]
    alone = [copy.deepcopy(net) for net in nets]
    both = population.network(nets, torch.device("cpu"), strategy)
    x = torch.randn(3, 7, *shape)
    torch.testing.assert_close(both(x), torch.stack([net(x[g]) for g, net in enumerate(alone)]), rtol=1e-5, atol=1e-6)
    for g, net in enumerate(alone):
        assert both.member(g).keys() == net.state_dict().keys()
        for k, v in net.state_dict().items():
            torch.testing.assert_close(both.member(g)[k], v, rtol=1e-5, atol=1e-7, msg=k)
    state = both.stacked_state()
    both.load_stacked({k: torch.zeros_like(v) for k, v in state.items()})
    assert not any(v.any() for v in both.stacked_state().values())
    assert population.has_batch_norm(nets[0]) == (name == "cnn")
    assert type(population.network(nets, torch.device("cpu"))).__name__ == ("Loop" if name == "cnn" else "Stack")


def test_population_data_serves_each_member_its_own_batches_in_its_own_order():
    members = [
        SyntheticDataModule(superclasses=2, subclasses=2, dim=4, train_per_class=5, seed=s, batch_size=3)
        for s in (0, 1)
    ]
    data = population.Data([members[0], members[1], members[0]])  # the third member shares the first's data
    data.setup()
    for split, shuffle in (("train", True), ("val", False)):
        stacked = list(data.loader(split, shuffle=shuffle))
        for g, member in enumerate([members[0], members[1], members[0]]):
            alone = list(member.loader(split, shuffle=shuffle))
            assert len(stacked) == len(alone)
            for (x, y, index), (xs, ys, indexs) in zip(stacked, alone):
                assert torch.equal(x[g], xs) and torch.equal(y[g], ys) and torch.equal(index[g], indexs)
    assert data.num_classes == 4 and data.input_shape == (4,)


def test_a_populations_evaluation_batches_hold_at_most_eval_rows_and_the_same_examples(monkeypatch):
    members = [
        SyntheticDataModule(superclasses=2, subclasses=2, dim=4, train_per_class=5, seed=s, eval_batch_size=8)
        for s in (0, 1, 2)
    ]
    data = population.Data(members)
    monkeypatch.setattr(population, "EVAL_ROWS", 9)  # 3 members: 3 examples each a batch, not 8
    batches = list(data.loader("val"))
    assert {index.shape for index in (b[2] for b in batches[:-1])} == {(3, 3)}
    for g, member in enumerate(members):
        alone = list(member.loader("val"))
        assert len(alone[0][2]) == 8
        assert torch.equal(torch.cat([b[0][g] for b in batches]), torch.cat([b[0] for b in alone]))
        assert torch.equal(torch.cat([b[2][g] for b in batches]), torch.cat([b[2] for b in alone]))


def test_members_with_one_teacher_and_the_same_inputs_share_its_pass():
    from omegaconf import OmegaConf

    from kd.module import DistillationModule, TeacherOutputs

    teacher = get_model("mlp", num_classes=5, input_shape=(8,), hidden=[16])
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    kd = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "objective" / "kd.yaml"), resolve=True)
    nets = [get_model("mlp", num_classes=5, input_shape=(8,), hidden=[16]) for _ in range(3)]
    module = DistillationModule(population.Stack(nets), objective=[kd] * 3, optimizer=None, teacher=teacher)
    module.teacher_outputs["val"] = TeacherOutputs(6)
    x, index = torch.randn(3, 6, 8), torch.arange(6).repeat(3, 1)
    x[2] = x[0]
    module.inputs_of = [0, 1, 0]  # members 0 and 2 share a data module (kd.population.Data): the same inputs
    logits = module._teacher_logits("val", x, index)
    assert len(calls) == 2
    with torch.no_grad():
        torch.testing.assert_close(logits, torch.stack([teacher(x[g]) for g in range(3)]), rtol=0, atol=0)
    module.teacher_outputs["val"].end_of_pass()
    torch.testing.assert_close(module._teacher_logits("val", x, index), logits, rtol=0, atol=0)
    assert len(calls) == 5  # the check above ran it 3 times; the second pass looked the logits up


def test_population_key_pools_what_can_share_and_keeps_the_rest_alone():
    base = compose_config([*TINY, "objective=kd", "teacher=oracle"], "/a")
    same = [
        compose_config([*TINY, f"objective={o}", f"seed={s}", "data.delta=2.0", "teacher=oracle"], f"/b{s}{o}")
        for o in ("ce", "kd_pt")
        for s in (0, 3)
    ]
    assert {population.key(c) for c in same} == {population.key(base)} != {None}
    other = [
        compose_config([*TINY, "model.hidden=[32]"], "/c"),
        compose_config([*TINY, "data.dim=4"], "/d"),
        compose_config([*TINY, "trainer.max_epochs=3"], "/e"),
    ]
    assert len({population.key(c) for c in [base, *other]}) == 4
    stop = ["+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping", "+callbacks.stop.monitor=val/acc"]
    alone = [
        compose_config([*TINY, *stop], "/f"),
        compose_config([*TINY, "compile=true"], "/g"),
        compose_config(["data=imagefolder", "model=resnet8", "logger=none"], "/h"),
    ]
    assert [population.key(c) for c in alone] == [None, None, None]
    # Batch norm no longer trains alone: CIFAR runs of one recipe pool across seeds and objectives.
    cifar = [
        compose_config(["data=cifar100", "model=resnet8", "logger=none", f"seed={s}", f"objective={o}"], f"/i{s}")
        for s, o in ((0, "ce"), (1, "kd"))
    ]
    assert population.key(cifar[0]) == population.key(cifar[1]) is not None
    # Loggers no longer keep a run alone: each member logs to its own.
    assert population.key(compose_config([*TINY, "logger=csv"], "/j")) is not None
    with pytest.raises(UserError, match="cannot train as one population"):
        population.check([base, other[0]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Seven objectives x two seeds as one population (their teachers trained as a population too),
    and each member again as its own single run, which finds those teachers in the cache."""
    root = tmp_path_factory.mktemp("population")
    os.environ["KD_ROOT"] = str(root)
    record = ["+callbacks.record._target_=tests.test_population.Record"]
    jobs = {f"{o}-s{s}": [*STEPS, *record, f"objective={o}", f"seed={s}"] for o in OBJECTIVES for s in (0, 1)}
    cfgs = {name: compose_config(o, root / "population" / name) for name, o in jobs.items()}
    members = dict(zip(jobs, run(list(cfgs.values()))))
    singles = {name: run(compose_config(o, root / "single" / name)) for name, o in jobs.items()}
    yield root, members, singles
    del os.environ["KD_ROOT"]


def test_a_member_starts_from_its_single_runs_weights_and_follows_its_losses(trained):
    root, members, singles = trained
    runs = importlib.import_module("tests.test_population").Record.runs  # the class the runs import
    (pop,) = [r for d, r in runs.items() if d.startswith(str(root / "population" / ".populations"))]
    for g, name in enumerate(members):
        alone = runs[str(root / "single" / name)]
        (start,) = alone["start"]
        assert all(torch.equal(pop["start"][g][k], v) for k, v in start.items()), name
        losses = torch.stack([step[g] for step in pop["losses"]])
        single = torch.cat([step for step in alone["losses"]])
        assert len(losses) == len(single) == 20
        torch.testing.assert_close(losses, single, rtol=1e-5, atol=0, msg=name)


def test_each_member_writes_the_record_and_checkpoints_its_single_run_would(trained):
    _, members, singles = trained
    for name, record in members.items():
        single = singles[name]
        assert record["status"] == single["status"] == "completed"
        assert record["metrics"].keys() == single["metrics"].keys()
        assert record["population"]["members"] == len(members) and record["config"]["seed"] == single["config"]["seed"]
        for which in ("last", "best"):
            net = load_checkpoint(record["checkpoints"][which], 4, (8,))
            assert isinstance(net, torch.nn.Module)
        assert completed_record(record["output_dir"]) == json.loads(json.dumps(record, default=str))
        torch.testing.assert_close(
            record["metrics"]["val/acc_best"], single["metrics"]["val/acc_best"], atol=1e-6, rtol=0
        )
    assert not any(Path(members["kd-s0"]["population"]["folder"]).glob("*"))  # its checkpoint is gone once done
    # The teachers trained as one population, each into the cache folder a single run would use.
    teachers = {r["config"]["teacher"]["kind"] for r in members.values()}
    assert teachers == {"trained"}


def test_a_killed_population_resumes_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_ROOT", str(tmp_path))
    from tests.test_reliability import SignalAt

    jobs = [[*BASE, f"objective={o}", "teacher=oracle", "callbacks.last_checkpoint.every_s=0"] for o in ("ce", "kd")]
    whole = run([compose_config(o, tmp_path / "whole" / str(i)) for i, o in enumerate(jobs)])
    stop = [
        "+callbacks.stop._target_=tests.test_reliability.SignalAt",
        f"+callbacks.stop.signum={int(signal.SIGTERM)}",
        "+callbacks.stop.epoch=2",
        "+callbacks.stop.batch=1",
    ]
    cfgs = [compose_config([*o, *stop], tmp_path / "cut" / str(i)) for i, o in enumerate(jobs)]
    assert SignalAt
    with pytest.raises(SystemExit, match="stopped by SIGTERM"):
        run(cfgs)
    assert json.loads((tmp_path / "cut" / "0" / "results.json").read_text())["status"] == "interrupted"
    resumed = run(cfgs)
    for a, b in zip(whole, resumed):
        assert a["metrics"] == b["metrics"]


class Poison(L.Callback):
    """Makes member 1's weights NaN after the first step: that member diverges, the others must not."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            with torch.no_grad():
                next(pl_module.net.parameters())[1] = float("nan")


def test_a_member_that_diverges_fails_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_ROOT", str(tmp_path))
    poison = ["+callbacks.poison._target_=tests.test_population.Poison"]
    records = run(
        [
            compose_config([*BASE, "teacher=oracle", "objective=kd", f"seed={s}", *poison], tmp_path / str(s))
            for s in range(3)
        ]
    )
    assert [r["status"] for r in records] == ["completed", "failed", "completed"]
    assert records[1]["error"].startswith("TrainingDiverged: loss is nan at step 1 (epoch 0)")
    assert all(0 <= r["metrics"]["test/acc_last"] <= 1 for r in (records[0], records[2]))


def test_run_jobs_trains_populations_or_not_as_asked(tmp_path):
    jobs = {
        f"{o}-s{s}": [*TINY, f"paths.root_dir={tmp_path}", f"objective={o}", "teacher=oracle", f"seed={s}"]
        for o in ("ce", "kd")
        for s in (0, 1)
    }
    pooled = run_jobs(jobs, tmp_path / "pooled")
    alone = run_jobs(jobs, tmp_path / "alone", population=False)
    assert all(r["population"]["members"] == 4 for r in pooled.values())
    assert not any("population" in r for r in alone.values())
    for name in jobs:
        assert pooled[name]["metrics"].keys() == alone[name]["metrics"].keys()


def test_units_keep_a_teachers_students_together_and_balance_the_workers():
    from experiments.drivers import build_jobs, overrides_of
    from kd.runner import check

    built = build_jobs("synthetic", [0.5, 1.0], [0, 1, 2], ["ce", "kd", "kd_pt"], ["logger=none"])
    jobs = overrides_of(built)
    plan = units(jobs, check(jobs), workers=2, population=True)
    assert sorted(map(len, plan)) == [9, 9] and sorted(n for u in plan for n in u) == sorted(jobs)
    for unit in plan:  # every (delta, seed) whole in one unit: its three methods
        points = [(built[n].values["delta"], built[n].values["seed"]) for n in unit]
        assert all(points.count(point) == 3 for point in points)
    assert len(units(jobs, check(jobs), workers=2, population=False)) == len(jobs)


def test_an_override_that_cannot_apply_names_the_job(tmp_path):
    jobs = {"ce-s0": ["objective=ce", "objective.temperature=4"], "kd-s0": ["objective=kd", "objective.temperature=4"]}
    with pytest.raises(UserError, match=r"^job ce-s0: Could not override 'objective.temperature'"):
        run_jobs(jobs, tmp_path)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


class Die(L.Callback):
    """Kills its own worker process, as the OS does when memory runs out."""

    def on_train_start(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_by_the_os_takes_only_its_own_job(tmp_path, capsys):
    jobs = {f"ce-s{s}": [*TINY, f"paths.root_dir={tmp_path}", f"seed={s}"] for s in range(3)}
    jobs["dies-s0"] = [*TINY, f"paths.root_dir={tmp_path}", "+callbacks.die._target_=tests.test_population.Die"]
    records = run_jobs(jobs, tmp_path, workers=2, population=False)
    assert all(records[f"ce-s{s}"]["status"] == "completed" for s in range(3))
    assert records["dies-s0"]["status"] == "failed" and "died while it ran alone" in records["dies-s0"]["error"]
    printed = capsys.readouterr()
    assert "a worker process died" in printed.out + printed.err


def test_teachers_no_longer_import_the_trainer():
    """kd.teachers gets the training function handed in: imports point down (no cycle)."""
    code = "import sys, kd.teachers; assert 'kd.train' not in sys.modules, sorted(m for m in sys.modules if m.startswith('kd'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("model", ["cnn", "resnet8"])
def test_batch_norm_members_follow_their_single_runs_with_augmentation(model, root, tmp_path):
    """A cnn or resnet8 member (batch norm, images cropped and flipped from its own seed, a teacher
    pass shared by the objectives of one seed) has its single run's losses over the first 20 steps
    and its running statistics after them."""
    from tests.fakes import write_fashion_mnist

    write_fashion_mnist(tmp_path / "images", gz=True)
    base = [
        "data=fashion_mnist",
        f"data.root={tmp_path / 'images'}",
        f"model={model}",
        "logger=none",
        "data.train_per_class=3",
        "data.val_size=10",
        "data.batch_size=6",
        "data.augment=true",
        "trainer.max_epochs=4",
        "trainer.enable_progress_bar=false",
        "+callbacks.record._target_=tests.test_population.Record",
        "teacher=cnn",
        "teacher.model.widths=[4,8]",
        "teacher.trainer.max_epochs=1",
    ]
    if model == "cnn":
        base.append("model.widths=[4,8]")
    jobs = {f"{o}-s{s}": [*base, f"objective={o}", f"seed={s}"] for o, s in (("ce", 0), ("kd", 0), ("kd", 1))}
    members = run([compose_config(o, root / "population" / name) for name, o in jobs.items()])
    assert {m["population"]["members"] for m in members} == {3}
    runs = importlib.import_module("tests.test_population").Record.runs
    (pop,) = [r for d, r in runs.items() if d.startswith(str(root / "population" / ".populations"))]
    for g, (name, overrides) in enumerate(jobs.items()):
        single = run(compose_config(overrides, root / "single" / name))
        alone = runs[str(root / "single" / name)]
        losses = torch.stack([step[g] for step in pop["losses"]])
        assert len(losses) == 20
        torch.testing.assert_close(losses, torch.cat(alone["losses"]), rtol=1e-5, atol=0, msg=name)
        stats = [
            {
                k: v
                for k, v in torch.load(r["checkpoints"]["last"], weights_only=False)["state_dict"].items()
                if "running" in k
            }
            for r in (members[g], single)
        ]
        assert stats[0] and stats[0].keys() == stats[1].keys()
        for k, v in stats[0].items():
            torch.testing.assert_close(v, stats[1][k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
