"""Data held as tensors and served in whole batches by index.

Small models spend most of their time in the data pipeline when batches are collated sample by
sample; here a batch is one indexing of resident tensors. On an accelerator the tensors are copied
to it once and indexed there, so no example crosses from the host during training. Every batch is
``(x, y, index)`` so per-example analyses can key results by example.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class IndexedTensors(Dataset):
    """``ds[indices] -> (x[indices], y[indices], indices)``; a batch is one tensor indexing."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):
        index = torch.as_tensor(index)
        return self.x[index], self.y[index], index


def ranked_by_class(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position of ``labels`` grouped by class, in a seeded random order within each class, and
    each one's rank in its class: the first ``n`` of a class are a seeded random draw of ``n``, and a
    larger ``n`` (same seed) draws a superset."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels)
    return by_class, torch.arange(len(labels)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)


class IndexBatchSampler:
    """Batches of indices, reshuffled per epoch from (seed, epoch) and sharded across ranks.

    The order depends only on the seed and the epoch, and the sampler counts the examples of that
    order the ranks have taken this epoch (its ``state_dict``), so a run resumed from a mid-epoch
    checkpoint goes on with the rest of the same order: on as many ranks, with the next batches an
    uninterrupted run would take; on fewer, the rest of the epoch once, in fewer steps. It is drawn
    on the host and sent to ``device`` once per epoch: a batch of indices copied on its own would
    make the host wait for the device. A shuffled epoch draws ``epoch_size`` indices (at least
    ``size``): a split smaller than that is passed over again, reshuffled, so a tiny training subset
    still gets that many steps per epoch. A shuffled (training) epoch is padded with repeated indices
    to shard evenly across ranks; an evaluation pass is not, so that it counts each example once
    (the ranks' metric states are summed at the end of the epoch, whatever their sizes).
    """

    def __init__(
        self, size, batch_size, shuffle, seed=0, drop_last=False, rank=0, world_size=1, device="cpu", epoch_size=0
    ):
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.device = device
        self.epoch_size = max(size, epoch_size) if shuffle else size
        self.epoch = 0
        self.start, self.given = 0, 0  # examples of this epoch taken before this pass; batches given out in it
        self._resume = (-1, 0)  # (epoch, examples taken): from a restored checkpoint, skipped by that epoch's pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.start + self.given * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        # "given" (batches of one rank's shard): a checkpoint written before "taken", by as many ranks
        self._resume = (state["epoch"], state.get("taken", state.get("given", 0) * self.batch_size * self.world_size))

    def _order(self) -> torch.Tensor:
        """This epoch's indices, before they are sharded."""
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        passes = -(-self.epoch_size // self.size)
        return torch.cat([torch.randperm(self.size, generator=generator) for _ in range(passes)])[: self.epoch_size]

    def _padded(self, order: torch.Tensor) -> torch.Tensor:
        """Training pads ``order`` with its first indices, so that every rank takes as many steps."""
        return torch.cat([order, order[: -len(order) % self.world_size]]) if self.shuffle else order

    def __iter__(self):
        epoch, taken = self._resume
        self.start, self.given, self._resume = (taken if epoch == self.epoch else 0), 0, (-1, 0)
        rest = self._padded(self._padded(self._order())[self.start :])  # padded again: on another number of ranks
        for batch in rest[self.rank :: self.world_size].to(self.device).split(self.batch_size):
            if not (self.drop_last and len(batch) < self.batch_size):
                self.given += 1
                yield batch

    def __len__(self) -> int:
        per_rank = math.ceil(self.epoch_size / self.world_size)  # padded in training
        n = per_rank if self.shuffle else len(range(self.rank, self.size, self.world_size))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning keeps in every checkpoint (it saves and restores the
    ``state_dict`` of stateful loaders): that of its batch sampler. Lightning takes no batch ahead
    from a loader with a length, so the position is the number of batches trained on."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def resumable(data: Dataset, sampler, seed: int) -> ResumableLoader:
    """``data`` served in ``sampler``'s batches of indices, by a loader with its own generator: a
    loader starting an epoch draws a seed for workers, and from torch's global generator that draw
    would shift dropout and augmentation in a run resumed mid-epoch."""
    return ResumableLoader(data, sampler=sampler, batch_size=None, generator=torch.Generator().manual_seed(seed))


class SplitDataModule(L.LightningDataModule):
    """Lightning's three loaders, all from one ``loader(split, shuffle)`` that subclasses define
    (the analyses call it too, for un-augmented passes over any split)."""

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        raise NotImplementedError

    def fixed_inputs(self, split: str) -> bool:
        """Whether every pass over ``split`` gives each example the same input (no augmentation)
        and the split is small enough to keep a teacher's logits for each example: then
        DistillationModule runs the frozen teacher over it once, not once per epoch."""
        return False

    @property
    def class_names(self) -> list[str]:
        """A name for each class, for figures (its index where the data set names none)."""
        return [str(k) for k in range(self.num_classes)]

    def train_dataloader(self):
        return self.loader("train", shuffle=True)

    def val_dataloader(self):
        return self.loader("val")

    def test_dataloader(self):
        return self.loader("test")


class TensorDataModule(SplitDataModule):
    """Base for data that fits in memory: subclasses fill ``self.splits`` in ``setup``.

    Attributes the rest of the toolkit reads: ``num_classes``, ``input_shape`` and
    ``superclass_of`` (a (K,) tensor of superclass ids, or None when the data has no hierarchy).
    ``min_epoch_size``: the fewest examples a shuffled (training) epoch draws (``IndexBatchSampler``).

    ``POPULATION_KEYS``: the config keys that change the values of the data but not its shapes
    (nor the batches' sizes); runs whose data configs differ only in them can train as one
    population (kd.population). Empty: its runs train one at a time.
    """

    POPULATION_KEYS: tuple[str, ...] = ()

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 1024, seed: int = 0, min_epoch_size: int = 0):
        super().__init__()
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.min_epoch_size = min_epoch_size
        self.splits: dict[str, IndexedTensors] = {}
        self.superclass_of: torch.Tensor | None = None
        self._resident: dict[tuple[str, torch.device], IndexedTensors] = {}

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"].x.shape[1:])

    def fixed_inputs(self, split: str) -> bool:
        return True  # in memory, and not augmented unless a subclass says so

    def transform(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """A batch's inputs as the network takes them, on their device (a population applies each
        member's): as held, unless a subclass augments or normalises."""
        return x

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, index = batch
        return self.transform(x, self.trainer is not None and self.trainer.training), y, index

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        self.setup()
        trainer = getattr(self, "trainer", None)
        data = self.on_device(split, trainer.strategy.root_device if trainer is not None else torch.device("cpu"))
        return resumable(data, self.sampler(split, shuffle, batch_size, data.x.device), self.seed)

    def sampler(
        self, split: str, shuffle: bool = False, batch_size: int | None = None, device: torch.device | str = "cpu"
    ) -> IndexBatchSampler:
        """The batches of indices ``loader`` serves (a population stacks its members')."""
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return IndexBatchSampler(
            len(self.splits[split]),
            batch_size or (self.batch_size if shuffle else self.eval_batch_size),
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            device=device,
            epoch_size=self.min_epoch_size,
        )

    def on_device(self, split: str, device: torch.device) -> IndexedTensors:
        """``split`` on ``device``, copied there on first use; ``self.splits`` stay on the host."""
        data = self.splits[split]
        if data.x.device == device:
            return data
        if (split, device) not in self._resident:
            self._resident[split, device] = IndexedTensors(data.x.to(device), data.y.to(device))
        return self._resident[split, device]
