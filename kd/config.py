"""OmegaConf resolvers the configs use; importing ``kd.train`` registers them."""

from __future__ import annotations

import hashlib
import re

from omegaconf import OmegaConf


def run_name(overrides: str) -> str:
    """A folder name from a run's overrides: readable, filesystem-safe, at most ~120 characters."""
    if not overrides:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", overrides)
    if len(name) > 120:
        name = f"{name[:100]}...{hashlib.sha1(overrides.encode()).hexdigest()[:10]}"
    return name


def register() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


register()
