"""Train the teachers a table distils from, ahead of its students; skip those already trained.

    python -m experiments.teachers --data cifar100             # make teachers DATA=cifar100 (table 1)
    python -m experiments.teachers --data imagenet -- trainer=gpu

Each teacher is found as its students find it, by ``kd.teachers.ensure_trained`` on a table cell's
config, so it lands in the same cache (paths.teacher_dir/<hash>/) and no student trains it again.
"""

from __future__ import annotations

import argparse

from experiments.drivers import require_data
from experiments.tables import TABLES, cell_overrides, cells, teacher_configs
from kd.errors import one_line
from kd.results import completed_record
from kd.teachers import ensure_trained
from kd.train import REPORTED, run


def main(argv=None) -> dict[str, str]:
    """Train what is missing; return ``{teacher folder: "done" | "trained"}``."""
    cli = argparse.ArgumentParser(
        prog="python -m experiments.teachers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_argument("--data", required=True, choices=sorted({t.data for t in TABLES.values()}))
    cli.add_argument("overrides", nargs="*", help="Hydra overrides, as given to the table driver")
    args = cli.parse_args(argv)
    try:
        return train_missing(args.data, args.overrides)
    except REPORTED as err:  # a bad override, missing data, a diverged teacher: one line, no traceback
        raise SystemExit(f"error: {one_line(err)}") from None


def train_missing(data: str, overrides) -> dict[str, str]:
    """Train each teacher of the tables on ``data`` whose run has not completed, one after another."""
    status = {}
    for table in [name for name, spec in TABLES.items() if spec.data == data]:
        require_data(cell_overrides(table, next(iter(cells(table))), overrides))
        for folder, cfg in teacher_configs(table, overrides).items():
            done = completed_record(folder) is not None
            if not done:
                ensure_trained(cfg, run)
            status[str(folder)] = "done" if done else "trained"
            print(f"[kd] {table} teacher {folder.name}: {status[str(folder)]} ({folder})", flush=True)
    return status


if __name__ == "__main__":
    main()
