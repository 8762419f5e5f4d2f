"""Lightning callbacks the run configs add (configs/callbacks)."""

from __future__ import annotations

import lightning as L
import torch

from kd.errors import TrainingDiverged


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
