"""The import direction of the layout: launch on top, rollouts and rewards in the middle,
align at the bottom; nothing imports launch, and rollouts/rewards take from align only the
records, prompt encoding and model loading. Checked on the source (every import statement,
lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# subpackage -> the medrl subpackages (or align modules) it may import
ALLOWED = {
    "align": {"align"},
    "rollouts": {"rollouts", "align.records", "align.encode", "align.prompts", "align.models"},
    "rewards": {"rewards", "align.records", "align.encode", "align.prompts", "align.models"},
    "launch": {"launch", "align", "rollouts", "rewards"},
}


def medrl_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module under medrl.) of every import of a medrl module in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("medrl."):
                out.append((node.lineno, name.removeprefix("medrl.")))
    return out


def allowed(package: str, module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in ALLOWED[package])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_down_the_layers(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, module in medrl_imports(path):
            if module in ("align", "rollouts", "rewards", "launch"):
                continue  # the package itself; its imported names are checked one by one
            if not allowed(package, module):
                bad.append(f"{path.relative_to(REPO)}:{line} imports medrl.{module}")
    assert not bad, "\n".join(bad)
