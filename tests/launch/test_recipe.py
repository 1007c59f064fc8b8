"""The recipe schema: every user error is one clear message with exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from medrl.launch.cli import app
from medrl.launch.recipe import Recipe, RecipeError, dump_recipe, load_recipe, parse_override

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
runner = CliRunner()


def write_recipe(tmp_path: Path, data: dict) -> Path:
    (tmp_path / "items.jsonl").write_text(
        json.dumps({"question": "Q?", "options": {"A": "a", "B": "b"}, "answer": "A"}) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
    return {"data": {"path": "items.jsonl"}, "rewards": {"functions": [{"name": "mcq_letter"}]}}


def test_quickstart_recipe_is_valid():
    recipe = load_recipe(QUICKSTART)
    assert recipe.run.stage == "grpo"
    assert recipe.model.policy == "tiny:qwen2"


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write_recipe(tmp_path, base())
    recipe = load_recipe(path, ["algorithm.kl.coef=0.01", "rollout.group_size=8",
                                "logging.tensorboard=false", "rollout.stop=[a, b]",
                                "data.max_samples=null"])
    assert recipe.algorithm.kl.coef == pytest.approx(0.01)
    assert recipe.rollout.group_size == 8
    assert recipe.logging.tensorboard is False
    assert recipe.rollout.stop == ["a", "b"]
    assert recipe.data.max_samples is None


def test_all_errors_are_reported_at_once_with_paths(tmp_path):
    data = base()
    data["rollout"] = {"group_sise": 4, "temperature": "hot"}
    data["algorithm"] = {"loss_agg": "mean"}
    path = write_recipe(tmp_path, data)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert str(path) in text
    assert "3 problem(s)" in text
    assert "rollout.group_sise: unknown key" in text
    assert "rollout.temperature:" in text and "'hot'" in text
    assert "algorithm.loss_agg:" in text and "'token_mean'" in text  # the choices are named


def test_missing_data_file_is_named(tmp_path):
    data = base()
    data["data"]["path"] = "nowhere.jsonl"
    path = write_recipe(tmp_path, data)
    with pytest.raises(RecipeError, match=r"data.path: 'nowhere.jsonl' does not exist"):
        load_recipe(path)


def test_hub_id_policy_says_the_hub_is_unreachable(tmp_path):
    data = base()
    data["model"] = {"policy": "Qwen/Qwen2-0.5B"}
    path = write_recipe(tmp_path, data)
    with pytest.raises(RecipeError, match="no model hub is reachable"):
        load_recipe(path)


@pytest.mark.parametrize("override, message", [
    ("rollout.group_size", "expected key.path=value"),
    ("rollout.group_size=many", "rollout.group_size"),
    ("rollout.nonsense=1", "rollout.nonsense: unknown key"),
    ("data.path.first=1", "data.path is not a section"),
])
def test_bad_overrides(tmp_path, override, message):
    path = write_recipe(tmp_path, base())
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, [override])


def test_parse_override_reads_flow_yaml():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a={x: 1}") == (["a"], {"x": 1})
    assert parse_override("a=~") == (["a"], None)
    assert parse_override("learner.lr=0.5") == (["learner", "lr"], 0.5)
    assert parse_override("learner.zero_stage=2") == (["learner", "zero_stage"], 2)
    assert parse_override("run.name=123") == (["run", "name"], "123")  # a string field
    assert parse_override("data.fields.answer=answer_idx") == (
        ["data", "fields", "answer"], "answer_idx")


@pytest.mark.parametrize("mutation, fragment", [
    ({"rollout": {"group_sise": 4}}, "unknown key"),
    ({"learner": {"zero_stage": 5}}, "learner.zero_stage"),
    ({"data": {"path": "missing.jsonl"}}, "does not exist"),
])
def test_cli_validate_exits_2_without_traceback(tmp_path, mutation, fragment):
    data = base()
    for section, values in mutation.items():
        data.setdefault(section, {}).update(values)
    path = write_recipe(tmp_path, data)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_cli_validate_bad_override_exits_2(tmp_path):
    path = write_recipe(tmp_path, base())
    result = runner.invoke(app, ["validate", str(path), "learner.lr=fast"])
    assert result.exit_code == 2
    assert "learner.lr" in result.output


def test_cli_schema_is_json_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["additionalProperties"] is False
    assert "rollout" in schema["properties"] and "data" in schema["properties"]


def _mutations():
    """Random edits of a valid recipe: wrong types, unknown keys, deleted keys, odd values."""
    keys = st.sampled_from(["run", "model", "data", "rollout", "rewards", "algorithm",
                            "learner", "cluster", "checkpoint", "logging", "bogus"])
    fields = st.sampled_from(["name", "seed", "stage", "max_steps", "policy", "path",
                              "group_size", "temperature", "functions", "kl", "zero_stage",
                              "every", "lr", "typo_field"])
    values = st.one_of(st.none(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                       st.text(max_size=8), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    return st.lists(st.tuples(keys, fields, values), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_mutations())
def test_random_mutations_never_produce_a_traceback(tmp_path, edits):
    data = base()
    for section, key, value in edits:
        node = data.setdefault(section, {})
        if isinstance(node, dict):
            node[key] = value
        else:
            data[section] = {key: value}
    path = write_recipe(tmp_path, data)
    try:
        recipe = load_recipe(path)
    except RecipeError as err:
        assert str(path) in str(err)
    else:
        assert isinstance(recipe, Recipe)


def test_layout_import_names():
    """The folders are medrl.* subpackages only: `import align` must not resolve."""
    code = ("import importlib.util, medrl.align, medrl.launch, medrl.rollouts, medrl.rewards;"
            "print(importlib.util.find_spec('align'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True)
    assert out.stdout.strip() == "None"


def test_recipes_ship_as_package_data():
    from importlib.resources import files

    assert (files("medrl.recipes") / "quickstart.yaml").is_file()
    assert (files("medrl.recipes") / "data" / "quickstart_mcq.jsonl").is_file()


def test_veto_forms_resolve_to_one_list(tmp_path):
    from medrl.launch.recipe import RewardsConfig

    one = RewardsConfig.model_validate({"veto": "rubric.safety", "veto_threshold": 0.3})
    assert [v.model_dump() for v in one.veto] == [
        {"score": "rubric.safety", "threshold": 0.3, "when": "below"}]
    assert RewardsConfig.model_validate({"veto": "rubric"}).veto[0].threshold == 0.5
    several = RewardsConfig.model_validate({"veto": [
        {"score": "rubric.safety", "threshold": 0.5},
        {"score": "toxicity", "threshold": 0.8, "when": "above"}]})
    assert [(v.score, v.when) for v in several.veto] == [("rubric.safety", "below"),
                                                         ("toxicity", "above")]
    # the resolved recipe reads back as it was written (what `medrl resume` does)
    data = base()
    data["rewards"]["veto"] = "mcq_letter"
    recipe = load_recipe(write_recipe(tmp_path, data))
    again = Recipe.model_validate(yaml.safe_load(dump_recipe(recipe)))
    assert again.rewards.veto == recipe.rewards.veto
    # a resolved recipe of an earlier version: veto null, veto_threshold 0.5
    assert RewardsConfig.model_validate({"veto": None, "veto_threshold": 0.5}).veto == []


@pytest.mark.parametrize("veto, fragment", [
    ([{"score": "rubric.safety", "when": "sometimes"}], "rewards.veto.0.when: Input should be "
                                                      "'below' or 'above'"),
    ([{"score": "rubric.safety", "treshold": 0.2}], "rewards.veto.0.treshold: unknown key"),
    ([{"threshold": 0.2}], "rewards.veto.0.score: required field is missing"),
    ("", "rewards: veto: an empty string names no reward"),
    (5, "rewards: veto: expected <reward>[.<dim>] or a list of {score, threshold, "
        "when}, not 5"),
])
def test_bad_vetoes_are_named(tmp_path, veto, fragment):
    data = base()
    data["rewards"]["veto"] = veto
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, data))
    assert fragment in str(err.value)


def test_veto_threshold_goes_with_the_string_form_only(tmp_path):
    data = base()
    data["rewards"].update(veto=[{"score": "mcq_letter"}], veto_threshold=0.2)
    with pytest.raises(RecipeError, match="rewards: veto_threshold belongs to "
                                          "the one-string form"):
        load_recipe(write_recipe(tmp_path, data))


def test_validate_names_a_veto_on_a_reward_that_is_not_loaded(tmp_path):
    data = base()
    data["rewards"]["veto"] = [{"score": "safety", "threshold": 0.5}]
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path, data))])
    assert result.exit_code == 2
    assert "rewards.veto[0]: 'safety' names no loaded reward" in result.output
    assert "Traceback" not in result.output


# -- settings that validate but would run wrong or not at all ----------------------------
def stage_recipe(stage: str, **sections) -> dict:
    data = base() if stage == "grpo" else {"data": {"path": "items.jsonl"}}
    data["run"] = {"stage": stage, **sections.pop("run", {})}
    data.update(sections)
    return data


def test_grpo_refuses_groups_of_one(tmp_path):
    data = stage_recipe("grpo", rollout={"group_size": 1})
    with pytest.raises(RecipeError, match=r"rollout.group_size is 1, but GRPO scores each "
                                          r"completion against the others of its prompt's "
                                          r"group: .* Set rollout.group_size to 2 or more"):
        load_recipe(write_recipe(tmp_path, data))
    assert load_recipe(write_recipe(tmp_path, stage_recipe(
        "sft", rollout={"group_size": 1}))).rollout.group_size == 1  # sft reads no groups


@pytest.mark.parametrize("stage, section, stages", [
    ("grpo", "sft", "sft or qat"),
    ("grpo", "qat", "qat"),
    ("sft", "qat", "qat"),
])
def test_a_section_of_another_stage_is_refused(tmp_path, stage, section, stages):
    data = stage_recipe(stage, **{section: {}})
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, data))
    assert (f"the {section}: section is read only by run.stage {stages}, and this recipe's "
            f"stage is {stage}: remove the {section}: section, or set run.stage") \
        in str(err.value)


def test_qat_reads_the_sft_section(tmp_path):
    data = stage_recipe("qat", run={"max_steps": 6}, sft={"batch_size": 1},
                        qat={"warmup_steps": 2})
    recipe = load_recipe(write_recipe(tmp_path, data))
    assert recipe.sft.batch_size == 1 and recipe.qat.warmup_steps == 2


@pytest.mark.parametrize("stage", ["vision_pretrain"])
def test_stages_that_do_not_run_yet_fail_validation(tmp_path, stage):
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path, stage_recipe(stage)))])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"run.stage: '{stage}' is not available in this version; the stages that run "
            "are: grpo, sft, qat, reward_model, dpo, distill, eval.") \
        in " ".join(result.output.split())


def test_run_stage_dispatches_on_the_runnable_stages(tmp_path):
    from medrl.align.records import UserError
    from medrl.launch.recipe import RUNNABLE_STAGES
    from medrl.launch.stages import run_stage

    valid = load_recipe(write_recipe(tmp_path, base()))
    # a Recipe built in code without validation, as the schema would never let it through
    recipe = valid.model_copy(update={"run": valid.run.model_copy(
        update={"stage": "vision_pretrain"})})
    assert "vision_pretrain" not in RUNNABLE_STAGES
    with pytest.raises(UserError, match="the stages that run are: grpo, sft, qat"):
        run_stage(recipe, tmp_path / "run")


@pytest.mark.parametrize("overrides", [
    {},  # defaults: run.max_steps 10, qat.warmup_steps 500
    {"run": {"max_steps": 4}, "qat": {"warmup_steps": 4}},
])
def test_qat_without_quantised_steps_is_refused(tmp_path, overrides):
    data = stage_recipe("qat", **overrides)
    with pytest.raises(RecipeError, match=r"run.max_steps gives \d+ step\(s\), but "
                                          r"qat.warmup_steps is \d+: quantisation starts after "
                                          r"the warm-up, so this run would train no quantised "
                                          r"step"):
        load_recipe(write_recipe(tmp_path, data))


def test_qat_epochs_schedule_is_checked_against_the_data(tmp_path):
    from medrl.align.records import UserError
    from medrl.launch.stages import check_recipe

    data = stage_recipe("qat", sft={"epochs": 2, "batch_size": 1}, qat={"warmup_steps": 2})
    recipe = load_recipe(write_recipe(tmp_path, data))  # the step count needs the data
    with pytest.raises(UserError, match=r"sft.epochs 2 x 1 training rows / sft.batch_size 1 "
                                        r"gives 2 step\(s\), but qat.warmup_steps is 2"):
        check_recipe(recipe, tmp_path)
    recipe.qat.warmup_steps = 1
    assert "qat: 2 steps" in check_recipe(recipe, tmp_path)


def test_reward_gpus_need_an_actor(tmp_path):
    data = base()
    data["rewards"]["functions"][0].update(num_gpus=1)
    with pytest.raises(RecipeError, match="num_gpus 1 but runs in the driver"):
        load_recipe(write_recipe(tmp_path, data))
    data["rewards"]["functions"][0].update(actor=True)
    assert load_recipe(write_recipe(tmp_path, data)).rewards.functions[0].num_gpus == 1


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_validates_as_it_is(name):
    from medrl.launch.stages import check_recipe

    path = REPO / "recipes" / name
    recipe = load_recipe(path)
    checked = check_recipe(recipe, path.parent)
    read = "evaluation:" if recipe.run.stage == "eval" else "data:"  # what the stage reads
    assert checked[0] == "schema" and any(c.startswith(read) for c in checked)


def test_judge_actors_count_in_the_cpus_an_embedded_cluster_reserves():
    from medrl.launch.cluster import cpus_needed

    data = yaml.safe_load(QUICKSTART.read_text())
    data["data"]["path"] = str(REPO / "recipes" / data["data"]["path"])
    base = cpus_needed(Recipe.model_validate(data))
    judge = {"name": "rubric", "kwargs": {"model": "tiny:qwen2", "replicas": 2,
                                          "judge_num_cpus": 1.5}}
    other = {"name": "rubric", "alias": "hb", "kwargs": {"model": "tiny:qwen2", "replicas": 2,
                                                         "judge_num_cpus": 1.5,
                                                         "aggregation": "healthbench"}}
    data["rewards"]["functions"] = data["rewards"]["functions"] + [judge, other]
    # the two rubric rewards share one judge: 2 replicas x 1.5 CPUs, counted once
    assert cpus_needed(Recipe.model_validate(data)) == base + 3.0


def test_validate_runs_class_rewards_own_argument_checks(tmp_path):
    data = base()
    data["rewards"]["functions"] = [{"name": "rubric", "kwargs": {"model": "tiny:qwen2",
                                                                  "veto_penalty": 1.1}}]
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path, data))])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("kwargs.veto_penalty is 1.1; it must be > 1 + beta = 1.2"
            in " ".join(result.output.split()))


def test_an_evaluation_section_is_read_by_grpo_sft_and_eval_only(tmp_path):
    data = stage_recipe("reward_model", evaluation={"every": 2, "datasets": ["medqa"]})
    with pytest.raises(RecipeError, match="the evaluation: section is read only by run.stage "
                                          "grpo or sft or eval"):
        load_recipe(write_recipe(tmp_path, data))
    sft = load_recipe(write_recipe(tmp_path, stage_recipe(
        "sft", evaluation={"every": 2, "datasets": ["medqa"]})))
    assert sft.evaluation.every == 2


@pytest.mark.parametrize("stage, sections, message", [
    ("eval", {}, "run.stage eval scores model.policy on the datasets of an evaluation: section"),
    ("sft", {"evaluation": {"datasets": ["medqa"]}},
     "evaluation.every is needed in a sft run"),
    ("grpo", {"evaluation": {"every": 2, "datasets": ["medqa"], "checkpoints": "all"}},
     "evaluation.checkpoints compares a run folder's checkpoints in an eval stage"),
])
def test_evaluation_settings_that_do_not_fit_the_stage_are_refused(tmp_path, stage, sections,
                                                                    message):
    data = stage_recipe(stage, **sections)
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, data))


def test_an_eval_stage_needs_no_data_but_training_stages_do(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, {
        "run": {"stage": "eval"}, "evaluation": {"datasets": ["items.jsonl"]}}))
    assert recipe.data is None and recipe.evaluation.every is None
    with pytest.raises(RecipeError, match="run.stage sft trains on data: add a data: section"):
        load_recipe(write_recipe(tmp_path, {"run": {"stage": "sft"}}))


def test_validate_loads_the_evaluation_datasets(tmp_path):
    data = base()
    data["evaluation"] = {"every": 2, "datasets": ["medqa"], "data_root": "nowhere"}
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path, data))])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # wrapped to the terminal's width
    assert "preset 'medqa':" in text and "medqa/test.jsonl not found" in text
