"""Hydra entry point: ``python -m kd.train`` (or ``kd-train``) with any overrides.

``run(cfg)`` does the work and returns the results record, so drivers and tests can run many
small jobs in one process; ``main`` is the thin command-line wrapper that turns user errors
into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd import config as _resolvers  # noqa: F401  (registers run_name)
from kd import objectives, teachers
from kd.errors import TrainingDiverged, UserError, check_choice, check_range
from kd.logging import build_loggers, finish_loggers
from kd.module import DistillationModule
from kd.objectives import similarity
from kd.predict import predict
from kd.results import hardware, versions, write_json_atomic

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def validate(cfg: DictConfig) -> None:
    """Fail before any work on a config that cannot run; every message is one line."""
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    name = objective.pop("name", None)
    check_choice("objective", name, objectives.NAMES)
    if name in objectives.NEEDS_SIMILARITY:
        check_choice("objective.similarity_source", objective.pop("similarity_source", None), similarity.SOURCES)
        check_range("objective.beta", objective.pop("beta", None), 0, None, low_open=True)
        objective["class_similarity"] = torch.eye(2)  # shape-free stand-in: only the parameters are checked here
    objectives.get(name, **objective)
    check_choice("teacher.kind", cfg.teacher.kind, teachers.KINDS)
    if objectives.needs_teacher(name) and cfg.teacher.kind == "none":
        raise UserError(f"objective={name} distils from a teacher but teacher=none; use teacher=mlp (trained and "
                        "cached on first use), teacher=oracle (synthetic data) or teacher=checkpoint teacher.path=...")


def class_similarity(cfg: DictConfig, teacher, datamodule) -> torch.Tensor | None:
    """The (K, K) class-similarity distribution for kd_sim / kd_pt_sim, from the teacher."""
    if cfg.objective.name not in objectives.NEEDS_SIMILARITY:
        return None
    if cfg.objective.similarity_source == "teacher_weights_cosine":
        return similarity.from_teacher_weights(teacher.classifier.weight, cfg.objective.beta)
    out = predict(teacher, datamodule, "train")
    probs = torch.softmax(out["logits"] / cfg.objective.temperature, dim=1)
    return similarity.from_mean_teacher_probs(probs, out["labels"], datamodule.num_classes)


def run(cfg: DictConfig) -> dict:
    """Train (or distil) as ``cfg`` says; write and return ``results.json`` of the run folder."""
    validate(cfg)
    start = time.time()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    teacher = teachers.resolve(cfg, datamodule)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # training a teacher must not shift the student's init
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes, input_shape=datamodule.input_shape)
    module = DistillationModule(
        net=net,
        objective=OmegaConf.to_container(cfg.objective, resolve=True),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        teacher=teacher,
        class_similarity=class_similarity(cfg, teacher, datamodule),
        model_config=model_cfg,
        num_classes=datamodule.num_classes,
        input_shape=datamodule.input_shape,
    )
    loggers = build_loggers(cfg, out)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    status = "failed"
    record = {"status": status, "config": OmegaConf.to_container(cfg, resolve=True), "versions": versions(),
              "hardware": hardware(), "output_dir": str(out)}
    try:
        last_ckpt = out / "checkpoints" / "last.ckpt"
        trainer.fit(module, datamodule, ckpt_path=str(last_ckpt) if last_ckpt.is_file() else None)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
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
    except TrainingDiverged as err:
        record["error"] = str(err)
        raise
    finally:
        record["seconds"] = round(time.time() - start, 2)
        if trainer.global_rank == 0:
            write_json_atomic(out / "results.json", record)
        finish_loggers(loggers, failed=record["status"] != "completed")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        record = run(cfg)
    except (UserError, TrainingDiverged) as err:
        raise SystemExit(f"error: {err}") from None
    metrics = record["metrics"]
    print(f"[kd] done: test/acc_last={metrics.get('test/acc_last', float('nan')):.4f} "
          f"test/acc_best={metrics.get('test/acc_best', float('nan')):.4f} -> {record['output_dir']}/results.json")


if __name__ == "__main__":
    main()
