"""OmegaConf resolvers the configs use; importing ``kd.train`` registers them."""

from __future__ import annotations

import hashlib
import re

import torch
from omegaconf import OmegaConf

from kd.results import cpu_features


def run_name(overrides: str) -> str:
    """A folder name from a run's overrides: readable, filesystem-safe, at most ~120 characters."""
    if not overrides:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", overrides)
    if len(name) > 120:
        name = f"{name[:100]}...{hashlib.sha1(overrides.encode()).hexdigest()[:10]}"
    return name


def fast_precision(accelerator: str) -> str:
    """The fast path's precision (trainer=gpu_fast): ``bf16-mixed`` where the run's device computes
    bf16 natively (a CUDA GPU of compute capability 8.0 or newer; a CPU with AVX512-BF16 or AMX,
    see ``kd.results.cpu_features``), else ``32-true``: emulated bf16 is slower than fp32, ten
    times on an AVX2-only CPU. The run's results.json records the choice (config.trainer.precision)
    and the CPU's features (hardware.cpu)."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        native = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    else:
        native = accelerator == "cpu" and cpu_features()["bf16_native"]
    return "bf16-mixed" if native else "32-true"


def slurm_gpus(accelerator: str, devices, gres: str | None) -> int | None:
    """``--gpus-per-node`` of a SLURM job (configs/hydra/launcher/slurm.yaml): the trainer's devices
    for a GPU trainer, none otherwise (a CPU job asking for GPUs fails on a cluster without them, and
    waits for GPUs it never uses on one with them), and none when ``gres`` asks for them: one way of
    asking, as a script with both asks twice."""
    return devices if accelerator in ("gpu", "cuda") and gres is None else None


def register() -> None:
    for name, resolver in (
        ("run_name", run_name),
        ("fast_precision", fast_precision),
        ("not", lambda x: not x),
        ("slurm_gpus", slurm_gpus),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register()
