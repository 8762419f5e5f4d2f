"""Lightning callbacks the run configs add (configs/callbacks)."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kd.errors import TrainingDiverged


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, what a relaunched run resumes from: rewritten at the end of an epoch
    once ``every_s`` seconds have passed since the last write, so a killed run loses at most about
    that much work, and a run of short epochs does not spend its time writing checkpoints
    (kd.train writes the final one when training ends). ``every_s=0``: after every epoch.

    Lightning's ``train_time_interval`` would save mid-epoch, where our resume is not exact."""

    def __init__(self, dirpath: str, every_s: float = 0.0):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
        self.every_s = every_s
        self._written = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._written = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if time.monotonic() - self._written >= self.every_s:
            super().on_train_epoch_end(trainer, pl_module)
            self._written = time.monotonic()


class ResumeState(L.Callback):
    """What a checkpoint needs beyond Lightning's own state for a resumed run to end exactly where an
    uninterrupted one would, and a guard that no checkpoint holds non-finite weights.

    Lightning restores weights, optimizer, scheduler, loop counters and callback states; this adds
    torch's random state (dropout, augmentation; the batch order is seeded per epoch by the data,
    and nothing draws from numpy's or Python's generators while training) and the epoch metrics
    logged so far, so a run resumed after its last epoch still reports them.
    """

    KEY = "kd_resume_state"

    def __init__(self):
        self._restored: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Refuse to write non-finite weights (the last good checkpoint stays the one to resume from);
        else add the random state and the epoch metrics."""
        for name, value in checkpoint["state_dict"].items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise TrainingDiverged(
                    f"weights {name} are not finite at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                    "they were not saved; lower the learning rate")
        checkpoint[self.KEY] = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))},
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._restored = checkpoint.get(self.KEY)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Lightning clears the logged metrics after restoring callbacks, so both come back here."""
        if self._restored is None:
            return
        torch.set_rng_state(self._restored["torch_rng"])
        if self._restored["cuda_rng"] and len(self._restored["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(self._restored["cuda_rng"])
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self._restored["metrics"].items()})
        self._restored = None
