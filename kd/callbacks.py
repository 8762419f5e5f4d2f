"""Lightning callbacks the run configs add (configs/callbacks), and the checkpoint a relaunch resumes from."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from kd.analysis import instance
from kd.errors import TrainingDiverged
from kd.private_api import cluster_environment, save_checkpoint_now, slurm_requeue_handler


def resume_checkpoint(last: Path, hpc_dir) -> Path | None:
    """The checkpoint a relaunched run goes on from: the newest of ``last`` (``LastCheckpoint``'s)
    and Lightning's ``hpc_ckpt_<n>.ckpt`` in ``hpc_dir`` (written on SLURM's requeue signal)."""
    found = [p for p in (last, *Path(hpc_dir).glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def mid_epoch(trainer, batch_idx: int) -> bool:
    """Whether the end of training batch ``batch_idx`` is a point a run resumes from exactly: any but
    the epoch's last, whose validation a checkpoint there would skip (resumed, Lightning counts the
    epoch as done); there the next such point is the epoch's end."""
    return batch_idx + 1 < trainer.num_training_batches


class EpochClock(L.Callback):
    """A line every ``every_s`` seconds (and at the last epoch) with the epoch and the time left, for a
    run trained outside a sweep's progress bar: the teachers a driver's students wait for."""

    def __init__(self, label: str, every_s: float = 30.0):
        self.label, self.every_s = label, every_s

    def on_train_start(self, trainer, pl_module):
        self.start = self.shown = time.monotonic()
        self.first = trainer.current_epoch  # a resumed run counts from where it resumed

    def on_train_epoch_end(self, trainer, pl_module):
        now, done, total = time.monotonic(), trainer.current_epoch + 1, trainer.max_epochs
        if now - self.shown < self.every_s and done < total:
            return
        self.shown = now
        left = (now - self.start) / max(done - self.first, 1) * (total - done)
        print(f"[kd] {self.label}: epoch {done}/{total}, about {left / 60:.1f} min left", flush=True)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, what a relaunched run resumes from: rewritten at the end of an epoch
    once ``every_s`` seconds have passed since the last write, so a killed run loses at most about
    that much work, and a run of short epochs does not spend its time writing checkpoints
    (kd.train writes the final one when training ends). ``every_s=0``: after every epoch.

    On SIGTERM, where Lightning stops the run, it is written then: at the end of the batch (the
    relaunch goes on from the next one; the data's samplers resume mid-epoch), or after the last
    batch's validation at the end of the epoch (a checkpoint between them would skip it). Under DDP
    the ranks agree on SIGTERM (``ResumeState``) and on the clock (rank 0's), so they save together."""

    def __init__(self, dirpath: str, every_s: float = 0.0):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
        self.every_s = every_s
        self._written = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._written = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        due = trainer.received_sigterm or time.monotonic() - self._written >= self.every_s
        if trainer.strategy.broadcast(due):  # rank 0's clock decides: a rank saving alone would wait in its barrier
            super().on_train_epoch_end(trainer, pl_module)
            self._written = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stopping = trainer.received_sigterm and mid_epoch(trainer, batch_idx)
        if stopping:
            save_checkpoint_now(self, trainer)


# Signals received and not yet acted on in this process: SIGUSR1 outside training (``defer_requeue_signal``),
# SIGUSR1 and SIGTERM inside it (``ResumeState``), until the ranks act on them together.
_received: set[int] = set()


def defer_requeue_signal() -> None:
    """SIGUSR1 (SLURM's requeue signal, sent before the time limit) would end the process outside
    training, where no handler of Lightning's is set: waiting on a teacher's lock, testing. Record it
    instead: a training that follows in this process checkpoints and requeues at its first step
    (``ResumeState``); otherwise the job goes on to its end, its finished training kept in last.ckpt."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _defer)


def _defer(signum, frame) -> None:
    _received.add(signum)
    print(
        "[kd] SIGUSR1 (SLURM's requeue signal) outside training: deferred; a training that follows in this job "
        "checkpoints and requeues at its first step, else the job goes on to its end",
        file=sys.stderr,
        flush=True,
    )


class ResumeState(L.Callback):
    """What a checkpoint needs beyond Lightning's own state for a resumed run to end exactly where an
    uninterrupted one would, and a guard that no checkpoint holds non-finite weights.

    Lightning restores weights, optimizer, scheduler, loop counters, callback states and the
    position of stateful loaders, and the module its metrics (kd.module); this adds torch's random
    state (dropout, augmentation; the batch order is seeded per epoch by the data, and nothing draws
    from numpy's or Python's generators while training). Rank 0's state is every rank's: the ranks
    are seeded alike and draw alike (equal shards), each on its own device.

    Signals: SIGTERM (preemption) and, on SLURM, the requeue signal (SIGUSR1: Lightning saves
    ``hpc_ckpt_<n>.ckpt``, then ``scontrol requeue``) are held to the next point a run resumes from
    exactly (a step's end; after the epoch's last step, the epoch's end, see ``mid_epoch``): saved
    inside a step, a checkpoint would hold half of it. Under DDP they are held there wherever they
    land, and the ranks first agree on what any of them received (one all-reduce), then each hands
    it to Lightning's handler: every rank writes the same checkpoint at the same step and meets the
    others in its barrier, also when a signal reached the ranks a step apart or reached one only.
    A lone process acts at once on a signal that lands between steps.
    """

    KEY = "kd_resume_state"

    def __init__(self):
        self._restored: dict | None = None
        self._handlers: dict = {}  # signal -> Lightning's handler, while training
        self._in_step = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Refuse to write non-finite weights (the last good checkpoint stays the one to resume from);
        else add the random state and the epoch metrics."""
        for name, value in checkpoint["state_dict"].items():  # the network's, not a running max that starts at -inf
            if name.startswith("net.") and value.is_floating_point() and not torch.isfinite(value).all():
                raise TrainingDiverged(
                    f"weights {name} are not finite at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                    "they were not saved; lower the learning rate"
                )
        device = trainer.strategy.root_device  # the rank's own GPU: get_rng_state_all would wake every GPU
        checkpoint[self.KEY] = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._restored = checkpoint.get(self.KEY)

    def on_fit_start(self, trainer, pl_module) -> None:
        """The random state comes back here, once Lightning has restored everything else."""
        if self._restored is None:
            return
        torch.set_rng_state(self._restored["torch_rng"])
        device = trainer.strategy.root_device
        if isinstance(self._restored["cuda_rng"], torch.Tensor) and device.type == "cuda":
            torch.cuda.set_rng_state(self._restored["cuda_rng"], device)
        self._restored = None

    def on_train_start(self, trainer, pl_module) -> None:
        """Hold the signals, in front of Lightning's handlers (registered just before training; it puts
        the previous ones back after fit)."""
        if threading.current_thread() is not threading.main_thread():
            return
        env = cluster_environment(trainer)
        self._handlers = {signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            # Lightning's requeue, also where it set no handler (defer_requeue_signal's was there first).
            self._handlers[env.requeue_signal] = slurm_requeue_handler(trainer)

        def hold(signum, frame):
            _received.add(signum)
            if trainer.world_size == 1 and not self._in_step:
                self._act(trainer)

        for signum in self._handlers:
            signal.signal(signum, hold)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if mid_epoch(trainer, batch_idx):
            self._act(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._act(trainer)

    def _act(self, trainer) -> None:
        """Every rank hands Lightning the signals any rank received, in the same order. Under DDP this
        costs one all-reduce of a few integers and a read of it on the host per step (Lightning's
        own broadcast of its SIGTERM flag at each step's start already makes the host wait so)."""
        self._in_step = False
        if not self._handlers:
            return
        seen = torch.tensor([signum in _received for signum in self._handlers], dtype=torch.int32)
        if trainer.world_size > 1:
            seen = seen.to(trainer.strategy.root_device)
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
        for (signum, handler), flag in zip(self._handlers.items(), seen.tolist()):
            if flag:
                _received.discard(signum)
                handler(signum, None)


class InstanceHistograms(L.Callback):
    """The instance level of a distillation run, in W&B: histograms ``val/w`` of the rescaling factor
    of the run's own objective (``kd.analysis.instance.gradient_ratio``) and ``val/q_c`` of the
    teacher's confidence on the true class (at the objective's temperature), over the validation
    split, after validation at the first, a middle and the last epoch (the first only when
    trainer.max_epochs is unbounded).

    Only for a run (or member of a population) whose objective distils from its teacher, with a W&B
    logger, on rank zero. The
    training steps pay nothing: the cost is one pass of student and teacher over the validation split
    at each of those epochs. w is unbounded below (an example the student is more confident on than
    its target), so its histogram spans w's 1st to 99th percentile, the examples beyond piled at its ends.
    """

    def __init__(self, bins: int = 64):
        self.bins = bins

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else 0
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.current_epoch not in {0, last // 2, last}:
            return
        for g in range(pl_module.members):  # each member's to its own W&B run
            loggers = [logger for logger in pl_module.loggers_of(g) if isinstance(logger, WandbLogger)]
            teacher, loss_fn = pl_module.member_teacher(g), pl_module.member_loss(g)
            if loggers and teacher is not None and loss_fn.needs_teacher:
                self._log(loggers, trainer, loss_fn.cpu(), pl_module.net.network(g), teacher, pl_module.member_data(g))

    def _log(self, loggers: list, trainer, loss_fn, student, teacher, datamodule) -> None:
        import wandb  # here: a run without W&B does not pay for importing it

        values = {k: v.numpy() for k, v in instance.of_objective(loss_fn, student, teacher, datamodule).items()}
        values["w"] = values["w"].clip(*np.percentile(values["w"], [1, 99]))
        histograms = {f"val/{key}": wandb.Histogram(value, num_bins=self.bins) for key, value in values.items()}
        for logger in loggers:
            logger.log_metrics({**histograms, "epoch": trainer.current_epoch}, step=trainer.global_step)
