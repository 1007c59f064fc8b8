"""The wheel: folders become medrl.* subpackages, recipes and assets ship as package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO)], check=True, capture_output=True,
                   cwd=tmp_path)
    (wheel,) = tmp_path.glob("medrl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("medrl/align/records.py", "medrl/launch/cli.py", "medrl/rollouts/engine.py",
                     "medrl/rewards/__init__.py", "medrl/recipes/quickstart.yaml",
                     "medrl/recipes/quickstart_reward.py", "medrl/recipes/data/quickstart_mcq.jsonl",
                     "medrl/align/assets/tiny_tokenizer/tokenizer.json",
                     "medrl/align/assets/corpus.txt"):
        assert expected in names, expected
    top = {n.split("/")[0] for n in names}
    assert not top & {"align", "launch", "rollouts", "rewards", "recipes", "tests", "bench"}
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "medrl = medrl.launch.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
