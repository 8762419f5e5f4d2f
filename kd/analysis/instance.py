"""Instance level: KD rescales each example's gradient by the teacher's confidence q_c.

At tau = 1 the gradient of the KD loss on the true-class logit is the CE gradient times
w = 1 - kd_weight (1 - rho_c) / (1 - p_c), with rho the soft target (the teacher's q for KD,
uniform for LS: the same w for every example of equal p_c). For tau != 1 the exact ratio is
w = (1 - kd_weight) + kd_weight tau (rho_c - p_tau_c) / (1 - p_c) (ce_weight = 1 - kd_weight, tau^2
scaling on, as in ``kd.objectives.get``); ``gradient_ratio`` finds w of any objective by autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd.objectives import targets
from kd.objectives.targets import true_class_prob
from kd.predict import predict, probabilities


def rescaling_factor(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B,) ratio of the KD and CE gradients on the true-class logit; ``teacher_probs`` is rho at tau."""
    z = student_logits.double()
    p = torch.softmax(z, dim=1)
    wrong_mass = p.scatter(1, labels[:, None], 0.0).sum(1)  # 1 - p_c without cancellation
    p_tau_c = true_class_prob(torch.softmax(z / temperature, dim=1), labels)
    rho_c = true_class_prob(teacher_probs.double(), labels)
    w = (1 - kd_weight) + kd_weight * temperature * (rho_c - p_tau_c) / wrong_mass
    return w.float()


def gradient_ratio(
    loss_fn: Callable, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) w of any objective (a ``kd.objectives.get`` loss, DKD's too): its gradient on the
    true-class logit over CE's, -(1 - p_c) / B, by autograd. One backward pass gives every example's:
    the loss is a mean over examples, and an example's logits enter only its own term."""
    z = student_logits.detach().float().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(z, labels, teacher_logits), z)
    wrong_mass = torch.softmax(z.detach().double(), dim=1).scatter(1, labels[:, None], 0.0).sum(1)
    return (-true_class_prob(grad.double(), labels) * len(z) / wrong_mass).float()


def _by_index(out: dict) -> dict:
    """A prediction dict in example-index order, so two models' outputs line up row by row."""
    order = out["index"].argsort()
    return {key: value[order] for key, value in out.items()}


def of_objective(loss_fn: Callable, student: nn.Module, teacher: nn.Module, datamodule, split: str = "val") -> dict:
    """``w`` of the objective ``loss_fn`` (``gradient_ratio``) and the teacher's ``q_c`` at its
    temperature, for every example of ``split`` in example-index order."""
    s, t = (_by_index(predict(model, datamodule, split)) for model in (student, teacher))
    return {
        "w": gradient_ratio(loss_fn, s["logits"], s["labels"], t["logits"]),
        "q_c": true_class_prob(loss_fn.teacher_probs(s["logits"], t["logits"]), s["labels"]),
    }


def per_example(
    student: nn.Module,
    teacher: nn.Module,
    datamodule,
    kd_weight: float,
    split: str = "train",
    temperature: float = 1.0,
    target: Callable = targets.teacher,
) -> pd.DataFrame:
    """One row per example of ``split``: the teacher's q_c, the target's rho_c, the student's p_c and w.

    ``target`` turns the teacher's q_tau into the soft target (``kd.objectives.targets``):
    ``targets.teacher`` for KD, ``targets.uniform`` (with kd_weight = eps, tau = 1) for LS, whose
    w then ignores the teacher while q_c still says how confident the teacher was.
    """
    t = _by_index(probabilities(teacher, datamodule, split, temperature))
    s = _by_index(probabilities(student, datamodule, split))
    rho = target(t["probs"], t["labels"])
    w = rescaling_factor(s["logits"], rho, s["labels"], kd_weight, temperature)
    return pd.DataFrame(
        {
            "index": s["index"].numpy(),
            "label": s["labels"].numpy(),
            "q_c": true_class_prob(t["probs"], t["labels"]).numpy(),
            "rho_c": true_class_prob(rho, t["labels"]).numpy(),
            "p_c": true_class_prob(s["probs"], s["labels"]).numpy(),
            "w": w.numpy(),
        }
    )


def binned(q_c, w, bins=10) -> pd.DataFrame:
    """w summarised in bins of q_c: ``bins`` equal-width bins on [0, 1], or the bin edges.

    Median and quartiles besides the mean: where a student is more confident than its target
    (p_c > rho_c) w turns negative and grows without bound as p_c -> 1, so a few examples can
    swamp a bin's mean.
    """
    q_c, w = np.asarray(q_c, dtype=float), np.asarray(w, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1) if np.isscalar(bins) else np.asarray(bins, dtype=float)
    which = np.clip(np.digitize(q_c, edges[1:-1]), 0, len(edges) - 2)
    groups = pd.DataFrame({"bin": which, "q_c": q_c, "w": w}).groupby("bin")
    stats = groups.agg(
        q_c=("q_c", "mean"),
        w_mean=("w", "mean"),
        w_median=("w", "median"),
        w_q25=("w", lambda v: v.quantile(0.25)),
        w_q75=("w", lambda v: v.quantile(0.75)),
        count=("w", "size"),
    ).reset_index()
    stats.insert(1, "q_lo", edges[stats["bin"]])
    stats.insert(2, "q_hi", edges[stats["bin"] + 1])
    return stats.drop(columns="bin")
