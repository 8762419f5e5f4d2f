"""Cluster set-up without a cluster: the sbatch script the SLURM launcher would submit (rendered by
submitit, not submitted), the global batch and learning rate at world sizes 1 and 2 (DDP over gloo),
data-loader workers from the CPUs SLURM grants, and sync_batchnorm reaching the Trainer.
tests/test_slurm.py submits the same scripts to a live cluster."""

import json
import re
import subprocess
import sys

import lightning as L
import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from submitit.slurm.slurm import _make_sbatch_string

from kd import teachers
from kd.errors import UserError
from kd.runner import compose_config
from kd.train import CONFIG_DIR, device_batch, run
from tests.conftest import TINY
from tests.test_sweeps import REPO, job_env

DDP_TIMEOUT_S = 120


def sbatch_script(*overrides, sweep, command: str = "python -m kd.train") -> str:
    """The sbatch script of a two-job multirun with ``hydra/launcher=slurm`` and ``overrides``: the
    launcher's own parameters, as it hands them to submitit, rendered by submitit without submitting."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", *overrides],
        )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    executors = []
    with pytest.MonkeyPatch.context() as patch:  # the launcher's submission, stopped before sbatch
        patch.setattr(submitit.AutoExecutor, "map_array", lambda self, fn, *args: executors.append(self) or [])
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    (executor,) = executors
    return _make_sbatch_string(command=command, folder=executor.folder, map_count=2, **executor._executor.parameters)


def flags(script: str) -> dict:
    return dict(
        line[len("#SBATCH --") :].partition("=")[::2] for line in script.splitlines() if line.startswith("#SBATCH --")
    )


def test_a_cpu_trainer_asks_slurm_for_no_gpu(tmp_path):
    assert not {"gpus-per-node", "gres"} & set(flags(sbatch_script(sweep=tmp_path)))
    assert not {"gpus-per-node", "gres"} & set(
        flags(sbatch_script("trainer=ddp", "trainer.accelerator=cpu", sweep=tmp_path))
    )


def test_a_gpu_trainer_asks_for_its_devices_one_way(tmp_path):
    script = flags(sbatch_script("trainer=ddp", "trainer.devices=4", sweep=tmp_path))
    assert (script["gpus-per-node"], script["ntasks-per-node"]) == ("4", "4") and "gres" not in script
    script = flags(sbatch_script("trainer=ddp", "trainer.devices=4", "hydra.launcher.gres=gpu:a100:4", sweep=tmp_path))
    assert script["gres"] == "gpu:a100:4" and "gpus-per-node" not in script  # gres asks alone


def test_a_rank_that_fails_ends_the_job(tmp_path):
    """srun reads SLURM_KILL_BAD_EXIT as --kill-on-bad-exit (tests/test_slurm.py shows it on a cluster)."""
    exported = flags(sbatch_script(sweep=tmp_path))["export"].split(",")
    assert exported[0] == "ALL" and "SLURM_KILL_BAD_EXIT=1" in exported


@pytest.mark.parametrize("data, outside", [("imagenet", 8), ("imagefolder", 8), ("torchvision", 2)])
def test_loader_workers_follow_the_cpus_slurm_grants(data, outside, monkeypatch):
    cfg = compose_config([f"data={data}"])
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert instantiate(cfg.data).num_workers == outside
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")  # --cpus-per-task=6: five workers and the rank itself
    assert instantiate(cfg.data).num_workers == 5
    cfg.data.num_workers = 3
    assert instantiate(cfg.data).num_workers == 3  # as given


# 80 training examples in batches of 16: 5 steps an epoch, on one device or split over two.
GLOBAL = [
    *TINY,
    "data.train_per_class=20",
    "global_batch=true",
    "data.batch_size=16",
    "optimizer.lr=0.01",
    "trainer.max_epochs=3",
    "threads=1",
]


def test_a_global_batch_trains_alike_on_one_device_and_split_over_two(root):
    one = run(compose_config(GLOBAL, root / "one"))
    assert one["data_parallel"] == {
        "world_size": 1,
        "global_batch": 16,
        "device_batch": 16,
        "lr": pytest.approx(0.01),
        "environment": "LightningEnvironment",
    }
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd.train",
            *GLOBAL,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"hydra.run.dir={root / 'two'}",
        ],
        cwd=REPO,
        env=job_env(root),
        capture_output=True,
        text=True,
        timeout=DDP_TIMEOUT_S,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    record = json.loads((root / "two" / "results.json").read_text())
    assert record["data_parallel"] == {
        "world_size": 2,
        "global_batch": 16,
        "device_batch": 8,
        "lr": pytest.approx(0.01),
        "environment": "LightningEnvironment",
    }
    # Each step's two halves are the one device's batch (the ranks shard its order): the same steps and weights.
    assert record["global_step"] == one["global_step"] == 15
    for key in ("test/acc_last", "test/nll_last"):
        assert record["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4), key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.batch_size=15"],
            "data.batch_size=15 (global_batch=true) does not split evenly over 2 devices "
            "(trainer.devices x trainer.num_nodes); give a multiple of 2",
        ),
        (["lr_scaling=linear"], "lr_scaling=linear follows a global batch that grows with the devices"),
        (
            ["trainer.devices=auto"],
            "global_batch=true splits data.batch_size over the devices, but "
            "trainer.devices='auto' does not count them; give their number",
        ),
    ],
)
def test_a_global_batch_that_cannot_split_is_one_line_before_any_work(overrides, message, tmp_path):
    cfg = compose_config([*GLOBAL, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *overrides], tmp_path)
    with pytest.raises(UserError, match="^" + re.escape(message)) as err:
        run(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "checkpoints").exists()


def test_the_recipes_state_the_papers_global_batch(tmp_path):
    """recipe=imagenet on 8 GPUs trains at the paper's 512 (64 a device), not at 8 x 512."""
    for recipe, batch in (("imagenet", 512), ("crd_cifar100", 64), ("fashion_mnist", 64)):
        cfg = compose_config([f"recipe={recipe}", "trainer=ddp", "trainer.devices=8"], tmp_path)
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert (plain["data"]["batch_size"], device_batch(plain)) == (batch, batch // 8), recipe


def test_sync_batchnorm_reaches_the_trainer(root, monkeypatch):
    given = []
    init = L.Trainer.__init__
    monkeypatch.setattr(L.Trainer, "__init__", lambda self, *a, **kw: given.append(kw) or init(self, *a, **kw))
    run(compose_config([*TINY, "trainer.sync_batchnorm=true"], root))
    assert given[-1]["sync_batchnorm"] is True


def test_sync_batchnorm_leaves_the_teachers_cache_key(tmp_path):
    """A teacher trains on one device, where sync_batchnorm changes nothing: one cached teacher for both."""
    folders = {
        teachers.teacher_config(
            compose_config(["objective=kd", "teacher=mlp", "trainer=ddp", f"trainer.sync_batchnorm={on}"], tmp_path)
        ).paths.output_dir
        for on in ("true", "false")
    }
    assert len(folders) == 1, folders
