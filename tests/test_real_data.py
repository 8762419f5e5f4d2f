"""The real-data modules on tiny stand-ins written in the real on-disk layouts (tests/fakes.py)."""

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from kd.data.cifar import CIFARDataModule
from kd.data.folder import ImageFolderDataModule, TorchvisionDataModule
from kd.data.images import augment_batch
from kd.errors import UserError
from tests.fakes import SUPERCLASS_OF, cifar10, cifar100, images, write_png_folder  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def as_set(x: torch.Tensor) -> set:
    return {bytes(image.numpy()) for image in x.reshape(len(x), -1)}


def check_splits(dm, n_train, n_val, n_test):
    """Validation carved from train, disjoint from it, together the whole train file; test untouched."""
    s = dm.splits
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (n_train, n_val, n_test)
    assert s["train"].x.dtype == torch.uint8 and s["train"].x.shape[1:] == (3, 32, 32) == dm.input_shape
    train, val = as_set(s["train"].x), as_set(s["val"].x)
    assert not train & val and len(train | val) == n_train + n_val
    assert not (train | val) & as_set(s["test"].x)


def test_cifar10_loads_with_a_seeded_val_split(cifar10):
    dm = CIFARDataModule("cifar10", root=str(cifar10), val_size=5, batch_size=4)
    dm.setup()
    check_splits(dm, 15, 5, 6)
    assert dm.num_classes == 10 and dm.superclass_of is None
    file_order = torch.from_numpy(images(4, 1)).reshape(4, 3, 32, 32)  # data_batch_1, CHW as in the file
    assert as_set(file_order) <= as_set(torch.cat([dm.splits["train"].x, dm.splits["val"].x]))
    same, other = (CIFARDataModule("cifar10", root=str(cifar10), val_size=5, seed=s) for s in (0, 1))
    same.setup(), other.setup()
    assert torch.equal(same.splits["val"].x, dm.splits["val"].x)
    assert not torch.equal(other.splits["val"].x, dm.splits["val"].x)


def test_cifar100_loads_with_its_superclasses(cifar100):
    dm = CIFARDataModule("cifar100", root=str(cifar100), val_size=50)
    dm.setup()
    check_splits(dm, 150, 50, 100)
    assert dm.num_classes == 100
    assert torch.equal(dm.superclass_of, SUPERCLASS_OF)
    x, y, index = next(iter(dm.loader("test")))
    assert torch.equal(y, torch.arange(100)) and torch.equal(index, torch.arange(100))


def test_images_are_stored_as_the_files_lay_them_out(cifar10):
    dm = CIFARDataModule("cifar10", root=str(cifar10), val_size=0)
    dm.setup()
    first = torch.from_numpy(images(6, 0)).reshape(6, 3, 32, 32)
    assert torch.equal(dm.splits["test"].x, first)  # R, G, B planes of 32 rows of 32


def test_missing_cifar_names_the_folder_and_the_fix(tmp_path):
    folder = re.escape(str(tmp_path / "absent" / "cifar-100-python"))
    with pytest.raises(UserError, match=folder + ".*make data DATA=cifar100"):
        CIFARDataModule("cifar100", root=str(tmp_path / "absent")).setup()


def test_bad_cifar_settings_are_user_errors(cifar10):
    with pytest.raises(UserError, match="data.name='cifar1000'"):
        CIFARDataModule("cifar1000")
    with pytest.raises(UserError, match="data.val_size=20"):
        CIFARDataModule("cifar10", root=str(cifar10), val_size=20).setup()


def candidates(image: torch.Tensor, padding: int):
    padded = F.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop.flip(-1)


def test_augment_batch_crops_and_flips_each_image():
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    draws = [[key for key, c in candidates(image, 4) if torch.equal(c, result)] for image, result in zip(x, out)]
    assert all(len(d) == 1 for d in draws)  # every output is exactly one padded crop, maybe flipped
    draws = [d[0] for d in draws]
    assert {flip for *_, flip in draws} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in draws}) > 20  # offsets drawn per image
    again = augment_batch(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_batches_are_augmented_only_while_training(cifar10):
    dm = CIFARDataModule("cifar10", root=str(cifar10), val_size=5)
    dm.setup()
    batch = next(iter(dm.loader("train", shuffle=True)))
    normalised = dm.prepare_eval_batch(batch[0])
    assert normalised.dtype == torch.float32 and abs(normalised.mean()) < 1
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], normalised)
    dm.trainer = SimpleNamespace(training=True)
    x, y, index = dm.on_after_batch_transfer(batch, 0)
    assert x.shape == normalised.shape and not torch.equal(x, normalised)
    assert torch.equal(y, batch[1]) and torch.equal(index, batch[2])


class Recorder(L.LightningModule):
    """Records what reaches the model, to check that Lightning runs the data module's hook."""

    def __init__(self):
        super().__init__()
        self.layer, self.seen = torch.nn.Linear(3 * 32 * 32, 10), []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0])
        return F.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_feeds_the_model_normalised_batches(cifar10):
    dm, model = CIFARDataModule("cifar10", root=str(cifar10), val_size=5, batch_size=5), Recorder()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    x = model.seen[0]
    assert x.dtype == torch.float32 and x.shape == (5, 3, 32, 32) and x.abs().max() < 3


def test_image_folder_loads_with_a_stratified_val_split(tmp_path):
    write_png_folder(tmp_path / "train", per_class=6, seed=0)
    write_png_folder(tmp_path / "val", per_class=2, seed=1)
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=8, batch_size=4, num_workers=0, pin_memory=False, val_per_class=2, val_fraction=0.0
    )
    assert dm.num_classes == 3 and dm.input_shape == (3, 8, 8) and dm.superclass_of is None
    train, val = dm.splits["train"], dm.splits["val"]
    assert (len(train), len(val), len(dm.splits["test"])) == (12, 6, 6)
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    targets = torch.tensor(train.dataset.targets)
    assert torch.equal(torch.bincount(targets[val.indices]), torch.tensor([2, 2, 2]))
    x, y, index = next(iter(dm.loader("train", shuffle=True)))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.shape == index.shape == (4,)
    assert torch.equal(y, targets[train.indices[index]])
    x, y, index = next(iter(dm.loader("test")))
    assert torch.equal(index, torch.arange(6)) and torch.equal(y, torch.tensor([0, 0, 1, 1, 2, 2]))
    by_fraction = ImageFolderDataModule(str(tmp_path), image_size=8, num_workers=0, val_fraction=0.5)
    by_fraction.setup()
    assert len(by_fraction.splits["val"]) == 9


def test_image_folder_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "train")) + ".*make data DATA=imagenet"):
        ImageFolderDataModule(str(tmp_path), num_workers=0).setup()
    write_png_folder(tmp_path / "train", per_class=2, seed=0)
    write_png_folder(tmp_path / "val", per_class=1, seed=0, classes=("ant", "bee"))
    with pytest.raises(UserError, match="2 class folders.*has 3"):
        ImageFolderDataModule(str(tmp_path), num_workers=0).setup()
    with pytest.raises(UserError, match="only one of"):
        ImageFolderDataModule(str(tmp_path), val_per_class=1, val_fraction=0.1)


def test_torchvision_data_set_by_name(cifar10):
    dm = TorchvisionDataModule(
        "CIFAR10", root=str(cifar10), num_workers=0, pin_memory=False, val_fraction=0.5, batch_size=8
    )
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    assert (len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"])) == (10, 10, 6)
    x, y, index = next(iter(dm.loader("train", shuffle=True)))
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(UserError, match="'FashionMnist' is not a torchvision data set.*FashionMNIST"):
        TorchvisionDataModule("FashionMnist", root=str(cifar10)).setup()
    with pytest.raises(UserError, match="MNIST not found.*" + re.escape(str(cifar10)) + ".*make data DATA=MNIST"):
        TorchvisionDataModule("MNIST", root=str(cifar10)).setup()


def load_prepare_data():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_sorts_imagenet_val_into_class_folders(tmp_path):
    write_png_folder(tmp_path / "train", per_class=2, seed=0)
    val = tmp_path / "val"
    write_png_folder(val, per_class=2, seed=1)
    lines = ["ImageId,PredictionString"]
    for image in sorted(val.glob("*/*.png")):  # flatten it, as ImageNet's val set arrives
        lines.append(f"{image.stem},{image.parent.name} 1 2 3 4 {image.parent.name} 5 6 7 8")
        image.rename(val / image.name)
    for folder in [p for p in val.iterdir() if p.is_dir()]:
        folder.rmdir()
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match="not yet sorted.*--val-labels"):
        load_prepare_data().main(["imagenet", "--root", str(tmp_path)])
    load_prepare_data().main(["imagenet", "--root", str(tmp_path), "--val-labels", str(labels)])
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, num_workers=0, val_per_class=1, val_fraction=0.0)
    assert dm.num_classes == 3 and len(dm.splits["test"]) == 6
    assert dm.splits["test"].dataset.targets == [0, 0, 1, 1, 2, 2]
