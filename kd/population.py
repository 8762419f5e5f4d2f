"""Populations: many runs of one architecture trained at once, as one stacked model.

A figure's sweep trains hundreds of small students (fig3: 7 objectives x 4 deltas x 10 seeds) whose
arithmetic is milliseconds an epoch; trained one by one, each pays Lightning's per-run and per-step
costs many times over. Runs whose configs agree on everything but their own seed, objective,
teacher and data values (``key``) train as one population: one Lightning run of ``kd.train.run``
with the G members' parameters stacked on a leading axis (``Stack``, torch.func's model
ensembling), each member with its own data and batch order (``Data``), teacher outputs,
objective, metrics and best epoch (``kd.module``). A member starts from exactly the weights its
own run starts from, sees the same batches in the same order, and writes the results.json and
checkpoints its own run would write, with a note that it ran in a population.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader, Dataset

from kd.data.base import SplitDataModule, TensorDataModule, resumable
from kd.errors import UserError

# The most rows (members x examples) of a population's evaluation batch: its activations grow with
# the members, and a larger batch spills the caches (140 fig3 students: 19 GFLOP/s at 256 examples
# a member, 14 at 1000 and more; docs/performance.md). The batches change no metric (fig3's 280
# accuracies are bit for bit those of whole-split batches).
EVAL_ROWS = 32768
# Top-level config keys every member has its own of; all other keys must agree.
MEMBER_KEYS = ("seed", "objective", "teacher", "paths", "task_name", "tags", "hydra")


def key(cfg: DictConfig) -> str | None:
    """What runs must share to train as one population; None for a run that trains alone: one with
    a callback that monitors a logged value (EarlyStopping: one value, not G), compile, gradient
    clipping (a norm over all members), more than one device, or data whose module declares no
    ``POPULATION_KEYS``."""
    data_cls = get_object(cfg.data._target_)
    if not (isinstance(data_cls, type) and issubclass(data_cls, TensorDataModule)) or not data_cls.POPULATION_KEYS:
        return None
    trainer = cfg.trainer
    if (
        cfg.get("compile")
        or trainer.get("gradient_clip_val")
        or trainer.get("devices", 1) != 1
        or trainer.get("num_nodes", 1) != 1
        or any(c and c.get("monitor") for c in (cfg.get("callbacks") or {}).values())
    ):
        return None
    # Unresolved: a value that follows a member's own (``${seed}``, ``${paths.output_dir}/...``) is alike.
    plain = OmegaConf.to_container(cfg, resolve=False)
    shared = {k: v for k, v in plain.items() if k not in MEMBER_KEYS}
    shared["data"] = {k: v for k, v in plain["data"].items() if k not in data_cls.POPULATION_KEYS}
    return json.dumps(shared, sort_keys=True, default=str)


def groups(cfgs: list[DictConfig]) -> list[list[int]]:
    """Indices of ``cfgs`` in populations (lists of two or more) and single runs (lists of one)."""
    found: dict[str, list[int]] = {}
    alone = []
    for i, cfg in enumerate(cfgs):
        k = key(cfg)
        if k is None:
            alone.append([i])
        else:
            found.setdefault(k, []).append(i)
    return [*found.values(), *alone]


def check(cfgs: list[DictConfig]) -> None:
    """Fail before any work unless ``cfgs`` can train as one population (one run always can)."""
    if len(cfgs) == 1:
        return
    keys = {key(cfg) for cfg in cfgs}
    if None in keys or len(keys) > 1:
        raise UserError(
            "these runs cannot train as one population: they must share everything but seed, "
            "objective, teacher and data values, and train on one device without compile "
            "(see kd.population.key)"
        )
    outs = [str(Path(cfg.paths.output_dir).resolve()) for cfg in cfgs]
    if len(set(outs)) < len(outs):
        raise UserError(f"two members of a population share the folder {max(set(outs), key=outs.count)}")


def folder(outs: list[Path]) -> Path:
    """Where a population keeps its own checkpoint (what a killed population resumes from), named by
    its members: beside them, in a hidden folder that kd.aggregate skips; a population of one, in
    its run folder."""
    if len(outs) == 1:
        return Path(outs[0])
    names = sorted(str(Path(o).resolve()) for o in outs)
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]
    return Path(os.path.commonpath(names)) / ".populations" / digest


def config(cfg: DictConfig, out: Path) -> DictConfig:
    """``cfg`` (any member's) with its folder set to the population's: its trainer and callbacks."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


class Members(nn.Module):
    """G networks of one architecture as one module: (G, B, ...) inputs, member g's through network
    g, to (G, B, K) logits. Two strategies (``network`` picks one): ``Stack`` runs every member with
    one set of kernels, ``Loop`` runs each member's own modules in turn."""

    members: int

    def stacked_state(self) -> dict[str, torch.Tensor]:
        """Every entry of a member's state_dict, named as in a single network, stacked over the members."""
        raise NotImplementedError

    def load_stacked(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def silence_(self, stopped: torch.Tensor) -> None:
        """Zero the gradients of the ``stopped`` (G,) members, and their non-finite weights (which would
        otherwise stop the others' checkpoints)."""
        raise NotImplementedError

    def member(self, g: int, state: dict | None = None) -> dict[str, torch.Tensor]:
        """Member ``g``'s state_dict, keyed as a single network's (from ``state``, a ``stacked_state``)."""
        state = self.stacked_state() if state is None else state
        return {k: v[g].detach().clone() for k, v in state.items()}

    def network(self, g: int) -> nn.Module:
        """Member ``g`` as a network of its own (for analyses that call one network)."""
        raise NotImplementedError


class Stack(Members):
    """Every parameter and buffer stacked on a leading member axis, in a copy of the first network
    (``body``, so the names are the network's own), run by vmap over ``functional_call`` of that
    code (torch.func's model ensembling). Batch norm's running statistics are stacked buffers too,
    updated per member exactly as in its own network."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.members = len(nets)
        params, buffers = stack_module_state(nets)
        self.body = copy.deepcopy(nets[0])
        for name, value in {**params, **buffers}.items():
            owner, _, attr = name.rpartition(".")
            module = self.body.get_submodule(owner)
            if name in params:
                setattr(module, attr, nn.Parameter(value.detach()))
            else:
                module.register_buffer(attr, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = (dict(self.body.named_parameters()), dict(self.body.named_buffers()))
        return vmap(lambda p, b, xg: functional_call(self.body, (p, b), (xg,)), randomness="different")(*tensors, x)

    def stacked_state(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("body."): v.detach() for k, v in self.state_dict().items()}

    def load_stacked(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({f"body.{k}": v for k, v in state.items()})

    def network(self, g: int) -> nn.Module:
        net = copy.deepcopy(self.body)
        for name, value in self.member(g).items():  # member g's tensors in place of the stacked ones
            owner, _, attr = name.rpartition(".")
            module = net.get_submodule(owner)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
        return net

    def silence_(self, stopped: torch.Tensor) -> None:
        for p in self.parameters():
            mask = stopped.view(-1, *[1] * (p.dim() - 1))
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0.0)
            p.data.masked_fill_(mask & ~torch.isfinite(p.data), 0.0)


class Loop(Members):
    """The members' own networks, run one after the other within each step: on a CPU the faster way
    for convolutional networks (docs/performance.md), and each member's layers are exactly its
    own run's (batch norm included)."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.members = len(nets)
        self.nets = nn.ModuleList(nets)
        if self.members == 1:  # a single run: its checkpoints name the weights as its network does
            self._register_state_dict_hook(_network_names)
            self._register_load_state_dict_pre_hook(_member_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(xg) for net, xg in zip(self.nets, x)])

    def stacked_state(self) -> dict[str, torch.Tensor]:
        states = [net.state_dict() for net in self.nets]
        return {k: torch.stack([s[k].detach() for s in states]) for k in states[0]}

    def load_stacked(self, state: dict[str, torch.Tensor]) -> None:
        for g, net in enumerate(self.nets):
            net.load_state_dict({k: v[g] for k, v in state.items()})

    def network(self, g: int) -> nn.Module:
        return self.nets[g]

    def silence_(self, stopped: torch.Tensor) -> None:
        for g in stopped.nonzero().flatten().tolist():
            for p in self.nets[g].parameters():
                if p.grad is not None:
                    p.grad.zero_()
                p.data.masked_fill_(~torch.isfinite(p.data), 0.0)


def _network_names(module: Loop, state: dict, prefix: str, local_metadata) -> None:
    """``nets.0.<name>`` -> ``<name>``: a population of one saves its weights as its network would."""
    for k in [k for k in state if k.startswith(f"{prefix}nets.0.")]:
        state[prefix + k[len(prefix) + len("nets.0.") :]] = state.pop(k)


def _member_names(state: dict, prefix: str, *args) -> None:
    """``<name>`` -> ``nets.0.<name>``: and loads them back (a single run's checkpoint, or a teacher's)."""
    for k in [k for k in state if k.startswith(prefix) and not k.startswith(f"{prefix}nets.")]:
        state[f"{prefix}nets.0.{k[len(prefix) :]}"] = state.pop(k)


STRATEGIES = {"stack": Stack, "loop": Loop}


def has_batch_norm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def network(nets: list[nn.Module], device: torch.device, strategy: str = "auto") -> Members:
    """The members' networks as one module, by the faster strategy measured for ``device``
    (docs/performance.md): on a CPU, a convolutional network with batch norm loops (7 cnn students:
    87 ms a step looped, 121 ms stacked) and any other stacks (fig3's MLPs: batched matrix
    products); on an accelerator, where a small member's kernels are launch-bound, every network
    stacks. A single run is a population of one: its own network (``Loop``)."""
    if strategy == "auto":  # one member: its own network, as it is
        cpu_loops = torch.device(device).type == "cpu" and has_batch_norm(nets[0])
        strategy = "loop" if len(nets) == 1 or cpu_loops else "stack"
    return STRATEGIES[strategy](nets)


def data(members: list) -> Data | SplitDataModule:
    """The members' data as one data module: a single run's is its own (any kind), whose batches
    have no member axis (kd.module adds it)."""
    return members[0] if len(members) == 1 else Data(members)


class StackedTensors(Dataset):
    """The splits of U data sets of one shape, (U, N, ...), served to G members by indices (G, B):
    member g reads data set ``data_of[g]``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, data_of: torch.Tensor):
        self.x, self.y, self.data_of = x, y, data_of

    def __len__(self) -> int:
        return self.y.shape[1]

    def __getitem__(self, index: torch.Tensor):
        rows = self.data_of[:, None]
        return self.x[rows, index], self.y[rows, index], index


class StackedSampler:
    """Each member's own batches of indices (its data module's sampler), step by step, as (G, B)."""

    def __init__(self, samplers: list):
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"members": [sampler.state_dict() for sampler in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        for sampler, member in zip(self.samplers, state["members"]):
            sampler.load_state_dict(member)

    def __len__(self) -> int:
        return len(self.samplers[0])

    def __iter__(self):
        yield from (torch.stack(step) for step in zip(*self.samplers))


class Data(SplitDataModule):
    """The data of G members as one data module: a batch is (x, y, index) with a leading member
    axis, and member g's rows are the examples its own run would see, in the same order. Members
    whose data configs agree share one data module (``members`` may repeat an object)."""

    def __init__(self, members: list[TensorDataModule]):
        super().__init__()
        self.members = members
        self.unique = list({id(m): m for m in members}.values())
        position = {id(m): i for i, m in enumerate(self.unique)}
        self.data_of = torch.tensor([position[id(m)] for m in members])
        # Members sharing a data module see the same batches: each module transforms them once.
        self.first = [self.data_of.tolist().index(u) for u in range(len(self.unique))]
        self.transforms = any(type(m).transform is not TensorDataModule.transform for m in self.unique)
        self.splits: dict[str, StackedTensors] = {}
        self._resident: dict[tuple[str, torch.device], StackedTensors] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for m in self.unique:
            m.setup()
        first = self.unique[0]
        for split in first.splits:
            shapes = {(tuple(m.splits[split].x.shape), m.num_classes) for m in self.unique}
            if len(shapes) > 1:
                raise UserError(
                    f"the members' {split} splits differ in shape ({sorted(shapes)}): they cannot "
                    "train as one population"
                )
            self.splits[split] = StackedTensors(
                torch.stack([m.splits[split].x for m in self.unique]),
                torch.stack([m.splits[split].y for m in self.unique]),
                self.data_of,
            )

    @property
    def num_classes(self) -> int:
        return self.unique[0].num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.unique[0].input_shape

    def fixed_inputs(self, split: str) -> bool:
        return all(m.fixed_inputs(split) for m in self.unique)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Each data module's ``transform`` on its members' rows (augmented from its own generator,
        as in its single run), once per module."""
        if not self.transforms:
            return batch
        x, y, index = batch
        training = self.trainer is not None and self.trainer.training
        out = torch.stack([m.transform(x[g], training) for m, g in zip(self.unique, self.first)])
        return (out if len(self.unique) == len(self.members) else out[self.data_of.to(out.device)]), y, index

    def state_dict(self) -> dict:
        return {"members": [m.state_dict() for m in self.unique]}

    def load_state_dict(self, state: dict) -> None:
        for m, kept in zip(self.unique, state["members"]):
            m.load_state_dict(kept)

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        self.setup()
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if (split, device) not in self._resident:
            data = self.splits[split]
            self._resident[split, device] = StackedTensors(
                data.x.to(device), data.y.to(device), data.data_of.to(device)
            )
        if not shuffle and batch_size is None:  # members x examples within EVAL_ROWS
            batch_size = max(1, min(self.unique[0].eval_batch_size, EVAL_ROWS // len(self.members)))
        sampler = StackedSampler([m.sampler(split, shuffle, batch_size, device) for m in self.members])
        return resumable(self._resident[split, device], sampler, self.unique[0].seed)
