"""Loggers from ``cfg.logger`` (wandb | csv | none), with W&B behaving well without credentials.

W&B mode ``auto``: ``WANDB_MODE`` if set; else online when the user is logged in (an API key in
the environment or in ~/.netrc), else offline (runs sync later with ``wandb sync``). The run id is
derived from the output folder, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd.private_api import wandb_run_started


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def run_id(output_dir: Path) -> str:
    return hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16]


def default_group(cfg: DictConfig) -> str:
    """``<task>-<sweep folder>`` in a Hydra multirun, so one sweep's jobs form one W&B group; else ``<task>``."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{cfg.task_name}-{Path(HydraConfig.get().sweep.dir).name}"
    return cfg.task_name


def build_loggers(cfg: DictConfig, output_dir: Path, several: bool = False) -> list:
    """The run's loggers; ``several``: one of several runs that log at once, from one process (the
    members of a population), each W&B run a run of its own (``reinit="create_new"``)."""
    loggers = []
    for spec in (cfg.get("logger") or {}).values():
        if spec is None:
            continue
        if "Wandb" in spec._target_:
            spec = OmegaConf.create(OmegaConf.to_container(spec, resolve=True))
            with open_dict(spec):
                if spec.get("mode", "auto") == "auto":
                    spec.mode = wandb_mode()
                spec.id = spec.get("id") or run_id(output_dir)
                spec.resume = "allow"
                spec.group = spec.get("group") or default_group(cfg)
                spec.tags = [*(spec.get("tags") or []), f"objective={cfg.objective.name}", f"seed={cfg.seed}"]
                if several:
                    spec.reinit = "create_new"
        loggers.append(instantiate(spec))
    return loggers


def summarise(loggers: list, values: dict) -> None:
    """``values`` into the summary of every W&B run: the numbers results.json reports, not whichever
    value of a key W&B saw last."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update(values)


def finish_loggers(loggers: list, failed: bool = False) -> None:
    """Close every W&B run this job opened, so the next run in the process starts a new one. A W&B
    service that is gone is no error of the run: SLURM signals every process of a job it requeues
    or preempts, W&B's too, and the run's own error (or stop) is what its record must say."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and wandb_run_started(logger):
            try:
                logger.experiment.finish(exit_code=1 if failed else 0)
            except OSError as err:  # ConnectionResetError from a killed service
                warnings.warn(f"the W&B run did not finish cleanly ({err}); its files so far are kept", stacklevel=2)
