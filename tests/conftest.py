"""Every test writes under a temporary root and never talks to the W&B servers."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A fresh project root: runs, teachers, W&B files all land here."""
    monkeypatch.setenv("KD_ROOT", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


TINY = [
    "data.superclasses=2", "data.subclasses=2", "data.dim=8", "data.train_per_class=10",
    "data.val_per_class=5", "data.test_per_class=20", "trainer.max_epochs=2",
    "model.hidden=[16]", "logger=none", "trainer.enable_progress_bar=false",
]
TINY_TEACHER = ["teacher=mlp", "teacher.model.hidden=[16]", "teacher.data.train_per_class=30",
                "teacher.trainer.max_epochs=2"]


@pytest.fixture
def tiny():
    return list(TINY)
