"""Many small runs, in one process or in a few worker processes: what every figure driver uses.

Each job is a list of Hydra overrides of ``configs/train.yaml``; it runs through ``kd.train.run``
into its own folder. A job whose ``results.json`` says completed is skipped, so a killed sweep
picks up where it was; a job that fails is recorded and the others go on. ``workers > 1`` runs
jobs in that many processes at once (each imports Lightning once and runs many jobs); a teacher
several jobs need is trained once, by the first, while the others wait on its lock.
"""

from __future__ import annotations

import logging
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def failed(err: BaseException, out: Path) -> dict:
    """The record of a job that raised ``err`` (its own results.json, if any, says more)."""
    return {"status": "failed", "error": f"{type(err).__name__}: {one_line(err)}", "output_dir": str(out)}


def run_job(overrides: list[str], out: Path) -> dict:
    """One job into ``out``: its record, or a failed record with the error (never an exception)."""
    try:
        return run(compose_config([*QUIET, *overrides], out))
    except Exception as err:  # keep the sweep going; the failure is in the record and the summary
        return failed(err, out)


def teachers_first(jobs: dict[str, list[str]], names: list[str]) -> list[str]:
    """``names`` reordered so that parallel workers train different teachers at once instead of
    waiting on one another's lock: jobs that differ only in their objective usually share a
    teacher, and the first job of each such group goes first."""
    first, rest, groups = [], [], set()
    for name in names:
        group = tuple(o for o in jobs[name] if not o.lstrip("+~").startswith(("objective=", "objective.")))
        (rest if group in groups else first).append(name)
        groups.add(group)
    return first + rest


def run_jobs(jobs: dict[str, list[str]], root: str | Path, desc: str = "runs", workers: int = 1) -> dict[str, dict]:
    """Run every ``name -> overrides`` job into ``root/runs/<name>``; return their records, in the
    order of ``jobs`` whatever the order they finish in.

    A failed job's record has ``status="failed"`` and ``error``; it never stops the others.
    """
    quiet_lightning()
    outs = {name: Path(root) / "runs" / name for name in jobs}
    records = {name: completed_record(out) for name, out in outs.items()}
    todo = [name for name, record in records.items() if record is None]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run", dynamic_ncols=True)

    def done(name: str, record: dict) -> None:
        records[name] = record
        if record["status"] != "completed":
            tqdm.write(f"[kd] job {name} failed: {record.get('error')}")
        bar.set_postfix_str(name[-40:])
        bar.update()

    if workers <= 1:
        for name in todo:
            done(name, run_job(jobs[name], outs[name]))
    else:  # spawn: a fresh interpreter per worker, never a fork of this one's threads and locks
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=quiet_lightning) as pool:
            futures = {pool.submit(run_job, jobs[name], outs[name]): name for name in teachers_first(jobs, todo)}
            try:
                for future in as_completed(futures):
                    name = futures[future]
                    try:
                        done(name, future.result())
                    except Exception as err:  # the worker died (killed, out of memory): this job, not the sweep
                        done(name, failed(err, outs[name]))
            except BaseException:  # Ctrl-C: the jobs not started never start (a re-run picks them up)
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    return records
