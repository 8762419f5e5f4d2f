"""Speed measured side by side in one process: ``make bench`` (scripts/benchmark.py; docs/performance.md).

(a) ``kd_step``: KD training steps, resnet56 teacher -> resnet20 student, on CIFAR-100-shaped random
    uint8 images. Ours is ``kd.train.run`` (the Lightning run users get: our data module, crop and
    flip on the device, DistillationModule, CRD recipe), timed by ``StepTimer`` from the end of a
    warm-up to the last step; once with the fast path (trainer=gpu_fast: bf16-mixed,
    channels_last, compile) and once paper-faithful (32-true). The reference is the common plain
    loop: a torchvision DataLoader over PIL images with per-sample RandomCrop(32, padding=4) +
    RandomHorizontalFlip + ToTensor + Normalize, fp32.
(b) ``mlp``: one fig3_synthetic KD run through ``kd.train.run`` against a plain PyTorch loop with
    the same data, model, objective, optimizer, schedule, epochs and evaluation (val accuracy each
    epoch, test of the last and the best epoch); the same run with ``callbacks=none`` (no
    checkpoints, so no best-epoch test either): what checkpoints cost; and the plain loop as a
    bare LightningModule (no metrics, logging or checkpoints): the part that is Lightning's own.
    Ours runs the teacher in the first epoch only (kd.module.TeacherOutputs: the data are not
    augmented); the plain and bare loops, written the common way, run it at every step.
(c) ``fig3``: wall time of ``make reproduce-fig3`` (``--fig3`` runs it; else read from results/fig3/fig3.md),
    against its compute floor: its matrix FLOPs (teachers and students, training and evaluation,
    counted by torch's FlopCounterMode per example) over the fp32 GEMM rate measured in the same run
    on every core.
(d) ``mlp.population``: seconds per student of a population of ``--members`` fig3 students (kd.population:
    the seven objectives, init seeds 0, 1, ..., one data draw and one teacher) through ``kd.train.run``,
    against (b)'s plain loop training one student.

The paths alternate round after round and each figure is the median over rounds, so a ratio
compares paths under the same load. This module, not the script, holds the pieces so that
Hydra can import ``RandomCIFAR`` and ``StepTimer`` as ``_target_`` of a run's config.
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
from kd.models import get as get_model
from kd.results import hardware, write_json_atomic, write_text_atomic
from kd.runner import QUIET, compose_config, quiet_lightning
from kd.train import run

REPO = Path(__file__).resolve().parent.parent
SHAPE = (3, 32, 32)
CLASSES = 100
TARGETS = {"cpu": {"kd_step.ratio": 1.5, "mlp.lightning_over_plain": 1.2, "mlp.population_per_student_over_plain": 0.3,
                   "fig3.wall_over_floor": 2.0},
           "cuda": {"kd_step.ratio": 5.0, "kd_step.ours_img_s": 20000}}
# The CRD recipe's KD loss and optimizer, as the reference loop writes them out.
TAU, CE_WEIGHT, KD_WEIGHT, LR, MOMENTUM, WEIGHT_DECAY = 4.0, 0.1, 0.9, 0.05, 0.9, 5e-4


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def random_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images laid out as torchvision's CIFAR keeps them (N, H, W, C), and labels."""
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), g.integers(0, CLASSES, n)


class RandomCIFAR(CIFARDataModule):
    """Our CIFAR-100 data path on ``size`` random training images (val and test: one batch each)."""

    def __init__(self, size: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = random_images(self.size)
        x, y = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
        few = IndexedTensors(x[: self.batch_size], y[: self.batch_size])
        self.splits = {"train": IndexedTensors(x, y), "val": few, "test": few}


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
            self.images += len(batch[1])
        if batch_idx == trainer.num_training_batches - 1:
            synchronize(pl_module.device)
            StepTimer.last = self.images / (time.perf_counter() - self.start)


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

def teacher_checkpoint(path: Path) -> None:
    """A randomly initialised resnet56 in the layout of a run's checkpoint (speed needs no training)."""
    net = get_model("resnet56", num_classes=CLASSES, input_shape=SHAPE)
    torch.save({"hyper_parameters": {"model": {"_target_": "kd.models.get", "name": "resnet56"},
                                     "num_classes": CLASSES, "input_shape": list(SHAPE)},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)


def ours_kd(root: Path, tag: str, mode: list[str], batch: int, warmup: int, steps: int) -> float:
    """Images per second of ``kd.train.run`` on experiment=fig3_cifar100, one epoch of warmup + steps."""
    overrides = [
        *QUIET, "experiment=fig3_cifar100", "logger=none", "callbacks=none", *mode,
        "data._target_=kd.bench.RandomCIFAR", f"+data.size={(warmup + steps) * batch}",
        f"data.batch_size={batch}", f"data.eval_batch_size={batch}",
        "teacher=checkpoint", f"teacher.path={root / 'resnet56.ckpt'}",
        "+callbacks.timer._target_=kd.bench.StepTimer", f"+callbacks.timer.warmup={warmup}",
        "trainer.max_epochs=1", "+trainer.limit_val_batches=0",
        "+trainer.limit_test_batches=1", f"paths.root_dir={root}",
    ]
    torch.compiler.reset()  # each run compiles afresh, as in a new process, and within the warm-up
    run(compose_config(overrides, tempfile.mkdtemp(prefix=f"kd-{tag}-", dir=root)))
    return StepTimer.last


def reference_kd(device: torch.device, batch: int, warmup: int, steps: int, workers: int) -> float:
    """Images per second of the common plain loop (RepDistiller's, in fp32)."""
    mean, std = MEAN_STD["cifar100"]
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = DataLoader(PILImages(*random_images((warmup + steps) * batch), transform), batch_size=batch,
                        shuffle=True, num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)
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
    return compose_config([*QUIET, "experiment=fig3_synthetic", "objective=kd", "data.delta=1.0", "seed=0",
                           f"threads={torch.get_num_threads()}", f"paths.root_dir={root}", *extra],
                          tempfile.mkdtemp(prefix=f"mlp-{tag}-", dir=root))


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
def accuracy(net, split: IndexedTensors) -> float:
    return (net(split.x).argmax(1) == split.y).float().mean().item()


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
    trainer = L.Trainer(max_epochs=cfg.trainer.max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1)
    trainer.fit(module, train_dataloaders=module.data.train_dataloader(), val_dataloaders=module.data.val_dataloader())
    last = accuracy(module.net, module.data.splits["test"])
    module.net.load_state_dict(module.best_state)
    return last, accuracy(module.net, module.data.splits["test"])


# ---- (d) populations and fig3's compute floor ------------------------------------------------------

def population_configs(root: Path, tag: str, members: int, extra: list[str]) -> list:
    """``members`` fig3 students at delta 1.0 (the seven objectives in turn, init seeds 0, 1, ...) that
    share the bench's data (data.seed=0) and its cached teacher: a population of mlp_config's run."""
    objectives_ = ["ce", "ls", "kd_sim", "kd_pt", "kd_pt_sim", "kd", "kd_topk"]
    return [compose_config([*QUIET, "experiment=fig3_synthetic", f"objective={objectives_[g % 7]}", "data.delta=1.0",
                            f"seed={g // 7}", "data.seed=0", "teacher.seed=0", f"threads={torch.get_num_threads()}",
                            f"paths.root_dir={root}", *extra], root / f"pop-{tag}" / str(g)) for g in range(members)]


def gemm_rate(n: int = 512, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n fp32 matrix product on this process's threads: the compute floor's rate."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


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
    teacher once over each of its students' splits, then looked up)."""
    cfg = compose_config(["experiment=fig3_synthetic"], "/unused")
    data = instantiate(cfg.data)
    k, shape = data.num_classes, data.input_shape
    nets = {who: get_model("mlp", num_classes=k, input_shape=shape, hidden=list(c.hidden))
            for who, c in (("student", cfg.model), ("teacher", cfg.teacher.model))}
    (s_fwd, s_train), (t_fwd, t_train) = (flops_per_example(nets[w], shape, k) for w in ("student", "teacher"))
    n = {split: cfg.data[f"{split}_per_class"] * k for split in ("train", "val", "test")}
    n_teacher = cfg.teacher.data.train_per_class * k
    teacher = (n_teacher * t_train + n["val"] * t_fwd) * cfg.teacher.trainer.max_epochs + 2 * n["test"] * t_fwd
    student = ((n["train"] * s_train + n["val"] * s_fwd) * cfg.trainer.max_epochs + 2 * n["test"] * s_fwd
               + (n["train"] + n["val"] + n["test"]) * t_fwd)
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
        subprocess.run(["make", "-s", "reproduce-fig3", f"ARGS={args}"], cwd=REPO, check=True,
                       env={**os.environ, "KD_ROOT": str(root)})
        return time.perf_counter() - start, "measured now (make reproduce-fig3, fresh folders, teachers trained)"
    summary = REPO / "results" / "fig3" / "fig3.md"
    found = re.search(r"wall time ([\d.]+) min", summary.read_text()) if summary.is_file() else None
    if found is None:
        return None, "not measured (no results/fig3/fig3.md; pass --fig3)"
    return float(found[1]) * 60, f"read from {summary.relative_to(REPO)}"


def measure(args) -> dict:
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else device.type
    fast = ["trainer=gpu_fast", f"trainer.accelerator={accelerator}", f"compile={str(args.compile).lower()}"]
    fp32 = ["trainer=gpu"] if accelerator == "gpu" else [f"trainer.accelerator={accelerator}"]
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        root = Path(tmp)
        teacher_checkpoint(root / "resnet56.ckpt")
        step = (args.batch, args.warmup, args.steps)
        kd = {"ours": [], "ours_fp32": [], "reference": []}
        mlp = {"lightning": [], "no_checkpoints": [], "plain": [], "bare": [], "compose": [], "population": []}
        cfg = mlp_config(root, "warmup", args.mlp_overrides)
        run(cfg)  # trains and caches the teacher; every later run reads it
        teacher_path = teachers.checkpoint_in(teachers.ensure_trained(cfg, run), cfg.teacher.checkpoint)
        for r in range(args.rounds):
            kd["ours"].append(ours_kd(root, "fast", fast, *step))
            kd["reference"].append(reference_kd(device, *step, args.workers))
            kd["ours_fp32"].append(ours_kd(root, "fp32", fp32, *step))
            start = time.perf_counter()
            cfg = mlp_config(root, f"ours{r}", args.mlp_overrides)
            mlp["compose"].append(time.perf_counter() - start)
            mlp["lightning"].append(timed(run, cfg))
            no_checkpoints = mlp_config(root, f"nockpt{r}", [*args.mlp_overrides, "callbacks=none"])
            mlp["no_checkpoints"].append(timed(run, no_checkpoints))
            mlp["plain"].append(timed(plain_mlp, cfg, teacher_path))
            mlp["bare"].append(timed(bare_mlp, cfg, teacher_path))
            members = population_configs(root, str(r), args.members, args.mlp_overrides)
            mlp["population"].append(timed(run, members) / len(members))
            print(f"[bench] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]:.1f} img/s" for k, v in kd.items()) + "; mlp " + ", ".join(
                f"{k} {v[-1]:.2f} s" for k, v in mlp.items()), flush=True)
        fig3_s, fig3_source = fig3_wall(args.fig3, root / "fig3")
        rate, flops = gemm_rate(), fig3_flops()
        floor = flops / (rate * (os.cpu_count() or 1))
    median = {f"kd_step.{k}_img_s": statistics.median(v) for k, v in kd.items()}
    median.update({f"mlp.{k}_s": statistics.median(v) for k, v in mlp.items()})
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "device_type": device.type,
        **median,
        "kd_step.ratio": median["kd_step.ours_img_s"] / median["kd_step.reference_img_s"],
        "kd_step.fp32_ratio": median["kd_step.ours_fp32_img_s"] / median["kd_step.reference_img_s"],
        "kd_step.batch": args.batch, "kd_step.steps": args.steps, "kd_step.warmup": args.warmup,
        "kd_step.fast_path": " ".join(fast), "kd_step.reference_workers": args.workers,
        "mlp.lightning_over_plain": median["mlp.lightning_s"] / median["mlp.plain_s"],
        "mlp.bare_lightning_over_plain": median["mlp.bare_s"] / median["mlp.plain_s"],
        "mlp.no_checkpoints_over_plain": median["mlp.no_checkpoints_s"] / median["mlp.plain_s"],
        "mlp.population_members": args.members,
        "mlp.population_per_student_over_plain": median["mlp.population_s"] / median["mlp.plain_s"],
        "fig3.wall_s": fig3_s, "fig3.source": fig3_source,
        "fig3.flops": flops, "fig3.gemm_flop_s_per_core": rate, "fig3.cores": os.cpu_count(), "fig3.floor_s": floor,
        "fig3.wall_over_floor": None if fig3_s is None else fig3_s / floor,
        "rounds": args.rounds, "threads": torch.get_num_threads(),
        **{f"samples.kd_step.{k}_img_s": v for k, v in kd.items()}, **{f"samples.mlp.{k}_s": v for k, v in mlp.items()},
    }


def report(result: dict) -> str:
    targets = {k: (v, result[k] >= v if k.startswith("kd_step") else result[k] <= v)
               for k, v in TARGETS.get(result["device_type"], {}).items() if result.get(k) is not None}
    fig3 = "n/a" if result["fig3.wall_s"] is None else f"{result['fig3.wall_s'] / 60:.1f} min"
    rows = [
        ("kd_step: ours, fast path (img/s)", f"{result['kd_step.ours_img_s']:.1f}"),
        ("kd_step: ours, 32-true (img/s)", f"{result['kd_step.ours_fp32_img_s']:.1f}"),
        ("kd_step: reference, fp32 (img/s)", f"{result['kd_step.reference_img_s']:.1f}"),
        ("kd_step: ratio ours / reference", f"{result['kd_step.ratio']:.2f}"),
        ("kd_step: ratio ours 32-true / reference", f"{result['kd_step.fp32_ratio']:.2f}"),
        ("mlp: kd.train.run (s)", f"{result['mlp.lightning_s']:.2f}"),
        ("mlp: kd.train.run callbacks=none, no checkpoints (s)", f"{result['mlp.no_checkpoints_s']:.2f}"),
        ("mlp: plain loop (s)", f"{result['mlp.plain_s']:.2f}"),
        ("mlp: bare LightningModule (s)", f"{result['mlp.bare_s']:.2f}"),
        ("mlp: Hydra compose, not in the run (s)", f"{result['mlp.compose_s']:.2f}"),
        ("mlp: overhead kd.train.run / plain", f"{result['mlp.lightning_over_plain']:.2f}"),
        ("mlp: overhead kd.train.run callbacks=none / plain", f"{result['mlp.no_checkpoints_over_plain']:.2f}"),
        ("mlp: overhead bare Lightning / plain", f"{result['mlp.bare_lightning_over_plain']:.2f}"),
        (f"mlp: population of {result['mlp.population_members']}, seconds per student", f"{result['mlp.population_s']:.3f}"),
        ("mlp: population per student / plain loop", f"{result['mlp.population_per_student_over_plain']:.2f}"),
        ("fig3: make reproduce-fig3 wall time", f"{fig3} ({result['fig3.source']})"),
        ("fig3: matrix FLOPs (teachers and students, training and evaluation)", f"{result['fig3.flops']:.3g}"),
        ("fig3: GEMM rate per core, fp32 512^3 (GFLOP/s)", f"{result['fig3.gemm_flop_s_per_core'] / 1e9:.1f}"),
        (f"fig3: compute floor on {result['fig3.cores']} cores", f"{result['fig3.floor_s']:.0f} s"),
        ("fig3: wall time / compute floor",
         "n/a" if result["fig3.wall_over_floor"] is None else f"{result['fig3.wall_over_floor']:.2f}"),
    ]
    lines = [f"# Benchmark ({result['device']}, {result['threads']} intra-op thread(s), "
             f"median of {result['rounds']} alternating rounds)", "",
             f"Command: `{result['command']}`; load average {result['load_before']} before, "
             f"{result['load_after']} after; batch {result['kd_step.batch']}, {result['kd_step.steps']} timed steps "
             f"after {result['kd_step.warmup']}; fast path: `{result['kd_step.fast_path']}`.", "",
             "| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "Targets: " + ", ".join(f"{k} {'>=' if k.startswith('kd_step') else '<='} {v:g}: "
                                     f"{'met' if ok else 'NOT met'}" for k, (v, ok) in targets.items())]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=512 if cuda else 32, help="kd_step batch (CRD recipe: 64)")
    p.add_argument("--steps", type=int, default=100 if cuda else 16, help="timed kd steps per measurement")
    p.add_argument("--warmup", type=int, default=20 if cuda else 3, help="kd steps before the timer starts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the reference")
    p.add_argument("--threads", type=int, default=None if cuda else 1,
                   help="torch intra-op threads for every path (default on CPU: 1, steady on a shared machine)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                   help="torch.compile in our fast path (default: on GPU only; CPU compiles take minutes)")
    p.add_argument("--fig3", action="store_true", help="run make reproduce-fig3 and time it (minutes)")
    p.add_argument("--members", type=int, default=70, help="students in the timed population (fig3: 7 objectives "
                                                           "x 10 seeds at one delta)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    p.add_argument("--out", default=str(REPO / "results" / "bench"))
    return p


SMOKE = {"batch": 4, "steps": 2, "warmup": 1, "rounds": 1, "workers": 0, "members": 3}
SMOKE_MLP = ["trainer.max_epochs=2", "teacher.trainer.max_epochs=1", "data.test_per_class=10", "data.val_per_class=5"]


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    args.mlp_overrides = SMOKE_MLP if args.smoke else []
    quiet_lightning()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        load_before = os.getloadavg()
        result = measure(args)
    finally:
        torch.set_num_threads(threads)
    given = " ".join(sys.argv[1:] if argv is None else argv)
    result.update(command=f'make bench ARGS="{given}"' if given else "make bench",
                  load_before=" ".join(f"{x:.2f}" for x in load_before),
                  load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()), hardware=hardware())
    out = Path(args.out)
    write_json_atomic(out / "bench.json", result)
    text = report(result)
    write_text_atomic(out / "bench.md", text)
    print(text, end="")
    return result
