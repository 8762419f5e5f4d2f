"""Put on PYTHONPATH, makes this Python as bare as the GPU machine's (tests/test_gpu_check.py): what
this environment's site-packages holds is there only for the distributions of ``GPU_MACHINE`` and
what they require. Any other (hydra-core, omegaconf, wandb, submitit, ...) is missing, to imports
and to importlib.metadata alike, unless found elsewhere on the path, as the wheels
scripts/gpu_check.sh installs. Python reads this file at start-up, so subprocesses are bare too."""

import importlib.machinery
import importlib.metadata as metadata
import os
import site
import sys

from packaging.requirements import Requirement

# What the GPU machine's Python has (docs/performance.md), with pip, which every environment has.
GPU_MACHINE = ("torch", "torchvision", "lightning", "torchmetrics", "pytest", "pandas", "scipy", "matplotlib", "pip")


def normal(name: str) -> str:
    return name.lower().replace("_", "-")


def closure(names) -> set[str]:
    """The distributions ``names`` name and, recursively, what they require (extras left out)."""
    seen, todo = set(), [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        if normal(req.name) in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(normal(req.name))
        todo += [Requirement(r) for r in requires]
    return seen


ALLOWED = closure(GPU_MACHINE)
SITE = {os.path.realpath(p) for p in site.getsitepackages()}
HIDDEN = {
    module
    for module, dists in metadata.packages_distributions().items()
    if not any(normal(d) in ALLOWED for d in dists)
}


class Bare(importlib.machinery.PathFinder):
    """Python's path finder, blind to the site-packages of the distributions outside ``ALLOWED``."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if path is None and name in HIDDEN:
            path = [p for p in sys.path if os.path.realpath(p) not in SITE]
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return (
            d
            for d in super().find_distributions(*args, **kwargs)
            if normal(d.name) in ALLOWED or os.path.realpath(d.locate_file("")) not in SITE
        )


sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Bare
