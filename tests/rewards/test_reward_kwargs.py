"""Reward keyword arguments from a recipe are coerced to the reward's annotations (as the
recipe schema coerces its own fields) and the reward receives the coerced values."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from medrl.align.records import Sample, UserError
from medrl.launch.recipe import load_recipe
from medrl.rewards import RewardRunner, load_rewards

PLUGIN = textwrap.dedent('''
    from __future__ import annotations

    from pathlib import Path

    def cites_guideline(sample, *, words: tuple[str, ...] = ("NICE", "WHO", "AHA"),
                        bonus: float = 1.0):
        assert isinstance(words, tuple), type(words)  # the reward sees the annotated type
        return bonus if any(w in sample.completion_text for w in words) else 0.0

    def reads_a_file(sample, *, table: Path, scale: float = 1.0, strict: bool = False):
        assert isinstance(table, Path) and isinstance(scale, float)
        return scale

    def untyped(sample, *, alpha=0.1):
        return alpha

    def forward_ref(sample, *, rubric: Rubric | None = None):  # Rubric is defined nowhere
        return 1.0
''')

NO_FUTURE = textwrap.dedent('''
    def nested_ref(sample, *, rubric: list["Rubric"] = ()):
        return 1.0
''')


@pytest.fixture
def plugin_dir(tmp_path):
    (tmp_path / "kw.py").write_text(PLUGIN)
    (tmp_path / "nested.py").write_text(NO_FUTURE)
    return tmp_path


def sample(text="Per the ACC guideline"):
    return Sample(uid="q/0", group_id="q", completion_text=text, completion_ids=[1])


def test_yaml_lists_become_tuples_and_the_reward_gets_them(plugin_dir):
    spec = {"name": "kw.py:cites_guideline", "kwargs": {"words": ["NICE", "ACC"], "bonus": 2}}
    [r] = load_rewards([spec], base_dir=plugin_dir)
    assert r.kwargs == {"words": ("NICE", "ACC"), "bonus": 2.0}
    report = RewardRunner([r]).score([sample()])
    assert report.samples[0].rewards == {"cites_guideline": 2.0}
    # provenance keeps the values as the recipe wrote them (JSON)
    assert r.identity()["kwargs"] == {"words": ["NICE", "ACC"], "bonus": 2}
    json.dumps(r.identity())


def test_paths_and_numeric_strings_are_coerced(plugin_dir):
    spec = {"name": "kw.py:reads_a_file",
            "kwargs": {"table": "tables/doses.csv", "scale": "1e-3", "strict": "true"}}
    [r] = load_rewards([spec], base_dir=plugin_dir)
    assert r.kwargs == {"table": Path("tables/doses.csv"), "scale": 1e-3, "strict": True}
    assert r.target(sample(), **r.kwargs) == 1e-3


def test_values_that_do_not_fit_are_still_refused(plugin_dir):
    spec = {"name": "kw.py:reads_a_file", "kwargs": {"table": 3, "strict": "sometimes"}}
    with pytest.raises(UserError) as err:
        load_rewards([spec], base_dir=plugin_dir)
    assert ("rewards.functions[0] (kw.py:reads_a_file): argument 'table': Input is not a valid "
            "path for <class 'pathlib.Path'> (got 3); argument 'strict': Input should be a valid "
            "boolean, "
            "unable to interpret input (got 'sometimes'). Accepted arguments: table, "
            "scale=1.0, strict=False.") in str(err.value)


@pytest.mark.parametrize("name, annotation", [
    ("kw.py:forward_ref", "Rubric | None"),
    ("nested.py:nested_ref", "list['Rubric']"),
])
def test_an_annotation_that_cannot_be_resolved_names_reward_and_argument(plugin_dir, name,
                                                                          annotation):
    with pytest.raises(UserError) as err:
        load_rewards([{"name": name, "kwargs": {"rubric": []}}], base_dir=plugin_dir)
    text = str(err.value)
    assert f"rewards.functions[0] ({name}): argument 'rubric': its annotation " in text
    assert "cannot be resolved" in text and "Rubric" in text
    assert "import that type at the top of the reward's module, or drop the annotation" in text
    # not passing the argument leaves the default, which needs no check
    assert load_rewards([{"name": name}], base_dir=plugin_dir)[0].kwargs == {}


def test_exponent_floats_in_a_recipe_reach_the_reward_as_floats(plugin_dir):
    (plugin_dir / "items.jsonl").write_text(
        json.dumps({"question": "Q?", "options": {"A": "a", "B": "b"}, "answer": "A"}) + "\n")
    (plugin_dir / "recipe.yaml").write_text(textwrap.dedent('''
        data: {path: items.jsonl}
        rewards:
          functions:
            - {name: kw.py:untyped, kwargs: {alpha: 1e-3}}
    '''))
    recipe = load_recipe(plugin_dir / "recipe.yaml", ["rewards.floor=-1e-1"])
    assert recipe.rewards.functions[0].kwargs == {"alpha": 1e-3}
    assert recipe.rewards.floor == -0.1
    [r] = load_rewards([recipe.rewards.functions[0].model_dump()], base_dir=plugin_dir)
    assert r.target(sample(), **r.kwargs) == 1e-3
