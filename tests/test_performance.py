"""The fast path's switches and the benchmark, on the CPU and in seconds (no timings are asserted)."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from kd import models
from kd.bench import RandomCIFAR
from kd.errors import TrainingDiverged
from kd.module import DistillationModule
from kd.runner import compose_config
from kd.train import run

REPO = Path(__file__).resolve().parent.parent
# A tiny CIFAR-shaped student run through kd.train.run; resnet8 keeps it to seconds.
CIFAR = ["data=cifar100", "data._target_=kd.bench.RandomCIFAR", "+data.size=16", "data.batch_size=8",
         "data.eval_batch_size=8", "model=resnet8", "objective=ce", "trainer.max_epochs=1", "logger=none",
         "trainer.enable_progress_bar=false"]


def module(channels_last=False, compile=False, teacher=True) -> DistillationModule:
    net, teacher_net = (models.get("resnet8", num_classes=100, input_shape=(3, 32, 32)) for _ in range(2))
    return DistillationModule(net, {"name": "kd", "temperature": 4.0, "kd_weight": 0.9},
                              lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                              teacher=teacher_net if teacher else None, num_classes=100,
                              input_shape=(3, 32, 32), channels_last=channels_last, compile=compile)


def test_gpu_fast_composes_with_the_paper_faithful_default_untouched():
    fast = compose_config(["trainer=gpu_fast"])
    assert (fast.trainer.precision, fast.trainer.accelerator, fast.channels_last, fast.compile) == (
        "bf16-mixed", "gpu", True, True)
    default = compose_config([])
    assert (default.trainer.precision, default.channels_last, default.compile) == ("32-true", False, False)


def test_fast_path_runs_on_the_cpu(root):
    """trainer=gpu_fast on a CPU: bf16 autocast and channels_last (compile is only wired: a CPU
    compile takes about a minute)."""
    record = run(compose_config([*CIFAR, "trainer=gpu_fast", "trainer.accelerator=cpu", "compile=false"],
                                root / "run"))
    assert record["status"] == "completed" and record["config"]["trainer"]["precision"] == "bf16-mixed"
    assert 0 <= record["metrics"]["test/acc_last"] <= 1


def test_bf16_channels_last_steps_with_the_uint8_data_resident_on_the_module_device(tmp_path):
    seen = []

    class Inspect(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            resident = trainer.datamodule.on_device("train", pl_module.device)
            seen.append((resident.x.dtype, resident.x.device == pl_module.device, math.isfinite(outputs["loss"])))

    model = module(channels_last=True)
    conv = model.net.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    inside = []  # what the student's first convolution receives, and the dtype it computes in
    model.net.features[0].register_forward_hook(lambda m, i, o: inside.append(
        (i[0].is_contiguous(memory_format=torch.channels_last), o.dtype)))
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, callbacks=[Inspect()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, RandomCIFAR(size=16, batch_size=8))
    assert seen == [(torch.uint8, True, True)] * 2
    assert inside == [(True, torch.bfloat16)] * 2
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_compile_is_wired_without_changing_checkpoint_keys():
    plain, compiled = module(), module(compile=True)
    assert compiled.net._compiled_call_impl is not None and compiled.teacher._compiled_call_impl is not None
    assert plain.net._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no _orig_mod. prefix


def test_on_an_accelerator_the_data_is_copied_once_and_indexed_there():
    """The meta device stands in for a GPU: the loaders serve a resident uint8 copy on it."""
    data = RandomCIFAR(size=20, batch_size=8)
    data.setup()
    data.trainer = SimpleNamespace(global_rank=0, world_size=1, strategy=SimpleNamespace(root_device=torch.device("meta")))
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


@pytest.mark.parametrize("data, teacher_examples", [
    ("synthetic", 40 + 20 + 80),  # fixed inputs: each split once (the best epoch's test reuses the last's)
    ("cifar", 2 * 16 + 8 + 8),  # augmented training inputs: every epoch; val and test once
])
def test_the_teacher_runs_once_over_fixed_inputs_and_nothing_changes(root, monkeypatch, data, teacher_examples):
    from tests.conftest import TINY

    count = ["+callbacks.count._target_=tests.test_performance.CountTeacher"]
    if data == "synthetic":
        overrides = [*TINY, "objective=kd", "teacher=oracle", *count]
    else:
        ckpt = run(compose_config(CIFAR, root / "teacher"))["checkpoints"]["last"]
        overrides = [*CIFAR, "trainer.max_epochs=2", "objective=kd", "teacher=checkpoint", f"teacher.path={ckpt}", *count]
    counter = importlib.import_module("tests.test_performance").CountTeacher  # the class the run imports
    counter.examples = 0
    cached = run(compose_config(overrides, root / "cached"))
    assert counter.examples == teacher_examples
    monkeypatch.setattr("kd.data.base.TensorDataModule.fixed_inputs", lambda self, split: False)
    monkeypatch.setattr("kd.data.cifar.CIFARDataModule.fixed_inputs", lambda self, split: False)
    assert run(compose_config(overrides, root / "uncached"))["metrics"] == cached["metrics"]


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
    done = subprocess.run([sys.executable, "scripts/benchmark.py", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    for key in ("kd_step.ours_img_s", "kd_step.reference_img_s", "kd_step.ratio", "mlp.lightning_over_plain", "device"):
        assert key in result, key
    assert result["kd_step.ratio"] > 0 and result["mlp.lightning_over_plain"] > 0
    assert "| kd_step: ratio ours / reference |" in (out / "bench.md").read_text()
