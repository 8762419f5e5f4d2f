"""Where a student's teacher comes from, with no manual bookkeeping.

``teacher.kind``:
- ``none``: no teacher (training a teacher, or a ce / ls student);
- ``oracle``: the exact Bayes posterior of the synthetic data;
- ``checkpoint``: a run's Lightning checkpoint, ``teacher.path``;
- ``trained``: a teacher described by config (model, objective, data and trainer overrides).
  It is trained on first use, by the training function the caller hands in (``kd.train.run``:
  this module sits below it), into ``paths.teacher_dir/<hash of its config>/`` and reused by every
  later student that asks for the same teacher. A file lock keeps parallel jobs from training it
  twice; the teachers a population of students needs train as populations themselves.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kd import population
from kd.callbacks import EpochClock
from kd.errors import UserError, check_choice
from kd.results import completed_record, definition, differences, lock

# The training function: ``kd.train.run``, handed in by its callers (one config, or a population's list).
Train = Callable[..., object]

# The keys each kind of teacher reads besides ``kind``; any other key is a user error.
KEYS = {
    "none": (),
    "oracle": (),
    "checkpoint": ("path", "data_check"),
    "trained": ("model", "objective", "data", "trainer", "optimizer", "scheduler", "seed", "checkpoint"),
}
KINDS = tuple(KEYS)
CHECKPOINTS = ("last", "best")
# Data keys that pick, batch, load or locate examples, not which data set and classes they are: a
# checkpoint teacher may have been trained with other values (fig3's teachers on 500 examples per
# class, its students on 20). On data read from a root (images) the seed too only picks examples;
# generated data (no root) are drawn from their seed, which then matters.
SAMPLING = (
    "train_per_class",
    "val_per_class",
    "test_per_class",
    "val_size",
    "val_fraction",
    "split_seed",
    "batch_size",
    "eval_batch_size",
    "min_epoch_size",
    "augment",
    "root",
    "download",
    "num_workers",
    "pin_memory",
)
# A teacher trains in one process on one device, before a data-parallel student's ranks meet (they
# wait on its lock); a DDP teacher would wait for ranks that are themselves waiting on the lock.
_ONE_DEVICE = {"devices": 1, "num_nodes": 1, "strategy": "auto", "sync_batchnorm": False}


def teacher_config(cfg: DictConfig) -> DictConfig:
    """The full run config that trains the teacher described by ``cfg.teacher``."""
    spec = cfg.teacher
    tcfg = copy.deepcopy(cfg)
    with open_dict(tcfg):
        tcfg.model = spec.model
        tcfg.objective = spec.objective
        tcfg.data = OmegaConf.merge(cfg.data, spec.get("data") or {})
        tcfg.trainer = OmegaConf.merge(cfg.trainer, spec.get("trainer") or {}, _ONE_DEVICE)
        for key in ("optimizer", "scheduler"):
            if spec.get(key) is not None:
                tcfg[key] = spec[key]
        tcfg.seed = spec.seed
        tcfg.teacher = {"kind": "none"}
        tcfg.task_name = "teacher"
    with open_dict(tcfg):
        tcfg.paths.output_dir = str(Path(cfg.paths.teacher_dir) / teacher_id(tcfg))
    return tcfg


def teacher_id(tcfg: DictConfig) -> str:
    """``<model>-<objective>-<hash>``: the hash covers what defines the teacher
    (``kd.results.definition``), not where its data lie nor the devices it ran on: jobs that stage
    the data set into folders of their own share one teacher."""
    keyed = definition(
        {
            key: OmegaConf.to_container(tcfg[key], resolve=True)
            for key in ("data", "model", "objective", "optimizer", "scheduler", "trainer")
            if key in tcfg
        }
    )
    keyed["trainer"].pop("sync_batchnorm", None)  # always off on one device: teachers cached before it keep their id
    keyed["seed"] = tcfg.seed
    keyed["deterministic"] = tcfg.get("deterministic")
    digest = hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{tcfg.model.name}-{tcfg.objective.name}-{digest}"


def ensure_trained(cfg: DictConfig, train: Train) -> Path:
    """Train the configured teacher unless its run already completed; return its run folder."""
    tcfg = teacher_config(cfg)
    train_missing([tcfg], train)
    return Path(tcfg.paths.output_dir)


def train_missing(tcfgs: list[DictConfig], train: Train) -> None:
    """Train the teachers (their run configs, ``teacher_config``) not yet in the cache: those that
    share a population key (kd.population) together, as one population."""
    unique = {tcfg.paths.output_dir: tcfg for tcfg in tcfgs}
    folders = sorted(unique)
    with ExitStack() as held:
        for folder in folders:  # in one order everywhere, so two processes never wait on each other
            Path(folder).mkdir(parents=True, exist_ok=True)
            held.enter_context(lock(Path(folder) / ".lock"))
        missing = [unique[f] for f in folders if completed_record(f) is None]
        for group in population.groups(missing):
            names = [Path(missing[i].paths.output_dir).name for i in group]
            shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
            print(
                f"[kd] training {len(names)} teacher{'s as one population' if len(names) > 1 else ''} "
                f"({shown}), cached for later students ...",
                flush=True,
            )
            clock = EpochClock(f"{len(names)} teacher{'s' if len(names) > 1 else ''} ({shown})")
            train([missing[i] for i in group] if len(group) > 1 else missing[group[0]], callbacks=[clock])


def checkpoint_in(run_dir: Path, which: str) -> Path:
    """A finished run's last or best checkpoint, as recorded in its results.json."""
    check_choice("teacher.checkpoint", which, CHECKPOINTS)
    return Path(completed_record(run_dir)["checkpoints"][which])


def load_checkpoint(path, num_classes: int | None = None, input_shape=None) -> nn.Module:
    """Rebuild a trained network from a run checkpoint and check it fits the data."""
    from kd import models

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"teacher checkpoint {path} does not exist; give teacher.path of a finished run's "
            "checkpoints/*.ckpt, or use a teacher config (e.g. teacher=mlp) to train one"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise UserError(
            f"teacher checkpoint {path} is unreadable or not a kd run checkpoint "
            f"({type(err).__name__}); delete it and train the teacher again"
        ) from None
    if num_classes is not None and hparams["num_classes"] != num_classes:
        raise UserError(
            f"teacher checkpoint {path} predicts {hparams['num_classes']} classes but the data "
            f"has {num_classes}; use a teacher trained on this data set"
        )
    if input_shape is not None and list(hparams["input_shape"]) != list(input_shape):
        raise UserError(
            f"teacher checkpoint {path} takes inputs of shape {hparams['input_shape']} but the "
            f"data gives {list(input_shape)}; use a teacher trained on this data set"
        )
    model_cfg = dict(hparams["model"])
    model_cfg.pop("_target_", None)
    net = models.get(**model_cfg, num_classes=hparams["num_classes"], input_shape=hparams["input_shape"])
    net.load_state_dict({k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")})
    return net


def check_spec(spec: DictConfig) -> None:
    """``teacher.kind`` is known and every other key is one that kind reads."""
    check_choice("teacher.kind", spec.kind, KINDS)
    unknown = sorted(set(spec) - {"kind", *KEYS[spec.kind]})
    if unknown:
        raise UserError(
            f"teacher.{unknown[0]} is not a key of teacher kind {spec.kind!r}; "
            f"valid: {', '.join(('kind', *KEYS[spec.kind]))}"
        )


def check_same_classes(cfg: DictConfig, tcfg: DictConfig, datamodule) -> None:
    """A teacher trained on other classes cannot teach this student: fail before training it (a
    teacher already trained is checked when its checkpoint loads)."""
    if not cfg.teacher.get("data") or completed_record(tcfg.paths.output_dir) is not None:
        return
    if tcfg.data == cfg.data:
        return
    k = instantiate(tcfg.data).num_classes
    if k != datamodule.num_classes:
        raise UserError(
            f"teacher.data gives the teacher {k} classes but the student's data has "
            f"{datamodule.num_classes}; drop the teacher.data override that changes the classes"
        )


def trained_on(path) -> dict | None:
    """The data config a checkpoint's run trained on, from its record (results.json beside its
    ``checkpoints/`` folder); None where there is no such record."""
    try:
        record = json.loads((Path(path).parent.parent / "results.json").read_text())
        return record["config"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_data(cfg: DictConfig) -> None:
    """A checkpoint teacher used on other data than it was trained on (another data set, classes,
    generator or generated draw) is a one-line error, unless ``teacher.data_check=false`` says that
    is the intent. A checkpoint without a run record is not checked."""
    trained = trained_on(cfg.teacher.path)
    if trained is None or not cfg.teacher.get("data_check", True):
        return
    ignored = set(SAMPLING) | ({"seed"} if "root" in trained else set())
    data = OmegaConf.to_container(cfg.data, resolve=True)
    changed = differences(
        {k: v for k, v in trained.items() if k not in ignored}, {k: v for k, v in data.items() if k not in ignored}
    )
    if changed:
        shown = ", ".join(f"data.{k}={a!r}, not {b!r}" for k, (a, b) in list(changed.items())[:3])
        raise UserError(
            f"teacher checkpoint {cfg.teacher.path} was trained on other data ({shown}); give the "
            "data overrides of its run, or teacher.data_check=false to use it on this data anyway"
        )


def resolve(
    cfg: DictConfig, datamodule, train: Train, tcfg: DictConfig | None = None, loaded: dict | None = None
) -> nn.Module | None:
    """The frozen teacher network this run distils from, or None (``train`` trains a missing one;
    ``tcfg``: its ``teacher_config`` if already built; ``loaded``: checkpoint path -> network, for
    the members of a population that share a teacher)."""
    kind = cfg.teacher.kind
    check_choice("teacher.kind", kind, KINDS)
    if kind == "none":
        return None
    if kind == "oracle":
        if not hasattr(datamodule, "oracle_teacher"):
            raise UserError(f"teacher=oracle exists only for data=synthetic, not {type(datamodule).__name__}")
        return datamodule.oracle_teacher()
    if kind == "checkpoint":
        check_data(cfg)
        path = cfg.teacher.path
    else:
        tcfg = tcfg or teacher_config(cfg)
        check_same_classes(cfg, tcfg, datamodule)
        train_missing([tcfg], train)
        path = checkpoint_in(Path(tcfg.paths.output_dir), cfg.teacher.checkpoint)
    loaded = {} if loaded is None else loaded
    if str(path) not in loaded:
        loaded[str(path)] = load_checkpoint(path, datamodule.num_classes, datamodule.input_shape)
    return loaded[str(path)]
