"""The metrics of a run, for one member or for a population of G members at once.

Per member: accuracy, expected calibration error (15 equal-width confidence bins, L1: what
torchmetrics' ``MulticlassCalibrationError`` computes), negative log-likelihood, agreement with the
teacher's top class, and the mean training loss over steps. torchmetrics' classification metrics
reduce over everything they are given; a population needs one value per member, and G metric
objects updated one by one cost more than the small students they measure. So the state here is
per member and one update serves every member: ``update`` takes tensors with a leading member
axis, ``compute`` returns a (G,) tensor per metric. The tests hold it to torchmetrics, member by member.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

N_BINS = 15


class MemberMetrics(Metric):
    full_state_update = False

    def __init__(self, members: int, agreement: torch.Tensor | None = None, loss: bool = False):
        """``agreement``: (G,) bool, which members have a teacher to agree with (None: none has);
        ``loss``: whether ``update`` receives the step's loss of each member."""
        super().__init__()
        self.members, self.with_loss = members, loss
        self.register_buffer(
            "has_teacher",
            torch.zeros(members, dtype=torch.bool)
            if agreement is None
            else torch.as_tensor(agreement, dtype=torch.bool),
            persistent=False,
        )
        per_member = ["examples", "correct", "nll", "agree"] + (["loss", "steps"] if loss else [])
        for name in per_member:
            self.add_state(
                name,
                torch.zeros(
                    members,
                ),
                dist_reduce_fx="sum",
            )
        for name in ("bin_count", "bin_conf", "bin_correct"):  # the bin edges, then 1.0 alone (torchmetrics')
            self.add_state(
                name,
                torch.zeros(
                    members,
                    N_BINS + 1,
                ),
                dist_reduce_fx="sum",
            )

    def update(
        self,
        probs: torch.Tensor,
        target: torch.Tensor,
        teacher_top: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
    ) -> None:
        """``probs`` (G, B, K), ``target`` (G, B), ``teacher_top`` (G, B) the teacher's top classes,
        ``loss`` (G,) the members' losses of this step."""
        confidence, top = probs.max(-1)
        correct = (top == target).float()
        self.examples += target.shape[-1]
        self.correct += correct.sum(-1)
        self.nll -= probs.gather(-1, target[..., None]).squeeze(-1).float().clamp_min(1e-12).log().sum(-1)
        if teacher_top is not None:
            self.agree += (top == teacher_top).float().sum(-1)
        if loss is not None:
            self.loss += loss.float()
            self.steps += 1
        edges = torch.linspace(0, 1, N_BINS + 1, dtype=confidence.dtype, device=confidence.device)
        bins = torch.bucketize(confidence, edges, right=True) - 1
        self.bin_count.scatter_add_(-1, bins, torch.ones_like(correct))
        self.bin_conf.scatter_add_(-1, bins, confidence.float())
        self.bin_correct.scatter_add_(-1, bins, correct)

    def compute(self) -> dict[str, torch.Tensor]:
        """(G,) per metric; ``agreement`` is NaN for members without a teacher."""
        count = self.bin_count.clamp_min(1)
        gap = (self.bin_correct / count - self.bin_conf / count).abs()
        values = {
            "acc": self.correct / self.examples,
            "ece": (gap * self.bin_count).sum(-1) / self.examples,
            "nll": self.nll / self.examples,
        }
        if bool(self.has_teacher.any()):
            values["agreement"] = torch.where(self.has_teacher, self.agree / self.examples, torch.nan)
        if self.with_loss:
            values["loss"] = self.loss / self.steps
        return values
