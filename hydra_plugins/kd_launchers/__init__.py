"""Hydra launchers that train a multirun's jobs as populations (kd.population), many per process.

``hydra/launcher=population`` (here) and ``hydra/launcher=slurm`` (one SLURM job per population)
cut the sweep's jobs into packs of at most ``population_size`` jobs that can share a population
(``kd.population.key``: the same architecture, data shapes and recipe; their own seed, objective,
teacher and data values), in the sweep's order. Each member is still a Hydra job of its own: its
sweep sub-folder, its saved ``.hydra`` configs, its record, W&B run and checkpoints, its return
value to the sweeper. A pack trains as one ``kd.train.run``; a requeued SLURM job resumes every
member. ``population_size=1`` launches every job alone, as Hydra's own launchers do.

Hydra imports every module of ``hydra_plugins`` when it starts (outside ``sys.modules``, so no
``from __future__ import annotations`` with the dataclass here): nothing heavy is imported until a
launcher runs.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, open_dict

# Separates the members of a pack in the one list of overrides a submitit job is given; the
# number after it is the member's job number in the sweep.
MEMBER = "#kd-member="


def packs(configs: Sequence[DictConfig], size: int) -> list[list[int]]:
    """The indices of the jobs' ``configs`` in packs of at most ``size`` that can train as one
    population, in the sweep's order."""
    from kd import population

    if size < 2:
        return [[i] for i in range(len(configs))]
    found: dict[str, list[list[int]]] = {}
    cut = []
    for i, cfg in enumerate(configs):
        key = population.key(cfg)
        if key is None:
            cut.append([i])
            continue
        if not found.get(key) or len(found[key][-1]) == size:
            found.setdefault(key, []).append([])
            cut.append(found[key][-1])
        found[key][-1].append(i)
    return cut


def sweep_configs(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]]) -> list:
    """Each job's config, composed as Hydra composes a sweep's job (a population key leaves out
    ``hydra``, each job's own)."""
    return [hydra_context.config_loader.load_sweep_config(config, list(overrides)) for overrides in job_overrides]


def _concrete(task_cfg: DictConfig) -> DictConfig:
    """A member's task config with its folder written out (it is Hydra's ``runtime.output_dir``,
    which names one job at a time)."""
    cfg = copy.deepcopy(task_cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return cfg


def run_pack(hydra_context: HydraContext, members: list[tuple[int, DictConfig]]) -> list[JobReturn]:
    """Set up each member (its job number, its ``sweep_configs`` config) as Hydra sets up a job
    (folder, configs, logging), then train them all as one population; each member's JobReturn
    carries its ``optimized_metric`` or its error."""
    from kd import train
    from kd.callbacks import defer_requeue_signal
    from kd.errors import TrainingDiverged, one_line

    defer_requeue_signal()
    returns = []
    for num, sweep_config in members:
        with open_dict(sweep_config.hydra.job):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
            sweep_config.hydra.job.num = num
        returns.append(
            run_job(
                hydra_context=hydra_context,
                task_function=_concrete,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        )
    cfgs = [ret.return_value for ret in returns]
    # While they train: a member's Hydra config, as in a job of the sweep (W&B's group is the sweep's).
    HydraConfig.instance().set_config(returns[-1].hydra_cfg)
    try:
        records = train.run(cfgs)
    except Exception as err:  # noqa: BLE001  (the population's failure is every member's)
        for ret in returns:
            ret.status, ret.return_value = JobStatus.FAILED, err
        return returns
    for ret, cfg, record in zip(returns, cfgs, records):
        try:
            if record["status"] != "completed":
                raise TrainingDiverged(record["error"])
            metric = cfg.get("optimized_metric")
            ret.return_value = train.optimized_value(record, metric) if metric else None
            ret.status = JobStatus.COMPLETED
            print(
                f"[kd] done: test/acc_last={record['metrics'].get('test/acc_last', float('nan')):.4f} "
                f"-> {record['output_dir']}/results.json"
            )
        except Exception as err:  # noqa: BLE001
            print(f"[kd] failed: {one_line(err)} -> {record['output_dir']}/results.json")
            ret.status, ret.return_value = JobStatus.FAILED, err
    return returns


class PopulationLauncher(Launcher):
    """Runs a multirun's packs one after the other in this process."""

    def __init__(self, population_size: int = 8) -> None:
        self.population_size = population_size

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        configs = sweep_configs(self.hydra_context, self.config, job_overrides)  # once: packed, then run
        returns: list[JobReturn | None] = [None] * len(job_overrides)
        for pack in packs(configs, self.population_size):
            members = [(initial_job_idx + i, configs[i]) for i in pack]
            for i, ret in zip(pack, run_pack(self.hydra_context, members)):
                returns[i] = ret
        return returns


class SlurmPopulationLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher, one array element per pack."""

    def __init__(self, population_size: int = 1, **params: Any) -> None:
        super().__init__(**params)
        self.population_size = population_size

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if self.population_size < 2:
            return super().launch(job_overrides, initial_job_idx)
        cut = packs(sweep_configs(self.hydra_context, self.config, job_overrides), self.population_size)
        # One "job" per pack for submitit: its members' overrides, each after its marker and number.
        flat = [[item for i in pack for item in (f"{MEMBER}{initial_job_idx + i}", *job_overrides[i])] for pack in cut]
        returns: list[JobReturn | None] = [None] * len(job_overrides)
        for pack, pack_returns in zip(cut, super().launch(flat, 0)):
            for i, ret in zip(pack, pack_returns):
                returns[i] = ret
        return returns

    def __call__(
        self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, singleton_state: dict
    ) -> JobReturn | list[JobReturn]:
        if not sweep_overrides or not sweep_overrides[0].startswith(MEMBER):
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        Singleton.set_state(singleton_state)
        setup_globals()
        members: list[tuple[int, list[str]]] = []
        for item in sweep_overrides:
            if item.startswith(MEMBER):
                members.append((int(item[len(MEMBER) :]), []))
            else:
                members[-1][1].append(item)
        configs = sweep_configs(self.hydra_context, self.config, [overrides for _, overrides in members])
        return run_pack(self.hydra_context, [(num, cfg) for (num, _), cfg in zip(members, configs)])


@dataclass
class SlurmPopulationConf(SlurmQueueConf):
    """hydra-submitit-launcher's SLURM settings and ``population_size`` (configs/hydra/launcher/slurm.yaml)."""

    _target_: str = "hydra_plugins.kd_launchers.SlurmPopulationLauncher"
    population_size: int = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="submitit_slurm_population", node=SlurmPopulationConf, provider="kd"
)
