"""Hydra entry point: ``python -m kd.train`` (or ``kd-train``) with any overrides.

``run(cfg)`` does the work and returns the results record, so drivers and tests can run many
small jobs in one process; ``main`` is the thin command-line wrapper that turns user errors
into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
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
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd import config as _resolvers  # noqa: F401  (registers run_name)
from kd import objectives, schema, teachers
from kd.callbacks import resume_checkpoint
from kd.errors import TrainingDiverged, UserError, check_choice, check_range, one_line
from kd.logging import build_loggers, finish_loggers
from kd.module import DistillationModule
from kd.objectives import similarity
from kd.predict import predict
from kd.results import hardware, lock, versions, write_json_atomic

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
# Errors the command line reports in one line: bad input (ours, Hydra's, OmegaConf's) and divergence.
REPORTED = (UserError, TrainingDiverged, HydraException, OmegaConfBaseException)
# How optimizer.lr (tuned for one device's batch, data.batch_size) follows the number of devices.
LR_SCALING = {"none": lambda world: 1.0, "linear": lambda world: float(world), "sqrt": lambda world: world**0.5}


def validate(cfg: DictConfig) -> None:
    """Fail before any work on a config that cannot run; every message is one line."""
    schema.check(cfg)
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    name = objective.pop("name", None)
    check_choice("objective", name, objectives.NAMES)
    if name in objectives.NEEDS_SIMILARITY:
        check_choice("objective.similarity_source", objective.pop("similarity_source", None), similarity.SOURCES)
        check_range("objective.beta", objective.pop("beta", None), 0, None, low_open=True)
        objective["class_similarity"] = torch.eye(2)  # shape-free stand-in: only the parameters are checked here
    objectives.get(name, **objective)
    teachers.check_spec(cfg.teacher)
    check_choice("lr_scaling", cfg.get("lr_scaling", "none"), LR_SCALING)
    for switch in ("channels_last", "compile"):
        check_choice(switch, cfg.get(switch, False), (True, False))
    if cfg.get("threads") is not None:
        check_range("threads", cfg.threads, 1, None)
    if objectives.needs_teacher(name) and cfg.teacher.kind == "none":
        raise UserError(f"objective={name} distils from a teacher but teacher=none; use teacher=mlp (trained and "
                        "cached on first use), teacher=oracle (synthetic data) or teacher=checkpoint teacher.path=...")
    if cfg.teacher.kind == "trained":
        try:
            validate(teachers.teacher_config(cfg))
        except UserError as err:
            raise UserError(f"in the teacher's config (teacher.*): {err}") from None


def class_similarity(cfg: DictConfig, teacher, datamodule) -> torch.Tensor | None:
    """The (K, K) class-similarity distribution for kd_sim / kd_pt_sim, from the teacher."""
    if cfg.objective.name not in objectives.NEEDS_SIMILARITY:
        return None
    if cfg.objective.similarity_source == "teacher_weights_cosine":
        return similarity.from_teacher_weights(teacher.classifier.weight, cfg.objective.beta)
    out = predict(teacher, datamodule, "train")
    probs = torch.softmax(out["logits"] / cfg.objective.temperature, dim=1)
    return similarity.from_mean_teacher_probs(probs, out["labels"], datamodule.num_classes)


def check_ddp_launch(trainer) -> None:
    """Lightning's ``ddp`` starts ranks > 0 by re-running this process's command line with
    ``hydra.run.dir`` pinned to ours: right for one ``python -m kd.train`` run, but in a multirun
    (or a Python driver) the children would start the whole sweep (or driver) again."""
    relaunches = (isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
                  and not trainer.strategy.cluster_environment.creates_processes_externally)
    if relaunches and not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN):
        raise UserError("trainer.strategy=ddp re-runs the command line for each extra device, which only works "
                        "for a single run; in a local multirun or from Python use trainer.strategy=ddp_spawn, on "
                        "SLURM hydra/launcher=slurm (one task per device)")


def progress(trainer, last_ckpt: Path) -> dict:
    """How far a run got: its epoch metrics so far and the checkpoint a relaunch resumes from."""
    resume = resume_checkpoint(last_ckpt, trainer.default_root_dir)
    return {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))},
            "checkpoints": {"last": str(last_ckpt) if last_ckpt.is_file() else None,
                            "resume": str(resume) if resume else None},
            "epochs": trainer.current_epoch, "global_step": trainer.global_step}


def record_invalid(cfg: DictConfig, err: Exception) -> None:
    """A job whose config fails ``validate`` still leaves its ``results.json`` (status failed, the
    one-line error), so ``kd.aggregate`` lists it as failed and why, not as missing."""
    try:
        out = Path(cfg.paths.output_dir)
    except OmegaConfBaseException:
        return  # no folder to write to (the error may be in paths.*)
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        config = OmegaConf.to_container(cfg, resolve=False)
    if rank_zero_only.rank == 0:
        write_json_atomic(out / "results.json", {"status": "failed", "error": f"{type(err).__name__}: {one_line(err)}",
                                                 "config": config, "output_dir": str(out), "versions": versions()})


def run(cfg: DictConfig) -> dict:
    """Train (or distil) as ``cfg`` says; write and return ``results.json`` of the run folder."""
    try:
        validate(cfg)
    except Exception as err:
        record_invalid(cfg, err)
        raise
    start = time.time()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Two processes given the same run take turns (the second resumes, or re-tests a finished run)
    # instead of writing the same files at once; the other ranks of a data-parallel run share it.
    held = lock(out / ".run.lock") if rank_zero_only.rank == 0 else None
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    with torch.device("meta"):  # a dry build (no memory, no random draws): a bad model fails before a teacher trains
        instantiate(cfg.model, num_classes=datamodule.num_classes, input_shape=datamodule.input_shape)
    teacher = teachers.resolve(cfg, datamodule)
    loggers = build_loggers(cfg, out)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # Checkpoints are the configured callbacks' (none for callbacks=none), never Lightning's default one.
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, enable_checkpointing=checkpointing)
    check_ddp_launch(trainer)
    world = trainer.num_nodes * trainer.num_devices  # data.batch_size is per device
    lr = cfg.optimizer.lr * LR_SCALING[cfg.get("lr_scaling", "none")](world)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # training a teacher must not shift the student's init
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes, input_shape=datamodule.input_shape)
    module = DistillationModule(
        net=net,
        objective=OmegaConf.to_container(cfg.objective, resolve=True),
        optimizer=instantiate(cfg.optimizer, lr=lr),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        teacher=teacher,
        class_similarity=class_similarity(cfg, teacher, datamodule),
        model_config=model_cfg,
        num_classes=datamodule.num_classes,
        input_shape=datamodule.input_shape,
        channels_last=cfg.get("channels_last", False),
        compile=cfg.get("compile", False),
    )
    threads = torch.get_num_threads()  # the caller's, restored when the run ends
    torch.set_num_threads(cfg.get("threads") or threads)
    status = "failed"
    record = {"status": status, "config": OmegaConf.to_container(cfg, resolve=True), "versions": versions(),
              "hardware": hardware(), "output_dir": str(out),
              "data_parallel": {"world_size": world, "global_batch": cfg.data.get("batch_size", 0) * world, "lr": lr,
                                # how the ranks met: LightningEnvironment (ours), SLURMEnvironment, ...
                                "environment": type(trainer._accelerator_connector.cluster_environment).__name__}}
    try:
        last_ckpt = out / "checkpoints" / "last.ckpt"
        resume = resume_checkpoint(last_ckpt, trainer.default_root_dir)  # last.ckpt, or SLURM's hpc_ckpt_<n>.ckpt
        trainer.fit(module, datamodule, ckpt_path=str(resume) if resume else None)
        # The final weights, whatever the callbacks' schedule (callbacks.last_checkpoint.every_n_epochs):
        # what a teacher is loaded from, and what the record's checkpoints.last names.
        trainer.save_checkpoint(last_ckpt)
        if trainer.is_global_zero:  # superseded by last.ckpt; on SLURM Lightning would test one of them
            for hpc in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
                hpc.unlink()
        trainer.strategy.barrier("hpc checkpoints removed")
        metrics = progress(trainer, last_ckpt)["metrics"]
        module.test_tag = "last"
        metrics.update(trainer.test(module, datamodule, verbose=False)[0])
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            module.test_tag = "best"
            metrics.update(trainer.test(module, datamodule, ckpt_path=best, verbose=False, weights_only=False)[0])
        record.update(status="completed", metrics=metrics,
                      checkpoints={"last": str(last_ckpt), "best": best or str(last_ckpt)},
                      epochs=trainer.current_epoch, global_step=trainer.global_step)
        return record
    except BaseException as err:  # recorded for kd.aggregate, which lists failed jobs with their error
        record.update(progress(trainer, last_ckpt))
        resume = record["checkpoints"]["resume"] or "the start (no checkpoint yet)"
        message = str(err)
        if isinstance(err, TrainingDiverged):
            message = f"{err}; the last good checkpoint is {resume}"
        elif isinstance(err, SIGTERMException):  # Lightning raises it bare: no message and exit status 0
            message = (f"stopped by SIGTERM at step {trainer.global_step}; "
                       f"run the same command again to resume from {resume}")
        record.update(status="interrupted" if isinstance(err, SystemExit) else "failed",
                      error=f"{type(err).__name__}: {message}")
        if isinstance(err, TrainingDiverged):
            raise TrainingDiverged(message) from None
        if isinstance(err, SIGTERMException):
            raise SIGTERMException(f"error: {message}") from None
        raise
    finally:
        torch.set_num_threads(threads)
        record["seconds"] = round(time.time() - start, 2)
        if trainer.global_rank == 0:
            write_json_atomic(out / "results.json", record)
        finish_loggers(loggers, failed=record["status"] != "completed")
        if held is not None:
            held.close()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> None:
    try:
        record = run(cfg)
    except REPORTED as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # an exception, not an exit: Hydra records the failed job and runs the rest of the sweep
        raise SystemExit(f"error: {one_line(err)}") from None
    metrics = record["metrics"]
    print(f"[kd] done: test/acc_last={metrics.get('test/acc_last', float('nan')):.4f} "
          f"test/acc_best={metrics.get('test/acc_best', float('nan')):.4f} -> {record['output_dir']}/results.json")


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
