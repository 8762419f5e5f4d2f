"""The private Hydra and Lightning API kd cannot do without, each use behind one function.

Nothing else in kd names a private (underscore) attribute of Hydra or Lightning. Each function says
why the public API does not do; tests/test_private_api.py checks every one against what it stands
for, so a Hydra or Lightning upgrade that changes one fails there, by name, rather than mid-run.
"""

from __future__ import annotations

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig


def apply_value_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Set ``overrides`` (``key=value``, ``+key=value``, ``++key=value``, ``~key``; none that chooses
    a config file) on ``cfg`` in place, with Hydra's own step and errors. Public Hydra offers only
    the whole composition, a tenth of a second or more per job; a sweep composes each structure once
    (kd.runner.compose_config) and applies its jobs' values with this."""
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(overrides), cfg)


def cluster_environment(trainer) -> ClusterEnvironment:
    """How a trainer's processes meet (LightningEnvironment, SLURMEnvironment, ...), whatever its
    strategy: the public ``strategy.cluster_environment`` exists on data-parallel strategies only,
    and a one-device run on SLURM still requeues through its SLURMEnvironment."""
    return trainer._accelerator_connector.cluster_environment


def relaunches_script(launcher) -> bool:
    """Whether a strategy's launcher starts the other ranks by running the command line again
    (trainer.strategy=ddp), rather than the fit in child processes (ddp_spawn, ddp_fork): Lightning
    tells them apart by their private classes only."""
    return isinstance(launcher, _SubprocessScriptLauncher)


def slurm_requeue_handler(trainer):
    """Lightning's handler of SLURM's requeue signal (it saves ``hpc_ckpt_<n>.ckpt`` and requeues the
    job), which Lightning registers only where no other handler is set, as kd's own is."""
    return trainer._signal_connector._slurm_sigusr_handler_fn


def save_checkpoint_now(callback: ModelCheckpoint, trainer) -> None:
    """Write ``callback``'s checkpoint now, mid-epoch, as it writes its own (its bookkeeping of the
    step saved, its loggers told), unless it already saved at this step or the trainer is not
    fitting; ``trainer.save_checkpoint`` would write the file alone."""
    if not callback._should_skip_saving_checkpoint(trainer):
        callback._save_topk_checkpoint(trainer, callback._monitor_candidates(trainer))


def wandb_run_started(logger) -> bool:
    """Whether a WandbLogger has started its W&B run; its public ``experiment`` starts one."""
    return logger._experiment is not None
