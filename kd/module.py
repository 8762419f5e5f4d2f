"""One LightningModule for both jobs: train a teacher (ce, ls) or distil a student from a teacher.

The teacher is frozen: eval mode at all times, no gradients, outside the optimizer and outside
the student's checkpoints (it is rebuilt from its own checkpoint when a run resumes).
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kd import objectives
from kd.errors import TrainingDiverged

STAGES = ("train", "val", "test")
# The frozen teacher is in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        objective: dict,
        optimizer,
        scheduler=None,
        teacher: nn.Module | None = None,
        class_similarity: torch.Tensor | None = None,
        model_config: dict | None = None,
        num_classes: int | None = None,
        input_shape: tuple | None = None,
    ):
        super().__init__()
        # Plain values only, so a checkpoint alone can rebuild the network (kd.models.load_checkpoint).
        self.save_hyperparameters({"model": model_config, "num_classes": num_classes,
                                   "input_shape": list(input_shape or ()), "objective": dict(objective)})
        self.net = net
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        params = {k: v for k, v in objective.items() if k not in ("name", "beta", "similarity_source")}
        if objective["name"] in objectives.NEEDS_SIMILARITY:
            params["class_similarity"] = class_similarity
        self.loss_fn = objectives.get(objective["name"], **params)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.test_tag = "last"
        k = num_classes or net.classifier.out_features
        self.metrics = nn.ModuleDict({  # keys "train_", ...: ModuleDict keys may not shadow nn.Module.train
            f"{stage}_": MetricCollection({
                "acc": MulticlassAccuracy(k, average="micro"),
                "ece": MulticlassCalibrationError(k, n_bins=15),
                "nll": MeanMetric(),
                **({"agreement": MeanMetric()} if teacher is not None else {}),
                **({"loss": MeanMetric()} if stage == "train" else {}),
            })
            for stage in STAGES
        })
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives a resume

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode each epoch; the teacher stays in eval."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x):
        return self.net(x)

    def _step(self, batch, stage: str):
        x, y, _ = batch
        logits = self.net(x)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        metrics = self.metrics[f"{stage}_"]
        probs = logits.detach().float().softmax(1)
        metrics["acc"].update(probs, y)
        metrics["ece"].update(probs, y)
        metrics["nll"].update(nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="none"))
        if teacher_logits is not None:
            metrics["agreement"].update((logits.argmax(1) == teacher_logits.argmax(1)).float())
        return logits, y, teacher_logits

    def training_step(self, batch, batch_idx):
        logits, y, teacher_logits = self._step(batch, "train")
        loss = self.loss_fn(logits, y, teacher_logits)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "lower the learning rate or check the data"
            )
        self.metrics["train_"]["loss"].update(loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _log_stage(self, stage: str, suffix: str = "") -> dict:
        values = {f"{stage}/{name}{suffix}": value for name, value in self.metrics[f"{stage}_"].compute().items()}
        self.metrics[f"{stage}_"].reset()
        self.log_dict(values, sync_dist=True)
        return values

    def on_train_epoch_end(self):
        self._log_stage("train")

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self.metrics["val_"].reset()
            return
        acc = self._log_stage("val")["val/acc"]
        self.val_acc_best.update(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self):
        self._log_stage("test", suffix=f"_{self.test_tag}")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint):
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
