"""The one KD loss every objective shares.

    loss = ce_weight * H(y, p) + kd_weight * s * mean_i D(rho_i, p_tau_i)

p = softmax(z), p_tau = softmax(z / tau), rho the soft target of the objective (a function of
the teacher's q_tau = softmax(t / tau), or not of the teacher at all), s = tau^2 when
``t2_scale`` is on. D is KL(rho || p_tau) for every objective of the paper; DKD weighs the two
parts of that same KL separately (``decoupled``). The divergence is summed over classes and
averaged over examples (batchmean: ``reduction='mean'`` would also divide by K, the classic
100x-too-weak bug on CIFAR-100), in fp32 whatever the autocast precision of the logits.
KL and H(rho, p_tau) differ by H(rho), a constant for the student: the gradients are the same.

Logits may carry leading member axes, (..., B, K) with labels (..., B): a population of students
(kd.population) is scored by the same code, one loss per member, each reduced over its own batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import UserError

TargetBuilder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (rho, log p_tau, labels) -> the divergence of each example, shape (..., B)
Divergence = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def kl(rho: torch.Tensor, log_p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(rho || p) of each example."""
    return F.kl_div(log_p, rho, reduction="none").sum(-1)


def decoupled_terms(rho: torch.Tensor, log_p: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (Zhao et al., CVPR 2022) two parts of KL(rho || p), per example: KL = TCKD + (1 - rho_c) NCKD.

    TCKD = KL([rho_c, 1 - rho_c] || [p_c, 1 - p_c]), the binary target-class-versus-rest part;
    NCKD = KL(rho_hat || p_hat) of the distributions over the wrong classes, each renormalised there.
    log(1 - p_c) is a log-sum-exp of the wrong classes' log p: exact even as p_c -> 1. A target
    with no wrong-class mass at all has NCKD = 0.
    """
    is_true = F.one_hot(labels, rho.shape[-1]).bool()
    log_p_rest = log_p.masked_fill(is_true, float("-inf")).logsumexp(-1)  # log(1 - p_c)
    rho_rest = rho.masked_fill(is_true, 0.0).sum(-1)  # 1 - rho_c
    binary_rho = torch.stack([rho.gather(-1, labels[..., None]).squeeze(-1), rho_rest], -1)
    binary_log_p = torch.stack([log_p.gather(-1, labels[..., None]).squeeze(-1), log_p_rest], -1)
    tckd = kl(binary_rho, binary_log_p, labels)
    rho_hat = rho.masked_fill(is_true, 0.0) / rho_rest.clamp_min(torch.finfo(rho.dtype).tiny)[..., None]
    log_p_hat = (log_p - log_p_rest[..., None]).masked_fill(is_true, 0.0)  # rho_hat is 0 there
    return tckd, kl(rho_hat, log_p_hat, labels)


def decoupled_kl(rho, log_p, labels, tckd_weight: float, nckd_weight: float) -> torch.Tensor:
    """DKD's divergence: tckd_weight TCKD + nckd_weight NCKD (its alpha and beta)."""
    tckd, nckd = decoupled_terms(rho, log_p, labels)
    return tckd_weight * tckd + nckd_weight * nckd


def decoupled(tckd_weight: float, nckd_weight: float) -> Divergence:
    return partial(decoupled_kl, tckd_weight=tckd_weight, nckd_weight=nckd_weight)


class KDLoss(nn.Module):
    """Callable ``(student_logits, labels, teacher_logits=None) -> loss``: a scalar for (B, K) logits,
    one loss per member, shape (...), for (..., B, K).

    A module, so that a target's tensors (KD-sim's class similarity, a buffer of ``target``) move
    with the model that holds the loss, once, not at every step.

    Inputs of the wrong shape or dtype and labels outside [0, K) are one-line user errors. The label
    range is checked at every call on the CPU and at the first call on an accelerator, where the check
    waits for the device (a training step must not).
    """

    def __init__(
        self,
        target: TargetBuilder | None,
        kd_weight: float,
        ce_weight: float | None = None,
        temperature: float = 1.0,
        t2_scale: bool = True,
        needs_teacher: bool = True,
        divergence: Divergence = kl,
    ):
        super().__init__()
        self.target = target
        self.kd_weight = kd_weight
        self.ce_weight = 1.0 - kd_weight if ce_weight is None else ce_weight
        self.temperature = temperature
        self.scale = temperature**2 if t2_scale else 1.0
        self.needs_teacher = needs_teacher
        self.divergence = divergence
        self._range_checked = False

    def teacher_probs(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """q_tau; without a teacher, the uniform distribution (a teacher that knows nothing)."""
        if teacher_logits is None:
            return torch.full_like(student_logits, 1.0 / student_logits.shape[-1], dtype=torch.float32)
        return torch.softmax(teacher_logits.float() / self.temperature, dim=-1)

    def check_inputs(self, student_logits, labels, teacher_logits) -> torch.Tensor:
        """The labels as class indices (int64), after checking every input; a UserError if one is wrong."""
        if self.needs_teacher and teacher_logits is None:
            raise UserError("this objective distils from a teacher: pass teacher_logits")
        if not isinstance(student_logits, torch.Tensor) or student_logits.ndim < 2:
            raise UserError(f"student_logits must be a (B, K) tensor (or (..., B, K)); got {_describe(student_logits)}")
        classes = student_logits.shape[-1]
        if not isinstance(labels, torch.Tensor) or labels.shape != student_logits.shape[:-1]:
            raise UserError(
                f"labels must be a tensor of shape {tuple(student_logits.shape[:-1])}, one class index "
                f"per example; got {_describe(labels)}"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise UserError(f"labels must be integer class indices in [0, {classes - 1}]; got dtype {labels.dtype}")
        if self.needs_teacher and (
            not isinstance(teacher_logits, torch.Tensor) or teacher_logits.shape != student_logits.shape
        ):
            raise UserError(
                f"teacher_logits must have the student's shape {tuple(student_logits.shape)}; "
                f"got {_describe(teacher_logits)}"
            )
        if labels.numel() and (labels.device.type == "cpu" or not self._range_checked):
            low, high = labels.aminmax()
            if low < 0 or high >= classes:
                raise UserError(
                    f"labels must be class indices in [0, {classes - 1}]; got values from {int(low)} to {int(high)}"
                )
            self._range_checked = True
        return labels.long()

    def forward(self, student_logits, labels, teacher_logits=None) -> torch.Tensor:
        labels = self.check_inputs(student_logits, labels, teacher_logits)
        z = student_logits.float()
        # Per example, then the mean over each member's batch: batchmean, one member at a time.
        loss = F.cross_entropy(z.movedim(-1, 1), labels, reduction="none").mean(-1) if self.ce_weight else 0.0
        if self.target is None or not self.kd_weight:
            return self.ce_weight * loss + z.new_zeros(z.shape[:-2])
        rho = self.target(self.teacher_probs(z, teacher_logits), labels)
        log_p_tau = F.log_softmax(z / self.temperature, dim=-1)
        divergence = self.divergence(rho, log_p_tau, labels).mean(-1)
        return self.ce_weight * loss + self.kd_weight * self.scale * divergence


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"
