"""kd/private_api.py: each private Hydra or Lightning name kd uses does what kd relies on, so an
upgrade that renames or changes one fails here, by name (kd.runner's use of the Hydra step is also
checked end to end by tests/test_configs.py)."""

import inspect

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import OmegaConf

from kd.private_api import (
    apply_value_overrides,
    cluster_environment,
    relaunches_script,
    save_checkpoint_now,
    slurm_requeue_handler,
    wandb_run_started,
)
from kd.train import CONFIG_DIR


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    "values",
    [
        ["trainer.max_epochs=7", "data.delta=0.5", "model.hidden=[8,8]"],
        ["+trainer.limit_val_batches=0", "++trainer.max_epochs=2", "++trainer.new_key=1", "~callbacks.resume_state"],
        ["trainer.no_such_key=1"],
        ["+trainer.max_epochs=2"],
        ["~trainer.no_such_key"],
    ],
    ids=["set", "add-force-delete", "unknown-key", "add-existing", "delete-missing"],
)
def test_value_overrides_are_set_as_hydra_composes_them(values):
    def outcome(build):
        try:
            return OmegaConf.to_container(build())
        except Exception as err:  # noqa: BLE001  (the same error either way)
            return type(err), str(err)

    def applied():
        cfg = composed(["objective=ce"])
        apply_value_overrides(cfg, values)
        return cfg

    assert outcome(applied) == outcome(lambda: composed(["objective=ce", *values]))


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_the_cluster_environment_is_found_whatever_the_strategy(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert type(cluster_environment(trainer(devices=1))) is LightningEnvironment
    ddp = trainer(devices=2, strategy="ddp")
    assert cluster_environment(ddp) is ddp.strategy.cluster_environment
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    one = trainer(devices=1)
    assert isinstance(cluster_environment(one), SLURMEnvironment) and cluster_environment(one).auto_requeue


def test_only_ddp_relaunches_the_command_line():
    assert relaunches_script(trainer(devices=2, strategy="ddp").strategy.launcher)
    assert not relaunches_script(trainer(devices=2, strategy="ddp_spawn").strategy.launcher)
    assert not relaunches_script(trainer(devices=1).strategy.launcher)


def test_the_slurm_requeue_handler_is_the_trainers_own():
    """The trainer's own, called as ``signal.signal`` calls a handler: ``(signum, frame)``."""
    one = trainer(devices=1)
    handler = slurm_requeue_handler(one)
    assert handler.__self__.trainer is one and len(inspect.signature(handler).parameters) == 2


def test_a_checkpoint_is_written_now_with_its_bookkeeping_once_per_step(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="now", monitor=None, save_top_k=1)
    written = tmp_path / "now.ckpt"

    class SaveAtFirstStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                save_checkpoint_now(checkpoint, trainer)
                assert written.is_file() and checkpoint.best_model_path == str(written)
                written.unlink()
                save_checkpoint_now(checkpoint, trainer)  # this step is saved already
                assert not written.exists()

    fit = trainer(max_steps=1, callbacks=[checkpoint, SaveAtFirstStep()], limit_val_batches=0)
    fit.fit(BoringModel())
    assert fit.global_step == 1 and not written.exists()  # the checkpoint's own end-of-fit save skipped it too


def test_a_wandb_run_counts_as_started_once_its_experiment_is_made(tmp_path):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), mode="disabled")
    assert not wandb_run_started(logger)
    logger.experiment.finish()
    assert wandb_run_started(logger)
