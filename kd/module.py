"""One LightningModule for every job: train a teacher (ce, ls) or distil a student, as one run or
as a population of G runs of one architecture trained at once (kd.population).

Everything here works on a leading member axis: a batch is (G, B, ...), and the loss, the metrics,
the divergence check and the best epoch are kept per member. A single run is a population of one:
its network is a ``kd.population.Loop`` of one, whose checkpoints name the weights as the plain
network does, so they load as any network's; a population's is ``kd.population.network``'s.

The teacher is frozen: eval mode at all times, no gradients, outside the optimizer and outside
the student's checkpoints (it is rebuilt from its own checkpoint when a run resumes). Each member
has its own teacher, or none; members may share one.

On a split whose inputs never change (no augmentation: synthetic data, every validation and test
split held in memory), the teachers run over each example once and their logits are then looked
up by example index (``TeacherOutputs``).

Nothing in a training step waits for the accelerator (docs/performance.md): the metrics are
updated on the device, and a non-finite loss is recorded on the device and checked every
``trainer.log_every_n_steps`` steps and before anything is checkpointed (at every step on the CPU,
where a check costs nothing). A member whose loss is no longer finite stops learning (its
gradients are zeroed once the check has seen it) while the others go on; the run stops when every
member has.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import lightning as L
import torch
from torch import nn

from kd import objectives, population
from kd.data.base import SplitDataModule
from kd.errors import TrainingDiverged
from kd.metrics import MemberMetrics

STAGES = ("train", "val", "test")
# The frozen teacher is in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class TeacherOutputs:
    """The frozen teachers' logits on one split of fixed inputs, for the P members that have a
    teacher: stored while the teachers run on the first complete pass, then read by example index
    instead of running the teachers again. Under mixed precision the teachers run in fp32 for this
    pass (``_teacher_logits``): once per example costs little, and a soft target at tau 4 from
    bf16-rounded logits would otherwise stay rounded for the whole run."""

    def __init__(self, size: int):
        self.size, self.complete = size, False
        self.logits: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    @torch.no_grad()  # not inference_mode: the student's backward keeps the teacher's outputs
    def __call__(self, run_teachers, index: torch.Tensor) -> torch.Tensor:
        """``run_teachers()``: the (P, B, K) logits of this batch; ``index``: its (P, B) example indices."""
        if self.complete:
            return self.logits[torch.arange(len(index), device=index.device)[:, None], index]
        logits = run_teachers()
        if self.logits is None:
            self.logits = logits.new_empty((len(index), self.size, logits.shape[-1]))
            self.seen = torch.zeros(len(index), self.size, dtype=torch.bool, device=logits.device)
        rows = torch.arange(len(index), device=index.device)[:, None]
        self.logits[rows, index] = logits
        self.seen[rows, index] = True
        return logits

    def end_of_pass(self) -> None:
        """Called once per epoch (it reads one flag back from the device)."""
        if not self.complete and self.seen is not None:
            self.complete = bool(self.seen.all())


class LossGroup(nn.Module):
    """The members that share one objective, and its loss. A module, so that the member indices and
    the loss's tensors (KD-sim's class similarities) live on the model's device: moved with it once,
    not copied to the device at every step."""

    def __init__(self, members: list[int], loss: objectives.KDLoss):
        super().__init__()
        self.register_buffer("members", torch.tensor(members), persistent=False)
        self.loss, self.needs_teacher = loss, loss.needs_teacher


def _on_host(tensors: dict | None) -> dict | None:
    """For a checkpoint: tensors on the host load on any machine."""
    return None if tensors is None else {k: v.cpu() for k, v in tensors.items()}


def _loss_params(objective: dict) -> dict:
    """An objective config's parameters (``kd.objectives.get``): all but its name."""
    return {k: v for k, v in objective.items() if k != "name"}


def _as_members(value, members: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * members


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        objective: dict | list[dict],
        optimizer,
        scheduler=None,
        teacher: nn.Module | None | list = None,
        class_similarity: torch.Tensor | None | list = None,
        model_config: dict | None = None,
        num_classes: int | None = None,
        input_shape: tuple | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        """``net``: a network, or ``kd.population.Members`` of G; ``objective``: one objective config,
        or one per member; ``teacher`` and ``class_similarity``: one, or one per member."""
        super().__init__()
        objective_list = [dict(o) for o in _as_members(objective, 1)]
        self.members = len(objective_list)
        # Plain values only, so a checkpoint alone can rebuild the network (kd.teachers.load_checkpoint).
        self.save_hyperparameters(
            {
                "model": model_config,
                "num_classes": num_classes,
                "input_shape": list(input_shape or ()),
                "objective": objective_list if self.members > 1 else objective_list[0],
            }
        )
        self.net = net if isinstance(net, population.Members) else population.Loop([net])
        member_teachers = _as_members(teacher, self.members)
        unique = list({id(t): t for t in member_teachers if t is not None}.values())
        self.teachers = nn.ModuleList(unique)
        for t in unique:
            t.requires_grad_(False).eval()
        # The members that have a teacher, and which of ``teachers`` is theirs.
        self.taught = [g for g, t in enumerate(member_teachers) if t is not None]
        self.teacher_of = [next(i for i, u in enumerate(unique) if u is member_teachers[g]) for g in self.taught]
        self.register_buffer("taught_index", torch.tensor(self.taught, dtype=torch.long), persistent=False)
        self.channels_last = channels_last
        for model in (net, *unique):
            if channels_last and not isinstance(model, population.Stack):  # 5-D stacked weights have no such layout
                model.to(memory_format=torch.channels_last)
            if compile:
                model.compile()  # in place: the state_dict keys, hence checkpoints, stay the same
        # Each member's class similarity, where its objective's target needs one.
        similarities = [
            similarity if objectives.lookup(o["name"]).needs_similarity else None
            for similarity, o in zip(_as_members(class_similarity, self.members), objective_list)
        ]
        self.loss_groups = self._loss_groups(objective_list, similarities)
        # (name, parameters, class similarity) of each member's objective (member_loss)
        self.member_objectives = [(o["name"], _loss_params(o), similarities[g]) for g, o in enumerate(objective_list)]
        self.member_loggers: list[list] = [[] for _ in range(self.members)]  # a population's (kd.train)
        self.register_buffer(
            "grouped_order", torch.cat([group.members for group in self.loss_groups]), persistent=False
        )  # the members in the order of the groups' losses
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.test_tag = "last"
        self.teacher_outputs: dict[str, TeacherOutputs] = {}  # by stage, for the data's fixed-input splits
        self.inputs_of = list(range(self.members))  # which data module's inputs each member sees (setup)
        self.member_axis = True  # whether batches come with the member axis (setup)
        taught = torch.zeros(self.members, dtype=torch.bool)
        taught[self.taught] = True
        self.metrics = nn.ModuleDict(
            {  # keys "train_", ...: ModuleDict keys may not shadow nn.Module.train
                f"{stage}_": MemberMetrics(
                    self.members, agreement=taught if self.taught else None, loss=stage == "train"
                )
                for stage in STAGES
            }
        )
        for metric in self.metrics.values():  # in checkpoints: a run resumed mid-epoch reports its whole epoch
            metric.persistent(True)
        # The latest epoch's metrics of each member, (G,) tensors by name: what the run records.
        self.epoch_values: dict[str, torch.Tensor] = {}
        self.register_buffer("best_val_acc", torch.full((self.members,), -torch.inf))  # survives a resume
        # Each member's best-epoch weights, stacked (``kd.population.Members.stacked_state``).
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = torch.full((self.members,), -1, dtype=torch.long)
        # The first non-finite loss of each member: (step, epoch), -1 while there is none, and its value.
        self.register_buffer("nonfinite_at", torch.full((self.members, 2), -1, dtype=torch.long), persistent=False)
        self.register_buffer("nonfinite_loss", torch.zeros(self.members), persistent=False)
        self.stopped: torch.Tensor | None = None  # (G,) bool, once the check has seen a member stop

    @staticmethod
    def _loss_groups(objective_list: list[dict], similarities: list) -> nn.ModuleList:
        """Members with the same objective and parameters share one loss call per step, on their
        stacked logits (KD-sim's class similarities stacked too)."""
        groups: dict[str, list[int]] = {}
        for g, objective in enumerate(objective_list):
            groups.setdefault(json.dumps(objective, sort_keys=True, default=str), []).append(g)
        built = nn.ModuleList()
        for members in groups.values():
            objective = objective_list[members[0]]
            given = [similarities[g] for g in members]
            stacked = None if given[0] is None else torch.stack(given)
            built.append(LossGroup(members, objectives.get(objective["name"], stacked, **_loss_params(objective))))
        return built

    @property
    def data_parallel(self) -> bool:
        """Whether this module runs on several ranks (a process group left by an earlier run does not count)."""
        return torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher every member distils from (a single run's teacher), else None."""
        return self.teachers[0] if len(self.teachers) == 1 and len(self.taught) == self.members else None

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode each epoch; the teachers stay in eval."""
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Images (..., C, H, W) with channels last in memory, when asked: each (C, H, W) image, so a
        member's batch of a (G, B, C, H, W) population batch is a channels_last (B, C, H, W) one."""
        if not (self.channels_last and x.dim() >= 4):
            return x
        return x.movedim(-3, -1).contiguous().movedim(-1, -3)

    def forward(self, x):
        """(G, B, ...) inputs to (G, B, K) logits."""
        return self.net(self._input(x))

    def setup(self, stage: str) -> None:
        """A ``TeacherOutputs`` per split the data module says has fixed inputs (kept across fit and test);
        which members see the same inputs (a population's members that share a data module)."""
        data = self.trainer.datamodule
        self.inputs_of = data.data_of.tolist() if isinstance(data, population.Data) else list(range(self.members))
        self.member_axis = isinstance(data, population.Data)  # other data modules serve a single run's batches
        if not self.taught or not isinstance(data, SplitDataModule):
            return
        for split in STAGES:
            if split not in self.teacher_outputs and data.fixed_inputs(split) and split in data.splits:
                self.teacher_outputs[split] = TeacherOutputs(len(data.splits[split]))

    def _teacher_logits(self, stage: str, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """(G, B, K) logits of each member's teacher on its inputs (zeros for members without one)."""
        if not self.taught:
            return None

        @torch.no_grad()  # not inference_mode: the student's backward keeps the teacher's outputs
        def run_teachers(fixed: bool = False):
            """Each taught member's teacher on its inputs; members with the same teacher and the same
            inputs (the objectives of one seed) share one pass. On the first pass over ``fixed``
            inputs, in fp32 (no autocast: see TeacherOutputs)."""
            passes: dict[tuple[int, int], torch.Tensor] = {}  # (teacher, inputs) -> logits
            with torch.autocast(x.device.type, enabled=False) if fixed else contextlib.nullcontext():
                for g, t in zip(self.taught, self.teacher_of):
                    if (t, self.inputs_of[g]) not in passes:
                        passes[t, self.inputs_of[g]] = self.teachers[t](self._input(x[g]))
            return torch.stack([passes[t, self.inputs_of[g]] for g, t in zip(self.taught, self.teacher_of)])

        outputs = self.teacher_outputs.get(stage)
        logits = (
            run_teachers() if outputs is None else outputs(lambda: run_teachers(fixed=True), index[self.taught_index])
        )
        if len(self.taught) == self.members:
            return logits
        return logits.new_zeros((self.members, *logits.shape[1:])).index_copy(0, self.taught_index, logits)

    def _step(self, batch, stage: str):
        x, y, index = batch
        if not self.member_axis:
            x, y, index = x[None], y[None], index[None]
        logits = self(x)
        teacher_logits = self._teacher_logits(stage, x, index)
        probs = logits.detach().float().softmax(-1)
        loss = self._losses(logits, y, teacher_logits) if stage == "train" else None
        self.metrics[f"{stage}_"].update(
            probs,
            y,
            None if teacher_logits is None else teacher_logits.argmax(-1),
            None if loss is None else loss.detach(),
        )
        return loss

    def _losses(self, logits, y, teacher_logits) -> torch.Tensor:
        """(G,) the loss of each member under its own objective."""
        if len(self.loss_groups) == 1:
            group = self.loss_groups[0]
            return group.loss(logits, y, teacher_logits if group.needs_teacher else None)
        parts = [
            group.loss(
                logits[group.members], y[group.members], teacher_logits[group.members] if group.needs_teacher else None
            )
            for group in self.loss_groups
        ]
        return logits.new_zeros(self.members).index_copy(0, self.grouped_order, torch.cat(parts))

    def training_step(self, batch, batch_idx):
        losses = self._step(batch, "train")
        self.step_loss = losses.detach()  # (G,): each member's loss at this step, for callbacks
        self._record_nonfinite(self.step_loss)
        if losses.device.type == "cpu" or (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self._raise_if_diverged()
        return torch.where(self.nonfinite_at[:, 0] < 0, losses, 0.0).sum()

    def on_after_backward(self) -> None:
        """A member whose loss went non-finite learns no more: once the divergence check has seen it,
        its gradients are zeroed, and so are its non-finite weights, which would otherwise stop the
        others' checkpoints."""
        if self.stopped is not None:
            self.net.silence_(self.stopped)

    def _record_nonfinite(self, loss: torch.Tensor) -> None:
        """Keep the step, epoch and value of each member's first non-finite loss, without waiting for the device."""
        first = ~torch.isfinite(loss) & (self.nonfinite_at[:, 0] < 0)
        # From pinned memory: a copy from pageable memory may make the host wait for the device.
        here = torch.tensor([self.global_step, self.current_epoch], pin_memory=loss.is_cuda)
        here = here.to(loss.device, non_blocking=True)
        self.nonfinite_at.copy_(torch.where(first[:, None], here, self.nonfinite_at))
        self.nonfinite_loss.copy_(torch.where(first, loss.float(), self.nonfinite_loss))

    def diverged(self, member: int = 0) -> str | None:
        """Why ``member`` stopped learning, or None."""
        step, epoch = self.nonfinite_at[member].tolist()
        if step < 0:
            return None
        return (
            f"loss is {self.nonfinite_loss[member].item()} at step {step} (epoch {epoch}); "
            "lower the learning rate or check the data"
        )

    def _raise_if_diverged(self) -> None:
        """Stop the run once every member's loss has gone non-finite (it reads the record back from
        the device); note which members have stopped. Every rank runs it at the same steps and first
        takes the lowest rank's record, so a loss gone non-finite on one rank stops them all at once,
        with one message, instead of leaving the others waiting for it."""
        if self.data_parallel:
            at, loss = self.all_gather(self.nonfinite_at), self.all_gather(self.nonfinite_loss)  # (ranks, G, ...)
            first = (at[..., 0] >= 0).int().argmax(0)  # per member, the first rank with a record (else 0)
            members = torch.arange(self.members, device=at.device)
            self.nonfinite_at.copy_(at[first, members])
            self.nonfinite_loss.copy_(loss[first, members])
        stopped = self.nonfinite_at[:, 0] >= 0
        if bool(stopped.all()):
            raise TrainingDiverged(self.diverged(0))
        if bool(stopped.any()):
            self.stopped = stopped

    def on_validation_epoch_start(self):
        """Checkpoints are written after validation or at the end of the epoch: never of a diverged run."""
        self._raise_if_diverged()

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _end_epoch(self, stage: str, suffix: str = "") -> dict:
        """The end of an epoch of ``stage``: the teachers' pass over fixed inputs checked for
        completeness, the epoch metrics kept (and logged for a single run) and reset."""
        if stage in self.teacher_outputs:
            self.teacher_outputs[stage].end_of_pass()
        values = {
            f"{stage}/{name}{suffix}": value.reshape(self.members)  # torchmetrics squeezes one member's away
            for name, value in self.metrics[f"{stage}_"].compute().items()
        }
        self.metrics[f"{stage}_"].reset()
        self._keep(values)
        return values

    def _keep(self, values: dict) -> None:
        """Keep the epoch's values and log them: a single run's through Lightning (its loggers, and
        any callback that monitors one of them), each member's of a population to its own loggers."""
        self.epoch_values.update(values)
        if self.members == 1:
            self.log_dict({name: value[0] for name, value in values.items()}, sync_dist=True)
            return
        if not any(self.member_loggers):
            return
        host = {name: value.tolist() for name, value in values.items()}
        for g, loggers in enumerate(self.member_loggers):
            for logger in loggers:
                logger.log_metrics({name: value[g] for name, value in host.items()}, step=self.global_step)

    def loggers_of(self, g: int) -> list:
        """Member ``g``'s loggers (a single run's: the trainer's)."""
        return list(self.trainer.loggers) if self.members == 1 else self.member_loggers[g]

    def on_fit_start(self) -> None:
        """Each member's hyperparameters to its own loggers (Lightning logs a single run's)."""
        if self.members > 1:
            for g, loggers in enumerate(self.member_loggers):
                for logger in loggers:
                    logger.log_hyperparams({**self.hparams, "objective": self.hparams["objective"][g]})

    def member_teacher(self, g: int) -> nn.Module | None:
        return self.teachers[self.teacher_of[self.taught.index(g)]] if g in self.taught else None

    def member_data(self, g: int):
        """Member ``g``'s own data module (a single run's: the trainer's)."""
        data = self.trainer.datamodule
        return data.members[g] if isinstance(data, population.Data) else data

    def member_loss(self, g: int) -> nn.Module:
        """Member ``g``'s loss on its own (B, K) logits: its group's, with its own class similarities."""
        name, params, similarity = self.member_objectives[g]
        return objectives.get(name, similarity, **params)

    def on_train_epoch_end(self):
        self._raise_if_diverged()
        self._end_epoch("train")

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self.metrics["val_"].reset()
            return
        acc = self._end_epoch("val")["val/acc"]
        improved = acc > self.best_val_acc
        self.best_val_acc.copy_(torch.maximum(self.best_val_acc, acc))
        self._keep({"val/acc_best": self.best_val_acc.clone()})
        self._keep_best(improved)

    def _keep_best(self, improved: torch.Tensor) -> None:
        """The weights of the members whose validation accuracy improved (strictly, like ModelCheckpoint)."""
        state = self.net.stacked_state()
        if self.best_state is None:
            self.best_state = {k: v.clone() for k, v in state.items()}
        for k, v in state.items():
            self.best_state[k][improved] = v[improved]
        self.best_epoch[improved.cpu()] = self.current_epoch

    def use_best(self) -> None:
        """Load each member's best-epoch weights (for the best-epoch test)."""
        if self.best_state is not None:
            self.net.load_stacked(self.best_state)

    def member_metrics(self, member: int = 0) -> dict[str, float]:
        """``member``'s latest epoch metrics and tests, as its single run records them."""
        return {
            name: float(value[member])
            for name, value in self.epoch_values.items()
            if not (name.split("/")[1].startswith("agreement") and member not in self.taught)
        }

    def on_test_epoch_end(self):
        self._end_epoch("test", suffix=f"_{self.test_tag}")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teachers.")}
        checkpoint["kd_members"] = {
            "epoch_values": _on_host(self.epoch_values),
            "best_state": _on_host(self.best_state),
            "best_epoch": self.best_epoch,
        }
        for name, metric in self.metrics.items():  # every rank's counts, summed: the whole job's epoch so far
            with metric.sync_context(should_sync=self.data_parallel):
                checkpoint["state_dict"].update(
                    {f"metrics.{name}.{k}": v.clone() for k, v in metric.metric_state.items()}
                )

    def on_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"].update({f"teachers.{k}": v for k, v in self.teachers.state_dict().items()})
        if self.global_rank > 0:  # the job's counts so far are rank 0's to carry on (on_save_checkpoint)
            checkpoint["state_dict"].update(
                {k: torch.zeros_like(v) for k, v in checkpoint["state_dict"].items() if k.startswith("metrics.")}
            )
        kept = checkpoint.get("kd_members")
        if kept is not None:
            self.epoch_values = {k: v.to(self.device) for k, v in kept["epoch_values"].items()}
            best, self.best_epoch = kept["best_state"], kept["best_epoch"]
            self.best_state = None if best is None else {k: v.to(self.device) for k, v in best.items()}

    def _apply(self, fn, recurse: bool = True):
        """``best_state`` moves with the module, as a buffer would (Lightning restores a checkpoint
        before it moves the module to its device); it is not one, as checkpoints keep it apart."""
        super()._apply(fn, recurse)
        if self.best_state is not None:
            self.best_state = {k: fn(v) for k, v in self.best_state.items()}
        return self
