"""scripts/gpu_check.sh, the GPU check in one command: rehearsed on the CPU at toy size, every step,
in this Python made as bare as the GPU machine's (tests/bare/sitecustomize.py: no hydra-core,
omegaconf, wandb or submitit but the wheels the check carries there)."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


@pytest.fixture(scope="module")
def bare() -> dict:
    """The environment of a Python as bare as the GPU machine's, the check's wheels built (.whl/)."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--wheels"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "bare"), env.get("PYTHONPATH")]))}


def test_the_bare_python_lacks_what_the_gpu_machine_lacks(bare):
    probe = (
        "import importlib.util as u, importlib.metadata as m; print([n for n in ('hydra', 'omegaconf', 'wandb', "
        "'submitit', 'torch', 'lightning', 'pandas') if u.find_spec(n)], [d.name for d in m.distributions() "
        "if d.name.lower() in ('hydra-core', 'wandb', 'rich', 'torch')])"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=bare)
    assert done.stdout == "['torch', 'lightning', 'pandas'] ['torch']\n", done.stderr


def test_its_gpu_tests_collect_there_with_the_carried_wheels(bare, tmp_path):
    """What the check's test step collects on the GPU machine; it once stopped at conftest's ``import wandb``."""
    wheels = sorted(str(w) for w in (REPO / ".whl").glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(tmp_path), *wheels],
        check=True,
        timeout=120,
        env=bare,
    )
    env = {**bare, "PYTHONPATH": f"{bare['PYTHONPATH']}{os.pathsep}{tmp_path}"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            "--gpu-device",
            "cpu",
            "tests/test_performance.py",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0 and re.search(r"^9/\d+ tests collected", done.stdout, re.M), done.stdout[-3000:]


@pytest.mark.slow
def test_the_gpu_check_rehearsed_on_the_cpu_passes_and_writes_its_results(bare, tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in bare.items() if k != "CUBLAS_WORKSPACE_CONFIG"},
    )
    assert done.returncode == 0, done.stdout[-5000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "== summary: 0 step(s) failed" in log and "no hydra here: installed the carried wheels" in log
    assert (
        "== plan: gpu tests at most 600s, then benchmark at most 600s (epoch, kd_step, parity, images); "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8"
    ) in log
    suite = ET.parse(tmp_path / "gpu_check_tests.xml").getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 6 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["measured"] == ["epoch", "kd_step", "parity", "images"]  # the headline (the projection) first
    assert result["kd_step.ratio"] > 0 and result["epoch.projected_min"] > 0 and result["parity.seeds"] == 2
    assert result["parity.kd_tau"] == 4 and result["parity.kd_grad_rel_err"] >= 0  # KD from bf16 teacher logits
    assert (
        result["cpu"]["capability"]
        and "| epoch: 240-epoch run, projected (min) |" in (tmp_path / "gpu_check.md").read_text()
    )


def test_the_wheels_it_carries_are_pinned_here():
    """--wheels fetches what the GPU machine lacks at this project's pins, so they must be pinned."""
    missing = re.search(r'^MISSING="([^"]+)"', SCRIPT.read_text(), re.M)[1].split()
    pinned = {line.split("==")[0].lower() for line in (REPO / "requirements" / "lock.txt").read_text().splitlines()}
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime"} <= set(missing) <= pinned


def test_bad_arguments_are_one_line_errors():
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr == "error: unknown argument --gpu; use --cpu, --wheels or --out DIR\n"
