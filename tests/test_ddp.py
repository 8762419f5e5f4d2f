"""The module, data and objectives under several ranks (two gloo processes on the CPU) and on an
accelerator's device: what each rank computes, counts and checkpoints. Every multi-process run is
bounded in time; a hang fails."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from kd import models, population
from kd.data.base import IndexBatchSampler
from kd.data.folder import ImageFolderDataModule, Split
from kd.data.synthetic import SyntheticDataModule
from kd.errors import UserError
from kd.module import STAGES, DistillationModule
from kd.objectives import REGISTRY, similarity
from kd.predict import predict
from kd.teachers import load_checkpoint
from kd.train import check_ddp_launch
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
# Two ranks of ``python -m kd.train`` (Lightning's ddp re-runs the command for rank 1) on the CPU.
TWO_RANKS = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4"]
# 3 classes: 21 test examples, which two ranks cannot share evenly.
ODD = ["data.superclasses=3", "data.subclasses=1", "data.test_per_class=7"]


def kd_train(*args, root: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """``python -m kd.train`` in a session of its own: on a timeout every rank is
    killed and the test fails, as a hang should."""
    env = {**os.environ, "KD_ROOT": str(root), "WANDB_MODE": "offline", "WANDB_DIR": str(root), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "kd.train", *args, f"hydra.run.dir={root / 'run'}"]
    with subprocess.Popen(
        command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"still running after {timeout} s (a hang): {err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def record(root: Path) -> dict:
    return json.loads((root / "run" / "results.json").read_text())


def population_module(objectives: list[str]) -> DistillationModule:
    """A population of mlp students, one per objective, all taught by one mlp."""
    nets = [models.get("mlp", num_classes=4, input_shape=(8,), hidden=[16]) for _ in objectives]
    teacher = models.get("mlp", num_classes=4, input_shape=(8,), hidden=[16])
    sim = similarity.from_teacher_weights(teacher.classifier.weight, beta=0.2)
    return DistillationModule(
        population.Stack(nets),
        [{"name": name} for name in objectives],
        lambda params: torch.optim.SGD(params, lr=0.1),
        teacher=teacher,
        class_similarity=[sim if REGISTRY[name].needs_similarity else None for name in objectives],
        num_classes=4,
        input_shape=(8,),
    )


def test_the_loss_groups_tensors_move_with_the_module_and_a_step_copies_none():
    """KD-sim's similarities and the member indices are the module's buffers: on a GPU no step
    copies them from the host (tests/test_performance.py checks that no step waits there)."""
    module = population_module(["kd_sim", "kd_pt_sim", "kd", "kd_sim"])
    G, B, K = 4, 5, 4
    logits, teacher = torch.randn(G, B, K), torch.randn(G, B, K)
    copies = []
    to = torch.Tensor.to

    def counted(self, *args, **kwargs):
        moved = to(self, *args, **kwargs)
        if moved is not self:
            copies.append((args, kwargs))
        return moved

    torch.Tensor.to = counted
    try:
        losses = module._losses(logits, torch.randint(0, K, (G, B)), teacher)
    finally:
        torch.Tensor.to = to
    assert copies == [] and losses.shape == (G,) and torch.isfinite(losses).all()
    module.to("meta")
    tensors = {name: t for name, t in module.loss_groups.named_buffers()}
    assert sorted(tensors) == [
        "0.loss.target.class_similarity",
        "0.members",
        "1.loss.target.class_similarity",
        "1.members",
        "2.members",
    ]
    assert all(t.device.type == "meta" for t in tensors.values())


def test_a_resumed_populations_best_weights_follow_the_module_to_its_device():
    """Lightning restores a checkpoint, then moves the module to its device: the best-epoch weights
    must follow, or a GPU run indexes host tensors with a device mask at its next validation."""
    saved = population_module(["kd", "kd_pt"])
    saved._keep_best(torch.tensor([True, False]))
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    resumed = population_module(["kd", "kd_pt"])
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.best_state.keys() == saved.best_state.keys()
    resumed.to("meta")
    assert {t.device.type for t in resumed.best_state.values()} == {"meta"}


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_strategy_whose_ranks_are_child_processes_is_refused_in_one_line(strategy):
    """ddp_spawn hands back only the weights: the record's metrics would be empty and last.ckpt
    overwritten by the parent's untrained loop state."""
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
    with pytest.raises(
        UserError,
        match=r"^trainer.strategy=ddp_spawn .* do not come back; run each data-parallel "
        r"job as its own `python -m kd.train trainer=ddp \.\.\.`, or on SLURM",
    ):
        check_ddp_launch(trainer)


def two_ranks(data):
    """``data`` as rank 0, then rank 1, of two would see it."""
    for rank in (0, 1):
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=SimpleNamespace(root_device="cpu"))
        yield data


@pytest.mark.parametrize("kind", ["tensors", "folder"])
def test_two_ranks_evaluate_each_example_once_and_train_on_shards_of_one_size(kind, tmp_path):
    if kind == "tensors":
        data = SyntheticDataModule(
            superclasses=3,
            subclasses=1,
            dim=4,
            train_per_class=7,
            val_per_class=7,
            test_per_class=7,
            batch_size=4,
            eval_batch_size=4,
        )
    else:
        data = ImageFolderDataModule(
            root=str(tmp_path), batch_size=4, eval_batch_size=4, num_workers=0, pin_memory=False
        )
        data.splits = {split: Split([(torch.zeros(1), 0)] * 21, lambda x: x) for split in STAGES}
    data.setup()
    for split in STAGES:
        shards = [
            torch.cat([index for _, _, index in ranked.loader(split, shuffle=split == "train")])
            for ranked in two_ranks(data)
        ]
        if split == "train":
            assert len(shards[0]) == len(shards[1]) == 11  # padded: as many steps on every rank
        else:
            assert sorted(torch.cat(shards).tolist()) == list(range(21)), split


def test_a_sampler_resumed_mid_epoch_goes_on_with_the_rest_of_its_epoch_on_any_number_of_ranks():
    def ranks(world: int, state: dict | None = None) -> list[IndexBatchSampler]:
        samplers = [IndexBatchSampler(40, 4, shuffle=True, seed=1, rank=r, world_size=world) for r in range(world)]
        for sampler in samplers:
            sampler.set_epoch(3)
            if state:
                sampler.load_state_dict(state)
        return samplers

    whole = [list(sampler) for sampler in ranks(2)]
    first = ranks(2)
    taken = [batch for sampler in first for _, batch in zip(range(2), sampler)]  # 2 steps on each rank
    assert first[0].state_dict() == {"epoch": 3, "taken": 16}
    again = [list(sampler) for sampler in ranks(2, first[0].state_dict())]
    assert all(torch.equal(torch.cat(a), torch.cat(w[2:])) for a, w in zip(again, whole))  # the next batches
    (alone,) = [list(sampler) for sampler in ranks(1, first[0].state_dict())]
    assert sorted(torch.cat([*taken, *alone]).tolist()) == list(range(40))  # the rest, once


@pytest.mark.slow
def test_two_ranks_test_each_example_once(tmp_path):
    """Two ranks' test accuracy is that of one process on the same weights: 21 examples, none twice."""
    result = kd_train(*TINY, *TWO_RANKS, *ODD, "callbacks=none", root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    done = record(tmp_path)
    data = instantiate(done["config"]["data"])
    data.setup()
    net = load_checkpoint(done["checkpoints"]["last"], data.num_classes, data.input_shape)
    out = predict(net, data, "test")
    assert len(out["labels"]) == 21
    alone = ((out["logits"].argmax(1) == out["labels"]).float().sum() / len(out["labels"])).item()
    assert done["metrics"]["test/acc_last"] == pytest.approx(alone, abs=1e-7)


class Seen(L.Callback):
    """Appends each training batch's example indices to ``path``, one line per batch: rank, epoch, indices."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as file:
            file.write(json.dumps([trainer.global_rank, trainer.current_epoch, batch[2].tolist()]) + "\n")


class StopAfter(L.Callback):
    """Writes last.ckpt on every rank after training step ``step``, then ends the job (a preemption
    at a known step, as a requeued job resumes from)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            raise SystemExit(3)


@pytest.mark.slow
def test_a_mid_epoch_resume_on_two_ranks_ends_the_epoch_with_every_ranks_counts(tmp_path):
    """Every rank's metric counts are in the checkpoint (summed, carried on by rank 0): the resumed
    epoch's training metrics are the uninterrupted run's. ce and no dropout: nothing random but the
    batch order, which the data resumes itself."""
    run = [*TINY, *TWO_RANKS, "trainer.max_epochs=1", "callbacks=none"]
    whole = kd_train(*run, root=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stop = ["+callbacks.stop._target_=tests.test_ddp.StopAfter", "+callbacks.stop.step=2"]
    stopped = kd_train(*run, *stop, root=tmp_path / "resumed")
    assert stopped.returncode == 3 and record(tmp_path / "resumed")["global_step"] == 2, stopped.stderr[-3000:]
    resumed = kd_train(*run, root=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = record(tmp_path / "whole")["metrics"], record(tmp_path / "resumed")["metrics"]
    assert got["train/acc"] == expected["train/acc"]
    assert got == pytest.approx(expected, rel=1e-6)  # sums added in another order


@pytest.mark.slow
def test_a_mid_epoch_resume_on_fewer_ranks_trains_the_rest_of_the_epoch_once(tmp_path):
    """Stopped after 2 of 5 steps on two ranks (16 of 40 examples), resumed on one: the 24 others, each once."""
    seen = tmp_path / "seen.jsonl"
    run = [
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "data.batch_size=4",
        "trainer.max_epochs=1",
        "callbacks=none",
        "+callbacks.seen._target_=tests.test_ddp.Seen",
        f"+callbacks.seen.path={seen}",
    ]
    stop = ["+callbacks.stop._target_=tests.test_ddp.StopAfter", "+callbacks.stop.step=2"]
    stopped = kd_train(*run, "trainer.devices=2", *stop, root=tmp_path)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    resumed = kd_train(*run, "trainer.devices=1", root=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    batches = [json.loads(line) for line in seen.read_text().splitlines()]
    assert sorted(rank for rank, _, _ in batches) == [0] * 8 + [1] * 2  # 2 + 6 steps, then 2
    assert sorted(i for _, epoch, index in batches for i in index) == list(range(40))  # all in epoch 0
    assert record(tmp_path)["global_step"] == 8
