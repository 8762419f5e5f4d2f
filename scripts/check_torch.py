"""What `make install` installed, and a warning where this machine has an NVIDIA GPU that the
installed torch cannot use: the locked torch is a CUDA 13 build, which an older NVIDIA driver
cannot run, and torch then quietly computes on the CPU.

    python scripts/check_torch.py      (make install runs it; exit status 0 either way)
"""

import re
import shutil
import subprocess
import sys
from importlib import metadata

import torch

# CUDA versions PyTorch publishes wheels for (https://download.pytorch.org/whl/cuXYZ), oldest first.
TORCH_CUDA = ("11.8", "12.6", "12.8", "13.0")


def driver_cuda() -> str | None:
    """The newest CUDA version the NVIDIA driver runs (nvidia-smi's header), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"CUDA Version:\s*(\d+\.\d+)", out)
    return found[1] if found else None


def warning(cuda: str) -> str:
    """What to do when the driver runs CUDA ``cuda`` but torch sees no GPU."""
    # A driver runs every CUDA release of its major version or older (CUDA's minor version compatibility).
    fits = [v for v in TORCH_CUDA if int(v.split(".")[0]) <= int(cuda.split(".")[0])]
    fix = (
        f"install a torch built for CUDA {fits[-1]}: make install "
        f"TORCH_INDEX=https://download.pytorch.org/whl/cu{fits[-1].replace('.', '')} (or update the driver)"
        if fits
        else f"update the NVIDIA driver (PyTorch's builds need CUDA {TORCH_CUDA[0]} or newer)"
    )
    return (
        f"warning: this machine has an NVIDIA GPU, whose driver runs CUDA up to {cuda}, but torch "
        f"{torch.__version__} (built for CUDA {torch.version.cuda}) sees none, so runs would use the CPU; {fix}"
    )


def main() -> None:
    print("kd", metadata.version("kd"), "| torch", torch.__version__, "| lightning", metadata.version("lightning"))
    cuda = driver_cuda()
    if cuda is not None and not torch.cuda.is_available():
        print(warning(cuda), file=sys.stderr)


if __name__ == "__main__":
    main()
