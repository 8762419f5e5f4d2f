"""Hierarchical Gaussian classes: the paper's three levels, with a known ground truth.

S superclass centres mu_s ~ N(0, I_d); m subclass centres per superclass
mu_sj = mu_s + delta N(0, I_d); K = S m classes; x ~ N(mu_k, sigma^2 I_d), optionally passed
through a fixed random nonlinear map. ``delta`` sets how related the classes of one superclass
are (small: near-duplicates), ``sigma`` how hard the examples are. Without the map the Bayes
posterior is exact and linear in x: ``oracle_teacher`` returns it as a model.

``noise_relative=true`` makes the noise sigma * delta: sibling classes then stay equally hard to
tell apart whatever delta, and delta changes only how the classes are related (our choice for
the fig3 sweep). Inputs are divided by their analytic marginal std sqrt(1 + delta^2 + sigma^2),
an affine change that keeps the Bayes posterior and spares the student badly scaled inputs.

Samples are drawn example-major, so a split with n examples per class is a prefix of the same
split with more: a teacher given more data sees a superset of the student's.
"""

from __future__ import annotations

import torch

from kd.data.base import IndexedTensors, TensorDataModule
from kd.errors import UserError, check_range
from kd.models.mlp import MLP

SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}


class SyntheticDataModule(TensorDataModule):
    POPULATION_KEYS = ("seed", "delta", "sigma", "noise_relative", "nonlinear")

    def __init__(
        self,
        superclasses: int = 5,
        subclasses: int = 4,
        dim: int = 32,
        delta: float = 0.5,
        sigma: float = 1.0,
        train_per_class: int = 20,
        val_per_class: int = 50,
        test_per_class: int = 500,
        nonlinear: bool = False,
        noise_relative: bool = False,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 4096,
    ):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
        for key, value in [
            ("superclasses", superclasses),
            ("subclasses", subclasses),
            ("dim", dim),
            ("train_per_class", train_per_class),
            ("val_per_class", val_per_class),
            ("test_per_class", test_per_class),
            ("batch_size", batch_size),
        ]:
            check_range(f"data.{key}", value, 1, None)
        check_range("data.delta", delta, 0, None)
        check_range("data.sigma", sigma, 0, None, low_open=True)
        self.save_hyperparameters()
        self.per_class = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
        self.superclass_of = torch.arange(superclasses).repeat_interleave(subclasses)
        noise = sigma * delta if noise_relative else sigma
        if noise <= 0:
            raise UserError(f"data.delta={delta} with data.noise_relative=true gives zero noise; use delta > 0")
        scale = (1 + delta**2 + noise**2) ** 0.5
        self.noise = noise / scale
        self.centres = self._centres() / scale
        self.map = self._nonlinear_map() if nonlinear else None

    @property
    def num_classes(self) -> int:
        return self.hparams.superclasses * self.hparams.subclasses

    @property
    def class_names(self) -> list[str]:
        """``superclass.subclass``: the generator's own hierarchy."""
        return [f"{s}.{i}" for s in range(self.hparams.superclasses) for i in range(self.hparams.subclasses)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.hparams.dim,)

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.hparams.seed * 1000 + stream)

    def _centres(self) -> torch.Tensor:
        h, g = self.hparams, self._generator(0)
        mu_s = torch.randn(h.superclasses, h.dim, generator=g)
        offsets = h.delta * torch.randn(h.superclasses, h.subclasses, h.dim, generator=g)
        return (mu_s[:, None, :] + offsets).reshape(-1, h.dim)

    def _nonlinear_map(self):
        g = self._generator(9)
        a = torch.randn(self.hparams.dim, self.hparams.dim, generator=g) / self.hparams.dim**0.5
        return lambda x: torch.tanh(x @ a)

    def sample(self, split: str) -> IndexedTensors:
        """Draw a split: ``per_class[split]`` examples of every class, example-major."""
        n, k, d = self.per_class[split], self.num_classes, self.hparams.dim
        noise = torch.randn(n, k, d, generator=self._generator(SPLIT_STREAM[split]))
        x = (self.centres + self.noise * noise).reshape(n * k, d)
        y = torch.arange(k).repeat(n)
        return IndexedTensors(self.map(x) if self.map else x, y)

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = {split: self.sample(split) for split in SPLIT_STREAM}

    def oracle_teacher(self) -> MLP:
        """The exact Bayes posterior as a linear model: logit_k = mu_k.x / s^2 - |mu_k|^2 / 2s^2."""
        if self.map is not None:
            raise UserError("teacher=oracle needs data.nonlinear=false: the posterior is exact only without the map")
        s2 = self.noise**2
        oracle = MLP(self.hparams.dim, self.num_classes, hidden=())
        with torch.no_grad():
            oracle.classifier.weight.copy_(self.centres / s2)
            oracle.classifier.bias.copy_(-(self.centres**2).sum(1) / (2 * s2))
        return oracle
