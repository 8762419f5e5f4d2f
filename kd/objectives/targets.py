"""Soft-target builders: what each level of teacher knowledge looks like as a distribution, each
declared as the target of its objectives (``registry.soft_target``).

Every builder returns a (B, K) tensor of probabilities that the one KD loss (``loss.py``)
consumes in place of the teacher distribution q. ``q`` is the teacher's softmax at the
objective's temperature, ``labels`` the true classes c. Any leading axes are kept: (..., B, K)
with labels (..., B) for a population of students, one distribution per member and example.

- universe: ``uniform`` -- a uniform teacher; KD with it is label smoothing.
- instance: ``pt`` -- keeps the teacher's true-class probability q_c, spreads the rest evenly.
- domain:   ``sim`` -- one class-similarity distribution per class, the same for every example.
- both:     ``pt_sim`` -- q_c per example, the rest shared by class similarity.
- ``topk`` (KD-topk), ``permuted`` (control: keeps q_c, destroys class relationships),
  ``teacher`` (plain KD).

Objectives are listed (in errors, ``python -m kd.objectives``, fig3 after its default methods) in
the order they are declared here, stacked declarations from the bottom up.
"""

from __future__ import annotations

import torch

from kd.objectives.registry import CE, DKD, LS, Objective, Param, register, soft_target

register(Objective("ce", "CE (none)", "none", target=None, loss=CE, needs_teacher=False))


# Label smoothing, and the same uniform target under KD's loss: equal at tau 1 with kd_weight = eps, no t2.
@soft_target("kd_uniform", "KD-uniform (control)", "universe (control: == ls at tau 1)", needs_teacher=False)
@soft_target("ls", "LS (universe)", "universe", loss=LS, needs_teacher=False)
def uniform(q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Universe level: a teacher that knows nothing but "do not be over-confident"."""
    return torch.full_like(q, 1.0 / q.shape[-1])


# DKD keeps the teacher's distribution and weighs the two parts of its KL apart (registry.DKD).
@soft_target("dkd", "DKD (peer)", "peer: Decoupled KD", loss=DKD)
@soft_target("kd", "KD", "all three")
def teacher(q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain KD: the teacher's own distribution."""
    return q


def true_class_prob(q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """q_c for each example, shape (..., B)."""
    return q.gather(-1, labels[..., None]).squeeze(-1)


def _with_true_class(rest: torch.Tensor, q_c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Place q_c on the true class and spread 1 - q_c over the others in proportion to ``rest``.

    ``rest`` is any non-negative (B, K) weighting; its true-class entry is ignored.
    """
    rest = rest.scatter(-1, labels[..., None], 0.0)
    rest = rest / rest.sum(-1, keepdim=True)
    return (rest * (1.0 - q_c)[..., None]).scatter(-1, labels[..., None], q_c[..., None])


def sharpened_true_class_prob(q: torch.Tensor, labels: torch.Tensor, power: float) -> torch.Tensor:
    """q_c of q^power renormalised: of softmax(t / tau), q_c at temperature tau / power (power 4 at
    tau 4: q_c at tau 1). Power 1 is q_c itself, unchanged to the last bit."""
    return true_class_prob(q if power == 1 else torch.softmax(power * q.log(), dim=-1), labels)


# true_class_power: q_c from q^power (sharpened_true_class_prob), the rest of the target from q itself.
TRUE_CLASS_POWER = Param(1.0, low=0, low_open=True)


@soft_target("kd_pt", "KD-pt (instance)", "universe + instance", true_class_power=TRUE_CLASS_POWER)
def pt(q: torch.Tensor, labels: torch.Tensor, true_class_power: float = 1.0) -> torch.Tensor:
    """Instance level (KD-pt): rho_c = q_c, rho_k = (1 - q_c) / (K - 1)."""
    return _with_true_class(torch.ones_like(q), sharpened_true_class_prob(q, labels, true_class_power), labels)


def sim(class_similarity: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Domain level (KD-sim): row c of the (K, K) class-similarity distribution (one per member:
    (..., K, K) with labels (..., B))."""
    return class_similarity.gather(-2, labels[..., None].expand(*labels.shape, class_similarity.shape[-1]))


@soft_target("kd_sim", "KD-sim (domain)", "universe + domain", needs_similarity=True)
def sim_row(q: torch.Tensor, labels: torch.Tensor, class_similarity: torch.Tensor) -> torch.Tensor:
    """KD-sim's target: ``sim``, whatever the teacher says of the example."""
    return sim(class_similarity, labels)


@soft_target("kd_pt_sim", "KD-pt+sim", "all three", needs_similarity=True, true_class_power=TRUE_CLASS_POWER)
def pt_sim(
    q: torch.Tensor, labels: torch.Tensor, class_similarity: torch.Tensor, true_class_power: float = 1.0
) -> torch.Tensor:
    """Instance + domain (KD-pt+sim): rho_c = q_c, rho_k = (1 - q_c) sim_k / sum_{j != c} sim_j."""
    q_c = sharpened_true_class_prob(q, labels, true_class_power)
    return _with_true_class(sim(class_similarity, labels), q_c, labels)


@soft_target(
    "kd_topk",
    "KD-topk",
    "KD-topk",
    k=Param(0.25, low=0, high=1, low_open=True),  # the fraction of the classes kept
    tail=Param("uniform", choices=("uniform", "renorm")),
)
def topk(q: torch.Tensor, labels: torch.Tensor, k: float, tail: str = "uniform") -> torch.Tensor:
    """KD-topk: keep the teacher's round(k K) largest probabilities (at least one).

    tail="uniform" spreads the dropped mass evenly over the other classes;
    tail="renorm" drops it and renormalises the kept ones.
    """
    num_classes = q.shape[-1]
    kept = max(1, round(k * num_classes))
    top = q.topk(kept, dim=-1)
    keep = torch.zeros_like(q).scatter(-1, top.indices, top.values)
    if tail == "renorm" or kept == num_classes:
        return keep / keep.sum(-1, keepdim=True)
    leftover = (1.0 - top.values.sum(-1, keepdim=True)).clamp_min(0.0) / (num_classes - kept)
    return torch.where(keep > 0, keep, leftover.expand_as(q))


@soft_target("kd_permuted", "KD-permuted (control)", "control for domain")
def permuted(q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Control: q_c kept, the wrong-class probabilities shuffled independently per example."""
    num_classes = q.shape[-1]
    is_true = torch.zeros_like(q, dtype=torch.bool).scatter(-1, labels[..., None], True)
    # Wrong classes first (in class order / in random order), the true class last.
    order = (torch.arange(num_classes, device=q.device) + is_true * num_classes).argsort(-1)
    keys = torch.rand(q.shape, device=q.device).masked_fill(is_true, 2.0)
    shuffled = keys.argsort(-1)
    return torch.zeros_like(q).scatter(-1, order, q.gather(-1, shuffled))
