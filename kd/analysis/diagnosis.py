"""Why KD fails with a given teacher: its three levels of knowledge, measured on one checkpoint.

The paper's v2 diagnoses two failures: a teacher trained with label smoothing erases the class
relationships of its wrong-class probabilities (domain level), and a larger, over-confident
teacher gives q_c near 1 on every training example, so KD rescales every gradient alike
(instance level). ``diagnose`` reports both for any teacher, with its accuracy, calibration and
effective smoothing (universe level).

The soft-target quantities are measured on the split KD distils on (``split``, the training
set), where an over-fit teacher is confident; accuracy and ECE on held-out data (``eval_split``).
w is taken at the start of distillation, where the student's p is uniform:
w = 1 - kd_weight (1 - q_c) / (1 - 1/K) at tau = 1, a property of the teacher alone (a trained
student sits near w = 0 on the examples it fits, see fig1).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_calibration_error

from kd.analysis import domain, instance, universe
from kd.objectives.targets import true_class_prob
from kd.predict import predict

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
ECE_BINS = 15  # as the runs' test/ece (kd.module)
HIGH_TEMPERATURE = 4.0  # where the paper reports class relationships show (fig2's default too)


def start_rescaling(
    teacher_probs: torch.Tensor, labels: torch.Tensor, kd_weight: float, temperature: float = 1.0
) -> torch.Tensor:
    """(B,) w of a student whose p is still uniform: how KD reweights examples from the first step."""
    return instance.rescaling_factor(torch.zeros_like(teacher_probs), teacher_probs, labels, kd_weight, temperature)


def soft_targets(logits: torch.Tensor, labels: torch.Tensor, kd_weight: float, temperature: float = 1.0):
    """The teacher's q at ``temperature``, its q_c and the start-of-training w of each example."""
    probs = torch.softmax(logits / temperature, dim=1)
    return probs, true_class_prob(probs, labels), start_rescaling(probs, labels, kd_weight, temperature)


def spread(name: str, values: torch.Tensor, quantiles=QUANTILES) -> dict[str, float]:
    """``name_mean``, ``name_std`` and ``name_q<percent>`` of ``values``."""
    values = values.double()
    found = {f"{name}_mean": values.mean().item(), f"{name}_std": values.std().item()}
    found.update({f"{name}_q{round(100 * q)}": values.quantile(q).item() for q in quantiles})
    return found


def soft_target_summary(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    superclass_of: torch.Tensor | None = None,
    high_temperature: float = HIGH_TEMPERATURE,
) -> dict[str, float]:
    """Universe, instance and domain summaries of a teacher's ``logits`` on the examples KD distils on.

    The superclass score of the probability correlation is given at KD's ``temperature`` and at
    ``high_temperature``, where the paper reports class relationships show.
    """
    probs, q_c, w = soft_targets(logits, labels, kd_weight, temperature)
    found = {
        "effective_smoothing": universe.effective_smoothing(probs, labels),
        "entropy": universe.entropy(probs).mean().item(),
        **spread("q_c", q_c),
        **spread("w_start", w),
    }
    if superclass_of is not None:
        for name, tau in (("superclass", temperature), ("superclass_high_tau", high_temperature)):
            corr = domain.probability_correlation(torch.softmax(logits / tau, dim=1))
            found.update({f"{name}_{k}": v for k, v in domain.superclass_score(corr, superclass_of).items()})
    return found


def per_example(
    teacher: nn.Module, datamodule, kd_weight: float, split: str = "train", temperature: float = 1.0
) -> pd.DataFrame:
    """One row per example of ``split``: label, the teacher's q_c and the start-of-training w."""
    out = predict(teacher, datamodule, split)
    _, q_c, w = soft_targets(out["logits"], out["labels"], kd_weight, temperature)
    return pd.DataFrame(
        {"index": out["index"].numpy(), "label": out["labels"].numpy(), "q_c": q_c.numpy(), "w_start": w.numpy()}
    )


def diagnose(
    teacher: nn.Module,
    datamodule,
    kd_weight: float,
    temperature: float = 1.0,
    split: str = "train",
    eval_split: str = "test",
    high_temperature: float = HIGH_TEMPERATURE,
) -> dict[str, float]:
    """Everything the paper's failure diagnosis looks at, for one teacher, as a flat dict.

    ``acc`` and ``ece`` on ``eval_split``; on ``split``: effective smoothing, entropy, q_c and w
    (mean, std, quantiles), and where the data has superclasses the within- and between-superclass
    correlation of the teacher's probabilities and the same score of its logit-layer cosine
    (what KD-sim distils).
    """
    held_out = predict(teacher, datamodule, eval_split)
    probs = torch.softmax(held_out["logits"], dim=1)
    k = probs.shape[1]
    found = {
        "acc": (probs.argmax(1) == held_out["labels"]).double().mean().item(),
        "ece": multiclass_calibration_error(probs, held_out["labels"], k, n_bins=ECE_BINS).item(),
    }
    out = predict(teacher, datamodule, split)
    superclass_of = getattr(datamodule, "superclass_of", None)
    found.update(
        soft_target_summary(out["logits"], out["labels"], kd_weight, temperature, superclass_of, high_temperature)
    )
    if superclass_of is not None:
        weights = domain.superclass_score(domain.weight_cosine(teacher), superclass_of)
        found.update({f"weights_{key}": value for key, value in weights.items()})
    return found
