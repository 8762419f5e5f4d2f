"""The paper's objectives: each one a soft target (``targets``) fed to one KD loss (``loss``).

    >>> loss_fn = kd.objectives.get("kd_pt", kd_weight=0.9)
    >>> loss = loss_fn(student_logits, labels, teacher_logits)

| name        | soft target                               | level of knowledge        |
| ----------- | ----------------------------------------- | ------------------------- |
| ce          | none                                      | none                      |
| ls          | uniform (kd_weight = eps, tau = 1)        | universe                  |
| kd_uniform  | uniform, with KD's weights and tau        | universe (control: == ls) |
| kd_pt       | q_c, rest uniform                         | universe + instance       |
| kd_sim      | class-similarity row of c                 | universe + domain         |
| kd_pt_sim   | q_c, rest by class similarity             | all three                 |
| kd_permuted | q_c, wrong classes shuffled per example   | control for domain        |
| kd_topk     | teacher's top-k, tail uniform or renorm   | KD-topk                   |
| kd          | the teacher's q_tau                       | all three                 |
"""

from __future__ import annotations

from functools import partial

from kd.errors import UserError, check_choice, check_range
from kd.objectives import targets
from kd.objectives.loss import KDLoss

NAMES = ("ce", "ls", "kd", "kd_pt", "kd_sim", "kd_pt_sim", "kd_topk", "kd_uniform", "kd_permuted")
TEACHER_FREE = ("ce", "ls")
NEEDS_SIMILARITY = ("kd_sim", "kd_pt_sim")
TOPK_TAILS = ("uniform", "renorm")

_KD_DEFAULTS = {"temperature": 1.0, "kd_weight": 0.9, "ce_weight": None, "t2_scale": True}
_EXTRA = {"kd_sim": {"class_similarity": None}, "kd_pt_sim": {"class_similarity": None},
          "kd_topk": {"k": 0.25, "tail": "uniform"}}


def needs_teacher(name: str) -> bool:
    return name not in TEACHER_FREE


def _params(name: str, given: dict) -> dict:
    """Defaults for ``name`` updated with ``given``; unknown keys and bad values are user errors."""
    if name == "ce":
        allowed = {}
    elif name == "ls":
        allowed = {"eps": 0.1}
    else:
        allowed = {**_KD_DEFAULTS, **_EXTRA.get(name, {})}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) or "none"
        raise UserError(f"objective {name!r} takes no parameter {unknown[0]!r}; valid parameters: {valid}")
    params = {**allowed, **given}
    if "eps" in params:
        check_range("objective.eps", params["eps"], 0, 1)
    if "temperature" in params:
        check_range("objective.temperature", params["temperature"], 0, None, low_open=True)
        check_range("objective.kd_weight", params["kd_weight"], 0, 1)
        if params["ce_weight"] is not None:
            check_range("objective.ce_weight", params["ce_weight"], 0, 1)
    if "k" in params:
        check_range("objective.k", params["k"], 0, 1, low_open=True)
        check_choice("objective.tail", params["tail"], TOPK_TAILS)
    if name in NEEDS_SIMILARITY and params["class_similarity"] is None:
        raise UserError(f"objective {name!r} needs class_similarity, a (K, K) tensor (see kd.objectives.similarity)")
    return params


def get(name: str, **params) -> KDLoss:
    """The loss callable ``(student_logits, labels, teacher_logits=None) -> scalar`` for ``name``."""
    check_choice("objective", name, NAMES)
    p = _params(name, params)
    if name == "ce":
        return KDLoss(None, kd_weight=0.0, ce_weight=1.0, needs_teacher=False)
    if name == "ls":
        return KDLoss(targets.uniform, kd_weight=p["eps"], t2_scale=False, needs_teacher=False)
    similarity = p.pop("class_similarity", None)
    builder = {
        "kd": targets.teacher,
        "kd_pt": targets.pt,
        "kd_uniform": targets.uniform,
        "kd_permuted": targets.permuted,
        "kd_sim": lambda q, labels: targets.sim(similarity.to(q.device), labels),
        "kd_pt_sim": lambda q, labels: targets.pt_sim(q, labels, similarity.to(q.device)),
        "kd_topk": partial(targets.topk, k=p.pop("k", None), tail=p.pop("tail", None)),
    }[name]
    return KDLoss(builder, **p)


__all__ = ["KDLoss", "NAMES", "NEEDS_SIMILARITY", "TEACHER_FREE", "UserError", "get", "needs_teacher", "targets"]
