"""Run a frozen model over a whole split: the raw material of every analysis."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, datamodule, split: str = "train", features: bool = False) -> dict:
    """Logits (and penultimate features h if asked), labels and example indices of ``split``.

    Un-augmented and keyed by example index, so results line up with the data whatever the order.
    It leaves torch's global random stream as it found it (a loader's iterator draws its seed from
    it), so an analysis run between training epochs changes nothing in the training.
    """
    with torch.random.fork_rng(devices=[]):
        return _predict(model, datamodule, split, features)


def _predict(model: nn.Module, datamodule, split: str, features: bool) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {"logits": [], "labels": [], "index": [], **({"features": []} if features else {})}
    for x, y, index in datamodule.loader(split):
        x = datamodule.prepare_eval_batch(x.to(device)) if hasattr(datamodule, "prepare_eval_batch") else x.to(device)
        if features:
            h = model.features(x)
            out["features"].append(h.flatten(1).float().cpu())
            logits = model.classifier(h.flatten(1))
        else:
            logits = model(x)
        out["logits"].append(logits.float().cpu())
        out["labels"].append(y.cpu())
        out["index"].append(index.cpu())
    model.train(was_training)
    return {key: torch.cat(value) for key, value in out.items()}


def probabilities(model: nn.Module, datamodule, split: str = "train", temperature: float = 1.0) -> dict:
    """``predict`` plus ``probs`` = softmax(logits / temperature): a teacher's q_tau on ``split``."""
    out = predict(model, datamodule, split)
    out["probs"] = torch.softmax(out["logits"] / temperature, dim=1)
    return out
