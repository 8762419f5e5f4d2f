"""Many small runs in one process: what every figure driver uses.

Each job is a list of Hydra overrides of ``configs/train.yaml``; it runs through ``kd.train.run``
into its own folder. A job whose ``results.json`` says completed is skipped, so a killed sweep
picks up where it was; a job that fails is recorded and the others go on.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from tqdm.auto import tqdm

from kd.errors import one_line
from kd.results import completed_record
from kd.train import CONFIG_DIR, run

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def compose_config(overrides: list[str], output_dir: str | Path | None = None) -> DictConfig:
    """``configs/train.yaml`` with ``overrides``, as ``python -m kd.train`` would build it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def quiet_lightning() -> None:
    """Sweeps print one progress bar, not Lightning's banner for every run."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*(eval mode|LeafSpec|litlogger).*")


def run_jobs(jobs: dict[str, list[str]], root: str | Path, desc: str = "runs") -> dict[str, dict]:
    """Run every ``name -> overrides`` job into ``root/runs/<name>``; return their records.

    A failed job's record has ``status="failed"`` and ``error``; it never stops the others.
    """
    quiet_lightning()
    root = Path(root)
    records = {}
    bar = tqdm(jobs.items(), desc=desc, unit="run", dynamic_ncols=True)
    for name, overrides in bar:
        bar.set_postfix_str(name[-40:])
        out = root / "runs" / name
        done = completed_record(out)
        if done is not None:
            records[name] = done
            continue
        try:
            records[name] = run(compose_config([*QUIET, *overrides], out))
        except Exception as err:  # keep the sweep going; the failure is in the record and the summary
            records[name] = {"status": "failed", "error": f"{type(err).__name__}: {one_line(err)}", "output_dir": str(out)}
            tqdm.write(f"[kd] job {name} failed: {records[name]['error']}")
    return records
