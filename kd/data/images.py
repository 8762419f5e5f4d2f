"""Image data sets held in memory as uint8 and augmented on the device, one whole batch at a time.

Decoding and augmenting small images sample by sample in worker processes costs more than the
small nets themselves; here a batch is one tensor indexing, and the standard augmentation (random
crop with 4 pixels of zero padding, horizontal flip) is one gather on the accelerator. The
validation split is carved from the training set (seeded), so the test set stays unseen; a
data-limited student can train on a seeded subset of the rest, ``train_per_class`` images of
each class. Subclasses read the files: ``load(train) -> (x (N, C, H, W) uint8, y (N,))``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kd.data.base import IndexedTensors, TensorDataModule, ranked_by_class
from kd.errors import UserError, check_range


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image and a coin-flip horizontal flip.

    ``x`` is (B, C, H, W) of any dtype; ``generator`` (on x's device) makes the draw reproducible.
    """
    b, c, h, w = x.shape
    device = x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, b), device=device, generator=generator)
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    rows = offsets[0, :, None] + torch.arange(h, device=device)
    cols = offsets[1, :, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
    padded = F.pad(x, (padding,) * 4)
    return padded[
        torch.arange(b, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def per_class_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted positions of a seeded random ``n`` examples of every class (nested: a larger ``n``
    with the same seed keeps the smaller draw)."""
    counts = torch.bincount(labels)
    if n > counts.min():
        raise UserError(
            f"data.train_per_class={n} is more than the {int(counts.min())} training images of class "
            f"{int(counts.argmin())}; lower it (null: every training image)"
        )
    by_class, rank = ranked_by_class(labels, seed)
    return by_class[rank < n].sort().values


class ImageDataModule(TensorDataModule):
    """Base of the resident image data sets (CIFAR, Fashion-MNIST).

    ``split_seed`` draws the validation split (None: ``seed``, so each seed has its own); ``seed``
    draws the ``train_per_class`` subset and the batch order. ``mean_std``: the training images'
    per-channel mean and std on the 0-1 scale. ``min_epoch_size``: see ``TensorDataModule``.
    Runs that differ in their seed train as one population (every other data key sets the shapes).
    """

    POPULATION_KEYS = ("seed",)

    def __init__(
        self,
        mean_std,
        val_size: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        augment: bool,
        train_per_class: int | None = None,
        split_seed: int | None = None,
        min_epoch_size: int = 0,
    ):
        super().__init__(
            batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, min_epoch_size=min_epoch_size
        )
        check_range("data.val_size", val_size, 0, None)
        check_range("data.batch_size", batch_size, 1, None)
        check_range("data.min_epoch_size", min_epoch_size, 0, None)
        if train_per_class is not None:
            check_range("data.train_per_class", train_per_class, 1, None)
        self.val_size, self.augment, self.train_per_class = val_size, augment, train_per_class
        self.split_seed = seed if split_seed is None else split_seed
        self.mean, self.std = (torch.tensor(s).view(1, -1, 1, 1) * 255 for s in mean_std)
        self._augment_rng: torch.Generator | None = None
        self._augment_state: torch.Tensor | None = None  # restored from a checkpoint, set on the next generator

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def superclasses(self) -> torch.Tensor | None:
        """(K,) superclass of each class, or None (no hierarchy); called after ``load``."""
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = self.load(train=True)
        check_range("data.val_size", self.val_size, 0, len(y) - 1)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        val, train = order[: self.val_size].sort().values, order[self.val_size :].sort().values
        if self.train_per_class is not None:
            train = train[per_class_subset(y[train], self.train_per_class, self.seed)]
        x_test, y_test = self.load(train=False)
        self.splits = {
            "train": IndexedTensors(x[train], y[train]),
            "val": IndexedTensors(x[val], y[val]),
            "test": IndexedTensors(x_test, y_test),
        }
        self.superclass_of = self.superclasses()

    def fixed_inputs(self, split: str) -> bool:
        return not (split == "train" and self.augment)

    def prepare_eval_batch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images to normalised floats; every batch goes through it (kd.predict calls it too)."""
        if self.mean.device != x.device:  # moved once, not per batch: each copy would make the host wait
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float() - self.mean) / self.std

    def transform(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Augment (training only, from this module's generator) and normalise on x's device."""
        return self.prepare_eval_batch(augment_batch(x, self._generator(x.device)) if training and self.augment else x)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The crops' and flips' random source: seeded by ``seed`` on the device, so that a member of a
        population draws what its single run draws; its state is in every checkpoint (``state_dict``)."""
        if self._augment_rng is None or self._augment_rng.device != device:
            self._augment_rng = torch.Generator(device).manual_seed(self.seed)
            if self._augment_state is not None:
                self._augment_rng.set_state(self._augment_state)
        return self._augment_rng

    def state_dict(self) -> dict:
        return {} if self._augment_rng is None else {"augment_rng": self._augment_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._augment_state, self._augment_rng = state.get("augment_rng"), None
