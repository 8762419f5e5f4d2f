"""Class similarity for the domain-level targets (KD-sim, KD-pt+sim).

Both sources return a row-stochastic (K, K) matrix: row c is the distribution KD-sim hands to
every example of class c.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCES = ("teacher_weights_cosine", "mean_teacher_probs")


def weight_cosine(weight: torch.Tensor) -> torch.Tensor:
    """Cosine similarity cos(w_c, w_k) of the rows of a (K, D) logit-layer weight."""
    unit = F.normalize(weight.detach().float(), dim=1)
    return unit @ unit.T


def from_teacher_weights(weight: torch.Tensor, beta: float) -> torch.Tensor:
    """rho(. | c) = softmax_k(cos(w_c, w_k) / beta) over the teacher's class templates."""
    return torch.softmax(weight_cosine(weight) / beta, dim=1)


def from_mean_teacher_probs(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Row c = the teacher's mean distribution over the training examples of class c."""
    sums = torch.zeros(num_classes, probs.shape[1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return sums / counts[:, None]
