"""Model zoo: ``kd.models.get(name, num_classes=..., input_shape=...)``.

Every model exposes ``features(x)`` (the penultimate activation h) and ``classifier``, the
linear logit layer whose rows are the class templates w_k the domain-level analysis reads.
"""

from __future__ import annotations

from kd.errors import UserError
from kd.models import cifar, imagenet
from kd.models.mlp import mlp

REGISTRY = {"mlp": mlp, **cifar.MODELS, **imagenet.MODELS}


def get(name: str, num_classes: int, input_shape=None, in_channels: int | None = None, **kwargs):
    """Build model ``name`` for ``num_classes`` classes and inputs of ``input_shape`` (C, H, W) or (D,)."""
    if name not in REGISTRY:
        raise UserError(f"model={name!r} is not valid; choose one of: {', '.join(sorted(REGISTRY))}")
    if input_shape is None:
        raise UserError(f"model {name!r} needs input_shape (the data module's input_shape)")
    if in_channels is not None:
        input_shape = (in_channels, *tuple(input_shape)[1:])
    return REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
