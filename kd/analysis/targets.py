"""What each soft target hands a student: the shape of rho, example by example.

A target rho replaces the teacher's q_tau in the one KD loss. How it spends its mass says which
level of knowledge it can carry: its true-class mass rho_c (instance), its largest wrong-class mass
and how much of its wrong-class mass stays within the true class's superclass (domain), its
entropy (how flat: universe), and KL(rho || q_tau), the divergence a student that matched the
teacher exactly would still pay under the objective (0 for KD itself). A target whose largest
wrong-class mass exceeds rho_c teaches the wrong class as the most likely one.
"""

from __future__ import annotations

import torch

from kd.objectives.targets import true_class_prob


def profile(rho: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, superclass_of: torch.Tensor | None = None):
    """Per-example quantities of a (B, K) target ``rho`` against the teacher's (B, K) ``q``, as a
    dict of (B,) tensors: ``true``, ``top_wrong``, ``wrong_argmax`` (1 where a wrong class has the
    most mass), ``entropy``, ``kl_from_teacher`` and, given superclasses, ``sibling_share`` (the share
    of the wrong-class mass on the true class's superclass siblings; nan where a class has none)."""
    rho, q = rho.double(), q.double()
    true = true_class_prob(rho, labels)
    wrong = rho.scatter(-1, labels[:, None], 0.0)
    top_wrong = wrong.max(-1).values
    found = {
        "true": true,
        "top_wrong": top_wrong,
        "wrong_argmax": (top_wrong > true).double(),
        "entropy": -torch.special.xlogy(rho, rho).sum(-1),
        "kl_from_teacher": (torch.special.xlogy(rho, rho) - torch.special.xlogy(rho, q)).sum(-1),
    }
    if superclass_of is not None:
        siblings = superclass_of[None, :] == superclass_of[labels][:, None]
        has = siblings.sum(-1) > 1  # a class alone in its superclass has no siblings to share with
        share = (wrong * siblings).sum(-1) / wrong.sum(-1).clamp_min(torch.finfo(rho.dtype).tiny)
        found["sibling_share"] = torch.where(has, share, torch.full_like(share, float("nan")))
    return found


def mean_profile(rho, q, labels, superclass_of=None) -> dict[str, float]:
    """``profile`` averaged over the examples (``sibling_share`` over those whose class has siblings)."""
    return {key: value.nanmean().item() for key, value in profile(rho, q, labels, superclass_of).items()}


def ranked(rho: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K,) the mean target by rank: the true class first, then the wrong classes from the largest
    mass down, so that targets of different shapes compare at a glance."""
    true = true_class_prob(rho, labels)
    wrong = rho.scatter(-1, labels[:, None], -1.0).sort(-1, descending=True).values[:, :-1]
    return torch.cat([true[:, None], wrong], -1).double().mean(0)
