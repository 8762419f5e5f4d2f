"""deterministic=true on CUDA after earlier matrix products in the same process: torch reads
CUBLAS_WORKSPACE_CONFIG once, at its first cuBLAS call, so kd sets it on import (before torch can
start) and refuses, in one line, a run that could only fail (docs/determinism.md)."""

import os
import subprocess
import sys

import pytest
import torch

from kd import schema
from kd.errors import UserError
from kd.runner import compose_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("given, expected", [(None, ":4096:8"), (":16:8", ":16:8"), (":0:0", ":0:0")])
def test_importing_kd_sets_it_unless_given(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-c", "import os, kd; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, **({"CUBLAS_WORKSPACE_CONFIG": given} if given else {})},
    )
    assert done.stdout == f"{expected}\n", done.stderr


@pytest.mark.parametrize(
    "value, accelerator, refused",
    [
        (None, "gpu", True),
        (":0:0", "gpu", True),
        (":0:0", "auto", True),
        (":4096:8", "gpu", False),
        (":16:8", "gpu", False),
        (None, "cpu", False),
    ],
)
def test_a_deterministic_cuda_run_after_cuda_started_without_it_is_refused(
    monkeypatch, tmp_path, value, accelerator, refused
):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as after a matrix product on the GPU
    if value is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", value)
    cfg = compose_config(["deterministic=true", f"trainer.accelerator={accelerator}"], tmp_path)
    if not refused:
        schema.check(cfg)
        return
    with pytest.raises(UserError) as err:
        schema.check(cfg)
    assert str(err.value) == (
        "deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before torch's first CUDA matrix product, and CUDA "
        f"started in this process with it {value or 'unset'}; export CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting "
        "Python, or import kd before using CUDA"
    )


def test_without_cuda_started_nothing_is_refused(monkeypatch, tmp_path):
    """Lightning sets the variable itself for a deterministic run: enough while torch has not read it."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    schema.check(compose_config(["deterministic=true", "trainer.accelerator=gpu"], tmp_path))
