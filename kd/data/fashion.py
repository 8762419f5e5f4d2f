"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): 70,000 28x28 grey photographs of clothing in 10
classes, resident as uint8 (kd.data.images).

It is read from its four IDX files, gzipped or not, by torchvision's IDX reader, wherever they are:
torchvision's download (``<root>/FashionMNIST/raw/``, what ``make data DATA=fashion_mnist`` and
``data.download=true`` fetch, md5-checked) or any folder that holds them, such as Debian's
``/usr/share/datasets/fashion-mnist`` (package dataset-fashion-mnist), with no copy to make.
The data set has no class hierarchy; ``hierarchy`` gives it one (ours, in configs/data/fashion_mnist.yaml).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import torch
import torchvision
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

from kd.data.folder import torchvision_dataset
from kd.data.images import ImageDataModule
from kd.errors import UserError

CLASSES = torchvision.datasets.FashionMNIST.classes
MEAN_STD = ((0.2860,), (0.3530,))  # of the 60,000 training images
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FETCH = (
    "fetch it with `make data DATA=fashion_mnist` (or data.download=true), or point data.root at a folder "
    "holding the four IDX files (Debian: apt-get install dataset-fashion-mnist, then "
    "data.root=/usr/share/datasets/fashion-mnist)"
)


def folders(root: str) -> list[Path]:
    """Where the files may be: ``root`` itself, or torchvision's layout under it."""
    return [Path(root), Path(root) / "FashionMNIST" / "raw"]


def find(root: str, name: str) -> Path | None:
    """``name`` or ``name.gz`` in one of ``folders(root)``, the uncompressed one first."""
    return next((p for folder in folders(root) for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


@functools.lru_cache(maxsize=4)
def read(path: str, stamp: tuple) -> torch.Tensor:
    """One IDX file as a tensor, decompressed first if gzipped; cached per process (a driver's worker
    runs many jobs on the same files), keyed by the file's ``stamp`` (size, mtime)."""
    reader = read_image_file if "-images-" in path else read_label_file
    if not path.endswith(".gz"):
        return reader(path)
    with tempfile.TemporaryDirectory() as tmp:
        return reader(extract_archive(path, tmp))


def superclass_ids(hierarchy: dict) -> torch.Tensor:
    """(10,) superclass of each class, numbered in the order ``hierarchy`` lists them; every class
    named exactly once."""
    named = [c for members in hierarchy.values() for c in members]
    unknown = sorted(set(named) - set(CLASSES))
    if unknown:
        raise UserError(
            f"data.hierarchy names {unknown[0]!r}, not a Fashion-MNIST class; classes: {', '.join(CLASSES)}"
        )
    if sorted(named) != sorted(CLASSES):
        left = sorted(set(CLASSES) - set(named)) or sorted({c for c in named if named.count(c) > 1})
        raise UserError(
            f"data.hierarchy must name every class exactly once; {left[0]!r} is "
            f"{'missing' if left[0] not in named else 'named twice'}"
        )
    ids = {c: i for i, members in enumerate(hierarchy.values()) for c in members}
    return torch.tensor([ids[c] for c in CLASSES])


class FashionMNISTDataModule(ImageDataModule):
    def __init__(
        self,
        root: str = "data/fashion_mnist",
        hierarchy: dict[str, list[str]] | None = None,
        val_size: int = 500,
        train_per_class: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        seed: int = 0,
        split_seed: int | None = 0,
        min_epoch_size: int = 0,
        augment: bool = False,
        download: bool = False,
    ):
        super().__init__(
            MEAN_STD, val_size, batch_size, eval_batch_size, seed, augment, train_per_class, split_seed, min_epoch_size
        )
        hierarchy = {name: list(members) for name, members in hierarchy.items()} if hierarchy else None  # plain
        self.save_hyperparameters()  # data, not Hydra's containers: checkpoints keep the hparams, and load weights-only
        self.superclass_ids = superclass_ids(hierarchy) if hierarchy else None

    @property
    def num_classes(self) -> int:
        return len(CLASSES)

    @property
    def class_names(self) -> list[str]:
        return list(CLASSES)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 28, 28)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.hparams.root
        if self.hparams.download:
            torchvision_dataset("FashionMNIST", root, train, download=True)
        paths = [find(root, name) for name in FILES[train]]
        if None in paths:
            missing = FILES[train][paths.index(None)]
            raise UserError(
                f"Fashion-MNIST not found: no {missing}[.gz] in {' or '.join(map(str, folders(root)))}; {FETCH}"
            )
        try:
            x, y = (read(str(p), (os.path.getsize(p), os.path.getmtime(p))) for p in paths)
        except Exception as err:  # torchvision's reader asserts and raises many types on a damaged file
            raise UserError(
                f"Fashion-MNIST files in {paths[0].parent} are damaged ({type(err).__name__}: {err}); "
                f"delete them and {FETCH}"
            ) from None
        if len(x) != len(y) or x.shape[1:] != (28, 28) or int(y.max()) >= len(CLASSES):
            raise UserError(
                f"{paths[0]} and {paths[1]} do not hold Fashion-MNIST: {tuple(x.shape)} images, "
                f"{len(y)} labels up to {int(y.max())}; {FETCH}"
            )
        return x[:, None], y

    def superclasses(self) -> torch.Tensor | None:
        return self.superclass_ids
