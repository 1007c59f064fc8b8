"""Fuzzing the code behind `medrl validate` and `medrl run`'s checks: mutated recipe files
(bytes, encodings, YAML structure, types, sizes, paths) and override strings. Every case ends
as a valid recipe or a UserError naming the file; never another exception.

`MEDRL_FUZZ_EXAMPLES` sets the number of cases per test (CI: the default; `make fuzz`:
thousands)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medrl.align.records import UserError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = (REPO / "recipes" / "quickstart.yaml").read_bytes()
EXAMPLES = int(os.environ.get("MEDRL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def validate(path: Path, overrides: list[str] = ()) -> None:
    """What `medrl validate RECIPE overrides` runs; raises only UserError (or passes)."""
    from medrl.launch.recipe import load_recipe
    from medrl.launch.stages import check_recipe

    recipe = load_recipe(path, list(overrides))
    check_recipe(recipe, path.parent)


def run_case(tmp_path: Path, content: bytes, overrides: list[str] = (), *,
             raise_errors: bool = False) -> None:
    folder = tmp_path / "case"
    folder.mkdir(exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    for name in ("quickstart_mcq.jsonl",):
        target = folder / "data" / name
        if not target.exists():
            target.symlink_to(REPO / "recipes" / "data" / name)
    if not (folder / "quickstart_reward.py").exists():
        (folder / "quickstart_reward.py").symlink_to(REPO / "recipes" / "quickstart_reward.py")
    path = folder / "recipe.yaml"
    path.write_bytes(content)
    try:
        validate(path, overrides)
    except UserError as exc:
        assert str(exc).strip(), "an error says what is wrong"
        if raise_errors:
            raise


@st.composite
def byte_edits(draw) -> bytes:
    """The quickstart recipe with random byte-level damage: flips, cuts, insertions
    (including bytes that are not UTF-8) and repeated chunks (sizes)."""
    data = bytearray(QUICKSTART)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 200))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            chunk = data[at:at + draw(st.integers(1, 40))]
            data[at:at] = chunk * draw(st.integers(2, 50))
    return bytes(data)


@FUZZ
@given(content=byte_edits())
def test_damaged_recipe_files_give_clear_errors(tmp_path, content):
    run_case(tmp_path, content)


# paths a file system refuses or a shell would expand: a name over 255 bytes, a path over
# 4096, a home folder of nobody, odd characters
PATHS = st.one_of(
    st.text(alphabet="ab", min_size=256, max_size=400),
    st.text(alphabet="/ab", min_size=4097, max_size=6000),
    st.builds(lambda s: f"~{s}/x.jsonl", st.text(alphabet="xyz", min_size=1, max_size=8)),
    st.builds(lambda s: f"{s}.py:fn", st.text(alphabet="ab", min_size=256, max_size=300)),
    st.text(alphabet="/.~ab\x00\n:", min_size=1, max_size=30))
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), PATHS, st.lists(st.one_of(st.text(max_size=5), PATHS), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
FIELDS = {
    "run": ["name", "seed", "stage", "max_steps", "output_dir"],
    "model": ["policy", "dtype"], "data": ["path", "fields", "template", "eval_path",
                                           "max_samples", "format"],
    "rollout": ["group_size", "temperature", "max_new_tokens", "backend", "stop"],
    "rewards": ["functions", "veto"], "learner": ["lr", "zero_stage", "lora"],
    "qat": ["probe_path"],
    "checkpoint": ["every", "keep_last"], "evaluation": ["datasets", "every", "mode"],
    "logging": ["every", "plots"], "cluster": ["address", "dashboard_host"]}


@st.composite
def structural_edits(draw) -> bytes:
    """The quickstart recipe parsed, with sections and fields set to values of any type
    (huge numbers, path-like strings longer than a file name may be, lists, mappings)."""
    data = yaml.safe_load(QUICKSTART)
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(FIELDS)))
        if draw(st.integers(0, 9)) == 0:
            data[section] = draw(VALUES)
            continue
        node = data.setdefault(section, {})
        if not isinstance(node, dict):
            node = data[section] = {}
        node[draw(st.sampled_from(FIELDS[section]))] = draw(VALUES)
    return yaml.safe_dump(data, allow_unicode=draw(st.booleans())).encode(
        draw(st.sampled_from(["utf-8", "utf-16", "latin-1"])), errors="replace")


@FUZZ
@given(content=structural_edits())
def test_mistyped_recipe_fields_give_clear_errors(tmp_path, content):
    run_case(tmp_path, content)


OVERRIDE = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
        [f"{s}.{f}" for s, fs in FIELDS.items() for f in fs] + ["a..b", ".x", "run.", "="]),
        st.text(max_size=30)))


@FUZZ
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3))
def test_override_strings_give_clear_errors(tmp_path, overrides):
    run_case(tmp_path, QUICKSTART, overrides)


BAD_PATHS = {"a name over 255 bytes": ("a" * 300, "a file name may be 255"),
             "a path over the limit": ("/".join(["abcdefgh"] * 600), "paths stay under 1024"),
             "a home folder of nobody": ("~nobody-here-xyz/x.jsonl",
                                         "~nobody-here-xyz names no user of this machine")}
PATH_FIELDS = {"data.path": lambda d, v: d["data"].update(path=v),
               "data.eval_path": lambda d, v: d["data"].update(eval_path=v),
               "model.policy": lambda d, v: d["model"].update(policy=v),
               "run.output_dir": lambda d, v: d["run"].update(output_dir=v),
               "evaluation.datasets.0": lambda d, v: d.update(
                   evaluation={"every": 1, "datasets": [v]}),
               "evaluation.data_root": lambda d, v: d.update(
                   evaluation={"every": 1, "datasets": ["medqa"], "data_root": v}),
               "rewards.functions.0.name": lambda d, v: d["rewards"].update(
                   functions=[{"name": f"{v}.py:fn"}])}


@pytest.mark.parametrize("field", sorted(PATH_FIELDS))
@pytest.mark.parametrize("kind", sorted(BAD_PATHS))
def test_paths_no_file_system_takes_are_refused_naming_the_field(tmp_path, field, kind):
    from medrl.launch.recipe import RecipeError

    value, says = BAD_PATHS[kind]
    data = yaml.safe_load(QUICKSTART)
    PATH_FIELDS[field](data, value)
    if field.startswith("rewards") and kind == "a path over the limit":
        says = "paths stay under 1024"
    with pytest.raises(RecipeError) as err:
        run_case(tmp_path, yaml.safe_dump(data).encode(), raise_errors=True)
    text = str(err.value)
    assert field in text and says in text and "not a usable path" in text
