"""Tiny stand-ins for the real data sets, written in their real on-disk layouts.

The CIFAR files are pickled exactly as the originals are laid out; torchvision still runs its md5
integrity check on them, against these files' own md5 sums patched into its tables. Fashion-MNIST's
are IDX files, gzipped or not. A test module uses the fixtures by importing them.
"""

import gzip
import hashlib
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image


def images(n: int, seed: int):
    """Distinct random images as the files store them: uint8 rows of 3072 (R, G, B planes)."""
    return torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy()


def write(path: Path, obj) -> list:
    path.write_bytes(pickle.dumps(obj))
    return [path.name, hashlib.md5(path.read_bytes()).hexdigest()]


@pytest.fixture
def cifar10(tmp_path, monkeypatch):
    """5 training batches of 4 images and a test batch of 6, in cifar-10-batches-py/."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [
        write(
            folder / f"data_batch_{i}",
            {
                "batch_label": f"training batch {i} of 5",
                "data": images(4, i),
                "labels": [(4 * i + j) % 10 for j in range(4)],
                "filenames": [f"img{i}_{j}.png" for j in range(4)],
            },
        )
        for i in range(1, 6)
    ]
    test = [
        write(
            folder / "test_batch",
            {
                "batch_label": "testing batch 1 of 1",
                "data": images(6, 0),
                "labels": list(range(6)),
                "filenames": [f"t{j}.png" for j in range(6)],
            },
        )
    ]
    name, md5 = write(
        folder / "batches.meta",
        {"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": 4, "num_vis": 3072},
    )
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", train)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", test)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "meta", {"filename": name, "key": "label_names", "md5": md5})
    return tmp_path


# Fine class k belongs to a superclass other than k // 5, so a map guessed from the order would fail.
SUPERCLASS_OF = torch.randperm(100, generator=torch.Generator().manual_seed(1)) % 20


@pytest.fixture
def cifar100(tmp_path, monkeypatch):
    """train (2 images per class), test (1 per class) and meta, in cifar-100-python/."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    def split(name, per_class, seed):
        fine = torch.arange(100).repeat(per_class)
        return write(
            folder / name,
            {
                "filenames": [f"{name}{i}.png" for i in range(len(fine))],
                "batch_label": name,
                "fine_labels": fine.tolist(),
                "coarse_labels": SUPERCLASS_OF[fine].tolist(),
                "data": images(len(fine), seed),
            },
        )

    train, test = [split("train", 2, 10)], [split("test", 1, 11)]
    name, md5 = write(
        folder / "meta",
        {"fine_label_names": [f"f{k}" for k in range(100)], "coarse_label_names": [f"s{k}" for k in range(20)]},
    )
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "train_list", train)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "test_list", test)
    meta = {"filename": name, "key": "fine_label_names", "md5": md5}
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "meta", meta)
    return tmp_path


def write_png_folder(folder: Path, per_class: int, seed: int, classes=("ant", "bee", "cat")):
    g = torch.Generator().manual_seed(seed)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(folder / name / f"{name}_{i}.png")


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """A uint8 tensor as an IDX file (big-endian header: 0, 0, type 0x08, ndim; then each dimension),
    gzipped when ``path`` ends in .gz, as Fashion-MNIST ships."""
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(n.to_bytes(4, "big") for n in tensor.shape)
    data = header + tensor.numpy().tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


FASHION_TRAIN_PER_CLASS, FASHION_TEST_PER_CLASS = 12, 2


def write_fashion_mnist(folder: Path, gz: bool) -> None:
    """Fashion-MNIST's four files, 12 training and 2 test images per class, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, per_class, seed in (("train", FASHION_TRAIN_PER_CLASS, 0), ("t10k", FASHION_TEST_PER_CLASS, 1)):
        labels = torch.arange(10).repeat(per_class).to(torch.uint8)
        images = torch.randint(
            0, 256, (len(labels), 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
        )
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


@pytest.fixture
def fashion_mnist(tmp_path):
    """A flat folder of the four gzipped files, as Debian's dataset-fashion-mnist installs them."""
    write_fashion_mnist(tmp_path / "fashion", gz=True)
    return tmp_path / "fashion"
