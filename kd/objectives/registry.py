"""Each objective declared once: its name, soft target, parameters and needs, in one registry.

``get`` builds an objective's loss from its declaration; the config checks (``kd.schema``), the
trainer (``kd.train``, ``kd.module``), fig3's ``--methods`` and labels, and ``python -m kd.objectives``
read it too, so none of them names an objective or its parameters. A soft target declares itself
with ``soft_target`` (``targets.py``; a new one: docs/extending.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from kd.errors import UserError, check_bool, check_choice, check_range
from kd.objectives import similarity
from kd.objectives.loss import KDLoss, decoupled

# A target's first arguments, not parameters: the teacher's q_tau, the labels, and for a domain-level
# target the class similarity.
INPUTS = ("q", "labels", "class_similarity")


@dataclass(frozen=True)
class Param:
    """One parameter of an objective: its default and the values it takes. A number in [low, high]
    (``low_open``: (low, high]), or one of ``choices``, or True / False where the default is a bool;
    None only where ``none`` says what None means."""

    default: object
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple = ()
    none: str | None = None

    def check(self, key: str, value):
        """``value`` as the loss takes it (a numpy number or 0-d tensor as a Python number), or a
        one-line UserError naming ``key``."""
        if value is None and self.none is not None:
            return None
        if self.choices:
            check_choice(key, value, self.choices)
            return value
        if isinstance(self.default, bool):
            check_bool(key, value)
            return value
        return check_range(key, value, self.low, self.high, self.low_open)

    def allowed(self) -> str:
        """The values it takes, as a line of the objectives table."""
        if self.choices:
            return ", ".join(map(str, self.choices))
        if isinstance(self.default, bool):
            return "true, false"
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}]"
        return f"{low}, {high}" + (f", null: {self.none}" if self.none else "")


@dataclass(frozen=True)
class Loss:
    """How an objective's soft target enters the one KD loss (``loss.KDLoss``): the loss's own
    parameters, and ``arguments``, which turns their checked values into ``KDLoss``'s."""

    params: Mapping[str, Param]
    arguments: Callable[[dict], dict]


# KD's loss: ce_weight H(y, p) + kd_weight s KL(rho || p_tau). Every KD-family objective takes it, and
# under a recipe its temperature and weights (recipe.kd; configs/objective/kd.yaml).
KD = Loss(
    {
        "temperature": Param(1.0, low=0, low_open=True),
        "kd_weight": Param(0.9, low=0, high=1),
        "ce_weight": Param(None, low=0, high=1, none="1 - kd_weight"),
        "t2_scale": Param(True),
    },
    dict,
)
# Label smoothing: KD's loss with weight eps on a uniform target, at tau 1 and without the tau^2 scale.
LS = Loss({"eps": Param(0.1, low=0, high=1)}, lambda p: {"kd_weight": p["eps"], "t2_scale": False})
# CE alone: no KD term.
CE = Loss({}, lambda p: {"kd_weight": 0.0, "ce_weight": 1.0})
# DKD (Zhao et al., CVPR 2022): KD's KL split into TCKD and NCKD, weighted apart (``loss.decoupled``);
# the defaults are mdistiller's CIFAR-100 recipe, tckd_weight and nckd_weight its alpha and beta.
DKD = Loss(
    {
        "temperature": Param(4.0, low=0, low_open=True),
        "ce_weight": Param(1.0, low=0, high=1),
        "tckd_weight": Param(1.0, low=0),
        "nckd_weight": Param(8.0, low=0),
        "t2_scale": Param(True),
    },
    lambda p: {
        "kd_weight": 1.0,
        "divergence": decoupled(p["tckd_weight"], p["nckd_weight"]),
        **{k: p[k] for k in ("temperature", "ce_weight", "t2_scale")},
    },
)
# How a domain-level target's class similarity is made (``similarity.of_teacher``); every objective
# that needs one takes these.
SIMILARITY = {
    "beta": Param(0.2, low=0, low_open=True),
    "similarity_source": Param("teacher_weights_cosine", choices=similarity.SOURCES),
}


@dataclass(frozen=True)
class Objective:
    """An objective: ``target`` (the soft target, ``(q, labels, **params) -> rho``, with the class
    similarity as ``class_similarity`` where ``needs_similarity``; None: no KD term) fed to ``loss``.
    ``label``: how figures and tables name it; ``level``: the knowledge its target carries."""

    name: str
    label: str
    level: str
    target: Callable | None
    loss: Loss = KD
    params: Mapping[str, Param] = field(default_factory=dict)  # the target's own
    needs_teacher: bool = True
    needs_similarity: bool = False

    def __post_init__(self):
        if self.target is None:
            return
        takes = {k: p for k, p in inspect.signature(self.target).parameters.items() if k not in INPUTS}
        if sorted(takes) != sorted(self.params):
            raise TypeError(
                f"objective {self.name!r}: its target {self.target.__name__} takes {list(takes) or 'no parameters'} "
                f"but declares {list(self.params) or 'none'}; declare each with a Param"
            )
        for key, p in takes.items():
            if p.default is not p.empty and p.default != self.params[key].default:
                raise TypeError(
                    f"objective {self.name!r}: {key} defaults to {p.default!r} in its target, not as declared"
                )
        shared = set(self.params) & (set(self.loss.params) | set(SIMILARITY))
        if shared:
            raise TypeError(f"objective {self.name!r}: {sorted(shared)} are its loss's or its similarity's parameters")

    @property
    def parameters(self) -> dict[str, Param]:
        """Everything its config may set: the loss's, the target's, the class similarity's."""
        return {**self.loss.params, **self.params, **(SIMILARITY if self.needs_similarity else {})}

    def check(self, given: Mapping, where: str = "objective") -> dict:
        """Every parameter's value: ``given``'s, else its default; an unknown key or bad value is a
        one-line UserError naming it as ``<where>.<key>``."""
        allowed = self.parameters
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            place = "" if where == "objective" else f" (in {where})"
            valid = ", ".join(allowed) or "none"
            raise UserError(
                f"objective {self.name!r} takes no parameter {unknown[0]!r}{place}; valid parameters: {valid}"
            )
        return {key: param.check(f"{where}.{key}", given.get(key, param.default)) for key, param in allowed.items()}

    def build(self, given: Mapping, class_similarity: torch.Tensor | None = None) -> KDLoss:
        """Its loss, ``(student_logits, labels, teacher_logits=None) -> loss``, with ``given``'s parameters."""
        p = self.check(given)
        target = self.target
        if self.params:
            target = partial(target, **{k: p[k] for k in self.params})
        if self.needs_similarity:
            target = similarity.SimilarityTarget(target, similarity.check(self.name, class_similarity))
        elif class_similarity is not None:
            raise UserError(f"objective {self.name!r} takes no class_similarity: its target uses none")
        arguments = self.loss.arguments({k: p[k] for k in self.loss.params})
        return KDLoss(target, needs_teacher=self.needs_teacher, **arguments)


REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add ``objective`` to the registry, under its name (a name is declared once)."""
    if objective.name in REGISTRY:
        raise ValueError(f"objective {objective.name!r} is declared twice")
    REGISTRY[objective.name] = objective
    return objective


def soft_target(
    name: str,
    label: str,
    level: str,
    loss: Loss = KD,
    needs_teacher: bool = True,
    needs_similarity: bool = False,
    **params: Param,
):
    """Declare the decorated function as objective ``name``'s soft target, with a ``Param`` for each of
    its own parameters (``k=Param(0.25, low=0, high=1, low_open=True)``), fed to ``loss``: KD's unless
    given another. Stacked, one function serves several objectives."""

    def declare(target: Callable) -> Callable:
        register(Objective(name, label, level, target, loss, params, needs_teacher, needs_similarity))
        return target

    return declare


def lookup(name: str) -> Objective:
    check_choice("objective", name, REGISTRY)
    return REGISTRY[name]


def get(name: str, class_similarity: torch.Tensor | None = None, **params) -> KDLoss:
    """The loss callable ``(student_logits, labels, teacher_logits=None) -> scalar`` for ``name``;
    ``class_similarity``: the (K, K) distribution of a domain-level target (or (..., K, K), one per member)."""
    return lookup(name).build(params, class_similarity)


def check(config: Mapping) -> tuple[Objective, dict]:
    """An objective config (``name`` and parameters, as ``configs/objective/``): its declaration and
    every parameter's value, or a one-line UserError."""
    given = dict(config)
    objective = lookup(given.pop("name", None))
    return objective, objective.check(given)


def needs_teacher(name: str) -> bool:
    return lookup(name).needs_teacher


def class_similarity(config: Mapping, teacher: nn.Module, train_outputs: Callable[[], dict]) -> torch.Tensor | None:
    """The class similarity the objective ``config`` needs, from its teacher (``train_outputs()``: the
    teacher's logits and labels on the training split, computed only if needed); None if it needs none."""
    objective, params = check(config)
    return similarity.of_teacher(params, teacher, train_outputs) if objective.needs_similarity else None


def table() -> str:
    """Every objective (its needs and parameters' defaults), then every parameter's values, as markdown."""

    lines = [
        "| objective | label | level | teacher | class similarity | parameters (defaults) |",
        "|---|---|---|---|---|---|",
    ]
    values: dict[tuple[str, str], list[str]] = {}
    for o in REGISTRY.values():
        params = " ".join(f"{k}={_spelt(p.default)}" for k, p in o.parameters.items()) or "none"
        needs = ["yes" if need else "no" for need in (o.needs_teacher, o.needs_similarity)]
        lines.append(f"| `{o.name}` | {o.label} | {o.level} | {needs[0]} | {needs[1]} | {params} |")
        for k, p in o.parameters.items():
            values.setdefault((k, p.allowed()), []).append(o.name)
    lines += ["", "| parameter | values | of |", "|---|---|---|"]
    lines += [f"| `{k}` | {allowed} | {', '.join(names)} |" for (k, allowed), names in values.items()]
    return "\n".join(lines)


def _spelt(value) -> str:
    """A value as a config spells it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)
