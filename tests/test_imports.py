"""What the library imports: nothing of its harness (experiments/, scripts/), and private Hydra or
Lightning names only in kd/private_api.py, where tests/test_private_api.py checks each."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIBRARY = sorted([*(REPO / "kd").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")])


def imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every import in ``path`` (name "" for ``import module``), at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_imports_nothing_of_its_harness(path):
    harness = [m for m, _ in imports(path) if m.split(".")[0] in ("experiments", "scripts")]
    assert not harness, f"{path.relative_to(REPO)} imports {harness}"
    assert "experiments." not in path.read_text(), "a _target_ in the library names the harness"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_private_hydra_and_lightning_names_are_imported_in_private_api_only(path):
    private = [
        f"{m}.{n}" if n else m
        for m, n in imports(path)
        if m.split(".")[0] in ("hydra", "lightning") and any(p.startswith("_") for p in [*m.split("."), n] if p)
    ]
    if path == REPO / "kd" / "private_api.py":
        assert private, "kd/private_api.py wraps private names: this check no longer sees them"
    else:
        assert not private, f"{path.relative_to(REPO)} imports {private}: wrap them in kd/private_api.py"
