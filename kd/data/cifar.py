"""CIFAR-10/100 kept resident as uint8 and augmented on the device, one whole batch at a time.

Decoding and augmenting 32x32 images sample by sample in worker processes costs more than the
small CIFAR nets themselves; here a batch is one tensor indexing, and the standard augmentation
(random crop with 4 pixels of zero padding, horizontal flip) is one gather on the accelerator.
The validation split is carved from the training set (seeded), so the test set stays unseen.
"""

from __future__ import annotations

import os
import pickle

import torch
import torchvision
from torch.nn import functional as F

from kd.data.base import IndexedTensors, TensorDataModule
from kd.errors import UserError, check_choice, check_range

DATASETS = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
MEAN_STD = {  # per-channel statistics of the training images, as used by RepDistiller
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


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


def superclasses(dataset: torchvision.datasets.CIFAR100) -> torch.Tensor:
    """(100,) coarse label of each fine class, read from the train file (torchvision keeps only fine)."""
    with open(os.path.join(dataset.root, dataset.base_folder, dataset.train_list[0][0]), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    fine, coarse = torch.tensor(entry["fine_labels"]), torch.tensor(entry["coarse_labels"])
    return torch.zeros(100, dtype=torch.long).scatter_(0, fine, coarse)


class CIFARDataModule(TensorDataModule):
    def __init__(
        self,
        name: str = "cifar100",
        root: str = "data/cifar100",
        val_size: int = 5000,
        batch_size: int = 64,
        eval_batch_size: int = 1024,
        seed: int = 0,
        download: bool = False,
        augment: bool = True,
    ):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
        check_choice("data.name", name, list(DATASETS))
        check_range("data.val_size", val_size, 0, None)
        check_range("data.batch_size", batch_size, 1, None)
        self.save_hyperparameters()
        self.mean, self.std = (torch.tensor(s).view(1, 3, 1, 1) * 255 for s in MEAN_STD[name])

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.hparams.name]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    def _load(self, train: bool):
        name, root = self.hparams.name, self.hparams.root
        try:
            dataset = DATASETS[name](root, train=train, download=self.hparams.download)
        except RuntimeError:  # torchvision: missing or failing its md5 check
            folder = os.path.join(root, DATASETS[name].base_folder)
            raise UserError(f"{name} not found or corrupted in {folder}; fetch it with "
                            f"`make data DATA={name}` or set data.download=true") from None
        x = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return dataset, x, torch.tensor(dataset.targets)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_set, x, y = self._load(train=True)
        check_range("data.val_size", self.hparams.val_size, 0, len(y) - 1)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
        val, train = order[: self.hparams.val_size].sort().values, order[self.hparams.val_size :].sort().values
        _, x_test, y_test = self._load(train=False)
        self.splits = {
            "train": IndexedTensors(x[train], y[train]),
            "val": IndexedTensors(x[val], y[val]),
            "test": IndexedTensors(x_test, y_test),
        }
        if self.hparams.name == "cifar100":
            self.superclass_of = superclasses(train_set)

    def fixed_inputs(self, split: str) -> bool:
        return not (split == "train" and self.hparams.augment)

    def prepare_eval_batch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images to normalised floats; every batch goes through it (kd.predict calls it too)."""
        if self.mean.device != x.device:  # moved once, not per batch: each copy would make the host wait
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float() - self.mean) / self.std

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment (training only) and normalise on the device the batch was moved to."""
        x, y, index = batch
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            x = augment_batch(x)
        return self.prepare_eval_batch(x), y, index
