"""CIFAR-10/100, resident as uint8 and augmented on the device (kd.data.images).

The validation split is carved from the 50,000 training images (seeded), so the test set stays
unseen; CIFAR-100's superclasses (its coarse labels) are read from the train file.
"""

from __future__ import annotations

import os
import pickle

import torch
import torchvision

from kd.data.folder import torchvision_dataset
from kd.data.images import ImageDataModule
from kd.errors import UserError, check_choice

DATASETS = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
MEAN_STD = {  # per-channel statistics of the training images, as used by RepDistiller
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def superclasses(root: str) -> torch.Tensor:
    """(100,) coarse label of each fine class, read from the train file (torchvision keeps only fine)."""
    cls = torchvision.datasets.CIFAR100
    with open(os.path.join(root, cls.base_folder, cls.train_list[0][0]), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    fine, coarse = torch.tensor(entry["fine_labels"]), torch.tensor(entry["coarse_labels"])
    return torch.zeros(100, dtype=torch.long).scatter_(0, fine, coarse)


class CIFARDataModule(ImageDataModule):
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
        check_choice("data.name", name, list(DATASETS))
        super().__init__(MEAN_STD[name], val_size, batch_size, eval_batch_size, seed, augment)
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.hparams.name]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        name, root = self.hparams.name, self.hparams.root
        if self.hparams.download:  # a failed download is a one-line error
            torchvision_dataset(DATASETS[name].__name__, root, train, download=True)
        try:
            dataset = DATASETS[name](root, train=train)
        except RuntimeError:  # torchvision: missing or failing its md5 check
            folder = os.path.join(root, DATASETS[name].base_folder)
            raise UserError(
                f"{name} not found or corrupted in {folder}; fetch it with "
                f"`make data DATA={name}` or set data.download=true"
            ) from None
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)

    def superclasses(self) -> torch.Tensor | None:
        return superclasses(self.hparams.root) if self.hparams.name == "cifar100" else None
