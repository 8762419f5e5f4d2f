"""scripts/gpu_check.sh, the GPU check in one command: rehearsed on the CPU at toy size, every step."""

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


@pytest.mark.slow
def test_the_gpu_check_rehearsed_on_the_cpu_passes_and_writes_its_results(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-5000:]
    assert "== summary: 0 step(s) failed" in (tmp_path / "gpu_check.log").read_text()
    suite = ET.parse(tmp_path / "gpu_check_tests.xml").getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 6 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["measured"] == ["kd_step", "parity", "epoch"]
    assert result["kd_step.ratio"] > 0 and result["epoch.projected_min"] > 0 and result["parity.seeds"] == 2
    assert result["cpu"]["capability"] and "| epoch: 240-epoch run, projected (min) |" in (tmp_path / "gpu_check.md").read_text()


def test_the_wheels_it_carries_are_pinned_here():
    """--wheels fetches what the GPU machine lacks at this project's pins, so they must be pinned."""
    missing = re.search(r'^MISSING="([^"]+)"', SCRIPT.read_text(), re.M)[1].split()
    pinned = {line.split("==")[0].lower() for line in (REPO / "requirements" / "lock.txt").read_text().splitlines()}
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime"} <= set(missing) <= pinned


def test_bad_arguments_are_one_line_errors():
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr == "error: unknown argument --gpu; use --cpu, --wheels or --out DIR\n"
