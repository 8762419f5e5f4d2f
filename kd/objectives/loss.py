"""The one KD loss every objective shares.

    loss = ce_weight * H(y, p) + kd_weight * s * KL(rho || p_tau)

p = softmax(z), p_tau = softmax(z / tau), rho the soft target of the objective (a function of
the teacher's q_tau = softmax(t / tau), or not of the teacher at all), s = tau^2 when
``t2_scale`` is on. KL uses batchmean reduction: summed over classes, averaged over examples
(``reduction='mean'`` would also divide by K, the classic 100x-too-weak bug on CIFAR-100).
KL and H(rho, p_tau) differ by H(rho), a constant for the student: the gradients are the same.

Logits may carry leading member axes, (..., B, K) with labels (..., B): a population of students
(kd.population) is scored by the same code, one loss per member, each reduced over its own batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

TargetBuilder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class KDLoss:
    """Callable ``(student_logits, labels, teacher_logits=None) -> loss``: a scalar for (B, K) logits,
    one loss per member, shape (...), for (..., B, K)."""

    def __init__(
        self,
        target: TargetBuilder | None,
        kd_weight: float,
        ce_weight: float | None = None,
        temperature: float = 1.0,
        t2_scale: bool = True,
        needs_teacher: bool = True,
    ):
        self.target = target
        self.kd_weight = kd_weight
        self.ce_weight = 1.0 - kd_weight if ce_weight is None else ce_weight
        self.temperature = temperature
        self.scale = temperature**2 if t2_scale else 1.0
        self.needs_teacher = needs_teacher

    def teacher_probs(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """q_tau; without a teacher, the uniform distribution (a teacher that knows nothing)."""
        if teacher_logits is None:
            return torch.full_like(student_logits, 1.0 / student_logits.shape[-1], dtype=torch.float32)
        return torch.softmax(teacher_logits.float() / self.temperature, dim=-1)

    def __call__(self, student_logits, labels, teacher_logits=None) -> torch.Tensor:
        if self.needs_teacher and teacher_logits is None:
            raise ValueError("this objective distils from a teacher: pass teacher_logits")
        z = student_logits.float()
        # Per example, then the mean over each member's batch: batchmean, one member at a time.
        loss = F.cross_entropy(z.movedim(-1, 1), labels, reduction="none").mean(-1) if self.ce_weight else 0.0
        if self.target is None or not self.kd_weight:
            return self.ce_weight * loss + z.new_zeros(z.shape[:-2])
        rho = self.target(self.teacher_probs(z, teacher_logits), labels)
        log_p_tau = F.log_softmax(z / self.temperature, dim=-1)
        kl = F.kl_div(log_p_tau, rho, reduction="none").sum(-1).mean(-1)
        return self.ce_weight * loss + self.kd_weight * self.scale * kl
