"""Config checks that need no code per component, run before any data is loaded or teacher trained.

Every node with a ``_target_`` is checked against the signature of what it names (for a factory
``get(name, **kwargs)`` with a ``REGISTRY``, the registered callable too): a key it does not take,
or a value whose type its annotation (else its default) rules out, is a one-line user error.
Values only a library can judge, such as an optimizer's learning rate, are judged by building
the optimizer and scheduler once on a dummy parameter. The objective, and the recipe's settings for
objectives, are checked against the objectives' declarations (``kd.objectives.registry``).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import os
import types
import typing

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd import CUBLAS_DETERMINISTIC, objectives
from kd.errors import UserError, check_choice

_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,), type(None): (type(None),)}
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_NO_NAME = object()  # a node without a ``name`` key


def check(cfg: DictConfig) -> dict:
    """The checks every run config must pass, whatever its components; returns it resolved."""
    plain = resolved(cfg)
    seed = plain.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise UserError(f"seed={seed!r} is not valid; give an integer in [0, 2**32 - 1]")
    check_choice("deterministic", plain.get("deterministic"), (True, False, "warn"))
    check_cublas(plain)
    check_targets(plain, OmegaConf.to_container(cfg, resolve=False))
    check_optimizer(cfg)
    check_objectives(plain)
    return plain


def check_cublas(plain: dict) -> None:
    """deterministic=true on CUDA fails at its first matrix product where torch's CUDA started
    without a deterministic CUBLAS_WORKSPACE_CONFIG, which torch reads once (kd/__init__.py)."""
    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if (
        plain.get("deterministic") is True
        and plain.get("trainer", {}).get("accelerator") != "cpu"
        and torch.cuda.is_initialized()
        and value not in CUBLAS_DETERMINISTIC
    ):
        good = CUBLAS_DETERMINISTIC[0]
        raise UserError(
            f"deterministic=true needs CUBLAS_WORKSPACE_CONFIG={good} before torch's first CUDA matrix "
            f"product, and CUDA started in this process with it {value or 'unset'}; export "
            f"CUBLAS_WORKSPACE_CONFIG={good} before starting Python, or import kd before using CUDA"
        )


def resolved(cfg: DictConfig) -> dict:
    """The whole config as plain data; a missing (``???``) or unresolvable value is a user error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "a key"
        raise UserError(
            f"{key} has no usable value ({str(err).splitlines()[0]}); set it on the command line: {key}=..."
        ) from None


def check_targets(node, raw, path: str = "") -> None:
    """Check every ``_target_`` node in resolved config data against its target's signature;
    ``raw`` is the same data unresolved, to name where an interpolated value came from."""
    if isinstance(node, dict):
        if "_target_" in node:
            check_target(path, node, raw if isinstance(raw, dict) else {})
        for key, value in node.items():
            check_targets(value, raw.get(key) if isinstance(raw, dict) else None, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, raw[i] if isinstance(raw, list) else None, f"{path}[{i}]")


def check_target(path: str, node: dict, raw: dict) -> None:
    name = node.get("name", _NO_NAME)
    options = _options(path, node["_target_"], name if isinstance(name, collections.abc.Hashable) else str(name))
    if options is None:
        return  # a builtin without a signature: it judges its own arguments
    callee, params, any_keyword = options
    for key, value in node.items():
        if key in _HYDRA_KEYS or (key not in params and any_keyword):
            continue
        if key not in params:
            raise UserError(f"{path}.{key} is not an option of {callee}; valid: {', '.join(params)}")
        if not _accepts(params[key], value):
            origin = f" (from {raw[key]})" if "${" in str(raw.get(key)) else ""
            raise UserError(
                f"{path}.{key}={value!r}{origin} has the wrong type for {callee}; "
                f"expected {inspect.formatannotation(params[key])}"
            )


@functools.cache  # a sweep checks many configs of a few targets: inspect each once
def _options(path: str, target_name: str, name) -> tuple[str, dict, bool] | None:
    """What the node at ``path`` with this ``_target_`` (and registry ``name``) takes: the callable's
    name, its parameters' types, whether it takes any keyword; None if it has no signature."""
    try:
        target = get_object(target_name)
    except Exception as err:  # noqa: BLE001  (import errors of every kind)
        raise UserError(f"{path}._target_={target_name!r} cannot be imported ({type(err).__name__}: {err})") from None
    chain = [target]
    registry = getattr(inspect.getmodule(target), "REGISTRY", None)
    if _takes_any_keyword(target) and isinstance(registry, dict) and name is not _NO_NAME:
        check_choice(f"{path}.name", name, sorted(registry))
        chain.append(registry[name])
    if any(_signature(fn) is None for fn in chain):
        return None
    params = {}
    for fn in chain:
        hints = _hints(fn)
        for p in _signature(fn).parameters.values():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params[p.name] = hints.get(p.name, _from_default(p.default))
    return getattr(chain[-1], "__qualname__", str(chain[-1])), params, _takes_any_keyword(chain[-1])


def check_objectives(plain: dict) -> None:
    """The objective against its declaration (``kd.objectives``), and every setting the recipe gives
    an objective (``recipe.<objective>.<parameter>``), whichever objective runs."""
    for name, given in (plain.get("recipe") or {}).items():
        check_choice("recipe.<objective>", name, objectives.REGISTRY)
        if not isinstance(given, dict):
            raise UserError(f"recipe.{name}={given!r} is not valid; give its parameters: recipe.{name}.<parameter>=...")
        objectives.lookup(name).check(given, where=f"recipe.{name}")
    objectives.check(plain["objective"])


def check_optimizer(cfg: DictConfig) -> None:
    """Build the optimizer and scheduler once on a dummy parameter: they judge their own values."""
    try:
        optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise UserError(f"optimizer ({cfg.optimizer._target_}) rejects its config: {err}") from None
    if cfg.get("scheduler"):
        try:
            instantiate(cfg.scheduler)(optimizer=optimizer)
        except (ValueError, TypeError) as err:
            raise UserError(f"scheduler ({cfg.scheduler._target_}) rejects its config: {err}") from None


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _takes_any_keyword(fn) -> bool:
    signature = _signature(fn)
    return signature is not None and any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def _hints(fn) -> dict:
    """Resolved annotations, or none when they cannot be resolved (then defaults stand in)."""
    try:
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # noqa: BLE001  (forward references a module cannot resolve)
        return {}


def _from_default(default):
    """The type a parameter without annotation takes, judged by its default (any number for a number)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float
    if isinstance(default, (list, tuple)):
        return list
    return typing.Any


def _accepts(annotation, value) -> bool:
    """Whether config data ``value`` can be an ``annotation``; kinds this cannot judge pass."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if isinstance(value, dict) and "_target_" in value:
        return True  # an object built from config: its own node is checked
    if annotation in _SCALARS:
        return isinstance(value, _SCALARS[annotation]) and not (annotation in (int, float) and isinstance(value, bool))
    if (origin or annotation) in _SEQUENCES:
        return isinstance(value, list)
    if (origin or annotation) in _MAPPINGS:
        return isinstance(value, dict)
    return True
