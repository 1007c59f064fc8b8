"""Command-line overrides are read as YAML reads the value in a recipe file, typed by the schema;
recipe files read YAML 1.2 exponent floats (``1e-3``) as floats."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import yaml
from medrl.launch.recipe import RecipeError, load_recipe, parse_override, read_yaml


def write_recipe(tmp_path: Path) -> Path:
    (tmp_path / "items.jsonl").write_text(
        json.dumps({"question": "Q?", "options": {"A": "a", "B": "b"}, "answer": "A"}) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "items.jsonl"},
                                    "rewards": {"functions": [{"name": "mcq_letter"}]}}))
    return path


def field(recipe, dotted: str):
    node = recipe
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


# (override, recipe attribute, expected value); the type is checked too
OVERRIDES = [
    ("rewards.normalize=none", "rewards.normalize", "none"),
    ("learner.ref_model=none", "learner.ref_model", "none"),
    ("algorithm.advantage_scale=none", "algorithm.advantage_scale", "none"),
    ('run.name="x"', "run.name", "x"),
    ("run.name='it''s'", "run.name", "it's"),
    ("run.name=123", "run.name", "123"),  # a string field keeps the text
    ("run.name=true", "run.name", "true"),
    ('model.dtype="bfloat16"', "model.dtype", "bfloat16"),
    ("model.dtype=float16", "model.dtype", "float16"),
    ("learner.lr=1e-3", "learner.lr", 1e-3),
    ("learner.lr=5.0e-3", "learner.lr", 5e-3),
    ("learner.lr=2E-5", "learner.lr", 2e-5),
    ("algorithm.kl.coef=0.05", "algorithm.kl.coef", 0.05),
    ("learner.zero_stage=3", "learner.zero_stage", 3),
    ("rollout.group_size=8", "rollout.group_size", 8),
    ('rollout.stop=[a, "</answer>"]', "rollout.stop", ["a", "</answer>"]),
    ("learner.betas=[0.9, 0.95]", "learner.betas", (0.9, 0.95)),
    ("cluster.learner_resources={slot: 1}", "cluster.learner_resources", {"slot": 1.0}),
    ("data.max_samples=null", "data.max_samples", None),
    ("data.max_samples=~", "data.max_samples", None),
    ("data.fields.prompt=null", "data.fields.prompt", None),
    ("data.split=none", "data.split", "none"),  # a string field: the text none
    ("data.system_prompt='null'", "data.system_prompt", "null"),
    ("data.system_prompt=Answer: A letter", "data.system_prompt", "Answer: A letter"),
    ("logging.tensorboard=false", "logging.tensorboard", False),
    ("algorithm.async=true", "algorithm.async_", True),
    ("data.shuffle=no", "data.shuffle", False),  # YAML 1.1 booleans, as in the file
    ("rewards.functions.0.weight=0.5", "rewards.functions.0.weight", 0.5),  # a list index
]


@pytest.mark.parametrize("override, attribute, expected", OVERRIDES,
                         ids=[o for o, _, _ in OVERRIDES])
def test_override_reads_like_the_file(tmp_path, override, attribute, expected):
    recipe = load_recipe(write_recipe(tmp_path), [override])
    value = field(recipe, attribute)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("override, value", [
    ("a.b=[1, 2]", [1, 2]),
    ("a={x: 1e-3}", {"x": 1e-3}),  # exponent floats inside flow collections too
    ("a=none", "none"),
    ("a=None", "None"),
    ("a=NULL", None),
    ('a=""', ""),  # the empty string, spelt out
    ("a=1e5", 100000.0),
    ("a=1.2.3", "1.2.3"),
])
def test_parse_override_values(override, value):
    assert parse_override(override)[1] == value


@pytest.mark.parametrize("override, message", [
    ("run.name=", (r"the value is empty\. Write run\.name=null for no value, or "
                   r"\"run\.name=''\" \(quoted for the shell\) for an empty string")),
    ("learner.lr=[1,", r"override 'learner.lr=\[1,': the value is not valid YAML"),
    ("model.dtype=bf16", (r"model\.dtype: Input should be 'auto', 'float32', 'bfloat16' or "
                          r"'float16'")),
    ("run.name=[a]", r"run\.name: Input should be a valid string"),
    ("rewards.functions.1.weight=2", (r"rewards\.functions is a list of 1 entries; '1' is not "
                                      r"the index of one of them \(0 to 0\)")),
    ("rewards.functions.x.weight=2", r"'x' is not the index of one of them"),
    ("data.path.x=1", r"data\.path is not a section"),
])
def test_bad_override_values_are_named(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path), [override])


def test_an_index_in_the_path_reaches_into_a_list(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["rewards.functions.0.kwargs.strict=true",
                                                  "rewards.functions.0.name=yes_no_maybe"])
    spec = recipe.rewards.functions[0]
    assert (spec.name, spec.kwargs) == ("yes_no_maybe", {"strict": True})


def test_recipe_files_read_exponent_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("a: 1e-3\nb: 5.0e-3\nc: 1E3\nd: 123\ne: '1e-3'\nf: 1.2.3\ng: .5e1\n"
                    "h: 2024-01-01\ni: none\nj: ~\nk: -2e+2\n")
    data = read_yaml(path)
    assert data == {"a": 1e-3, "b": 5e-3, "c": 1000.0, "d": 123, "e": "1e-3", "f": "1.2.3",
                    "g": 5.0, "h": datetime.date(2024, 1, 1), "i": "none", "j": None,
                    "k": -200.0}
    assert [type(data[k]) for k in "acdk"] == [float, float, int, float]
    # plain yaml.safe_load is left as it was
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}
