"""The paper's objectives: each one a soft target (``targets``) fed to one KD loss (``loss``),
declared once in the registry (``registry``) that everything else reads.

    >>> loss_fn = kd.objectives.get("kd_pt", kd_weight=0.9)
    >>> loss = loss_fn(student_logits, labels, teacher_logits)

``python -m kd.objectives`` lists every objective with its level, needs and parameters.

KD-pt and DKD are the two ways of editing KD's wrong-class part. Per example,
KL(q || p) = TCKD + (1 - q_c) NCKD (``loss.decoupled_terms``). KD-pt keeps TCKD and replaces the
teacher's distribution over the wrong classes by the uniform one: its KL is
TCKD + (1 - q_c) KL(uniform || p_hat). DKD keeps the teacher's wrong-class distribution and drops
the (1 - q_c) factor: tckd_weight TCKD + nckd_weight NCKD.
"""

from __future__ import annotations

from kd.errors import UserError
from kd.objectives import targets  # declares the paper's objectives
from kd.objectives.loss import KDLoss
from kd.objectives.registry import (
    REGISTRY,
    Objective,
    Param,
    check,
    class_similarity,
    get,
    lookup,
    needs_teacher,
    register,
    soft_target,
)

__all__ = [
    "REGISTRY",
    "KDLoss",
    "Objective",
    "Param",
    "UserError",
    "check",
    "class_similarity",
    "get",
    "lookup",
    "needs_teacher",
    "register",
    "soft_target",
    "targets",
]
