"""What a run leaves behind: an atomically written JSON record with config, versions, hardware."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import IO

import torch

PACKAGES = ("kd", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf", "wandb")


def write_atomic(path, write) -> None:
    """Call ``write(tmp_path)``, then rename tmp over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600: results must stay readable by the rest of a shared cluster
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lock(path) -> IO:
    """An exclusive lock on ``path`` (created if absent), held until the returned file is closed or
    the process ends, even by SIGKILL; waits while another process holds it."""
    held = open(path, "a")
    fcntl.flock(held, fcntl.LOCK_EX)
    return held


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def cpu_features() -> dict:
    """This CPU as torch sees it: its name, the vector instructions torch's kernels use, and whether
    it computes bf16 natively (x86: AVX512-BF16 or AMX; elsewhere oneDNN's check, e.g. Arm's BF16).
    Without native support bf16 is emulated, and about ten times slower than fp32 (AVX2-only CPUs)."""
    if platform.machine().lower() in ("x86_64", "amd64"):  # torch's private probes; absent ones count as no
        native = any(getattr(torch.cpu, f"_is_{isa}_supported", bool)() for isa in ("avx512_bf16", "amx_tile"))
    else:  # on x86 this check also counts AVX-512 emulation as support, hence the explicit flags above
        try:
            native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        except (AttributeError, RuntimeError):  # a build without oneDNN
            native = False
    return {"model": _cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(), "bf16_native": bool(native)}


def _cpu_model() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def tf32() -> dict:
    """Whether fp32 convolutions (cuDNN) and matrix products (cuBLAS) may run in TF32 (10-bit
    mantissa), as torch is set: on an Ampere or newer GPU they then do, under 32-true too. torch's
    default: convolutions yes, matrix products no (docs/determinism.md)."""
    return {"convolutions": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}


def hardware() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu": cpu_features(), "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda, "gpus": [],
            "tf32": tf32()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def completed_record(run_dir) -> dict | None:
    """A run folder's results.json if that run completed, else None."""
    try:
        record = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("status") == "completed" else None
