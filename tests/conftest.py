"""Every test writes under a temporary root and never talks to the W&B servers; what a test sent to
W&B is read back from the offline run folder (``wandb_run``, ``assert_published_to_wandb``).

Tests marked ``gpu`` take the ``device`` fixture: CUDA, skipped where none is visible (the suite
runs on CPU-only CI; scripts/gpu_check.sh runs them on a GPU), or the CPU under
``--gpu-device cpu``, which rehearses them (scripts/gpu_check.sh --cpu, itself run by the suite).

Nothing here imports wandb up front: the GPU machine has none, and its check collects this file. A
test that reads what it sent to W&B skips where wandb is missing.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_addoption(parser):
    parser.addoption(
        "--gpu-device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="where the tests marked gpu run (default cuda: skipped without a GPU; cpu rehearses them)",
    )


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
    yield tmp_path
    if "wandb" in sys.modules:  # W&B keeps the settings it read (WANDB_DIR) until its service ends
        sys.modules["wandb"].teardown()


TINY = [
    "data.superclasses=2",
    "data.subclasses=2",
    "data.dim=8",
    "data.train_per_class=10",
    "data.val_per_class=5",
    "data.test_per_class=20",
    "trainer.max_epochs=2",
    "model.hidden=[16]",
    "logger=none",
    "trainer.enable_progress_bar=false",
]
TINY_TEACHER = [
    "teacher=mlp",
    "teacher.model.hidden=[16]",
    "teacher.data.train_per_class=30",
    "teacher.trainer.max_epochs=2",
]


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
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%T"],
            env={**os.environ, "SLURM_CONF": SLURM_CONF},
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.split()
    except subprocess.TimeoutExpired:
        state = []
    if not any(s.startswith(("idle", "mixed", "allocated", "completing")) for s in state):  # busy is up
        return f"the cluster of {SLURM_CONF} does not answer with a usable node (sinfo: {state})"
    return None


# LevelDB's log format, which W&B's offline run files use (wandb_run): block size, chunk kinds.
BLOCK, FULL, LAST = 32 * 1024, 1, 4


def wandb_records(folder: Path) -> list:
    """The records of the one offline W&B run under ``folder``, as W&B would sync them, read from its
    ``run-*.wandb`` file: protobuf records in LevelDB's log format (a 7-byte file header, then 32 KiB
    blocks of chunks, each behind a 7-byte header: crc, length, kind)."""
    wandb = pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # W&B's service writes run files on its own time: ending it flushes them
    (path,) = Path(folder).rglob("offline-run-*/run-*.wandb")
    data, pos, chunk, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def wandb_run(folder: Path) -> tuple[list[dict], dict]:
    """The history rows and the summary of the one offline W&B run under ``folder``."""
    records = wandb_records(folder)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    return history, summary


def assert_published_to_wandb(out_dir: Path, wandb_dir: Path) -> None:
    """Every PNG a driver wrote into ``out_dir`` is in its W&B run's media, byte for byte, and every
    CSV table is there as a W&B table with the same columns and rows."""
    pytest.importorskip("wandb").teardown()
    (files,) = Path(wandb_dir).rglob("offline-run-*/files")
    media = {p.read_bytes() for p in (files / "media" / "images").rglob("*.png")}
    pngs = sorted(Path(out_dir).glob("*.png"))
    assert pngs and all(png.read_bytes() in media for png in pngs), (pngs, list(files.rglob("*")))
    logged = [json.loads(p.read_text()) for p in (files / "media" / "table").rglob("*.table.json")]
    csvs = sorted(Path(out_dir).glob("*.csv"))
    assert len(logged) == len(csvs)
    for csv in csvs:
        table = pd.read_csv(csv)
        assert any(t["columns"] == list(table.columns) and len(t["data"]) == len(table) for t in logged), csv
