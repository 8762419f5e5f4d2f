"""The fast path's switches and the benchmark, in seconds (no timings are asserted).

The tests marked gpu (tests/conftest.py) run the same paths on CUDA: scripts/gpu_check.sh runs them
on a GPU machine, and ``--gpu-device cpu`` rehearses them here.
"""

import functools
import importlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from experiments.bench import RandomCIFAR, teacher_checkpoint, template_images
from kd import config, models
from kd.errors import TrainingDiverged
from kd.module import DistillationModule
from kd.runner import compose_config
from kd.train import run
from tests.conftest import DEVICES, on

REPO = Path(__file__).resolve().parent.parent
# A tiny CIFAR-shaped student run through kd.train.run; resnet8 keeps it to seconds.
CIFAR = [
    "data=cifar100",
    "data._target_=experiments.bench.RandomCIFAR",
    "+data.size=16",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "model=resnet8",
    "objective=ce",
    "trainer.max_epochs=1",
    "logger=none",
    "trainer.enable_progress_bar=false",
]
# Runs ``python -m kd.train`` with wandb unimportable, as on a machine without it (the GPU machine):
# an import, or a probe with importlib.util.find_spec, fails as for a missing package and is counted.
NO_WANDB = """
import runpy, sys
attempts = []
class NoWandb:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "wandb":
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoWandb())
sys.argv = ["kd-train", *sys.argv[1:]]
try:
    runpy.run_module("kd.train", run_name="__main__")
finally:
    print(f"[test] wandb imports attempted: {attempts}")
    try:
        import wandb
    except ModuleNotFoundError:
        print("[test] and blocked")
"""


def kd_train_without_wandb(*overrides, root: Path) -> subprocess.CompletedProcess:
    """``python -m kd.train`` as NO_WANDB runs it, in this environment (on a GPU machine: its CUDA
    settings and the carried wheels on PYTHONPATH), with this checkout first on the path."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "KD_ROOT": str(root), "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-c", NO_WANDB, *overrides, f"hydra.run.dir={root / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def module(channels_last=False, compile=False, teacher=True) -> DistillationModule:
    net, teacher_net = (models.get("resnet8", num_classes=100, input_shape=(3, 32, 32)) for _ in range(2))
    return DistillationModule(
        net,
        {"name": "kd", "temperature": 4.0, "kd_weight": 0.9},
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        teacher=teacher_net if teacher else None,
        num_classes=100,
        input_shape=(3, 32, 32),
        channels_last=channels_last,
        compile=compile,
    )


def test_gpu_fast_composes_with_the_paper_faithful_default_untouched(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fast = compose_config(["trainer=gpu_fast"])
    assert (fast.trainer.precision, fast.trainer.accelerator, fast.channels_last, fast.compile) == (
        "bf16-mixed",
        "gpu",
        True,
        True,
    )
    assert fast.trainer.benchmark and not compose_config(["trainer=gpu_fast", "deterministic=true"]).trainer.benchmark
    explicit = compose_config(["trainer=gpu_fast", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed"])
    assert explicit.trainer.precision == "bf16-mixed"  # a precision given is used as given
    default = compose_config([])
    assert (default.trainer.precision, default.channels_last, default.compile) == ("32-true", False, False)


@pytest.mark.parametrize(
    "accelerator, cuda, cpu_bf16, precision",
    [
        ("gpu", (9, 0), False, "bf16-mixed"),  # H100, H200
        ("gpu", (7, 0), True, "32-true"),  # V100: bf16 emulated
        ("gpu", None, True, "32-true"),  # no GPU visible: the run fails anyway, with Lightning's message
        ("cpu", (9, 0), True, "bf16-mixed"),  # AVX512-BF16 or AMX
        ("cpu", (9, 0), False, "32-true"),  # AVX2 only: bf16 emulated, ten times slower than fp32
        ("auto", None, True, "bf16-mixed"),
        ("auto", (8, 0), False, "bf16-mixed"),
        ("mps", None, True, "32-true"),  # not judged: fp32
    ],
)
def test_the_fast_path_uses_bf16_only_where_the_device_computes_it_natively(
    monkeypatch, accelerator, cuda, cpu_bf16, precision
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cuda)
    monkeypatch.setattr(config, "cpu_features", lambda: {"bf16_native": cpu_bf16})
    assert config.fast_precision(accelerator) == precision  # what trainer=gpu_fast's precision resolves to


class NoHostSync(L.Callback):
    """On CUDA, every synchronising operation from the end of one training step to the end of the
    next (the next batch's fetch and crop included), after the first step and before the epoch's
    last: ``found`` lists them as ``file:line: message``. Elsewhere it records nothing."""

    found: list[str] = []

    def __init__(self):
        self.caught = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.caught is not None:
            torch.cuda.set_sync_debug_mode(0)
            NoHostSync.found += [
                f"{w.filename}:{w.lineno}: {w.message}" for w in self.caught if "synchroniz" in str(w.message)
            ]
            self.watch.__exit__(None, None, None)
            self.caught = None
        if pl_module.device.type == "cuda" and batch_idx < trainer.num_training_batches - 1:
            self.watch = warnings.catch_warnings(record=True)
            self.caught = self.watch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")


class Precision(L.Callback):
    """The dtype of the student's logits as the loss receives them (``seen``): bf16 under bf16
    autocast. Read at the loss, outside the compiled nets (dynamo may drop a hook's side effects)."""

    seen: list = []

    def on_fit_start(self, trainer, pl_module):
        losses = pl_module._losses

        def recorded(logits, *args, **kwargs):
            Precision.seen.append(logits.dtype)
            return losses(logits, *args, **kwargs)

        pl_module._losses = recorded


@pytest.mark.parametrize(
    "device, compile, objective",
    [
        ("cpu", False, "kd"),
        *[pytest.param("gpu", False, name, marks=pytest.mark.gpu) for name in ("kd", "kd_sim", "kd_pt_sim")],
        pytest.param("gpu", True, "kd", marks=pytest.mark.gpu),
    ],
    indirect=["device"],
)
def test_the_fast_path_runs_without_waiting_for_the_device(root, monkeypatch, device, compile, objective):
    """trainer=gpu_fast, a KD student (or KD-sim, KD-pt+sim: their class similarities stay on the
    device): bf16 autocast where the device computes bf16 natively, else fp32; channels_last;
    compile. On CUDA no training step waits for the device. Rehearsed on the CPU, the compile goes
    through dynamo with the eager backend (inductor takes minutes on a CPU)."""
    if compile and device.type == "cpu":
        monkeypatch.setattr(
            torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend="eager")
        )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module = importlib.import_module("tests.test_performance")  # the classes the run imports by name
    module.NoHostSync.found, module.Precision.seen = [], []
    callbacks = [
        f"+callbacks.{name.lower()}._target_=tests.test_performance.{name}" for name in ("NoHostSync", "Precision")
    ]
    teacher_checkpoint(root / "teacher.ckpt", "resnet8")
    overrides = [
        *CIFAR,
        "data.size=64",
        "callbacks=none",
        f"objective={objective}",
        "teacher=checkpoint",
        f"teacher.path={root / 'teacher.ckpt'}",
        "trainer=gpu_fast",
        *on(device),
        f"compile={compile}",
        *callbacks,
    ]
    record = run(compose_config(overrides, root / "run"))
    precision = config.fast_precision(on(device)[0].split("=")[1])
    assert record["status"] == "completed" and record["config"]["trainer"]["precision"] == precision
    assert record["hardware"]["cpu"]["capability"]
    assert 0 <= record["metrics"]["test/acc_last"] <= 1 and math.isfinite(record["metrics"]["train/loss"])
    assert 0 <= record["metrics"]["train/agreement"] <= 1  # the teacher ran
    assert set(module.Precision.seen) == {torch.bfloat16 if precision == "bf16-mixed" else torch.float32}
    assert module.NoHostSync.found == []
    assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compile


@pytest.mark.gpu
def test_a_population_of_several_objectives_runs_without_waiting_for_the_device(root, device):
    """Three members, three loss groups (KD, KD-sim, KD-pt+sim): their member indices and class
    similarities stay on the device. Each member has its own data seed, so its own oracle teacher
    (members that share one compare their inputs once, on the first pass, which waits)."""
    from tests.conftest import TINY

    module = importlib.import_module("tests.test_performance")
    module.NoHostSync.found = []
    cfgs = [
        compose_config(
            [
                *TINY,
                "data.batch_size=8",
                "callbacks=none",
                f"objective={name}",
                "teacher=oracle",
                f"seed={seed}",
                *on(device),
                "+callbacks.sync._target_=tests.test_performance.NoHostSync",
            ],
            root / name,
        )
        for seed, name in enumerate(("kd", "kd_sim", "kd_pt_sim"))
    ]
    records = run(cfgs)
    assert [r["status"] for r in records] == ["completed"] * 3 and records[0]["population"]["members"] == 3
    assert module.NoHostSync.found == []


def test_bf16_channels_last_steps_with_the_uint8_data_resident_on_the_module_device(tmp_path):
    seen = []

    class Inspect(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            resident = trainer.datamodule.on_device("train", pl_module.device)
            seen.append((resident.x.dtype, resident.x.device == pl_module.device, math.isfinite(outputs["loss"])))

    model = module(channels_last=True)
    conv = model.net.network(0).features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    inside = []  # what the student's first convolution receives, and the dtype it computes in
    model.net.network(0).features[0].register_forward_hook(
        lambda m, i, o: inside.append((i[0].is_contiguous(memory_format=torch.channels_last), o.dtype))
    )
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=2,
        logger=False,
        callbacks=[Inspect()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, RandomCIFAR(size=16, batch_size=8))
    assert seen == [(torch.uint8, True, True)] * 2
    assert inside == [(True, torch.bfloat16)] * 2
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_compile_is_wired_without_changing_checkpoint_keys():
    plain, compiled = module(), module(compile=True)
    assert compiled.net.network(0)._compiled_call_impl is not None and compiled.teacher._compiled_call_impl is not None
    assert plain.net.network(0)._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no _orig_mod. prefix


def test_on_an_accelerator_the_data_is_copied_once_and_indexed_there():
    """The meta device stands in for a GPU: the loaders serve a resident uint8 copy on it."""
    data = RandomCIFAR(size=20, batch_size=8)
    data.setup()
    data.trainer = SimpleNamespace(
        global_rank=0, world_size=1, strategy=SimpleNamespace(root_device=torch.device("meta"))
    )
    loader = data.train_dataloader()
    assert loader.dataset is data.on_device("train", torch.device("meta"))  # copied once
    x, y, index = next(iter(loader))
    assert (x.device.type, y.device.type, index.device.type) == ("meta",) * 3
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
    assert data.splits["train"].x.device.type == "cpu"  # the host copy stays for analyses


class CountTeacher(L.Callback):
    """Counts the examples the teacher's forward sees (class attribute: the run instantiates it)."""

    examples = 0

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            pl_module.teacher.register_forward_hook(lambda m, args, out: self._count(len(args[0])))

    @classmethod
    def _count(cls, n):
        cls.examples += n


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize(
    "data, teacher_examples",
    [
        ("synthetic", 40 + 20 + 80),  # fixed inputs: each split once (the best epoch's test reuses the last's)
        ("cifar", 2 * 16 + 8 + 8),  # augmented training inputs: every epoch; val and test once
    ],
)
def test_the_teacher_runs_once_over_fixed_inputs_and_nothing_changes(root, monkeypatch, device, data, teacher_examples):
    from tests.conftest import TINY

    # On CUDA deterministic kernels, so that the two runs can agree bit for bit there too (docs/determinism.md).
    count = [
        "+callbacks.count._target_=tests.test_performance.CountTeacher",
        *on(device),
        *(["deterministic=true"] if device.type == "cuda" else []),
    ]
    if data == "synthetic":
        overrides = [*TINY, "objective=kd", "teacher=oracle", *count]
    else:
        ckpt = run(compose_config([*CIFAR, *on(device)], root / "teacher"))["checkpoints"]["last"]
        overrides = [
            *CIFAR,
            "trainer.max_epochs=2",
            "objective=kd",
            "teacher=checkpoint",
            f"teacher.path={ckpt}",
            *count,
        ]
    counter = importlib.import_module("tests.test_performance").CountTeacher  # the class the run imports
    counter.examples = 0
    cached = run(compose_config(overrides, root / "cached"))
    assert counter.examples == teacher_examples
    monkeypatch.setattr("kd.data.base.TensorDataModule.fixed_inputs", lambda self, split: False)
    monkeypatch.setattr("kd.data.cifar.CIFARDataModule.fixed_inputs", lambda self, split: False)
    assert run(compose_config(overrides, root / "uncached"))["metrics"] == cached["metrics"]


@pytest.mark.gpu
def test_resident_batches_and_their_crop_and_flip_are_the_cpu_paths(device, monkeypatch):
    """For the same draws, the device path serves the CPU path's batches: the uint8 copy resident on
    the device and indexed there, the crop and flip (one gather) and the normalisation."""
    paths = {}
    for where in ("cpu", device):
        data = RandomCIFAR(size=40, batch_size=16)
        data.setup()
        data.trainer = SimpleNamespace(
            global_rank=0, world_size=1, training=True, strategy=SimpleNamespace(root_device=torch.device(where))
        )
        draws = torch.Generator().manual_seed(0)  # drawn on the CPU and moved, so both paths get the same
        with monkeypatch.context() as patch:
            for name in ("randint", "rand"):
                draw = getattr(torch, name)
                patch.setattr(
                    torch,
                    name,
                    lambda *args, device=None, generator=None, draw=draw, draws=draws: draw(*args, generator=draws).to(
                        device
                    ),
                )
            paths[str(where)] = [data.on_after_batch_transfer(batch, 0) for batch in data.train_dataloader()]
    cpu, on_device = paths["cpu"], paths[str(device)]
    assert len(cpu) == len(on_device) == 3
    for (x, y, index), (dx, dy, dindex) in zip(cpu, on_device):
        assert dx.device.type == dy.device.type == dindex.device.type == device.type
        assert torch.equal(dy.cpu(), y) and torch.equal(dindex.cpu(), index)
        torch.testing.assert_close(dx.cpu(), x, rtol=1e-6, atol=1e-6)
    assert not torch.equal(cpu[0][0], data.prepare_eval_batch(data.splits["train"].x[cpu[0][2]]))  # augmented


@pytest.mark.gpu
def test_a_one_device_ddp_run_completes(root, device):
    result = kd_train_without_wandb(*CIFAR, "trainer=ddp", *on(device), "trainer.devices=1", root=root)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((root / "run" / "results.json").read_text())
    assert record["status"] == "completed"
    assert record["data_parallel"] == {
        "world_size": 1,
        "global_batch": 8,
        "device_batch": 8,
        "lr": pytest.approx(0.003),
        "environment": "LightningEnvironment",
    }
    assert "wandb imports attempted: []\n[test] and blocked" in result.stdout


def test_a_run_without_a_logger_never_imports_wandb(root):
    """The GPU machine has no wandb: logger=none (and csv) must run without it."""
    from tests.conftest import TINY

    result = kd_train_without_wandb(*TINY, "objective=kd", "teacher=oracle", root=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb imports attempted: []\n[test] and blocked" in result.stdout
    assert json.loads((root / "run" / "results.json").read_text())["status"] == "completed"


def test_template_images_are_class_textures_under_pixel_noise():
    """RandomCIFAR(noise=...), the bf16 parity data: each class one periodic texture at random shifts."""
    clean, y = template_images(1000, noise=0.0)
    noisy, same_y = template_images(1000, noise=2.0)
    assert clean.shape == (1000, 32, 32, 3) and clean.dtype == np.uint8 and np.array_equal(y, same_y)
    assert np.array_equal(clean, np.roll(clean, 8, axis=1)) and np.array_equal(clean, np.roll(clean, 8, axis=2))
    for k in range(20):  # every image of a class shows its class's tile, shifted
        first, *others = clean[y == k]
        shifts = {np.roll(first, (dy, dx), axis=(0, 1)).tobytes() for dy in range(8) for dx in range(8)}
        assert all(image.tobytes() in shifts for image in others)
    assert len({image[:8, :8].tobytes() for image in clean}) > 900  # classes and shifts differ
    assert 30 < noisy.std() < 50 and np.abs(noisy.astype(int) - clean).mean() > 20


def test_the_first_non_finite_loss_is_kept_until_checked():
    """On an accelerator the loss is checked every few steps: the error still names the first bad one."""
    model = module(teacher=False)
    model._raise_if_diverged()  # nothing yet
    for loss in (1.0, float("inf"), float("nan"), 2.0):
        model._record_nonfinite(torch.tensor(loss))
    with pytest.raises(TrainingDiverged, match=r"^loss is inf at step 0 \(epoch 0\); lower the learning rate"):
        model._raise_if_diverged()


@pytest.mark.slow
def test_benchmark_smoke_writes_its_results(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    for key in (
        "kd_step.ours_img_s",
        "kd_step.reference_img_s",
        "kd_step.ratio",
        "kd_step.fast_precision",
        "mlp.lightning_over_plain",
        "device",
        "cpu",
    ):
        assert key in result, key
    assert result["kd_step.ratio"] > 0 and result["mlp.lightning_over_plain"] > 0
    assert "| kd_step: ratio ours / reference |" in (out / "bench.md").read_text()
