"""What a run leaves behind: an atomically written JSON record with config, versions, hardware; what
defines a run, so that a finished one is reused only for the same job; and a lock on a folder."""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import uuid
import weakref
from importlib import metadata
from pathlib import Path

import torch

from kd.errors import UserError
from kd.objectives import REGISTRY

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


# A lock's owner refreshes its file's time every HEARTBEAT_S; a waiter that sees the time unchanged
# for STALE_S (its own clock: node clocks may differ) takes the lock as left by a dead owner.
HEARTBEAT_S = 20.0
STALE_S = 120.0
_HELD: weakref.WeakSet = weakref.WeakSet()  # this process's locks, whose files one heartbeat thread refreshes


class Lock:
    """An exclusive lock on ``path``: a file made by an atomic ``link`` that names its owner (host, pid),
    removed by ``close``. It works where ``flock`` fails (ENOSYS on file systems mounted without
    locks) or holds on one node only (node-local locks on a shared folder). A lock whose owner died
    is taken over: at once where the owner ran on this host, else once its heartbeat has stopped
    for STALE_S. A file without an owner line (a ``flock`` file of an earlier version) is stale."""

    def __init__(self, path):
        self.path = Path(path)
        self.owner = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}\n"
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_text(self.owner)
        try:
            seen, since = None, time.monotonic()
            while True:
                try:
                    os.link(tmp, self.path)  # atomic, also over NFS: fails if the lock exists
                    break
                except FileExistsError:
                    pass
                found = _stat(self.path)
                if found != seen:
                    seen, since = found, time.monotonic()
                if found is not None and _stale(found[1], time.monotonic() - since):
                    _remove_if(self.path, found[1])
                    continue
                time.sleep(0.2)
        finally:
            tmp.unlink(missing_ok=True)
        _HELD.add(self)
        _heartbeat()

    def close(self) -> None:
        if self in _HELD:
            _HELD.discard(self)
            _remove_if(self.path, self.owner)

    __del__ = close  # released when dropped, as a file's flock was (a run that fails before its try)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


lock = Lock  # lock(path): waits while another process holds it; held until closed or dropped


def _stat(path: Path) -> tuple[int, str] | None:
    """``(mtime_ns, owner line)`` of a lock file, None if it is gone."""
    try:
        return path.stat().st_mtime_ns, path.read_text()
    except FileNotFoundError:
        return None


def _stale(owner: str, unchanged_s: float) -> bool:
    """Whether a lock file's owner is dead: no owner line, a process gone from this host, or (another
    host's) no heartbeat seen for ``unchanged_s`` > STALE_S."""
    try:
        host, pid, _ = owner.split()
    except ValueError:
        return True
    if host != socket.gethostname():
        return unchanged_s > STALE_S
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _remove_if(path: Path, owner: str) -> None:
    """Remove a lock file if it still names ``owner`` (never one another process has just taken)."""
    try:
        if path.read_text() == owner:
            path.unlink()
    except FileNotFoundError:
        pass


@functools.cache
def _heartbeat() -> None:
    """Start, once per process, the thread that refreshes the time of every lock file held."""

    def beat():
        while True:
            time.sleep(HEARTBEAT_S)
            for held in list(_HELD):
                try:
                    os.utime(held.path)
                except OSError:
                    pass

    threading.Thread(target=beat, daemon=True, name="kd-lock-heartbeat").start()


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
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def tf32() -> dict:
    """Whether fp32 convolutions (cuDNN) and matrix products (cuBLAS) may run in TF32 (10-bit
    mantissa), as torch is set: on an Ampere or newer GPU they then do, under 32-true too. torch's
    default: convolutions yes, matrix products no (docs/determinism.md)."""
    return {"convolutions": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}


def hardware() -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu": cpu_features(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpus": [],
        "tf32": tf32(),
    }
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


# What does not define a run: where it writes (paths), how it reports and keeps checkpoints (logger,
# callbacks, names, progress), where its data lie, and the devices it runs on (a run requeued onto fewer
# GPUs resumes; its record's data_parallel says what it ran on), and the recipe's settings for objectives
# (recipe.*), which define a run only through its objective, recorded there. A run folder whose config
# differs from a job's only here is that job's run.
NOT_DEFINING = {
    "paths": None,
    "recipe": None,
    "logger": None,
    "callbacks": None,
    "task_name": None,
    "tags": None,
    "optimized_metric": None,
    "data": ("download",),
    "trainer": (
        "default_root_dir",
        "enable_progress_bar",
        "enable_model_summary",
        "log_every_n_steps",
        "accelerator",
        "devices",
        "num_nodes",
        "strategy",
    ),
}


def definition(config: dict) -> dict:
    """What defines a run of the resolved ``config``: the config less ``NOT_DEFINING``; every value
    under one of its ``paths`` written as ``${paths.<key>}/...`` (the run's checkpoint folder, wherever
    it is, reads the same); and its data known by the name of their folder, not where it lies
    (``/scratch/job7/cifar100`` is ``cifar100``: staged data, the same data set)."""
    paths = sorted(
        ((v.rstrip("/"), k) for k, v in (config.get("paths") or {}).items() if isinstance(v, str) and v),
        key=lambda found: -len(found[0]),
    )

    def portable(value):
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [portable(v) for v in value]
        if isinstance(value, str):
            for prefix, key in paths:
                if value == prefix or value.startswith(prefix + "/"):
                    return "${paths." + key + "}" + value[len(prefix) :]
        return value

    kept = {}
    for key, value in config.items():
        if key in NOT_DEFINING and NOT_DEFINING[key] is None:
            continue
        if key in NOT_DEFINING and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_DEFINING[key]}
        kept[key] = portable(value)
    if isinstance(kept.get("data"), dict) and isinstance(kept["data"].get("root"), str):
        kept["data"]["root"] = Path(kept["data"]["root"]).name
    return kept


def differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` where two (definitions of) configs differ; a key one
    lacks reads as ``<absent>``."""
    found = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found.update(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            found[f"{prefix}{key}"] = (a, b)
    return found


def declared_since(config: dict, key: str, values: tuple) -> bool:
    """Whether ``key`` is a parameter the run's objective declared after one of the two runs was made,
    asked for at its default there: the same run, since an objective's new option keeps the behaviour
    before it as its default (docs/extending.md)."""
    section, _, name = key.partition(".")
    objective = REGISTRY.get((config.get("objective") or {}).get("name"))
    if section != "objective" or objective is None or "<absent>" not in values:
        return False
    param = objective.parameters.get(name)
    return param is not None and values[values[0] == "<absent>"] == param.default


def check_same_run(run_dir, config: dict) -> None:
    """Stop, in one line, where ``run_dir`` holds a run of other settings than the resolved ``config``
    that would be reused: reported as finished, or resumed from its checkpoint. A folder with no
    such run (none, or a failure with nothing to resume) is the job's to (re)write."""
    try:
        record = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return
    resumable = (record.get("checkpoints") or {}).get("resume")
    if "config" not in record or not (record.get("status") == "completed" or resumable):
        return
    changed = {
        key: values
        for key, values in differences(definition(record["config"]), definition(config)).items()
        if not declared_since(config, key, values)
    }
    if changed:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(changed.items())[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        what = "a finished run" if record.get("status") == "completed" else "an unfinished run"
        raise UserError(
            f"{run_dir} holds {what} of other settings ({shown}{more}); it is not reused: delete "
            "that folder to run there again, or give the run another folder (a driver's --runs, "
            "kd.train's hydra.run.dir)"
        )
