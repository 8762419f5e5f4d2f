"""Hydra entry point: ``python -m kd.train`` (or ``kd-train``) with any overrides.

``run(cfg)`` does the work and returns the results record, so drivers and tests can run many
small jobs in one process; ``main`` is the thin command-line wrapper that turns user errors
into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd import config as _resolvers  # noqa: F401  (registers run_name)
from kd import objectives, population, schema, teachers
from kd.callbacks import defer_requeue_signal, resume_checkpoint
from kd.errors import TrainingDiverged, UserError, check_bool, check_choice, check_range, one_line
from kd.logging import build_loggers, finish_loggers, summarise
from kd.module import DistillationModule
from kd.predict import predict
from kd.private_api import cluster_environment, relaunches_script
from kd.results import check_same_run, completed_record, hardware, lock, versions, write_atomic, write_json_atomic

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
# Errors the command line reports in one line: bad input (ours, Hydra's, OmegaConf's) and divergence.
REPORTED = (UserError, TrainingDiverged, HydraException, OmegaConfBaseException)
# How optimizer.lr (tuned for a batch of data.batch_size) follows the number of devices (global_batch false).
LR_SCALING = {"none": lambda world: 1.0, "linear": lambda world: float(world), "sqrt": lambda world: world**0.5}


def device_batch(plain: dict) -> int:
    """One device's batch: ``data.batch_size``, or with ``global_batch`` that global batch split evenly
    over the devices of every node, so that a recipe trains at its batch on any number of devices."""
    batch = plain["data"]["batch_size"]
    if not plain.get("global_batch", False):
        return batch
    devices = plain["trainer"]["devices"]
    count = len(devices) if isinstance(devices, list) else devices
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(
            f"global_batch=true splits data.batch_size over the devices, but trainer.devices={devices!r} "
            "does not count them; give their number"
        )
    world = count * plain["trainer"]["num_nodes"]
    if batch % world:
        raise UserError(
            f"data.batch_size={batch} (global_batch=true) does not split evenly over {world} devices "
            f"(trainer.devices x trainer.num_nodes); give a multiple of {world}"
        )
    return batch // world


def validate(cfg: DictConfig, teachers_checked: dict | None = None) -> tuple[dict, DictConfig | None]:
    """Fail before any work on a config that cannot run; every message is one line. Returns the
    config resolved (plain data) and the run config of its trained teacher
    (``teachers.teacher_config``), if it has one: checked too, once in ``teachers_checked``, which
    the members of a population share."""
    plain = schema.check(cfg)
    teachers.check_spec(cfg.teacher)
    check_choice("lr_scaling", cfg.get("lr_scaling", "none"), LR_SCALING)
    check_bool("global_batch", cfg.get("global_batch", False))
    if cfg.get("global_batch", False) and cfg.get("lr_scaling", "none") != "none":
        raise UserError(
            f"lr_scaling={cfg.lr_scaling} follows a global batch that grows with the devices, but with "
            "global_batch=true it is data.batch_size on any number of them; set lr_scaling=none (and "
            "optimizer.lr for that batch) or global_batch=false"
        )
    device_batch(plain)
    for switch in ("channels_last", "compile"):
        check_choice(switch, cfg.get(switch, False), (True, False))
    if cfg.get("threads") is not None:
        check_range("threads", cfg.threads, 1, None)
    name = plain["objective"]["name"]
    if objectives.needs_teacher(name) and cfg.teacher.kind == "none":
        raise UserError(
            f"objective={name} distils from a teacher but teacher=none; use teacher=mlp (trained and "
            "cached on first use), teacher=oracle (synthetic data) or teacher=checkpoint teacher.path=..."
        )
    if cfg.teacher.kind != "trained":
        return plain, None
    # What the teacher's config reads of the student's: all but its objective, names and folders (what
    # follows the student's folder follows the teacher's own there). The members of a population that
    # differ in nothing else share their teacher's config, built once.
    reads = {k: v for k, v in plain.items() if k not in ("objective", "task_name", "tags", "paths")}
    same = json.dumps([reads, plain["paths"]["teacher_dir"]], sort_keys=True, default=str).replace(
        json.dumps(plain["paths"]["output_dir"])[1:-1], "${paths.output_dir}"
    )
    checked = {} if teachers_checked is None else teachers_checked
    if same not in checked:
        tcfg = teachers.teacher_config(cfg)
        try:
            validate(tcfg)
        except UserError as err:
            raise UserError(f"in the teacher's config (teacher.*): {err}") from None
        checked[same] = tcfg
    return plain, checked[same]


def class_similarity(cfg: DictConfig, teacher, datamodule) -> torch.Tensor | None:
    """The (K, K) class-similarity distribution the objective's target needs, from the teacher; None
    for a target that needs none."""
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    return objectives.class_similarity(objective, teacher, lambda: predict(teacher, datamodule, "train"))


def check_ddp_launch(trainer) -> None:
    """The ranks must run ``kd.train`` itself. Lightning's ``ddp`` starts ranks > 0 by re-running
    this process's command line with ``hydra.run.dir`` pinned to ours: right for one ``python -m
    kd.train`` run, but in a multirun (or a Python driver) the children would start the whole sweep
    (or driver) again. ``ddp_spawn`` (and any launcher that hands the fit to child processes) gives
    back only the weights: the epochs' metrics, the loops' state and the children's errors stay
    behind, so the run's record and its last.ckpt would be wrong."""
    launcher = trainer.strategy.launcher
    instead = (
        "run each data-parallel job as its own `python -m kd.train trainer=ddp ...`, or on SLURM "
        "with hydra/launcher=slurm (one task per device)"
    )
    if launcher is not None and not relaunches_script(launcher):
        raise UserError(
            f"trainer.strategy=ddp_spawn (or ddp_fork, ddp_notebook) runs the fit in child processes "
            f"whose metrics, checkpoint and errors do not come back; {instead}"
        )
    relaunches = relaunches_script(launcher) and not trainer.strategy.cluster_environment.creates_processes_externally
    if relaunches and not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN):
        raise UserError(
            f"trainer.strategy=ddp re-runs the command line for each extra device, which only works "
            f"for a single run; {instead}"
        )


def run(cfg: DictConfig | list[DictConfig], callbacks=()) -> dict | list[dict]:
    """Train (or distil) as ``cfg`` says; write and return ``results.json`` of the run folder.

    A list of configs that share a population key (kd.population) trains as one population, in one
    Lightning run: each member writes the results.json and checkpoints its own run would write, and
    their records come back in order. ``callbacks``: Lightning callbacks for this run only (not for
    the teachers it trains), beside the configured ones.
    """
    records = _run([cfg] if isinstance(cfg, DictConfig) else list(cfg), list(callbacks))
    return records[0] if isinstance(cfg, DictConfig) else records


def _prepare(cfg: DictConfig, plain: dict, tcfg: DictConfig | None, datamodules: dict, loaded: dict):
    """A run's data (shared with the members whose data configs agree) and its frozen teacher (shared
    too: ``loaded``); the model is built once on the meta device, so a bad one fails before a
    teacher trains."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    key = json.dumps(plain["data"], sort_keys=True, default=str)
    if key not in datamodules:
        datamodules[key] = instantiate(cfg.data, batch_size=device_batch(plain))
        datamodules[key].setup()
    datamodule = datamodules[key]
    with torch.device("meta"):  # a dry build: no memory, no random draws
        instantiate(cfg.model, num_classes=datamodule.num_classes, input_shape=datamodule.input_shape)
    return datamodule, teachers.resolve(cfg, datamodule, train=run, tcfg=tcfg, loaded=loaded)


def _member_checkpoints(
    module: DistillationModule, g: int, last: dict, cfg: DictConfig, trainer, written: Path
) -> dict:
    """Member ``g``'s last and best-epoch checkpoints, as its own run would write them (the network's
    weights and what rebuilds it); ``written``: the population's own last checkpoint (resuming
    happens from it), which a population of one keeps as its member's."""
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    best = module.best_state is not None
    states = {"last": last, "best": module.net.member(g, module.best_state) if best else last}
    paths = {
        "last": folder / "last.ckpt",
        "best": folder / (f"epoch{int(module.best_epoch[g]):03d}.ckpt" if best else "last.ckpt"),
    }
    objective = module.hparams["objective"]
    hparams = {**module.hparams, "objective": objective[g] if isinstance(objective, list) else objective}
    for which, state in states.items():
        if not trainer.is_global_zero or paths[which] == written or (which == "best" and not best):
            continue
        checkpoint = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "pytorch-lightning_version": L.__version__,
            "hyper_parameters": hparams,
            "state_dict": {f"net.{k}": v for k, v in state.items()},
        }
        write_atomic(paths[which], lambda tmp, c=checkpoint: torch.save(c, tmp))
    return {which: str(path) for which, path in paths.items()}


def record_invalid(cfg: DictConfig, err: Exception) -> dict | None:
    """A job whose config fails ``validate`` still leaves its ``results.json`` (status failed, the
    one-line error), so ``kd.aggregate`` lists it as failed and why, not as missing."""
    try:
        out = Path(cfg.paths.output_dir)
    except OmegaConfBaseException:
        return None  # no folder to write to (the error may be in paths.*)
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        config = OmegaConf.to_container(cfg, resolve=False)
    record = {
        "status": "failed",
        "error": f"{type(err).__name__}: {one_line(err)}",
        "config": config,
        "output_dir": str(out),
        "versions": versions(),
    }
    if rank_zero_only.rank == 0:
        write_json_atomic(out / "results.json", record)
    return record


def _run(cfgs: list[DictConfig], extra_callbacks: list) -> list[dict]:
    invalid, plains, tcfgs, checked = {}, [], [], {}
    for g, cfg in enumerate(cfgs):
        try:
            plain, tcfg = validate(cfg, checked)
            plains.append(plain)
            tcfgs.append(tcfg)
        except Exception as err:
            invalid[g] = record_invalid(cfg, err)
            if len(cfgs) == 1:
                raise
    if invalid:  # a population trains without the members that cannot run (each has its record)
        valid = iter(
            _run([cfg for g, cfg in enumerate(cfgs) if g not in invalid], extra_callbacks)
            if len(invalid) < len(cfgs)
            else []
        )
        return [invalid[g] if g in invalid else next(valid) for g in range(len(cfgs))]
    outs = [Path(cfg.paths.output_dir) for cfg in cfgs]
    for out, plain in zip(outs, plains):  # never report or resume a run made with other settings
        check_same_run(out, plain)
    done = [completed_record(out) for out in outs]
    if all(record is not None and "population" in record for record in done):
        return done  # trained with others: re-testing them needs that population run
    population.check(cfgs)
    start = time.time()
    folder = population.folder(outs)  # where the population's own checkpoints go (a single run's: its folder)
    for out in {*outs, folder}:
        out.mkdir(parents=True, exist_ok=True)
    # Two processes given the same run take turns (the second resumes, or re-tests a finished run)
    # instead of writing the same files at once; the other ranks of a data-parallel run share it.
    held = [lock(out / ".run.lock") for out in sorted(outs)] if rank_zero_only.rank == 0 else []
    try:
        trainer, module, datamodule = _build(cfgs, plains, tcfgs, folder, extra_callbacks)
        records = _new_records(cfgs, plains, outs, folder, trainer)
        last_ckpt, finished = folder / "checkpoints" / "last.ckpt", False
        threads = torch.get_num_threads()  # the caller's, restored when the run ends
        torch.set_num_threads(cfgs[0].get("threads") or threads)
    except BaseException:  # a run that cannot start leaves its folders to the next one
        for file in held:
            file.close()
        raise
    try:
        metrics, checkpoints = _fit_and_test(trainer, module, datamodule, cfgs, last_ckpt)
        for g, record in enumerate(records):
            record.update(metrics=metrics[g], epochs=trainer.current_epoch, global_step=trainer.global_step)
            reason = module.diverged(g)
            if reason:  # a member of a population that went on without it
                record.update(error=f"TrainingDiverged: {reason}")
            else:
                record.update(status="completed", checkpoints=checkpoints[g])
        if trainer.global_rank == 0:
            for member, record in zip(module.member_loggers, records):
                summarise(member, {k: v for k, v in record["metrics"].items() if k.startswith("test/")})
        finished = True
        return records
    except BaseException as err:  # recorded for kd.aggregate, which lists failed jobs with their error
        found = resume_checkpoint(last_ckpt, trainer.default_root_dir)
        resume = str(found) if found else "the start (no checkpoint yet)"
        message = str(err)
        if isinstance(err, TrainingDiverged):
            message = f"{err}; the last good checkpoint is {resume}"
        elif isinstance(err, SIGTERMException):  # Lightning raises it bare: no message and exit status 0
            message = (
                f"stopped by SIGTERM at step {trainer.global_step}; run the same command again to resume from {resume}"
            )
        for g, record in enumerate(records):
            record.update(
                metrics=module.member_metrics(g),
                epochs=trainer.current_epoch,
                global_step=trainer.global_step,
                checkpoints={
                    "last": str(last_ckpt) if last_ckpt.is_file() else None,
                    "resume": str(found) if found else None,
                },
                status="interrupted" if isinstance(err, SystemExit) else "failed",
                error=f"{type(err).__name__}: {message}",
            )
        if isinstance(err, TrainingDiverged):
            raise TrainingDiverged(message) from None
        if isinstance(err, SIGTERMException):
            raise SIGTERMException(f"error: {message}") from None
        raise
    finally:
        torch.set_num_threads(threads)
        seconds = round(time.time() - start, 2)
        for record in records:
            record["seconds"] = round(seconds / len(records), 2)  # a member's share: sums stay wall time
            if "population" in record:
                record["population"]["seconds"] = seconds
            if trainer.global_rank == 0:
                write_json_atomic(Path(record["output_dir"]) / "results.json", record)
        for member, record in zip(module.member_loggers, records):
            finish_loggers(member, failed=record["status"] != "completed")
        for file in held:
            file.close()
        if finished and folder not in outs:  # nothing left to resume
            shutil.rmtree(folder, ignore_errors=True)


def scaled_lr(cfg: DictConfig, trainer) -> float:
    """``optimizer.lr`` scaled by ``lr_scaling`` to the trainer's devices x nodes."""
    return cfg.optimizer.lr * LR_SCALING[cfg.get("lr_scaling", "none")](trainer.num_nodes * trainer.num_devices)


def _build(cfgs: list[DictConfig], plains: list[dict], tcfgs: list, folder: Path, extra_callbacks: list):
    """The members' data, teachers and networks as one Lightning module (holding each member's
    loggers: a single run's are the trainer's, a population's members log through the module) and
    data module, and the trainer and callbacks of the population's config (a single run's own)."""
    if len(cfgs) > 1:  # the teachers the members need, trained as populations before any is loaded
        teachers.train_missing([t for t in tcfgs if t is not None], train=run)
    datamodules, loaded = {}, {}
    members = [_prepare(*found, datamodules, loaded) for found in zip(cfgs, plains, tcfgs)]
    pcfg = population.config(cfgs[0], folder)  # the trainer's and callbacks' config
    loggers = [build_loggers(cfg, Path(cfg.paths.output_dir), several=len(cfgs) > 1) for cfg in cfgs]
    callbacks = [instantiate(c) for c in (pcfg.get("callbacks") or {}).values() if c is not None]
    # Checkpoints are the configured callbacks' (none for callbacks=none), never Lightning's default one.
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = instantiate(
        pcfg.trainer,
        logger=loggers[0] if len(cfgs) == 1 and loggers[0] else False,
        callbacks=[*callbacks, *extra_callbacks],
        enable_checkpointing=checkpointing,
    )
    check_ddp_launch(trainer)
    shape = {"num_classes": members[0][0].num_classes, "input_shape": members[0][0].input_shape}
    nets = []
    for cfg in cfgs:
        # Training a teacher must not shift the student's init.
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        nets.append(instantiate(cfg.model, **shape))
    module = DistillationModule(
        net=population.network(nets, trainer.strategy.root_device),
        objective=[OmegaConf.to_container(cfg.objective, resolve=True) for cfg in cfgs],
        optimizer=instantiate(pcfg.optimizer, lr=scaled_lr(pcfg, trainer)),
        scheduler=instantiate(pcfg.scheduler) if pcfg.get("scheduler") else None,
        teacher=[teacher for _, teacher in members],
        class_similarity=[class_similarity(cfg, t, dm) for cfg, (dm, t) in zip(cfgs, members)],
        model_config=OmegaConf.to_container(pcfg.model, resolve=True),
        channels_last=pcfg.get("channels_last", False),
        compile=pcfg.get("compile", False),
        **shape,
    )
    module.member_loggers = loggers
    return trainer, module, population.data([dm for dm, _ in members])


def _new_records(cfgs: list[DictConfig], plains: list[dict], outs: list[Path], folder: Path, trainer) -> list[dict]:
    """Each member's record before training (status failed until it completes)."""
    world, batch = trainer.num_nodes * trainer.num_devices, device_batch(plains[0])
    common = {
        "status": "failed",
        "versions": versions(),
        "hardware": hardware(),
        "data_parallel": {
            "world_size": world,
            "global_batch": batch * world,
            "device_batch": batch,
            "lr": scaled_lr(cfgs[0], trainer),
            # how the ranks met: LightningEnvironment (ours), SLURMEnvironment, ...
            "environment": type(cluster_environment(trainer)).__name__,
        },
    }
    records = [{**common, "config": plain, "output_dir": str(out)} for plain, out in zip(plains, outs)]
    if len(records) > 1:
        for g, record in enumerate(records):
            record["population"] = {"members": len(records), "member": g, "folder": str(folder)}
    return records


def _fit_and_test(trainer, module: DistillationModule, datamodule, cfgs: list[DictConfig], last_ckpt: Path):
    """Train (resuming from the population's last checkpoint, if any), test the last and each
    member's best epoch, and write each member's checkpoints; their metrics and checkpoints."""
    resume = resume_checkpoint(last_ckpt, trainer.default_root_dir)  # last.ckpt, or SLURM's hpc_ckpt_<n>.ckpt
    trainer.fit(module, datamodule, ckpt_path=str(resume) if resume else None)
    # The final weights, whatever the callbacks' schedule (callbacks.last_checkpoint.every_s):
    # what a population resumes from, and a single run's checkpoints.last (what a teacher is loaded from).
    trainer.save_checkpoint(last_ckpt)
    if trainer.is_global_zero:  # superseded by last.ckpt; on SLURM Lightning would test one of them
        for hpc in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
            hpc.unlink()
    trainer.strategy.barrier("hpc checkpoints removed")
    module.test_tag = "last"
    trainer.test(module, datamodule, verbose=False)
    metrics = [module.member_metrics(g) for g in range(len(cfgs))]
    last = module.net.stacked_state()
    lasts = [module.net.member(g, last) for g in range(len(cfgs))]
    module.use_best()
    module.test_tag = "best"
    trainer.test(module, datamodule, verbose=False)
    checkpoints = [_member_checkpoints(module, g, lasts[g], cfg, trainer, last_ckpt) for g, cfg in enumerate(cfgs)]
    for g, values in enumerate(metrics):
        values.update(
            {k: v for k, v in module.member_metrics(g).items() if k.startswith("test/") and k.endswith("_best")}
        )
    return metrics, checkpoints


def optimized_value(record: dict, metric: str) -> float:
    """The value of ``metric`` in a finished run's record: what a sweeper optimises (``optimized_metric``)."""
    if metric not in record["metrics"]:
        raise UserError(
            f"optimized_metric={metric!r} is not a metric of this run; choose one of: "
            f"{', '.join(sorted(record['metrics']))}"
        )
    return float(record["metrics"][metric])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    """One run; returns the value of ``optimized_metric`` (when set) to the sweeper (hparams_search)."""
    defer_requeue_signal()  # here, not in main: a SLURM job of a sweep calls this function only
    try:
        record = run(cfg)
        value = optimized_value(record, cfg.optimized_metric) if cfg.get("optimized_metric") else None
    except REPORTED as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # an exception, not an exit: Hydra records the failed job and runs the rest of the sweep
        raise SystemExit(f"error: {one_line(err)}") from None
    metrics = record["metrics"]
    print(
        f"[kd] done: test/acc_last={metrics.get('test/acc_last', float('nan')):.4f} "
        f"test/acc_best={metrics.get('test/acc_best', float('nan')):.4f} -> {record['output_dir']}/results.json"
    )
    return value


def main() -> None:
    """``python -m kd.train`` and ``kd-train``. Hydra's own errors (an unknown key or option, an
    override it cannot parse) end as ours do: one line on stderr and exit status 1, not Hydra's
    report; HYDRA_FULL_ERROR=1 shows everything in full."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return _main()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them
    try:
        _main()
    except REPORTED as err:
        raise SystemExit(f"error: {one_line(err)}") from None
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


if __name__ == "__main__":
    main()
