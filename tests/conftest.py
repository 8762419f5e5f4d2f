"""Every test writes under a temporary root and never talks to the W&B servers.

Tests marked ``gpu`` take the ``device`` fixture: CUDA, skipped where none is visible (the suite
runs on CPU-only CI; scripts/gpu_check.sh runs them on a GPU), or the CPU under
``--gpu-device cpu``, which rehearses them (scripts/gpu_check.sh --cpu, itself run by the suite).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_addoption(parser):
    parser.addoption("--gpu-device", default="cuda", choices=("cuda", "cpu"),
                     help="where the tests marked gpu run (default cuda: skipped without a GPU; cpu rehearses them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu-device") == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: scripts/gpu_check.sh runs it (--cpu rehearses it here)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


# Parametrises ``device`` over the CPU and the GPU path: @pytest.mark.parametrize("device", DEVICES, indirect=True)
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture
def device(request) -> torch.device:
    """The CPU for the "cpu" parameter; else (the "gpu" parameter, or a test marked gpu) --gpu-device."""
    if getattr(request, "param", "gpu") == "cpu":
        return torch.device("cpu")
    return torch.device(request.config.getoption("--gpu-device"))


def on(device: torch.device) -> list[str]:
    """The overrides that put a run on ``device``."""
    return [f"trainer.accelerator={'gpu' if device.type == 'cuda' else device.type}"]


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A fresh project root: runs, teachers, W&B files all land here."""
    monkeypatch.setenv("KD_ROOT", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


TINY = [
    "data.superclasses=2", "data.subclasses=2", "data.dim=8", "data.train_per_class=10",
    "data.val_per_class=5", "data.test_per_class=20", "trainer.max_epochs=2",
    "model.hidden=[16]", "logger=none", "trainer.enable_progress_bar=false",
]
TINY_TEACHER = ["teacher=mlp", "teacher.model.hidden=[16]", "teacher.data.train_per_class=30",
                "teacher.trainer.max_epochs=2"]


@pytest.fixture
def tiny():
    return list(TINY)


# The SLURM cluster tests/test_slurm.py runs on: scripts/slurm_local.sh's, or SLURM_CONF's.
SLURM_CONF = os.environ.get("SLURM_CONF") or str(Path(os.environ.get("KD_SLURM_DIR", "/tmp/kd-slurm")) / "slurm.conf")


def cluster_down() -> str | None:
    """Why no SLURM cluster can run jobs here, or None."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (scripts/slurm_local.sh start installs it and starts a local cluster)"
    if not Path(SLURM_CONF).is_file():
        return f"no cluster config at {SLURM_CONF} (scripts/slurm_local.sh start, or set SLURM_CONF)"
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env={**os.environ, "SLURM_CONF": SLURM_CONF},
                               capture_output=True, text=True, timeout=5).stdout.split()
    except subprocess.TimeoutExpired:
        state = []
    if not any(s.startswith(("idle", "mixed", "allocated", "completing")) for s in state):  # busy is up
        return f"the cluster of {SLURM_CONF} does not answer with a usable node (sinfo: {state})"
    return None
