"""The paper's objectives: each one a soft target (``targets``) fed to one KD loss (``loss``).

    >>> loss_fn = kd.objectives.get("kd_pt", kd_weight=0.9)
    >>> loss = loss_fn(student_logits, labels, teacher_logits)

| name        | soft target                               | level of knowledge        |
| ----------- | ----------------------------------------- | ------------------------- |
| ce          | none                                      | none                      |
| ls          | uniform (kd_weight = eps, tau = 1)        | universe                  |
| kd_uniform  | uniform, with KD's weights and tau        | universe (control: == ls at tau 1) |
| kd_pt       | q_c, rest uniform                         | universe + instance       |
| kd_sim      | class-similarity row of c                 | universe + domain         |
| kd_pt_sim   | q_c, rest by class similarity             | all three                 |
| kd_permuted | q_c, wrong classes shuffled per example   | control for domain        |
| kd_topk     | teacher's top-k, tail uniform or renorm   | KD-topk                   |
| kd          | the teacher's q_tau                       | all three                 |
| dkd         | q_tau, its KL split into TCKD and NCKD    | peer: Decoupled KD        |

KD-pt and DKD are the two ways of editing KD's wrong-class part. Per example,
KL(q || p) = TCKD + (1 - q_c) NCKD (``loss.decoupled_terms``). KD-pt keeps TCKD and replaces the
teacher's distribution over the wrong classes by the uniform one: its KL is
TCKD + (1 - q_c) KL(uniform || p_hat). DKD keeps the teacher's wrong-class distribution and drops
the (1 - q_c) factor: tckd_weight TCKD + nckd_weight NCKD.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from kd.errors import UserError, check_bool, check_choice, check_range
from kd.objectives import targets
from kd.objectives.loss import KDLoss, decoupled

NAMES = ("ce", "ls", "kd", "kd_pt", "kd_sim", "kd_pt_sim", "kd_topk", "kd_uniform", "kd_permuted", "dkd")
# No teacher in the loss: kd_uniform's target is uniform whatever the teacher says.
TEACHER_FREE = ("ce", "ls", "kd_uniform")
NEEDS_SIMILARITY = ("kd_sim", "kd_pt_sim")
TOPK_TAILS = ("uniform", "renorm")

_KD_DEFAULTS = {"temperature": 1.0, "kd_weight": 0.9, "ce_weight": None, "t2_scale": True}
# DKD (Zhao et al., CVPR 2022): mdistiller's CIFAR-100 recipe; tckd_weight and nckd_weight are its alpha, beta.
_DEFAULTS = {
    "ce": {},
    "ls": {"eps": 0.1},
    "dkd": {"temperature": 4.0, "ce_weight": 1.0, "tckd_weight": 1.0, "nckd_weight": 8.0, "t2_scale": True},
}
_EXTRA = {
    "kd_sim": {"class_similarity": None},
    "kd_pt_sim": {"class_similarity": None},
    "kd_topk": {"k": 0.25, "tail": "uniform"},
}
# check_range's (low, high, low_open) for every numeric parameter.
_RANGES = {
    "eps": (0, 1),
    "kd_weight": (0, 1),
    "ce_weight": (0, 1),
    "k": (0, 1, True),
    "temperature": (0, None, True),
    "tckd_weight": (0, None),
    "nckd_weight": (0, None),
}


def needs_teacher(name: str) -> bool:
    return name not in TEACHER_FREE


def _params(name: str, given: dict) -> dict:
    """Defaults for ``name`` updated with ``given``; unknown keys and bad values are user errors."""
    allowed = _DEFAULTS.get(name, {**_KD_DEFAULTS, **_EXTRA.get(name, {})})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) or "none"
        raise UserError(f"objective {name!r} takes no parameter {unknown[0]!r}; valid parameters: {valid}")
    params = {**allowed, **given}
    for key in [k for k in _RANGES if k in params]:
        if key == "ce_weight" and params[key] is None and "kd_weight" in params:
            continue  # KD's ce_weight None is 1 - kd_weight
        params[key] = check_range(f"objective.{key}", params[key], *_RANGES[key])
    if "t2_scale" in params:
        check_bool("objective.t2_scale", params["t2_scale"])
    if "tail" in params:
        check_choice("objective.tail", params["tail"], TOPK_TAILS)
    if name in NEEDS_SIMILARITY:
        params["class_similarity"] = _class_similarity(name, params["class_similarity"])
    return params


def _class_similarity(name: str, value) -> torch.Tensor:
    """``value`` if it is a (K, K) matrix whose rows are distributions (or (..., K, K), one per member
    of a population), else a one-line error saying why not."""
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


def _sim(q: torch.Tensor, labels: torch.Tensor, class_similarity: torch.Tensor) -> torch.Tensor:
    return targets.sim(class_similarity, labels)


class SimilarityTarget(nn.Module):
    """KD-sim's and KD-pt+sim's target ``build(q, labels, class_similarity)``, with the similarity a
    buffer: it moves with the model that holds the loss (once), not to the logits' device at each step."""

    def __init__(self, build, class_similarity: torch.Tensor):
        super().__init__()
        self.build = build
        self.register_buffer("class_similarity", class_similarity, persistent=False)

    def forward(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classes = self.class_similarity.shape[-1]
        if classes != q.shape[-1]:
            raise UserError(f"class_similarity is {classes}x{classes}, but the logits have {q.shape[-1]} classes")
        # In q's dtype (fp32) even in a model converted to half precision (precision=bf16-true).
        return self.build(q, labels, self.class_similarity.to(q.dtype))


def get(name: str, **params) -> KDLoss:
    """The loss callable ``(student_logits, labels, teacher_logits=None) -> scalar`` for ``name``."""
    check_choice("objective", name, NAMES)
    p = _params(name, params)
    if name == "ce":
        return KDLoss(None, kd_weight=0.0, ce_weight=1.0, needs_teacher=False)
    if name == "ls":
        return KDLoss(targets.uniform, kd_weight=p["eps"], t2_scale=False, needs_teacher=False)
    if name == "dkd":
        divergence = decoupled(p.pop("tckd_weight"), p.pop("nckd_weight"))
        return KDLoss(targets.teacher, kd_weight=1.0, divergence=divergence, **p)
    if name in NEEDS_SIMILARITY:
        builder = SimilarityTarget(_sim if name == "kd_sim" else targets.pt_sim, p.pop("class_similarity"))
    else:
        builder = {
            "kd": targets.teacher,
            "kd_pt": targets.pt,
            "kd_uniform": targets.uniform,
            "kd_permuted": targets.permuted,
            "kd_topk": partial(targets.topk, k=p.pop("k", None), tail=p.pop("tail", None)),
        }[name]
    return KDLoss(builder, needs_teacher=needs_teacher(name), **p)


__all__ = ["KDLoss", "NAMES", "NEEDS_SIMILARITY", "TEACHER_FREE", "UserError", "get", "needs_teacher", "targets"]
