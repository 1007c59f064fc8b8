"""The examples in docs/rewards.md run as written (the page cannot rot)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import yaml

from medrl.rewards import load_rewards

DOC = Path(__file__).resolve().parents[2] / "docs" / "rewards.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def test_python_examples_run():
    code = blocks("python")
    assert len(code) >= 4
    # run as one module, as a user's plugin file would be (importable, so picklable)
    module = types.ModuleType("medrl_docs_example")
    sys.modules[module.__name__] = module
    try:
        for block in code:
            exec(compile(block, str(DOC), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    assert module.report.dropped == []


def test_recipe_snippet_is_a_valid_rewards_section(tmp_path):
    from medrl.launch.recipe import RewardsConfig

    section = yaml.safe_load(blocks("yaml")[0])["rewards"]
    config = RewardsConfig.model_validate(section)
    assert [(v.score, v.threshold, v.when) for v in config.veto] == [
        ("rubric.safety", 0.5, "below"), ("sequence_classifier", 0.8, "above")]
    assert len(config.functions) == 4
    # the built-in entries of the snippet load with their kwargs as written
    builtin = [f.model_dump() for f in config.functions if ":" not in f.name
               and f.name != "sequence_classifier"]
    assert [r.name for r in load_rewards(builtin, base_dir=tmp_path)] == ["mcq_letter"]
