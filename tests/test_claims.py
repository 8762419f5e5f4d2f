"""experiments.claims: the claims side by side, read from the published tables (no training).

Run on the committed fig3 and sensitivity tables, it gives back the committed claims table, so the
table the README quotes is the one those runs give."""

from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("wandb")
from experiments import claims  # noqa: E402 (after the skip: it imports wandb through kd.report)

REPO = Path(__file__).resolve().parent.parent


def test_the_committed_tables_give_the_committed_claims(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = claims.main(["--out", str(tmp_path / "claims"), "--no-wandb"])
    table = [line for line in (out / "claims.md").read_text().splitlines() if line.startswith(("|", "- "))]
    committed = (REPO / "results/claims/claims.md").read_text().splitlines()
    assert table and table == [line for line in committed if line.startswith(("|", "- "))]
    gaps = pd.read_csv(out / "claims.csv")
    assert set(gaps.data) == {"synthetic", "fashion_mnist"}
    # Holm keeps only decided verdicts, never one whose own interval contains 0.
    assert not gaps[gaps.holm & (gaps.verdict == "unresolved")].size


def test_a_missing_table_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no .*nowhere/fig3.csv; run fig3 and sensitivity first"):
        claims.main(["--fig3", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--no-wandb"])
