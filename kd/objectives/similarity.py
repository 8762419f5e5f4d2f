"""Class similarity for the domain-level targets (KD-sim, KD-pt+sim).

Both sources return a row-stochastic (K, K) matrix: row c is the distribution KD-sim hands to
every example of class c. ``of_teacher`` makes the one an objective's parameters ask for;
``SimilarityTarget`` hands it to the objective's target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import UserError

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


def of_teacher(params: dict, teacher: nn.Module, train_outputs: Callable[[], dict]) -> torch.Tensor:
    """The class similarity of an objective's checked ``params`` (``similarity_source``, ``beta``, and
    ``temperature`` for the teacher's mean distribution); ``train_outputs()``: the teacher's logits and
    labels on the training split (``kd.predict.predict``), asked for only by that source."""
    if params["similarity_source"] == "teacher_weights_cosine":
        return from_teacher_weights(teacher.classifier.weight, params["beta"])
    out = train_outputs()
    probs = torch.softmax(out["logits"] / params["temperature"], dim=1)
    return from_mean_teacher_probs(probs, out["labels"], probs.shape[1])


def check(name: str, value) -> torch.Tensor:
    """``value`` if it is a (K, K) matrix whose rows are distributions (or (..., K, K), one per member
    of a population), else a one-line error saying why not; ``name``: the objective that needs it."""
    wanted = "a (K, K) tensor whose rows are distributions (see kd.objectives.similarity)"
    if value is None:
        raise UserError(f"objective {name!r} needs class_similarity, {wanted}")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise UserError(f"class_similarity is {kind}; give {wanted}")
    if value.ndim < 2 or value.shape[-1] != value.shape[-2]:
        raise UserError(f"class_similarity has shape {tuple(value.shape)}; give {wanted}")
    sums = value.sum(-1)
    if not (
        torch.isfinite(value).all() and (value >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
    ):
        raise UserError(
            f"class_similarity's rows must be distributions (non-negative, summing to 1); its row sums "
            f"range from {sums.min().item():.4g} to {sums.max().item():.4g}, its entries from "
            f"{value.min().item():.4g} to {value.max().item():.4g}"
        )
    return value


class SimilarityTarget(nn.Module):
    """A domain-level target ``build(q, labels, class_similarity=...)`` with the similarity a buffer:
    it moves with the model that holds the loss (once), not to the logits' device at each step."""

    def __init__(self, build, class_similarity: torch.Tensor):
        super().__init__()
        self.build = build
        self.register_buffer("class_similarity", class_similarity, persistent=False)

    def forward(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classes = self.class_similarity.shape[-1]
        if classes != q.shape[-1]:
            raise UserError(f"class_similarity is {classes}x{classes}, but the logits have {q.shape[-1]} classes")
        # In q's dtype (fp32) even in a model converted to half precision (precision=bf16-true).
        return self.build(q, labels, class_similarity=self.class_similarity.to(q.dtype))
