"""Speed measured side by side in one process: ``make bench`` (scripts/benchmark.py; docs/performance.md).

(a) ``kd_step``: KD training steps, resnet56 teacher -> resnet20 student, on CIFAR-100-shaped random
    uint8 images. Ours is ``kd.train.run`` (the Lightning run users get: our data module, crop and
    flip on the device, DistillationModule, CRD recipe), timed by ``StepTimer`` from the end of a
    warm-up to the last step; once with the fast path (trainer=gpu_fast: channels_last, compile,
    bf16-mixed where the device computes bf16 natively, else 32-true) and once paper-faithful
    (32-true). The reference is the common plain loop: a torchvision DataLoader over PIL images
    with per-sample RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, fp32.
(b) ``mlp``: one fig3_synthetic KD run through ``kd.train.run`` against a plain PyTorch loop with
    the same data, model, objective, optimizer, schedule, epochs and evaluation (val accuracy each
    epoch, test of the last and the best epoch); the same run with ``callbacks=none`` (no
    checkpoints, so no best-epoch test either): what checkpoints cost; and the plain loop as a
    bare LightningModule (no metrics, logging or checkpoints): the part that is Lightning's own.
    Ours runs the teacher in the first epoch only (kd.module.TeacherOutputs: the data are not
    augmented); the plain and bare loops, written the common way, run it at every step.
(c) ``fig3``: wall time of ``make reproduce-fig3`` (``--fig3`` runs it; else read from results/fig3/fig3.md),
    against its compute floor: its matrix FLOPs (teachers and students, training and evaluation,
    counted per example by torch's FlopCounterMode) over the fp32 GEMM rate measured in the same
    run, on every core. (b) also times a population (kd.population) of ``--members`` fig3 students
    (the seven objectives, init seeds 0, 1, ..., one data draw and one teacher) through
    ``kd.train.run``: its seconds per student against the plain loop's one student.
(d) ``epoch``: a few epochs of the CRD KD run (experiment=fig3_cifar100 objective=kd, batch 64,
    CIFAR-100's 45,000 training and 5,000 validation images, random) on the fast path, timed by
    ``EpochTimer``; the wall time of the 240-epoch run is projected from them.
(e) ``parity``: test accuracy of fp32 (32-true) against the fast path in bf16-mixed (no compile),
    a few seeds each, the same epochs, on ``RandomCIFAR(noise=...)``: class textures under pixel
    noise, which a net learns gradually, so that accuracy means something. Then KD at tau 4 with
    the trained nets (the fp32 one teaching the bf16 one): how far its loss and gradient move when
    the teacher's logits come from bf16 autocast, as on the fast path's augmented training inputs.

(g) ``images``: fig3's seven students on Fashion-MNIST shapes (experiment=fig3_fashion_mnist at 60 per
    class, random pixels, one random cnn teacher) as one population, in seconds per student, against
    a single run of one of them and against that student's bare arithmetic (``bare_student``: a
    plain loop over the same steps and evaluations); and resnet20 students of one resnet56 teacher on
    CIFAR shapes (``kd_overrides``' run, the fast path without compile, which a population does not
    take) as one population against a single run, in training images per second summed over the members.

The paths alternate round after round and each figure is the median over rounds, so a ratio
compares paths under the same load. This module, not the script, holds the pieces so that
Hydra can import ``RandomCIFAR``, ``StepTimer`` and ``EpochTimer`` as ``_target_`` of a run's config.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import VisionDataset

from kd import objectives, teachers
from kd.data.base import IndexedTensors
from kd.data.cifar import MEAN_STD, CIFARDataModule
from kd.data.fashion import FashionMNISTDataModule
from kd.errors import one_line
from kd.models import get as get_model
from kd.results import cpu_features, hardware, write_json_atomic, write_text_atomic
from kd.runner import QUIET, compose_config, quiet_lightning
from kd.train import run

REPO = Path(__file__).resolve().parent.parent
SHAPE = (3, 32, 32)
CLASSES = 100
# Per device type: speeds are at least (``at_least``), the others at most their target; a target is
# judged when its measurement ran.
TARGETS = {
    "cpu": {
        "kd_step.ratio": 1.3,
        "kd_step.fp32_ratio": 1.0,
        "mlp.lightning_over_plain": 1.2,
        "mlp.population_per_student_over_plain": 0.3,
        "fig3.wall_over_floor": 2.0,
        "images.population_over_single": 0.75,
        "images.population_over_bare": 1.2,
    },
    "cuda": {
        "kd_step.ours_img_s": 25000,
        "kd_step.ratio": 5.0,
        "epoch.projected_min": 10.0,
        "images.cifar_population_img_s": 100000,
        "parity.gap_over_fp32_spread": 1.0,
    },
}
MEASUREMENTS = ("kd_step", "mlp", "fig3", "epoch", "parity", "images")
# parity: pixel noise 1.5 times the class textures' scale (template_images). On a CPU, resnet8 trained
# 3 epochs on 5,000 images (120 steps) reached 13%, 5% and 2% test accuracy at noise 1, 2 and 3
# (chance 1%); the parity runs train resnet20 for 2,340 steps, and should land between chance and 100%.
PARITY_NOISE = 1.5
# The CRD recipe's KD loss and optimizer, as the reference loop writes them out.
TAU, CE_WEIGHT, KD_WEIGHT, LR, MOMENTUM, WEIGHT_DECAY = 4.0, 0.1, 0.9, 0.05, 0.9, 5e-4


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def random_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images laid out as torchvision's CIFAR keeps them (N, H, W, C), and labels."""
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), g.integers(0, CLASSES, n)


def template_images(n: int, noise: float, seed: int = 0, tile: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of ``CLASSES`` classes, laid out as ``random_images``: each class a texture, a
    random colour tile of ``tile`` x ``tile`` pixels repeated over the image; each image its class's
    texture at a random (cyclic) shift, plus Gaussian pixel noise ``noise`` times the tile's scale.
    A convolutional net must learn the 100 textures from noisy examples, and it learns them
    gradually: test accuracy after a short training is far from chance and from 100%, so a
    difference between two trainings (fp32 and bf16) shows in it."""
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randn(CLASSES, 3, tile, tile, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    shift = torch.randint(0, tile, (2, n, 1), generator=g)
    rows, cols = (torch.arange(32) + shift) % tile  # (n, 32) each: which tile pixel each image pixel shows
    x = tiles[y[:, None, None, None], torch.arange(3)[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    x = x + noise * torch.randn(x.shape, generator=g)
    x = (128 + 40 / (1 + noise**2) ** 0.5 * x).round().clamp(0, 255)  # pixel std about 40 at any noise
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy(), y.numpy()


class RandomCIFAR(CIFARDataModule):
    """Our CIFAR-100 data path on ``size`` generated training images and ``eval_size`` more for
    each of validation and test (default: one batch): uniform random pixels (``noise=None``, for
    speed alone) or class textures under pixel ``noise`` (``template_images``). The images are the same
    whatever the run's seed, as a real data set's are."""

    def __init__(self, size: int = 1024, eval_size: int | None = None, noise: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.size, self.eval_size, self.noise = size, eval_size or self.batch_size, noise

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        n = self.size + 2 * self.eval_size
        x, y = random_images(n) if self.noise is None else template_images(n, self.noise)
        x, y = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
        ends = {
            "train": (0, self.size),
            "val": (self.size, self.size + self.eval_size),
            "test": (self.size + self.eval_size, n),
        }
        self.splits = {split: IndexedTensors(x[a:b], y[a:b]) for split, (a, b) in ends.items()}


class StepTimer(L.Callback):
    """Images per second of the training steps after ``warmup`` ones, up to the end of the epoch's
    last step, the device synchronised at both ends; ``StepTimer.last`` holds the latest figure."""

    last: float | None = None

    def __init__(self, warmup: int = 2):
        self.warmup, self.images, self.start = warmup, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start, self.images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += batch[1].numel()  # every member's, in a population
        if batch_idx == trainer.num_training_batches - 1:
            synchronize(pl_module.device)
            StepTimer.last = self.images / (time.perf_counter() - self.start)


class EpochTimer(L.Callback):
    """Seconds of each epoch of a fit, its validation included: from the start of one training epoch
    to the start of the next (or the end of training), the device synchronised at each mark.
    ``EpochTimer.last`` holds the latest fit's list."""

    last: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.marks, EpochTimer.last = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self._mark(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._mark(pl_module)

    def _mark(self, pl_module) -> None:
        synchronize(pl_module.device)
        self.marks.append(time.perf_counter())
        EpochTimer.last = [b - a for a, b in zip(self.marks, self.marks[1:])]


class PILImages(VisionDataset):
    """A torchvision-style data set: uint8 (H, W, C) arrays, each returned as a PIL image through
    the per-sample ``transform`` (what torchvision.datasets.CIFAR100 does)."""

    def __init__(self, data: np.ndarray, targets: np.ndarray, transform):
        super().__init__(root=None, transform=transform)
        self.data, self.targets = data, targets

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


# ---- (a) a KD step on CIFAR-shaped data ----------------------------------------------------------


def teacher_checkpoint(path: Path, model: str = "resnet56", shape=SHAPE, classes: int = CLASSES) -> None:
    """A randomly initialised ``model`` in the layout of a run's checkpoint (speed needs no training)."""
    net = get_model(model, num_classes=classes, input_shape=shape)
    torch.save(
        {
            "hyper_parameters": {
                "model": {"_target_": "kd.models.get", "name": model},
                "num_classes": classes,
                "input_shape": list(shape),
            },
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        },
        path,
    )


def kd_overrides(root: Path, mode: list[str], batch: int, warmup: int, steps: int) -> list[str]:
    """experiment=fig3_cifar100 (resnet56 -> resnet20, KD) for one epoch of warmup + steps, timed by StepTimer."""
    return [
        *QUIET,
        "experiment=fig3_cifar100",
        "logger=none",
        "callbacks=none",
        *mode,
        "data._target_=experiments.bench.RandomCIFAR",
        f"+data.size={(warmup + steps) * batch}",
        f"data.batch_size={batch}",
        f"data.eval_batch_size={batch}",
        "teacher=checkpoint",
        f"teacher.path={root / 'resnet56.ckpt'}",
        "+callbacks.timer._target_=experiments.bench.StepTimer",
        f"+callbacks.timer.warmup={warmup}",
        "trainer.max_epochs=1",
        "+trainer.limit_val_batches=0",
        "+trainer.limit_test_batches=1",
        f"paths.root_dir={root}",
    ]


def ours_kd(root: Path, tag: str, mode: list[str], batch: int, warmup: int, steps: int) -> tuple[float, dict]:
    """Images per second of ``kd.train.run`` on ``kd_overrides``' run, and the run's record."""
    torch.compiler.reset()  # each run compiles afresh, as in a new process, and within the warm-up
    record = run(
        compose_config(kd_overrides(root, mode, batch, warmup, steps), tempfile.mkdtemp(prefix=f"kd-{tag}-", dir=root))
    )
    return StepTimer.last, record


def reference_kd(device: torch.device, batch: int, warmup: int, steps: int, workers: int) -> float:
    """Images per second of the common plain loop (RepDistiller's, in fp32, cuDNN autotuned as there)."""
    torch.backends.cudnn.benchmark = True
    mean, std = MEAN_STD["cifar100"]
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    loader = DataLoader(
        PILImages(*random_images((warmup + steps) * batch), transform),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    student = get_model("resnet20", num_classes=CLASSES, input_shape=SHAPE).to(device)
    teacher = get_model("resnet56", num_classes=CLASSES, input_shape=SHAPE).to(device).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    start = 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kl = F.kl_div(F.log_softmax(s / TAU, 1), F.softmax(t / TAU, 1), reduction="batchmean")
        loss = CE_WEIGHT * F.cross_entropy(s, y) + KD_WEIGHT * TAU**2 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


# ---- (b) the synthetic MLP student ---------------------------------------------------------------


def mlp_config(root: Path, tag: str, extra: list[str]):
    """fig3_synthetic's KD run on the benchmark's threads (the plain loop runs on the same)."""
    return compose_config(
        [
            *QUIET,
            "experiment=fig3_synthetic",
            "objective=kd",
            "data.delta=1.0",
            "seed=0",
            f"threads={torch.get_num_threads()}",
            f"paths.root_dir={root}",
            *extra,
        ],
        tempfile.mkdtemp(prefix=f"mlp-{tag}-", dir=root),
    )


def parts(cfg, teacher_path: Path):
    """What a plain loop builds from ``cfg``: data, frozen teacher, student, loss, optimizer, schedule."""
    data = instantiate(cfg.data)
    data.setup()
    teacher = teachers.load_checkpoint(teacher_path).requires_grad_(False).eval()
    torch.manual_seed(cfg.seed)
    net = instantiate(cfg.model, num_classes=data.num_classes, input_shape=data.input_shape)
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    loss_fn = objectives.get(objective.pop("name"), **objective)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    return data, teacher, net, loss_fn, optimizer, instantiate(cfg.scheduler)(optimizer=optimizer)


@torch.no_grad()
def accuracy(net, split: IndexedTensors, batch: int | None = None) -> float:
    """On the whole split at once, or in batches of ``batch``."""
    chunks = split.x.split(batch) if batch else [split.x]
    return (torch.cat([net(x) for x in chunks]).argmax(1) == split.y).float().mean().item()


def plain_mlp(cfg, teacher_path: Path) -> tuple[float, float]:
    """The run as a plain PyTorch loop; test accuracy of the last and the best epoch."""
    data, teacher, net, loss_fn, optimizer, scheduler = parts(cfg, teacher_path)
    train, best, best_state = data.splits["train"], -1.0, None
    for _ in range(cfg.trainer.max_epochs):
        net.train()
        for index in torch.randperm(len(train)).split(cfg.data.batch_size):
            x, y = train.x[index], train.y[index]
            with torch.no_grad():
                t = teacher(x)
            loss = loss_fn(net(x), y, t)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        net.eval()
        acc = accuracy(net, data.splits["val"])
        if acc > best:
            best, best_state = acc, copy.deepcopy(net.state_dict())
    last = accuracy(net, data.splits["test"])
    net.load_state_dict(best_state)
    return last, accuracy(net, data.splits["test"])


class BareModule(L.LightningModule):
    """``plain_mlp``'s loop as a LightningModule without metrics, logging or checkpoints."""

    def __init__(self, cfg, teacher_path: Path):
        super().__init__()
        self.data, self.teacher, self.net, self.loss_fn, self.opt, self.sched = parts(cfg, teacher_path)
        self.best, self.best_state = -1.0, None

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        with torch.no_grad():
            t = self.teacher(x)
        return self.loss_fn(self.net(x), y, t)

    def validation_step(self, batch, batch_idx):  # the whole val split is one batch
        acc = accuracy(self.net, IndexedTensors(*batch[:2]))
        if acc > self.best:
            self.best, self.best_state = acc, copy.deepcopy(self.net.state_dict())

    def configure_optimizers(self):
        return {"optimizer": self.opt, "lr_scheduler": self.sched}


def bare_mlp(cfg, teacher_path: Path) -> tuple[float, float]:
    module = BareModule(cfg, teacher_path)
    trainer = L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    trainer.fit(module, train_dataloaders=module.data.train_dataloader(), val_dataloaders=module.data.val_dataloader())
    last = accuracy(module.net, module.data.splits["test"])
    module.net.load_state_dict(module.best_state)
    return last, accuracy(module.net, module.data.splits["test"])


# ---- (d) the epoch time of the CRD KD run, (e) fp32 against bf16 -------------------------------


def epoch_times(root: Path, mode: list[str], size: int, eval_size: int, epochs: int, extra: list[str]) -> dict:
    """A few epochs of experiment=fig3_cifar100 objective=kd (the CRD recipe) on ``mode``, timed by
    ``EpochTimer``, and the wall time of the recipe's full run projected from them: the first epoch
    (compilation, the teacher's pass over the validation split) + the others at the median speed
    of epochs 2.. + what the run spends outside epochs (set-up, the tests of the last and best epoch)."""
    recipe = ["experiment=fig3_cifar100", "objective=kd"]
    overrides = [
        *QUIET,
        *recipe,
        "logger=none",
        *mode,
        "data._target_=experiments.bench.RandomCIFAR",
        f"+data.size={size}",
        f"+data.eval_size={eval_size}",
        "teacher=checkpoint",
        f"teacher.path={root / 'resnet56.ckpt'}",
        "+callbacks.epochs._target_=experiments.bench.EpochTimer",
        f"trainer.max_epochs={epochs}",
        f"paths.root_dir={root}",
        *extra,
    ]
    torch.compiler.reset()
    start = time.perf_counter()
    run(compose_config(overrides, tempfile.mkdtemp(prefix="kd-epoch-", dir=root)))
    wall, seconds = time.perf_counter() - start, EpochTimer.last
    full = compose_config(recipe).trainer.max_epochs
    steady = statistics.median(seconds[1:] or seconds)
    projected = seconds[0] + (full - 1) * steady + wall - sum(seconds)
    return {
        "epoch.first_s": seconds[0],
        "epoch.steady_s": steady,
        "epoch.train_images": size,
        "epoch.batch": compose_config([*recipe, *extra]).data.batch_size,
        "epoch.recipe_epochs": full,
        "epoch.projected_min": projected / 60,
        "samples.epoch.seconds": seconds,
    }


def parity(
    root: Path,
    modes: dict[str, list[str]],
    seeds: list[int],
    size: int,
    eval_size: int,
    epochs: int,
    noise: float,
    extra: list[str],
    device: torch.device,
) -> dict:
    """Test accuracy (last epoch) of a CE student per mode and seed on class textures under pixel
    noise (``RandomCIFAR(noise=...)``), the same data and epochs for every mode, and how far the
    bf16 mean is from the fp32 mean, in fp32 seed spreads (sample std); then KD at tau 4 from the
    fp32 net to the bf16 one with the teacher's logits in bf16 (``bf16_teacher_kd_error``)."""
    base = [
        *QUIET,
        "recipe=crd_cifar100",
        "model=resnet20",
        "objective=ce",
        "logger=none",
        "callbacks=none",
        "data._target_=experiments.bench.RandomCIFAR",
        f"+data.size={size}",
        f"+data.eval_size={eval_size}",
        f"+data.noise={noise}",
        "scheduler=cosine",
        f"trainer.max_epochs={epochs}",
        f"paths.root_dir={root}",
        *extra,
    ]
    acc, trained = {name: [] for name in modes}, {}
    for seed in seeds:
        for name, mode in modes.items():
            out = tempfile.mkdtemp(prefix=f"kd-parity-{name}-", dir=root)
            trained.setdefault(name, Trained())
            record = run(compose_config([*base, *mode, f"seed={seed}"], out), callbacks=[trained[name]])
            acc[name].append(record["metrics"]["test/acc_last"])
    fp32, bf16 = acc["fp32"], acc["bf16"]
    spread = statistics.stdev(fp32) if len(fp32) > 1 else float("nan")
    gap = statistics.mean(bf16) - statistics.mean(fp32)
    return {
        "parity.fp32_acc": statistics.mean(fp32),
        "parity.fp32_std": spread,
        "parity.bf16_acc": statistics.mean(bf16),
        "parity.bf16_std": statistics.stdev(bf16) if len(bf16) > 1 else float("nan"),
        "parity.gap": gap,
        "parity.gap_over_fp32_spread": abs(gap) / spread if spread > 0 else float("nan"),
        "parity.model": record["config"]["model"]["name"],
        "parity.seeds": len(seeds),
        "parity.epochs": epochs,
        "parity.train_images": size,
        "parity.noise": noise,
        **{f"samples.parity.{k}_acc": v for k, v in acc.items()},
        **bf16_teacher_kd_error(
            trained["fp32"].module.net.network(0), trained["bf16"].module.net.network(0), trained["fp32"].data, device
        ),
    }


class Trained(L.Callback):
    """Keeps the module and the data of the last run it was handed to."""

    def on_fit_end(self, trainer, pl_module):
        self.module, self.data = pl_module, trainer.datamodule


def bf16_teacher_kd_error(
    teacher: torch.nn.Module, student: torch.nn.Module, data, device: torch.device, tau: float = 4.0
) -> dict:
    """KD's loss at ``tau`` (CE weight 0) on the test split, and its gradient in the student's
    logits, from the teacher's logits under bf16 autocast against fp32: relative errors. The
    student's logits are the same fp32 for both, so the errors are the teacher's bf16 alone."""
    x = data.prepare_eval_batch(data.splits["test"].x.to(device))
    y = data.splits["test"].y.to(device)
    teacher, student = teacher.to(device).eval(), student.to(device).eval()
    with torch.no_grad():
        logits, exact = student(x).float(), teacher(x).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            rounded = teacher(x).float()
    loss_fn = objectives.get("kd", temperature=tau, kd_weight=1.0)
    losses, grads = [], []
    for targets in (exact, rounded):
        z = logits.clone().requires_grad_()
        loss = loss_fn(z, y, targets)
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, z)[0])
    return {
        "parity.kd_tau": tau,
        "parity.kd_loss_rel_err": abs(losses[1] - losses[0]) / abs(losses[0]),
        "parity.kd_grad_rel_err": ((grads[1] - grads[0]).norm() / grads[0].norm()).item(),
        "parity.kd_teacher_logit_err": (rounded - exact).abs().max().item(),
    }


# ---- (g) populations of image students -----------------------------------------------------------


class RandomFashion(FashionMNISTDataModule):
    """Fashion-MNIST's shapes and sizes (60,000 training and 10,000 test images of 1 x 28 x 28, ten
    classes), uniform random pixels: the speed of fig3's students on it without its files."""

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = 60000 if train else 10000
        generator = torch.Generator().manual_seed(int(train))
        return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator), torch.arange(n) % 10


def fashion_configs(root: Path, tag: str, names: list[str], extra: list[str]) -> list:
    """fig3's students on Fashion-MNIST at 60 per class, seed 0 (one data draw), of one (random) cnn teacher."""
    return [
        compose_config(
            [
                *QUIET,
                "experiment=fig3_fashion_mnist",
                "data._target_=experiments.bench.RandomFashion",
                "data.train_per_class=60",
                f"objective={name}",
                "seed=0",
                "teacher=checkpoint",
                f"teacher.path={root / 'cnn.ckpt'}",
                f"threads={torch.get_num_threads()}",
                f"paths.root_dir={root}",
                *extra,
            ],
            root / f"images-{tag}" / name,
        )
        for name in names
    ]


def bare_student(cfg, teacher_path: Path) -> None:
    """One student's bare arithmetic as a plain loop over the run's steps and evaluations: the
    teacher once over the training images (as ours runs it on fixed inputs), the epoch's batches,
    validation after every epoch, the last and the best epoch tested; channels_last as the run."""
    data, teacher, net, loss_fn, optimizer, scheduler = parts(cfg, teacher_path)
    layout = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
    net.to(memory_format=layout), teacher.to(memory_format=layout)
    split = {
        k: IndexedTensors(data.prepare_eval_batch(v.x).contiguous(memory_format=layout), v.y)
        for k, v in data.splits.items()
    }
    train, batch, eval_batch = split["train"], cfg.data.batch_size, cfg.data.eval_batch_size
    with torch.no_grad():
        logits = torch.cat([teacher(x) for x in train.x.split(eval_batch)])
    epoch_size, best, best_state = max(len(train), cfg.data.min_epoch_size), -1.0, None
    for _ in range(cfg.trainer.max_epochs):
        net.train()
        order = torch.cat([torch.randperm(len(train)) for _ in range(-(-epoch_size // len(train)))])[:epoch_size]
        for index in order.split(batch):
            loss = loss_fn(net(train.x[index]), train.y[index], logits[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        net.eval()
        acc = accuracy(net, split["val"], eval_batch)
        if acc > best:
            best, best_state = acc, copy.deepcopy(net.state_dict())
    accuracy(net, split["test"], eval_batch)
    net.load_state_dict(best_state)
    accuracy(net, split["test"], eval_batch)


def images(args, root: Path) -> dict:
    """(g) fig3's seven students on Fashion-MNIST shapes as one population against a single run of
    one of them and against its bare arithmetic (seconds per student); and ``--cifar-members``
    resnet20 students of one resnet56 teacher on CIFAR shapes as one population against single
    runs (training images per second, summed over the members)."""
    teacher_checkpoint(root / "cnn.ckpt", "cnn", (1, 28, 28), 10)
    extra = [f"trainer.max_epochs={args.image_epochs}", *args.image_overrides]
    seven = ["ce", "ls", "kd_sim", "kd_pt", "kd_pt_sim", "kd", "kd_topk"]
    step = (args.batch, args.warmup, args.steps)
    fast = [*args.fast, "compile=false"]  # the fast path's precision and layout; a population takes no compile
    times = {"single": [], "population": [], "bare": [], "cifar_single_img_s": [], "cifar_population_img_s": []}
    for r in range(args.rounds):
        (single,) = fashion_configs(root, f"single{r}", ["kd"], extra)
        times["single"].append(timed(run, single))
        members = fashion_configs(root, f"population{r}", seven, extra)
        times["population"].append(timed(run, members) / len(members))
        times["bare"].append(timed(bare_student, single, root / "cnn.ckpt"))
        times["cifar_single_img_s"].append(ours_kd(root, f"single{r}", fast, *step)[0])
        run(
            [
                compose_config(
                    [*kd_overrides(root, fast, *step), f"objective={seven[g % 7]}", f"seed={g // 7}"],
                    root / f"cifar-population{r}" / str(g),
                )
                for g in range(args.cifar_members)
            ]
        )
        times["cifar_population_img_s"].append(StepTimer.last)
        print(
            f"[bench] images round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()),
            flush=True,
        )
    median = {f"images.{k}{'' if k.endswith('img_s') else '_s'}": statistics.median(v) for k, v in times.items()}
    return {
        **median,
        "images.epochs": args.image_epochs,
        "images.cifar_members": args.cifar_members,
        "images.population_over_single": median["images.population_s"] / median["images.single_s"],
        "images.population_over_bare": median["images.population_s"] / median["images.bare_s"],
        "images.cifar_population_over_single": median["images.cifar_population_img_s"]
        / median["images.cifar_single_img_s"],
        **{f"samples.images.{k}": v for k, v in times.items()},
    }


# ---- (f) populations and fig3's compute floor ------------------------------------------------------


def population_configs(root: Path, tag: str, members: int, extra: list[str]) -> list:
    """``members`` fig3 students at delta 1.0 (the seven objectives in turn, init seeds 0, 1, ...) that
    share the bench's data (data.seed=0) and its cached teacher: a population of mlp_config's run."""
    objectives_ = ["ce", "ls", "kd_sim", "kd_pt", "kd_pt_sim", "kd", "kd_topk"]
    return [
        compose_config(
            [
                *QUIET,
                "experiment=fig3_synthetic",
                f"objective={objectives_[g % 7]}",
                "data.delta=1.0",
                f"seed={g // 7}",
                "data.seed=0",
                "teacher.seed=0",
                f"threads={torch.get_num_threads()}",
                f"paths.root_dir={root}",
                *extra,
            ],
            root / f"pop-{tag}" / str(g),
        )
        for g in range(members)
    ]


def gemm_rate(n: int = 512, repeats: int = 10, members: int = 0, rows: int | None = None, trials: int = 5) -> float:
    """FLOP/s of an n x n x n fp32 matrix product on this process's threads: the compute floor's
    rate; with ``members``, of a batched product of that many (rows x n) @ (n x n), the shape of a
    population's hidden layer. The best of ``trials`` timings of ``repeats`` products: on a shared
    machine a timing is only ever slowed down."""
    shape = (members,) if members else ()
    a, b = torch.randn(*shape, rows or n, n), torch.randn(*shape, n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * max(members, 1) * (rows or n) * n * n * repeats / best


def flops_per_example(net: torch.nn.Module, shape, num_classes: int) -> tuple[float, float]:
    """Matrix FLOPs of one example: (forward, forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(64, *shape), torch.randint(0, num_classes, (64,))
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            net(x)
    forward = counter.get_total_flops() / 64
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return forward, counter.get_total_flops() / 64


def fig3_flops(seeds: int = 10, deltas: int = 4) -> float:
    """The matrix FLOPs of ``make reproduce-fig3``: every teacher and student, trained and evaluated
    as kd.train.run does (validation every epoch, test of the last and the best weights, each
    teacher once over each split of its students' data, which they share, then looked up)."""
    cfg = compose_config(["experiment=fig3_synthetic"], "/unused")
    data = instantiate(cfg.data)
    k, shape = data.num_classes, data.input_shape
    nets = {
        who: get_model("mlp", num_classes=k, input_shape=shape, hidden=list(c.hidden))
        for who, c in (("student", cfg.model), ("teacher", cfg.teacher.model))
    }
    (s_fwd, s_train), (t_fwd, t_train) = (flops_per_example(nets[w], shape, k) for w in ("student", "teacher"))
    n = {split: cfg.data[f"{split}_per_class"] * k for split in ("train", "val", "test")}
    n_teacher = cfg.teacher.data.train_per_class * k
    teacher = (
        (n_teacher * t_train + n["val"] * t_fwd) * cfg.teacher.trainer.max_epochs
        + 2 * n["test"] * t_fwd
        + (n["train"] + n["val"] + n["test"]) * t_fwd
    )
    student = (n["train"] * s_train + n["val"] * s_fwd) * cfg.trainer.max_epochs + 2 * n["test"] * s_fwd
    return seeds * deltas * (teacher + 7 * student)


# ---- the measurements -----------------------------------------------------------------------------


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def fig3_wall(run_it: bool, root: Path) -> tuple[float | None, str]:
    """Seconds of ``make reproduce-fig3``: run now into ``root`` (teachers trained too), or as
    recorded in results/fig3/fig3.md."""
    if run_it:
        args = f"--runs {root / 'runs'} --out {root / 'results'} --no-wandb"
        start = time.perf_counter()
        subprocess.run(
            ["make", "-s", "reproduce-fig3", f"ARGS={args}"],
            cwd=REPO,
            check=True,
            env={**os.environ, "KD_ROOT": str(root)},
        )
        return time.perf_counter() - start, "measured now (make reproduce-fig3, fresh folders, teachers trained)"
    summary = REPO / "results" / "fig3" / "fig3.md"
    found = re.search(r"wall time ([\d.]+) min", summary.read_text()) if summary.is_file() else None
    if found is None:
        return None, "not measured (no results/fig3/fig3.md; pass --fig3)"
    return float(found[1]) * 60, f"read from {summary.relative_to(REPO)}"


def kd_step(args, root: Path) -> dict:
    step = (args.batch, args.warmup, args.steps)
    kd = {"ours": [], "ours_fp32": [], "reference": []}
    for r in range(args.rounds):
        img_s, record = ours_kd(root, "fast", args.fast, *step)
        kd["ours"].append(img_s)
        kd["reference"].append(reference_kd(args.device, *step, args.workers))
        kd["ours_fp32"].append(ours_kd(root, "fp32", args.fp32, *step)[0])
        print(
            f"[bench] kd_step round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in kd.items()),
            flush=True,
        )
    median = {f"kd_step.{k}_img_s": statistics.median(v) for k, v in kd.items()}
    return {
        **median,
        "kd_step.ratio": median["kd_step.ours_img_s"] / median["kd_step.reference_img_s"],
        "kd_step.fp32_ratio": median["kd_step.ours_fp32_img_s"] / median["kd_step.reference_img_s"],
        "kd_step.batch": args.batch,
        "kd_step.steps": args.steps,
        "kd_step.warmup": args.warmup,
        "kd_step.fast_path": " ".join(args.fast),
        "kd_step.fast_precision": record["config"]["trainer"]["precision"],
        "kd_step.reference_workers": args.workers,
        **{f"samples.kd_step.{k}_img_s": v for k, v in kd.items()},
    }


def mlp(args, root: Path) -> dict:
    times = {"lightning": [], "no_checkpoints": [], "plain": [], "bare": [], "compose": [], "population": []}
    cfg = mlp_config(root, "warmup", args.mlp_overrides)
    run(cfg)  # trains and caches the teacher; every later run reads it
    teacher_path = teachers.checkpoint_in(teachers.ensure_trained(cfg, run), cfg.teacher.checkpoint)
    for r in range(args.rounds):
        start = time.perf_counter()
        cfg = mlp_config(root, f"ours{r}", args.mlp_overrides)
        times["compose"].append(time.perf_counter() - start)
        times["lightning"].append(timed(run, cfg))
        no_checkpoints = mlp_config(root, f"nockpt{r}", [*args.mlp_overrides, "callbacks=none"])
        times["no_checkpoints"].append(timed(run, no_checkpoints))
        times["plain"].append(timed(plain_mlp, cfg, teacher_path))
        times["bare"].append(timed(bare_mlp, cfg, teacher_path))
        members = population_configs(root, str(r), args.members, args.mlp_overrides)
        times["population"].append(timed(run, members) / len(members))
        print(
            f"[bench] mlp round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
            flush=True,
        )
    median = {f"mlp.{k}_s": statistics.median(v) for k, v in times.items()}
    return {
        **median,
        "mlp.lightning_over_plain": median["mlp.lightning_s"] / median["mlp.plain_s"],
        "mlp.bare_lightning_over_plain": median["mlp.bare_s"] / median["mlp.plain_s"],
        "mlp.no_checkpoints_over_plain": median["mlp.no_checkpoints_s"] / median["mlp.plain_s"],
        "mlp.population_members": args.members,
        "mlp.population_per_student_over_plain": median["mlp.population_s"] / median["mlp.plain_s"],
        **{f"samples.mlp.{k}_s": v for k, v in times.items()},
    }


def fig3(args, root: Path) -> dict:
    seconds, source = fig3_wall(args.fig3, root / "fig3")
    rate, flops, cores = gemm_rate(), fig3_flops(), os.cpu_count() or 1
    floor = flops / (rate * cores)
    # fig3's own hidden layers, for comparison: 20 teachers' 256 x 256 at batch 256, 140 students' 128 x 128 at 64.
    shapes = {"teachers": gemm_rate(256, members=20, rows=256), "students": gemm_rate(128, 40, members=140, rows=64)}
    return {
        "fig3.wall_s": seconds,
        "fig3.source": source,
        "fig3.flops": flops,
        "fig3.gemm_flop_s_per_core": rate,
        **{f"fig3.gemm_{who}_flop_s": r for who, r in shapes.items()},
        "fig3.cores": cores,
        "fig3.floor_s": floor,
        **({"fig3.wall_over_floor": seconds / floor} if seconds else {}),
    }


def epoch(args, root: Path) -> dict:
    return epoch_times(root, args.fast, *args.epoch_size, args.epochs, args.epoch_overrides)


def parity_fp32_bf16(args, root: Path) -> dict:
    modes = {"fp32": args.fp32, "bf16": [*args.fast, "compile=false", "trainer.precision=bf16-mixed"]}
    return parity(
        root,
        modes,
        args.seeds,
        *args.parity_size,
        args.parity_epochs,
        args.parity_noise,
        args.parity_overrides,
        args.device,
    )


MEASURE = {"kd_step": kd_step, "mlp": mlp, "fig3": fig3, "epoch": epoch, "parity": parity_fp32_bf16, "images": images}


def measure(args, publish) -> dict:
    """Run the measurements ``args.measure`` names, in that order; ``publish(result)`` after each,
    so that what finished survives a later one's failure or a time limit. A measurement that fails
    is recorded (``failed``, printed with its traceback) and the others still run."""
    device = args.device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else device.type
    args.fast = ["trainer=gpu_fast", f"trainer.accelerator={accelerator}", f"compile={str(args.compile).lower()}"]
    args.fp32 = ["trainer=gpu"] if accelerator == "gpu" else [f"trainer.accelerator={accelerator}"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result = {
        "device": device_name,
        "device_type": device.type,
        "cpu": cpu_features(),
        "measured": [],
        "failed": {},
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        root = Path(tmp)
        teacher_checkpoint(root / "resnet56.ckpt")
        for name in args.measure:
            start = time.perf_counter()
            try:
                result.update(MEASURE[name](args, root))
                result["measured"].append(name)
            except Exception as err:  # noqa: BLE001  (any failure of one measurement)
                traceback.print_exc()
                result["failed"][name] = f"{type(err).__name__}: {one_line(err)}"
            result[f"{name}.bench_s"] = time.perf_counter() - start
            publish(result)
    return result


def at_least(target: str) -> bool:
    """Speeds (kd_step's, images per second) are judged at least their target; times and ratios at most."""
    return target.startswith("kd_step") or target.endswith("img_s")


def report(result: dict) -> str:
    """``bench.md``: a table of the measurements that ran, and the targets they are judged by."""
    f = {k: (f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in result.items()}
    rows = {
        "kd_step": [
            (f"kd_step: ours, fast path, {result.get('kd_step.fast_precision')} (img/s)", "kd_step.ours_img_s"),
            ("kd_step: ours, 32-true (img/s)", "kd_step.ours_fp32_img_s"),
            ("kd_step: reference, fp32 (img/s)", "kd_step.reference_img_s"),
            ("kd_step: ratio ours / reference", "kd_step.ratio"),
            ("kd_step: ratio ours 32-true / reference", "kd_step.fp32_ratio"),
        ],
        "mlp": [
            ("mlp: kd.train.run (s)", "mlp.lightning_s"),
            ("mlp: kd.train.run callbacks=none, no checkpoints (s)", "mlp.no_checkpoints_s"),
            ("mlp: plain loop (s)", "mlp.plain_s"),
            ("mlp: bare LightningModule (s)", "mlp.bare_s"),
            ("mlp: Hydra compose, not in the run (s)", "mlp.compose_s"),
            ("mlp: overhead kd.train.run / plain", "mlp.lightning_over_plain"),
            ("mlp: overhead kd.train.run callbacks=none / plain", "mlp.no_checkpoints_over_plain"),
            ("mlp: overhead bare Lightning / plain", "mlp.bare_lightning_over_plain"),
            (f"mlp: population of {result.get('mlp.population_members')}, seconds per student", "mlp.population_s"),
            ("mlp: population per student / plain loop", "mlp.population_per_student_over_plain"),
        ],
        "epoch": [
            ("epoch: CRD KD, fast path, first epoch (s)", "epoch.first_s"),
            ("epoch: CRD KD, fast path, later epochs, median (s)", "epoch.steady_s"),
            (f"epoch: {result.get('epoch.recipe_epochs')}-epoch run, projected (min)", "epoch.projected_min"),
        ],
        "images": [
            (
                f"images: 7 cnn students (Fashion-MNIST shapes, {result.get('images.epochs')} epochs) as one population, "
                "seconds per student",
                "images.population_s",
            ),
            ("images: one student's single run (s)", "images.single_s"),
            ("images: one student's bare arithmetic, a plain loop (s)", "images.bare_s"),
            ("images: population per student / single run", "images.population_over_single"),
            ("images: population per student / bare arithmetic", "images.population_over_bare"),
            (
                f"images: {result.get('images.cifar_members')} resnet20 students of one resnet56 (CIFAR shapes) as one "
                "population, training img/s summed",
                "images.cifar_population_img_s",
            ),
            ("images: one resnet20 student's single run, training img/s", "images.cifar_single_img_s"),
            ("images: population / single run", "images.cifar_population_over_single"),
        ],
        "parity": [
            ("parity: test accuracy, fp32, mean (std)", "parity.fp32_acc"),
            ("parity: test accuracy, bf16-mixed, mean (std)", "parity.bf16_acc"),
            ("parity: bf16 - fp32 (mean) / fp32 seed std", "parity.gap_over_fp32_spread"),
            ("parity: KD loss at tau 4, teacher logits in bf16, relative error", "parity.kd_loss_rel_err"),
            ("parity: its gradient in the student's logits, relative error", "parity.kd_grad_rel_err"),
            ("parity: the teacher's logits, largest bf16 error", "parity.kd_teacher_logit_err"),
        ],
    }
    for key in ("parity.kd_loss_rel_err", "parity.kd_grad_rel_err", "parity.kd_teacher_logit_err"):
        if key in result:
            f[key] = f"{result[key]:.2g}"
    for key, std in (("parity.fp32_acc", "parity.fp32_std"), ("parity.bf16_acc", "parity.bf16_std")):
        if key in result:
            f[key] = f"{result[key]:.4f} ({result[std]:.4f})"
    if "fig3.source" in result:
        wall = "n/a" if result["fig3.wall_s"] is None else f"{result['fig3.wall_s'] / 60:.1f} min"
        f["fig3.wall"] = f"{wall} ({result['fig3.source']})"
        f["fig3.flops"] = f"{result['fig3.flops']:.3g}"
        for key in ("gemm_flop_s_per_core", "gemm_teachers_flop_s", "gemm_students_flop_s"):
            f[f"fig3.{key}"] = f"{result[f'fig3.{key}'] / 1e9:.1f}"
        rows["fig3"] = [
            ("fig3: make reproduce-fig3 wall time", "fig3.wall"),
            ("fig3: matrix FLOPs (teachers and students, training and evaluation)", "fig3.flops"),
            ("fig3: GEMM rate per core, fp32 512^3 (GFLOP/s)", "fig3.gemm_flop_s_per_core"),
            ("fig3: its teachers' hidden layer, 20 x (256 x 256 @ 256 x 256) (GFLOP/s)", "fig3.gemm_teachers_flop_s"),
            ("fig3: its students' hidden layer, 140 x (64 x 128 @ 128 x 128) (GFLOP/s)", "fig3.gemm_students_flop_s"),
            (f"fig3: compute floor on {result['fig3.cores']} cores (s)", "fig3.floor_s"),
            *(
                [("fig3: wall time / compute floor", "fig3.wall_over_floor")]
                if "fig3.wall_over_floor" in result
                else []
            ),
        ]
    table = [f"| {label} | {f[key]} |" for name in result["measured"] for label, key in rows[name]]
    cpu = result["cpu"]
    lines = [
        f"# Benchmark ({result['device']}, {result['threads']} intra-op thread(s), "
        f"median of {result['rounds']} alternating rounds)",
        "",
        f"Command: `{result['command']}`; load average {result['load_before']} before, "
        f"{result['load_after']} after. CPU: {cpu['model']}, kernels {cpu['capability']}, native bf16: "
        f"{'yes' if cpu['bf16_native'] else 'no'}.",
        "",
    ]
    if "kd_step" in result["measured"]:
        lines += [
            f"kd_step: batch {result['kd_step.batch']}, {result['kd_step.steps']} timed steps after "
            f"{result['kd_step.warmup']}; fast path: `{result['kd_step.fast_path']}`, which chose "
            f"precision {result['kd_step.fast_precision']}.",
            "",
        ]
    if "epoch" in result["measured"]:
        lines += [
            f"epoch: {result['epoch.train_images']} training images, batch {result['epoch.batch']}; "
            f"seconds per epoch: {', '.join(f'{s:.1f}' for s in result['samples.epoch.seconds'])}.",
            "",
        ]
    if "parity" in result["measured"]:
        lines += [
            f"parity: {result['parity.model']}, CE, {result['parity.train_images']} training images of class "
            f"textures under pixel noise {result['parity.noise']}, {result['parity.epochs']} epochs, "
            f"{result['parity.seeds']} seeds (chance: {1 / CLASSES:.2f}); "
            + "; ".join(
                f"{name} " + ", ".join(f"{a:.3f}" for a in result[f"samples.parity.{name}_acc"])
                for name in ("fp32", "bf16")
            )
            + "."
            + (
                ""
                if 5 / CLASSES < result["parity.fp32_acc"] < 0.98
                else " Accuracy near chance or 100%: "
                "not informative; run again with another --parity-noise (lower: easier)."
            ),
            "",
        ]
    targets = {
        k: (v, result[k] >= v if at_least(k) else result[k] <= v)
        for k, v in TARGETS.get(result["device_type"], {}).items()
        if k in result
    }
    verdicts = [
        f"{k} {'>=' if at_least(k) else '<='} {v:g}: {'met' if ok else 'NOT met'}" for k, (v, ok) in targets.items()
    ]
    lines += ["| measure | value |", "|---|---|", *table, "", "Targets: " + (", ".join(verdicts) or "none judged")]
    lines += [f"\nFailed: {name} ({error})" for name, error in result.get("failed", {}).items()]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="scripts/benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--measure",
        nargs="+",
        choices=MEASUREMENTS,
        default=["kd_step", "mlp", "images", "fig3"],
        help="what to measure, in this order (default: kd_step mlp images fig3)",
    )
    p.add_argument("--batch", type=int, default=512 if cuda else 32, help="kd_step batch (CRD recipe: 64)")
    p.add_argument("--steps", type=int, default=100 if cuda else 16, help="timed kd steps per measurement")
    p.add_argument("--warmup", type=int, default=20 if cuda else 3, help="kd steps before the timer starts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers of the reference"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None if cuda else 1,
        help="torch intra-op threads for every path (default on CPU: 1, steady on a shared machine)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=cuda,
        help="torch.compile in our fast path (default: on GPU only; CPU compiles take minutes)",
    )
    p.add_argument("--fig3", action="store_true", help="run make reproduce-fig3 and time it (minutes)")
    p.add_argument(
        "--members",
        type=int,
        default=70,
        help="students in mlp's timed population (fig3: 7 objectives x 10 seeds at one delta)",
    )
    p.add_argument(
        "--image-epochs",
        type=int,
        default=20,
        help="images: epochs of each Fashion-MNIST student (fig3 trains 60; 20 keeps the measurement to minutes)",
    )
    p.add_argument("--cifar-members", type=int, default=8, help="images: resnet20 students in the CIFAR population")
    p.add_argument("--epochs", type=int, default=3, help="epoch: epochs run (the first one compiles)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="parity: seeds per precision")
    p.add_argument("--parity-epochs", type=int, default=15)
    p.add_argument(
        "--parity-noise",
        type=float,
        default=PARITY_NOISE,
        help="parity: pixel noise over the class textures (more: harder, lower accuracy)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    p.add_argument("--out", default=str(REPO / "results" / "bench"))
    p.add_argument("--name", default="bench", help="the output files' name: <out>/<name>.json and <name>.md")
    return p


SMOKE = {
    "batch": 4,
    "steps": 2,
    "warmup": 1,
    "rounds": 1,
    "workers": 0,
    "epochs": 2,
    "seeds": [0, 1],
    "parity_epochs": 1,
    "members": 3,
    "image_epochs": 1,
    "cifar_members": 2,
}
SMOKE_MLP = ["trainer.max_epochs=2", "teacher.trainer.max_epochs=1", "data.test_per_class=10", "data.val_per_class=5"]
# (training images, validation = test images): CIFAR-100's 45,000 / 5,000 for the epoch time; for
# parity, 200 training images per class, 100 held out for each of validation and test.
EPOCH_SIZE, PARITY_SIZE = (45000, 5000), (20000, 10000)
SMOKE_SIZE = (16, 8)
SMOKE_IMAGES = ["data.train_per_class=2", "data.min_epoch_size=0", "data.val_size=10"]
SMOKE_EVAL = ["data.batch_size=8", "data.eval_batch_size=8", "model=resnet8"]
# parity: a batch of 128 at lr 0.1 (He et al.'s CIFAR ResNet recipe) with a cosine schedule over the epochs
PARITY = ["data.batch_size=128", "optimizer.lr=0.1"]


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    args.mlp_overrides = SMOKE_MLP if args.smoke else []
    args.epoch_size, args.parity_size = (SMOKE_SIZE, SMOKE_SIZE) if args.smoke else (EPOCH_SIZE, PARITY_SIZE)
    args.epoch_overrides = SMOKE_EVAL if args.smoke else []
    args.image_overrides = SMOKE_IMAGES if args.smoke else []
    args.parity_overrides = [*PARITY, *(SMOKE_EVAL if args.smoke else [])]
    quiet_lightning()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    given = " ".join(sys.argv[1:] if argv is None else argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = Path(args.out)

    def publish(result: dict) -> None:
        result.update(
            command=f'make bench ARGS="{given}"' if given else "make bench",
            load_before=load_before,
            load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
            hardware=hardware(),
        )
        write_json_atomic(out / f"{args.name}.json", result)
        write_text_atomic(out / f"{args.name}.md", report(result))

    try:
        result = measure(args, publish)
    finally:
        torch.set_num_threads(threads)
    print(report(result), end="")
    if result["failed"]:
        raise SystemExit(f"error: {len(result['failed'])} measurement(s) failed: {', '.join(result['failed'])}")
    return result
