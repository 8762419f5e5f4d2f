"""Put a data set where the data configs look for it (``make data DATA=<name>`` calls this).

  python scripts/prepare_data.py cifar100 --root data/cifar100   # or cifar10, fashion_mnist, or any
                                                                 # torchvision data set class name (KMNIST)
  python scripts/prepare_data.py imagenet --root data/imagenet --val-labels LOC_val_solution.csv

CIFAR, Fashion-MNIST and the other torchvision data sets are downloaded by torchvision, which checks
their md5; a download that fails (no route to the host) says in one line where to put the files by hand.
Fashion-MNIST needs no download where its four IDX files already are: data.root=<their folder>.

ImageNet (ILSVRC-2012) needs its terms accepted, so it must be downloaded by hand: either the
tars ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/download.php,
placed in --root, or Kaggle's imagenet-object-localization-challenge, with --root pointing at its
ILSVRC/Data/CLS-LOC (holding train/ and a flat val/). The train tar is md5-checked and unpacked
into train/<wnid>/. The 50,000 val images come in one flat folder; they are moved into
val/<wnid>/ folders from the ground-truth file given as --val-labels: Kaggle's
LOC_val_solution.csv (the wnid opens each PredictionString) or any file of '<image> <wnid>' lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torchvision.datasets.imagenet import ARCHIVE_META, parse_train_archive
from torchvision.datasets.utils import check_integrity, extract_archive

from kd.data.folder import torchvision_dataset
from kd.errors import UserError

TORCHVISION_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "fashion_mnist": "FashionMNIST"}


def download(name: str, root: Path) -> None:
    for train in (True, False):
        torchvision_dataset(TORCHVISION_NAMES.get(name, name), str(root), train=train, download=True)
    print(f"{name} ready in {root}")


def read_val_labels(path: Path) -> dict[str, str]:
    """Image id (file name without extension) -> wnid, from either ground-truth format."""
    labels = {}
    for line in path.read_text().splitlines():
        fields = line.replace(",", " ").split()
        if len(fields) >= 2 and fields[0] != "ImageId":  # skip the CSV header
            labels[Path(fields[0]).stem] = fields[1]
    return labels


def sort_val_folder(val_dir: Path, labels: dict[str, str]) -> int:
    """Move every ``val_dir/<image>`` into ``val_dir/<wnid>/``; returns how many moved."""
    images = sorted(p for p in val_dir.iterdir() if p.is_file())
    unlabelled = [p.name for p in images if p.stem not in labels]
    if unlabelled:
        raise UserError(
            f"{len(unlabelled)} images in {val_dir} are not in the ground-truth file, e.g. "
            f"{unlabelled[0]}; pass the file for these images as --val-labels"
        )
    for image in images:
        (val_dir / labels[image.stem]).mkdir(exist_ok=True)
        image.rename(val_dir / labels[image.stem] / image.name)
    return len(images)


def imagenet(root: Path, val_labels: Path | None) -> None:
    train_dir, val_dir = root / "train", root / "val"
    train_tar, val_tar = (root / ARCHIVE_META[split][0] for split in ("train", "val"))
    if not train_dir.is_dir():
        if not train_tar.is_file():
            raise UserError(f"neither {train_dir} nor {train_tar} exists; download ImageNet by hand (see --help)")
        parse_train_archive(str(root))
    if not val_dir.is_dir():
        if not val_tar.is_file():
            raise UserError(f"neither {val_dir} nor {val_tar} exists; download ImageNet by hand (see --help)")
        if not check_integrity(str(val_tar), ARCHIVE_META["val"][1]):
            raise UserError(f"{val_tar} is corrupted (md5 mismatch); download it again")
        extract_archive(str(val_tar), str(val_dir))
    if any(p.is_file() for p in val_dir.iterdir()):
        if val_labels is None:
            raise UserError(
                f"{val_dir} holds images not yet sorted into class folders; rerun with "
                "--val-labels <LOC_val_solution.csv or '<image> <wnid>' file>"
            )
        print(f"moved {sort_val_folder(val_dir, read_val_labels(val_labels))} images into class folders in {val_dir}")
    print(f"imagenet ready in {root}: {sum(1 for p in train_dir.iterdir() if p.is_dir())} training classes")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="cifar10, cifar100, fashion_mnist, imagenet or a torchvision data set class name")
    parser.add_argument("--root", type=Path, help="where to put it (default: data/<name>)")
    parser.add_argument("--val-labels", type=Path, help="ImageNet only: ground truth of the val images")
    args = parser.parse_args(argv)
    root = args.root or Path("data") / args.name
    try:
        if args.name == "imagenet":
            imagenet(root, args.val_labels)
        else:
            download(args.name, root)
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
