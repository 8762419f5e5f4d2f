"""Many runs, in one process or in a few worker processes: what every figure driver uses.

Each job is a list of Hydra overrides of ``configs/train.yaml``; it runs through ``kd.train.run``
into its own folder. A job whose ``results.json`` says completed is skipped, so a killed sweep
picks up where it was; a job that fails is recorded and the others go on. A folder that holds a run
of other settings stops the sweep before any work (``check_reuse``), never stands for the job.

Jobs that can share a population (kd.population: the same architecture, data shapes and recipe;
their own seed, objective, teacher and data values) train as populations, many members in one
Lightning run; ``population=False`` trains every job alone. The work is cut into units, one
population (or one lone job) each, run in ``workers`` processes at once (each imports Lightning
once and runs many units); jobs that share a teacher stay in one unit, so the teachers a unit
needs are trained there, as a population too, once. A worker the OS kills takes only its own
units with it: the others run on in a fresh pool.

``load_job`` rebuilds a finished job (its config, student, teacher and data) for analysis.
"""

from __future__ import annotations

import copy
import functools
import logging
import multiprocessing
import os
import queue
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.managers import BaseManager
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from kd import population as populations
from kd import teachers
from kd.errors import UserError, one_line
from kd.private_api import apply_value_overrides
from kd.results import check_same_run, completed_record
from kd.train import CONFIG_DIR, run

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def override_key(override: str) -> str:
    """The config key an override sets: ``+objective.k=1`` -> ``objective.k``, ``model@teacher.model=x`` ->
    ``teacher.model``."""
    return override.lstrip("+~").split("=", 1)[0].split("@")[-1]


GROUPS = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}  # data, model, objective, ...


def structure(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that choose config files (``group=option``, ``group@package=option``): jobs
    alike in them compose alike, so one of them stands for all in ``check``."""

    def chooses(override: str) -> bool:
        key = override.lstrip("+~").split("=", 1)[0]
        return "@" in key or "/" in key or key in GROUPS

    return tuple(o for o in overrides if chooses(o))


def compose_config(overrides: list[str], output_dir: str | Path | None = None) -> DictConfig:
    """``configs/train.yaml`` with ``overrides``, as ``python -m kd.train`` would build it.

    Hydra composes from the overrides that choose config files (``structure``) and then sets the
    other overrides' values; a sweep's jobs share a few structures, so each is composed once per
    process (composing takes a tenth of a second or more) and Hydra's own value step
    (``kd.private_api.apply_value_overrides``) is applied to a copy of it.
    """
    choices = structure(overrides)
    values = [o for o in overrides if o not in choices]
    if any(override_key(o).startswith("hydra") for o in values):
        cfg = _composed(tuple(overrides))
    else:
        cfg = _composed(choices)
        apply_value_overrides(cfg, values)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """A fresh copy of Hydra's composition of ``overrides``, composed once per process."""
    return copy.deepcopy(_compose_once(overrides))


@functools.lru_cache(maxsize=256)
def _compose_once(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def quiet_lightning() -> None:
    """Sweeps print one progress bar, not Lightning's banner for every run."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*(eval mode|LeafSpec|litlogger).*")


def failed(err: BaseException, out: Path) -> dict:
    """The record of a job that raised ``err`` (its own results.json, if any, says more)."""
    return {"status": "failed", "error": f"{type(err).__name__}: {one_line(err)}", "output_dir": str(out)}


def check(jobs: dict[str, list[str]]) -> dict[tuple, DictConfig]:
    """Compose one job of each ``structure``: an override that cannot apply stops the sweep before any
    work, in one line naming the job, rather than failing every job alike. Returns the configs."""
    found = {}
    for name, overrides in jobs.items():
        shape = structure(overrides)
        if shape not in found:
            try:
                found[shape] = compose_config([*QUIET, *overrides], "/unused")
            except Exception as err:  # Hydra's own errors: an override it cannot apply, an unknown option
                raise UserError(
                    f"job {name}: {one_line(err)} (the extra overrides go to every job of the "
                    "driver; see its --help for what it sweeps itself)"
                ) from None
    return found


def check_reuse(jobs: dict[str, list[str]], outs: dict[str, Path]) -> None:
    """Stop before any work, in one line, where a job's folder holds a run of other settings that it
    would reuse (``kd.results.check_same_run``): a finished run is found by its folder, and its
    folder's name says nothing of the overrides every job of a driver gets."""
    for name, overrides in jobs.items():
        if not (outs[name] / "results.json").is_file():
            continue
        try:
            config = OmegaConf.to_container(compose_config([*QUIET, *overrides], outs[name]), resolve=True)
        except Exception:  # a config that cannot run: its own run fails, with its record
            continue
        try:
            check_same_run(outs[name], config)
        except UserError as err:
            raise UserError(f"job {name}: {err}") from None


def population_of(overrides: list[str], cfg: DictConfig) -> tuple | None:
    """Jobs with equal values train together: the population key of their composed files (``cfg``:
    experiment files that differ only in the objective, as table 1's methods of a pair, pool) and
    their value overrides but the members' own (seed, objective, teacher, the data module's
    POPULATION_KEYS); None: the job trains alone."""
    key = populations.key(cfg)
    if key is None:
        return None
    own = {f"data.{k}" for k in get_object(cfg.data._target_).POPULATION_KEYS} | {"seed"}
    choices = structure(overrides)
    values = [o for o in overrides if o not in choices]
    return key, tuple(
        o
        for o in values
        if override_key(o) not in own and override_key(o).split(".")[0] not in ("objective", "teacher")
    )


def teacher_group(overrides: list[str]) -> tuple:
    """Jobs that differ only in their objective usually share a teacher."""
    return tuple(o for o in overrides if override_key(o).split(".")[0] != "objective")


def units(
    jobs: dict[str, list[str]], configs: dict[tuple, DictConfig], workers: int, population: bool
) -> list[list[str]]:
    """The work as units (lists of job names): each population cut into ``workers`` parts at teacher
    boundaries (so parallel workers train different teachers), and every other job alone; the
    larger units first."""
    pools: dict[tuple, list[str]] = {}
    alone = []
    for name, overrides in jobs.items():
        found = population_of(overrides, configs[structure(overrides)]) if population else None
        (alone.append([name]) if found is None else pools.setdefault(found, []).append(name))
    cut = []
    for names in pools.values():
        by_teacher: dict[tuple, list[str]] = {}
        for name in names:
            by_teacher.setdefault(teacher_group(jobs[name]), []).append(name)
        parts = [[] for _ in range(min(workers, len(by_teacher)))]
        for group in by_teacher.values():
            min(parts, key=len).extend(group)
        cut += parts
    return sorted(cut, key=len, reverse=True) + alone


class Progress(L.Callback):
    """Reports each training epoch of a run (all of its members) as a fraction of its jobs."""

    def __init__(self, report):
        self.report = report

    def on_train_epoch_end(self, trainer, pl_module):
        self.report(pl_module.members / trainer.max_epochs)


class _Reports(BaseManager):
    """The workers' progress, ``(unit, fraction of jobs done)``, to the parent's queue ``_REPORTS``:
    each worker puts through a connection of its own to a server in a thread of the parent (one
    the OS kills mid-message breaks no other's), not a manager process, which would import the
    driver again (seconds of every sweep's start)."""


_REPORTS: queue.Queue = queue.Queue()  # in the parent: the running sweep's (each _run_in_pool makes its own)
_Reports.register("reports", callable=lambda: _REPORTS)
_QUEUE = None  # in a worker: its proxy of the parent's _REPORTS


@functools.cache
def _reports_address():
    """Where this process serves ``_REPORTS``: a server started on first use that lives as long as
    the process (a daemon thread)."""
    server = _Reports().get_server()
    threading.Thread(target=server.serve_forever, daemon=True, name="kd-reports").start()
    return server.address


def gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (its entries, else the
    indices of the devices torch counts); none without CUDA. Counting them does not start CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _start_worker(address, started, devices: list[str]) -> None:
    """A worker's set-up: its own GPU (the next of ``devices`` in turn, counted by ``started``), set
    before anything in it starts CUDA, so that N workers on N GPUs do not all train on cuda:0; its
    connection to the parent's progress queue."""
    global _QUEUE
    if devices:
        with started.get_lock():
            slot, started.value = started.value, started.value + 1
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    quiet_lightning()
    client = _Reports(address=address)
    client.connect()
    _QUEUE = client.reports()


def run_unit(names: list[str], jobs: dict[str, list[str]], outs: dict[str, Path], report=None) -> dict[str, dict]:
    """One unit: its jobs composed, and trained as populations where they can be (alone otherwise);
    a record for every job, never an exception. ``report(fraction)``: progress, in jobs."""
    if report is None and _QUEUE is not None:
        _QUEUE.put((names[0], None))  # started: if this worker dies now, this unit is the suspect
        report = lambda fraction: _QUEUE.put((names[0], fraction))  # noqa: E731
    callbacks = [Progress(report)] if report else []
    records, cfgs = {}, {}
    for name in names:
        try:
            cfgs[name] = compose_config([*QUIET, *jobs[name]], outs[name])
        except Exception as err:  # keep the sweep going; the failure is in the record and the summary
            records[name] = failed(err, outs[name])
    composed = list(cfgs)
    for group in populations.groups([cfgs[name] for name in composed]):
        members = [composed[i] for i in group]
        try:
            found = run([cfgs[n] for n in members] if len(members) > 1 else cfgs[members[0]], callbacks=callbacks)
            records.update(zip(members, found if len(members) > 1 else [found]))
        except Exception as err:
            records.update({name: failed(err, outs[name]) for name in members})
    return records


class _Bar:
    """One progress bar for the sweep: whole jobs done, plus the epochs reported by units in flight."""

    def __init__(self, total: int, initial: int, desc: str):
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="run",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total} runs [{elapsed}<{remaining}{postfix}]",
        )
        self.done, self.partial, self.lock = initial, {}, threading.Lock()

    def advance(self, unit: str, fraction: float, size: int) -> None:
        with self.lock:
            self.partial[unit] = min(self.partial.get(unit, 0.0) + fraction, size * 0.99)
            self._show()

    def finish(self, unit: str, size: int) -> None:
        with self.lock:
            self.partial.pop(unit, None)
            self.done += size
            self.bar.set_postfix_str(unit[-40:])
            self._show()

    def _show(self) -> None:
        self.bar.update(self.done + sum(self.partial.values()) - self.bar.n)


def job_folder(root: str | Path, name: str) -> Path:
    """The run folder of ``run_jobs``' job ``name``: ``<root>/runs/<name>``."""
    return Path(root) / "runs" / name


def run_jobs(
    jobs: dict[str, list[str]], root: str | Path, desc: str = "runs", workers: int = 1, population: bool = True
) -> dict[str, dict]:
    """Run every ``name -> overrides`` job into its ``job_folder``; return their records, in the
    order of ``jobs`` whatever the order they finish in.

    A failed job's record has ``status="failed"`` and ``error``; it never stops the others. An
    override that cannot apply to some job stops everything first, with a one-line UserError.
    """
    quiet_lightning()
    outs = {name: job_folder(root, name) for name in jobs}
    check_reuse(jobs, outs)
    records = {name: completed_record(out) for name, out in outs.items()}
    todo = {name: jobs[name] for name, record in records.items() if record is None}
    plan = units(todo, check(todo), workers, population) if todo else []
    bar = _Bar(len(jobs), len(jobs) - len(todo), desc)
    size = {names[0]: len(names) for names in plan}

    def done(names: list[str], found: dict[str, dict]) -> None:
        for name in names:
            records[name] = found[name]
            if found[name]["status"] != "completed":
                tqdm.write(f"[kd] job {name} failed: {found[name].get('error')}")
        bar.finish(names[0], len(names))

    if workers <= 1:
        for names in plan:
            done(
                names,
                run_unit(
                    names, todo, outs, report=lambda fraction, unit=names[0]: bar.advance(unit, fraction, size[unit])
                ),
            )
    else:
        _run_in_pool(plan, todo, outs, workers, bar, size, done)
    bar.bar.close()
    return records


def _run_in_pool(plan, jobs, outs, workers, bar, size, done) -> None:
    """``plan``'s units in ``workers`` spawned processes. A worker that dies (killed by the OS) breaks
    the pool and every unit in it: the units that were running then are each run again alone, so
    that the one that kills its worker fails by itself, and the rest go on in a fresh pool."""
    global _REPORTS
    # A queue of this sweep's own: an earlier sweep's late reports, or its end marker, must not reach it.
    _REPORTS = reports = queue.Queue()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker, never a fork
    started: set[str] = set()
    synced = threading.Event()

    def advance(unit: str | None, fraction: float | None) -> None:
        if unit is None:
            synced.set()
        elif fraction is None:
            started.add(unit)
        else:
            bar.advance(unit, fraction, size[unit])

    def sync() -> None:
        """Wait until the messages the workers sent before the pool closed are read."""
        synced.clear()
        reports.put((None, None))
        synced.wait(timeout=10)

    address = _reports_address()
    reader = threading.Thread(target=lambda: [advance(*message) for message in iter(reports.get, None)], daemon=True)
    reader.start()
    try:
        pending, suspects, tries = list(plan), [], {}
        while pending or suspects:
            alone = bool(suspects)  # suspects run in a pool of one worker, one after another
            batch = suspects if alone else pending
            broken = _pool(batch, jobs, outs, 1 if alone else workers, done, context, address)
            sync()
            rest = [names for names in batch if names in broken]
            if alone:
                for names in rest:
                    tries[names[0]] = tries.get(names[0], 0) + 1
                    # It broke a pool it had to itself (its start report can be lost with its worker: twice is enough).
                    if names[0] in started or tries[names[0]] >= 2:
                        error = RuntimeError(
                            "its worker process died while it ran alone (killed by the OS, e.g. out of memory)"
                        )
                        done(names, {name: failed(error, outs[name]) for name in names})
                suspects = [names for names in rest if names[0] not in started and tries[names[0]] < 2]
            else:
                suspects = [names for names in rest if names[0] in started]
                pending = [names for names in rest if names[0] not in started]
                if rest:
                    tqdm.write(
                        f"[kd] a worker process died (killed by the OS?): {len(suspects)} job group(s) "
                        "that were running then run again one at a time; the other "
                        f"{sum(map(len, pending))} jobs go on in a fresh pool"
                    )
            started.clear()
    finally:
        reports.put(None)
        reader.join()


def executor(workers: int, context, address) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes that report to ``address``, each on a GPU of its own where there
    are several (``_start_worker``)."""
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(address, context.Value("i", 0), gpus())
    )


def _pool(batch, jobs, outs, workers, done, context, address) -> list[list[str]]:
    """The units of ``batch`` in one pool of ``workers``; returns those a broken pool did not finish."""
    broken = []
    with executor(workers, context, address) as pool:
        futures = {pool.submit(run_unit, names, jobs, outs): names for names in batch}
        try:
            for future in as_completed(futures):
                try:
                    done(futures[future], future.result())
                except BrokenProcessPool:
                    broken.append(futures[future])
        except BaseException:  # Ctrl-C: the units not started never start (a re-run picks them up)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return broken


def setup_teacher(cfg: DictConfig):
    """``(teacher, datamodule)`` of a run config: its data set up, its teacher found in the cache (or
    trained there on first use), as the run itself has them."""
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return teachers.resolve(cfg, datamodule, train=run), datamodule


def load_teacher(overrides: list[str], output_dir):
    """``(cfg, teacher, datamodule)`` of a run config (``setup_teacher``); ``output_dir`` is the run's
    folder, which the config's paths need."""
    cfg = compose_config([*QUIET, *overrides], output_dir)
    return (cfg, *setup_teacher(cfg))


def load_job(root, name: str, overrides: list[str]):
    """``(cfg, student, teacher, datamodule)`` of a finished ``run_jobs`` job, rebuilt from its overrides.

    The config is composed again (not read back resolved from results.json, whose paths point into
    the student's folder), so a trained teacher is found in its cache, never retrained.
    """
    out = job_folder(root, name)
    cfg, teacher, datamodule = load_teacher(overrides, out)
    student = teachers.load_checkpoint(
        teachers.checkpoint_in(out, "last"), datamodule.num_classes, datamodule.input_shape
    )
    return cfg, student, teacher, datamodule
