"""`make install` on a GPU machine whose driver is older than the locked torch's CUDA 13: what it
prints (scripts/check_torch.py, under a fake nvidia-smi) and how TORCH_INDEX picks another build."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def check_torch(tmp_path, driver_cuda: str | None) -> subprocess.CompletedProcess:
    """scripts/check_torch.py with only a fake nvidia-smi (reporting ``driver_cuda``) on PATH, or none."""
    if driver_cuda:
        smi = tmp_path / "nvidia-smi"
        smi.write_text(
            f'#!/bin/sh\necho "| NVIDIA-SMI 535.104.05  Driver Version: 535.104.05  CUDA Version: {driver_cuda} |"\n'
        )
        smi.chmod(0o755)
    return subprocess.run(
        [sys.executable, "scripts/check_torch.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": str(tmp_path)},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: nothing to warn about")
@pytest.mark.parametrize(
    "driver_cuda, fix",
    [
        (
            "12.2",
            "install a torch built for CUDA 12.8: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128",
        ),
        (
            "11.4",
            "install a torch built for CUDA 11.8: make install TORCH_INDEX=https://download.pytorch.org/whl/cu118",
        ),
        ("10.2", "update the NVIDIA driver (PyTorch's builds need CUDA 11.8 or newer)"),
    ],
)
def test_a_gpu_that_torch_cannot_see_is_a_warning_saying_what_to_do(tmp_path, driver_cuda, fix):
    done = check_torch(tmp_path, driver_cuda)
    assert done.returncode == 0 and done.stdout.startswith(f"kd 0.1.0 | torch {torch.__version__}"), done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        f"warning: this machine has an NVIDIA GPU, whose driver runs CUDA up to {driver_cuda}, "
        f"but torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees none"
    )
    assert line.split("so runs would use the CPU; ")[1].removesuffix(" (or update the driver)") == fix


def test_no_nvidia_smi_no_warning(tmp_path):
    done = check_torch(tmp_path, None)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.startswith("kd 0.1.0 | torch")


def test_torch_index_installs_the_locked_torch_from_that_index_first():
    pins = re.findall(r"^(torch(?:vision)?==\S+)$", (REPO / "requirements" / "lock.txt").read_text(), re.M)
    url = "https://download.pytorch.org/whl/cu126"
    # --no-print-directory: under `make test` (MAKELEVEL 1) make would add "Entering directory" lines.
    plain, other = (
        subprocess.run(
            ["make", "--no-print-directory", "-n", "install", *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
        for extra in ([], [f"TORCH_INDEX={url}"])
    )
    assert len(pins) == 2 and other[1] == f".venv/bin/python -m pip install --quiet --index-url {url} {' '.join(pins)}"
    assert [line for line in other if line != other[1]] == plain  # then the same install, the lock's pins
    assert plain[-1] == ".venv/bin/python scripts/check_torch.py"
