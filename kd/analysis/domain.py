"""Domain level: class relationships in the teacher's probabilities and in logit-layer geometry.

On hierarchical classes a teacher that knows the domain gives correlated probabilities to the
classes of one superclass (visible at high temperature; at tau = 1 the true class takes nearly all
the mass), and KD imprints the relationship on the student's class templates w_k.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.objectives import similarity
from kd.predict import probabilities


def probability_correlation(probs: torch.Tensor) -> torch.Tensor:
    """(K, K) Pearson correlation across examples of the columns (classes) of (N, K) ``probs``."""
    return torch.corrcoef(probs.double().T).float()


def class_correlation(model: nn.Module, datamodule, split: str = "test", temperature: float = 1.0) -> torch.Tensor:
    """``probability_correlation`` of ``model``'s softmax at ``temperature`` over ``split``."""
    return probability_correlation(probabilities(model, datamodule, split, temperature)["probs"])


def weight_cosine(model: nn.Module) -> torch.Tensor:
    """(K, K) cosine similarity of the logit layer's class templates w_k."""
    return similarity.weight_cosine(model.classifier.weight)


def superclass_score(matrix: torch.Tensor, superclass_of: torch.Tensor) -> dict[str, float]:
    """Mean off-diagonal entry within superclasses, between them, and ``score`` = within - between."""
    same = superclass_of[:, None] == superclass_of[None, :]
    off_diagonal = ~torch.eye(len(superclass_of), dtype=torch.bool)
    within = matrix[same & off_diagonal].double().nanmean().item()
    between = matrix[~same].double().nanmean().item()
    return {"within": within, "between": between, "score": within - between}


def superclass_order(superclass_of: torch.Tensor) -> torch.Tensor:
    """A class permutation that puts the classes of each superclass next to each other."""
    return torch.argsort(superclass_of, stable=True)


def sibling_mass(probs: torch.Tensor, labels: torch.Tensor, superclass_of: torch.Tensor) -> float:
    """Share of the wrong-class mass that falls on the true class's superclass siblings, averaged
    over examples (chance: (m - 1) / (K - 1) for m classes per superclass)."""
    sibling = superclass_of[None, :] == superclass_of[labels][:, None]
    sibling[torch.arange(len(labels)), labels] = False
    wrong = 1.0 - probs[torch.arange(len(labels)), labels]
    keep = wrong > 1e-6  # examples the teacher is certain about carry no relationship signal
    return ((probs * sibling).sum(1)[keep] / wrong[keep]).mean().item()
