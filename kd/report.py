"""Publishing a driver's results: ``results/<name>/`` (CSV, PNG + PDF, markdown) and one W&B run.

Every file is written atomically; the W&B run is named and grouped after the results folder
(``fig3``, ``fig3_fashion_mnist``: one run name per data set) so a figure, its table and its summary
sit together, and it is finished before the driver returns.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kd.logging import wandb_mode  # noqa: E402
from kd.results import write_atomic, write_text_atomic  # noqa: E402


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """``name.png`` and ``name.pdf`` in ``out_dir``."""
    paths = [Path(out_dir) / f"{name}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        write_atomic(path, lambda tmp, ext=path.suffix[1:]: fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight"))
    plt.close(fig)
    return paths


def publish(
    name: str,
    out_dir,
    tables: dict[str, pd.DataFrame],
    figures: dict,
    summary: str,
    wandb: bool = True,
    config: dict | None = None,
) -> Path:
    """Write tables as CSV, figures as PNG/PDF and ``<name>.md``; log them all to one W&B run named
    after ``out_dir``'s folder (``<folder>-<name>`` where the folder is another driver's: targets in
    fig3_fashion_mnist/)."""
    out_dir = Path(out_dir)
    for table_name, table in tables.items():
        write_atomic(out_dir / f"{table_name}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
    images = {fig_name: save_figure(fig, out_dir, fig_name)[0] for fig_name, fig in figures.items()}
    write_text_atomic(out_dir / f"{name}.md", summary)
    if wandb:
        label = out_dir.name if out_dir.name.startswith(name) else f"{out_dir.name}-{name}"
        _log_wandb(name, label, tables, images, summary, config)
    return out_dir


def _log_wandb(name, label, tables, images, summary, config) -> None:
    import wandb as wb

    run = wb.init(
        project="kd",
        group=label,
        job_type="figure",
        name=label,
        mode=wandb_mode(),
        config=config or {},
        reinit="finish_previous",
    )
    try:
        # A figure and a table may share a name (fig3.png, fig3.csv): kinds get keys of their own.
        run.log(
            {
                **{f"{name}/figure/{k}": wb.Image(str(v)) for k, v in images.items()},
                **{f"{name}/table/{k}": wb.Table(dataframe=t) for k, t in tables.items()},
            }
        )
        run.summary["summary_md"] = summary
    finally:
        run.finish()
