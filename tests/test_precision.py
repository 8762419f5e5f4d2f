"""What mixed precision leaves in fp32: the teacher's logits on fixed inputs (kd.module.TeacherOutputs),
computed once per example and cached, so that KD's soft targets at tau 4 are not built from
bf16-rounded logits for the whole run; and what a run's record says about TF32."""

import importlib

import lightning as L
import torch

from kd.results import tf32
from kd.runner import compose_config
from kd.train import run
from tests.conftest import TINY


class KeepModule(L.Callback):
    """Keeps the trained module and its data (class attributes: the run instantiates it by name)."""

    module = data = None

    def on_fit_end(self, trainer, pl_module):
        KeepModule.module, KeepModule.data = pl_module, trainer.datamodule


def test_under_bf16_autocast_the_cached_teacher_logits_are_fp32(root):
    keep = importlib.import_module("tests.test_precision").KeepModule  # the class the run imports
    overrides = [
        *TINY,
        "objective=kd",
        "objective.temperature=4",
        "teacher=oracle",
        "trainer.precision=bf16-mixed",
        "+callbacks.keep._target_=tests.test_precision.KeepModule",
    ]
    record = run(compose_config(overrides, root / "run"))
    assert record["status"] == "completed" and record["config"]["trainer"]["precision"] == "bf16-mixed"
    assert record["hardware"]["tf32"] == {
        "convolutions": torch.backends.cudnn.allow_tf32,  # torch's default: True
        "matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    teacher = keep.module.teachers[0]
    for split in ("train", "val", "test"):
        x = keep.data.splits[split].x
        cached = keep.module.teacher_outputs[split].logits[0]
        with torch.no_grad():
            fp32 = teacher(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = teacher(x)
        assert cached.dtype == torch.float32
        torch.testing.assert_close(cached, fp32, rtol=1e-6, atol=1e-6)
        assert (bf16.float() - fp32).abs().max() > 1e-3  # what bf16 would have cached


def test_the_record_says_whether_fp32_runs_in_tf32():
    """On an Ampere or newer GPU, 32-true convolutions run in TF32 unless torch is told otherwise."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.backends.cudnn.flags(allow_tf32=False):
            assert tf32() == {"convolutions": False, "matmul": True}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
