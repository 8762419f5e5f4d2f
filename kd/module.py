"""One LightningModule for both jobs: train a teacher (ce, ls) or distil a student from a teacher.

The teacher is frozen: eval mode at all times, no gradients, outside the optimizer and outside
the student's checkpoints (it is rebuilt from its own checkpoint when a run resumes).

On a split whose inputs never change (no augmentation: synthetic data, every validation and test
split held in memory), the teacher runs over each example once and its logits are then looked up
by example index (``TeacherOutputs``).

Nothing in a training step waits for the accelerator (docs/performance.md): the metrics skip their
argument checks, and a non-finite loss is recorded on the device and checked every
``trainer.log_every_n_steps`` steps and before anything is checkpointed (at every step on the CPU,
where a check costs nothing).
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kd import objectives
from kd.data.base import SplitDataModule
from kd.errors import TrainingDiverged

STAGES = ("train", "val", "test")
# The frozen teacher is in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class TeacherOutputs:
    """The frozen teacher's logits on one split of fixed inputs: stored while the teacher runs on
    the first complete pass, then read by example index instead of running the teacher again."""

    def __init__(self, size: int):
        self.size, self.complete = size, False
        self.logits: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    @torch.no_grad()  # not inference_mode: the student's backward keeps the teacher's outputs
    def __call__(self, teacher: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.complete:
            return self.logits[index]
        logits = teacher(x)
        if self.logits is None:
            self.logits = logits.new_empty((self.size, logits.shape[1]))
            self.seen = torch.zeros(self.size, dtype=torch.bool, device=logits.device)
        self.logits[index] = logits
        self.seen[index] = True
        return logits

    def end_of_pass(self) -> None:
        """Called once per epoch (it reads one flag back from the device)."""
        if not self.complete and self.seen is not None:
            self.complete = bool(self.seen.all())


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
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        # Plain values only, so a checkpoint alone can rebuild the network (kd.models.load_checkpoint).
        self.save_hyperparameters({"model": model_config, "num_classes": num_classes,
                                   "input_shape": list(input_shape or ()), "objective": dict(objective)})
        self.net = net
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        self.channels_last = channels_last
        for model in filter(None, (net, teacher)):
            if channels_last:
                model.to(memory_format=torch.channels_last)
            if compile:
                model.compile()  # in place: the state_dict keys, hence checkpoints, stay the same
        params = {k: v for k, v in objective.items() if k not in ("name", "beta", "similarity_source")}
        if objective["name"] in objectives.NEEDS_SIMILARITY:
            params["class_similarity"] = class_similarity
        self.loss_fn = objectives.get(objective["name"], **params)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.test_tag = "last"
        self.teacher_outputs: dict[str, TeacherOutputs] = {}  # by stage, for the data's fixed-input splits
        k = num_classes or net.classifier.out_features
        self.metrics = nn.ModuleDict({  # keys "train_", ...: ModuleDict keys may not shadow nn.Module.train
            f"{stage}_": MetricCollection({
                "acc": MulticlassAccuracy(k, average="micro", validate_args=False),
                "ece": MulticlassCalibrationError(k, n_bins=15, validate_args=False),
                "nll": MeanMetric(nan_strategy="disable"),
                **({"agreement": MeanMetric(nan_strategy="disable")} if teacher is not None else {}),
                **({"loss": MeanMetric(nan_strategy="disable")} if stage == "train" else {}),
            })
            for stage in STAGES
        })
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives a resume
        # The first non-finite loss: (step, epoch), -1 while there is none, and its value.
        self.register_buffer("nonfinite_at", torch.full((2,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("nonfinite_loss", torch.zeros(()), persistent=False)

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode each epoch; the teacher stays in eval."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x):
        return self.net(x)

    def setup(self, stage: str) -> None:
        """A ``TeacherOutputs`` per split the data module says has fixed inputs (kept across fit and test)."""
        data = self.trainer.datamodule
        if self.teacher is None or not isinstance(data, SplitDataModule):
            return
        for split in STAGES:
            if split not in self.teacher_outputs and data.fixed_inputs(split) and split in data.splits:
                self.teacher_outputs[split] = TeacherOutputs(len(data.splits[split]))

    def _step(self, batch, stage: str):
        x, y, index = batch
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        teacher_logits = None
        if stage in self.teacher_outputs:
            teacher_logits = self.teacher_outputs[stage](self.teacher, x, index)
        elif self.teacher is not None:
            with torch.no_grad():  # not inference_mode: the student's backward keeps the teacher's outputs
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
        self._record_nonfinite(loss.detach())
        if loss.device.type == "cpu" or (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self._raise_if_diverged()
        self.metrics["train_"]["loss"].update(loss.detach())
        return loss

    def _record_nonfinite(self, loss: torch.Tensor) -> None:
        """Keep the step, epoch and value of the first non-finite loss, without waiting for the device."""
        first = ~torch.isfinite(loss) & (self.nonfinite_at[0] < 0)
        # From pinned memory: a copy from pageable memory may make the host wait for the device.
        here = torch.tensor([self.global_step, self.current_epoch], pin_memory=loss.is_cuda)
        here = here.to(loss.device, non_blocking=True)
        self.nonfinite_at.copy_(torch.where(first, here, self.nonfinite_at))
        self.nonfinite_loss.copy_(torch.where(first, loss.float(), self.nonfinite_loss))

    def _raise_if_diverged(self) -> None:
        step, epoch = self.nonfinite_at.tolist()
        if step >= 0:
            raise TrainingDiverged(f"loss is {self.nonfinite_loss.item()} at step {step} (epoch {epoch}); "
                                   "lower the learning rate or check the data")

    def on_validation_epoch_start(self):
        """Checkpoints are written after validation or at the end of the epoch: never of a diverged run."""
        self._raise_if_diverged()

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _end_epoch(self, stage: str, suffix: str = "") -> dict:
        """The end of an epoch of ``stage``: the teacher's pass over fixed inputs checked for
        completeness, the epoch metrics logged and reset (and returned)."""
        if stage in self.teacher_outputs:
            self.teacher_outputs[stage].end_of_pass()
        values = {f"{stage}/{name}{suffix}": value for name, value in self.metrics[f"{stage}_"].compute().items()}
        self.metrics[f"{stage}_"].reset()
        self.log_dict(values, sync_dist=True)
        return values

    def on_train_epoch_end(self):
        self._raise_if_diverged()
        self._end_epoch("train")

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self.metrics["val_"].reset()
            return
        acc = self._end_epoch("val")["val/acc"]
        self.val_acc_best.update(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self):
        self._end_epoch("test", suffix=f"_{self.test_tag}")

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
