"""Universe level: a teacher smooths the one-hot label, as label smoothing does uniformly.

``effective_smoothing`` is the LS eps that moves the same average mass off the true class:
LS(eps) leaves 1 - q_c = eps (K - 1) / K, so eps = mean(1 - q_c) K / (K - 1). It summarises how
much a teacher regularises, not how it spreads the mass (that is the domain level).
"""

from __future__ import annotations

import torch
from torch import nn

from kd.objectives.targets import true_class_prob
from kd.predict import probabilities


def effective_smoothing(teacher_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The label-smoothing eps whose wrong-class mass matches the teacher's average."""
    num_classes = teacher_probs.shape[1]
    wrong_mass = 1.0 - true_class_prob(teacher_probs.double(), labels)
    return (wrong_mass.mean() * num_classes / (num_classes - 1)).item()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B,) entropy in nats of each row of ``probs``."""
    return -torch.special.xlogy(probs, probs).sum(1)


def summary(model: nn.Module, datamodule, split: str = "train", temperature: float = 1.0) -> dict[str, float]:
    """Effective smoothing, mean entropy and mean q_c of ``model``'s softmax at ``temperature``."""
    out = probabilities(model, datamodule, split, temperature)
    return {
        "effective_smoothing": effective_smoothing(out["probs"], out["labels"]),
        "entropy": entropy(out["probs"]).mean().item(),
        "q_c": true_class_prob(out["probs"], out["labels"]).mean().item(),
    }
