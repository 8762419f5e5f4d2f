"""Data too large to hold in memory, decoded by worker processes: ImageNet-style folders and any
torchvision classification data set.

Batches are ``(x, y, index)`` like the tensor modules', with ``index`` the example's position in
its split. Each module carves a seeded, class-stratified validation split from the training set
and shards batches across ranks itself (the trainer runs with ``use_distributed_sampler=false``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from kd.data.base import SplitDataModule, ranked_by_class
from kd.errors import UserError, check_range

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def to_normalised_tensor(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class Split(Dataset):
    """Examples ``indices`` of a data set of (image, label), with their own transform: ``split[i] -> (x, y, i)``."""

    def __init__(self, dataset: Dataset, transform, indices: torch.Tensor | None = None):
        self.dataset, self.transform = dataset, transform
        self.indices = torch.arange(len(dataset)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.dataset[int(self.indices[i])]
        return self.transform(x), y, i


def carve(labels: torch.Tensor, seed: int, val_per_class: int = 0, val_fraction: float = 0.0):
    """(train, val) indices: per class, a seeded random ``val_per_class`` examples (or the nearest
    whole number to ``val_fraction`` of them) go to validation."""
    by_class, rank = ranked_by_class(labels, seed)
    counts = torch.bincount(labels)
    n_val = torch.full_like(counts, val_per_class) if val_per_class else (counts * val_fraction).round().long()
    if bool(((n_val >= counts) & (counts > 0)).any()):
        raise UserError(
            f"data.val_per_class={val_per_class} / data.val_fraction={val_fraction} leaves a class "
            f"with no training examples (smallest class: {int(counts[counts > 0].min())}); lower it"
        )
    is_val = rank < n_val.repeat_interleave(counts)
    return by_class[~is_val].sort().values, by_class[is_val].sort().values


class LoaderDataModule(SplitDataModule):
    """Base for file-backed data: subclasses fill ``self.splits`` (train/val/test ``Split``s) in ``setup``.

    Exposes what the toolkit reads from every data module: ``num_classes``, ``input_shape``,
    ``superclass_of`` (None: no class hierarchy) and ``loader(split)``.
    """

    superclass_of = None
    WORKERS = 8  # data.num_workers null outside a SLURM job

    def __init__(self, batch_size, eval_batch_size, num_workers, pin_memory, seed, val_per_class, val_fraction):
        super().__init__()
        check_range("data.batch_size", batch_size, 1, None)
        check_range("data.val_per_class", val_per_class, 0, None)
        check_range("data.val_fraction", val_fraction, 0, 1, high_open=True)
        if val_per_class and val_fraction:
            raise UserError("set only one of data.val_per_class and data.val_fraction (the other to 0)")
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        # null: a worker per CPU SLURM grants the task (--cpus-per-task) but the one the rank runs on, so a
        # job's loaders use what it asked for; outside a SLURM job, WORKERS.
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if num_workers is None:
            num_workers = max(int(cpus) - 1, 0) if cpus else self.WORKERS
        self.num_workers, self.pin_memory = check_range("data.num_workers", num_workers, 0, None), pin_memory
        self.val_per_class, self.val_fraction = val_per_class, val_fraction
        self.splits: dict[str, Split] = {}

    def make_splits(self, train_set, test_set, labels, train_transform, eval_transform) -> None:
        train, val = carve(labels, self.seed, self.val_per_class, self.val_fraction)
        self.class_count = len(getattr(train_set, "classes", ())) or int(labels.max()) + 1
        self.splits = {
            "train": Split(train_set, train_transform, train),
            "val": Split(train_set, eval_transform, val),
            "test": Split(test_set, eval_transform),
        }

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.class_count

    @property
    def input_shape(self) -> tuple[int, ...]:
        self.setup()
        return tuple(self.splits["test"][0][0].shape)

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        self.setup()
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # Lightning calls set_epoch on it, so the order follows (seed, epoch) and survives a resume. Only
        # training is padded to shard evenly: an evaluation pass counts each example once.
        sampler = (DistributedSampler if shuffle else UnrepeatedDistributedSampler)(
            self.splits[split], num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed
        )
        return DataLoader(
            self.splits[split],
            batch_size=batch_size or (self.batch_size if shuffle else self.eval_batch_size),
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )


class ImageFolderDataModule(LoaderDataModule):
    """``root/<train_dir>/<class>/<image>`` for training (and validation, carved from it) and
    ``root/<val_dir>/<class>/<image>`` as the test split, as for ImageNet. Standard ImageNet
    transforms, scaled by ``image_size``: RandomResizedCrop + flip for training; resize to
    256/224 of it then centre crop for evaluation."""

    def __init__(
        self,
        root: str = "data/imagenet",
        train_dir: str = "train",
        val_dir: str = "val",
        image_size: int = 224,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int | None = None,
        pin_memory: bool = True,
        val_per_class: int = 0,
        val_fraction: float = 0.01,
        seed: int = 0,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed, val_per_class, val_fraction)
        check_range("data.image_size", image_size, 1, None)
        self.save_hyperparameters()

    def _folder(self, subdir: str) -> torchvision.datasets.ImageFolder:
        path = Path(self.hparams.root) / subdir
        try:
            return torchvision.datasets.ImageFolder(path)
        except FileNotFoundError as err:
            h = self.hparams
            raise UserError(
                f"no <class>/<image> folders in {path} ({err}); for ImageNet run "
                f"`make data DATA=imagenet`, or point data.root at a folder with {h.train_dir}/ and "
                f"{h.val_dir}/"
            ) from None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_set, test_set = self._folder(self.hparams.train_dir), self._folder(self.hparams.val_dir)
        if train_set.classes != test_set.classes:
            h = self.hparams
            raise UserError(
                f"{Path(h.root) / h.val_dir} has {len(test_set.classes)} class folders but {h.train_dir}/ "
                f"has {len(train_set.classes)}; both need the same classes (ImageNet's val images must be "
                "sorted into class folders: `make data DATA=imagenet`)"
            )
        size, normalise = self.hparams.image_size, to_normalised_tensor(*IMAGENET_MEAN_STD)
        self.make_splits(
            train_set,
            test_set,
            torch.tensor(train_set.targets),
            v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *normalise]),
            v2.Compose([v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size), *normalise]),
        )


def torchvision_dataset(name: str, root: str, train: bool, download: bool = False, **kwargs):
    """``torchvision.datasets.<name>``'s train or test split, whether it takes ``train=`` or ``split=``."""
    cls = getattr(torchvision.datasets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torchvision.datasets.VisionDataset)):
        raise UserError(
            f"data.name={name!r} is not a torchvision data set; e.g. MNIST, FashionMNIST, KMNIST, "
            "CIFAR10, CIFAR100, SVHN, STL10 (names are case-sensitive)"
        )
    params = inspect.signature(cls).parameters
    if "train" in params:
        kwargs["train"] = train
    elif "split" in params:
        kwargs["split"] = "train" if train else "test"
    else:
        raise UserError(f"torchvision's {name} has no train/test splits; use data=imagefolder instead")
    try:
        return cls(root, download=download, **kwargs)
    except (OSError, RuntimeError) as err:  # a failed download (URLError is an OSError); missing or corrupt files
        if download:
            raise UserError(download_failed(cls, root, err)) from None
        if not isinstance(err, RuntimeError):  # not torchvision's "not found": the system's own error says more
            raise
        raise UserError(
            f"{name} not found or corrupted in {root}; fetch it with `make data DATA={name}` or set data.download=true"
        ) from None


def download_failed(cls: type, root: str, err: BaseException) -> str:
    """One line for a torchvision download that failed: why, the address tried, and where to put the
    files by hand (torchvision then checks and unpacks them instead of downloading)."""
    reason = next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), type(err).__name__)
    if isinstance(getattr(cls, "url", None), str):  # one archive: CIFAR
        files, url, where = cls.filename, cls.url, root
    elif getattr(cls, "mirrors", None) and isinstance(getattr(cls, "resources", None), list):  # MNIST and kin
        files, url = ", ".join(name for name, _ in cls.resources), f"{cls.mirrors[0]}{cls.resources[0][0]}"
        where = str(Path(root) / cls.__name__ / "raw")
    else:
        return (
            f"downloading {cls.__name__} into {root} failed ({reason}); see torchvision's {cls.__name__} for its source"
        )
    return (
        f"downloading {cls.__name__} failed ({reason}); tried {url}; if this machine cannot reach it, "
        f"download {files} by hand into {where} and run again"
    )


def labels_of(dataset) -> torch.Tensor:
    for attr in ("targets", "labels", "_labels"):  # where torchvision's data sets keep them
        if getattr(dataset, attr, None) is not None:
            return torch.as_tensor(np.asarray(getattr(dataset, attr)), dtype=torch.long)
    raise UserError(f"cannot read the labels of {type(dataset).__name__}; use data=imagefolder instead")


class TorchvisionDataModule(LoaderDataModule):
    """Any torchvision classification data set by class name (``data.name=FashionMNIST``).

    Images become tensors normalised with mean = std = 0.5 per channel, centre-cropped to
    ``image_size`` when given (needed when image sizes vary); no augmentation.
    ``dataset_kwargs`` go to the data set class (e.g. ``{split: balanced}`` for EMNIST).
    """

    WORKERS = 2  # small images: few workers keep up

    def __init__(
        self,
        name: str = "FashionMNIST",
        root: str = "data/FashionMNIST",
        download: bool = False,
        image_size: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        num_workers: int | None = None,
        pin_memory: bool = True,
        val_per_class: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        dataset_kwargs: dict | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed, val_per_class, val_fraction)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        h = self.hparams
        train_set, test_set = (
            torchvision_dataset(h.name, h.root, train, h.download, **(h.dataset_kwargs or {}))
            for train in (True, False)
        )
        resize = [v2.Resize(h.image_size), v2.CenterCrop(h.image_size)] if h.image_size else []
        transform = v2.Compose([*resize, *to_normalised_tensor([0.5], [0.5])])
        self.make_splits(train_set, test_set, labels_of(train_set), transform, transform)
