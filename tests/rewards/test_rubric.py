"""Rubric rewards (ProMedical): rubric parsing in both layouts (the real HealthBench rows too),
the two aggregations by hand, the safety-veto property, the lexicographic preference, the
criterion reward model (a tiny real sequence classifier) and the reward through the runner."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrl.align.records import Sample, UserError
from medrl.rewards import RewardContext, RewardRunner, hash_folder, load_rewards
from medrl.rewards.api import RewardResult
from medrl.rewards.calls import Failure, check_result
from medrl.rewards.rubric import (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_VETO_PENALTY,
                                  RubricReward, TierScores, aggregate, check_promedical_params,
                                  healthbench_score, parse_rubric, prefer, promedical_reward,
                                  proficiency, resolve_params, sample_rubric, tier_scores)
from medrl.rewards.rubric_scorers import (CriterionPair, RewardModelScorer, instruction_text,
                                          rm_input)

PARAMS = resolve_params("promedical", None, None, None)


def tiered(*items) -> list[dict]:
    return [dict(zip(("criterion", "tier", "weight"), item)) for item in items]


# --- parsing ------------------------------------------------------------------------------------


def test_healthbench_layout_maps_positive_points_to_main_and_penalties_to_veto():
    rubric = parse_rubric([
        {"criterion": "Advises seeing a clinician.", "points": 6, "tags": ["axis:completeness"]},
        {"criterion": "Mentions red flags.", "points": 4, "tags": ["axis:accuracy",
                                                                   "level:example"]},
        {"criterion": "Recommends stopping insulin.", "points": -8, "tags": ["axis:accuracy"]},
    ], uid="q1")
    assert rubric.layout == "healthbench"
    assert [c.tier for c in rubric.criteria] == ["main", "main", "veto"]
    assert [c.weight for c in rubric.criteria] == [0.6, 0.4, 1.0]
    assert [c.points for c in rubric.criteria] == [6.0, 4.0, -8.0]
    assert rubric.criteria[1].axes == ("accuracy",)


def test_tiered_layout_and_a_json_string():
    items = tiered(("Gives the dose.", "main", 0.75), ("States the route.", "main", 0.25),
                   ("Cites a guideline.", "bonus", None), ("Doubles the dose.", "veto", None))
    rubric = parse_rubric(items, uid="q2")
    assert rubric.layout == "tiered"
    assert [(c.tier, c.weight, c.points) for c in rubric.criteria] == [
        ("main", 0.75, None), ("main", 0.25, None), ("bonus", 1.0, None), ("veto", 1.0, None)]
    import json

    assert parse_rubric(json.dumps(items), uid="q2") == rubric


SECRET = "Patient Jane Roe, 43, on warfarin"


@pytest.mark.parametrize("items, index, words", [
    (tiered((SECRET, "main", 0.5), (SECRET, "main", 0.4)), None, "sum to 0.9"),
    (tiered((SECRET, "main", 1.0), (SECRET, "urgent", None)), 1, "unknown tier"),
    (tiered((SECRET, "main", 1.0), ("  ", "bonus", None)), 1, "empty or missing 'criterion'"),
    ([{"criterion": SECRET, "points": 5}, {"criterion": SECRET, "points": "ten"}], 1,
     "'points' must be a non-zero number"),
    ([{"criterion": SECRET, "points": 5}, {"criterion": SECRET, "points": 0}], 1,
     "'points' must be a non-zero number"),
    ([{"criterion": SECRET, "points": 5}, {"criterion": SECRET, "tier": "veto"}], 1,
     "a rubric uses one layout"),
    (tiered((SECRET, "main", 1.0), (SECRET, "veto", 0.3)), 1, "takes no 'weight'"),
    (tiered((SECRET, "main", "0.5"), (SECRET, "main", 0.5)), 0, "needs a 'weight'"),
    ([{"criterion": SECRET, "points": 5}, SECRET], 1, "is a str"),
    ([{"criterion": SECRET}], 0, "neither 'tier'"),
])
def test_bad_rubrics_name_the_sample_and_item_never_the_text(items, index, words):
    with pytest.raises(UserError) as err:
        parse_rubric(items, uid="case-17/2")
    message = str(err.value)
    assert "sample 'case-17/2'" in message and words in message
    if index is not None:
        assert f"rubric item {index}" in message
    assert "Jane" not in message and "warfarin" not in message


def test_a_rubric_that_is_no_list_or_empty_is_refused():
    for value, words in (([], "an empty list"), ({"criterion": "x"}, "a dict"),
                         ("[{", "not JSON")):
        with pytest.raises(UserError, match=words):
            parse_rubric(value, uid="q")


def test_sample_rubric_needs_the_mapped_field_and_a_null_one_does_not_apply():
    with pytest.raises(UserError, match="map data.fields.rubric"):
        sample_rubric(Sample(uid="a", group_id="a", row={"rubrics": []}))
    assert sample_rubric(Sample(uid="b", group_id="b", row={"rubric": None})) is None


def test_the_real_healthbench_rows_load_with_messages_and_rubrics(shared_data):
    from medrl.launch.data import load_samples
    from medrl.launch.recipe import DataConfig

    cfg = DataConfig.model_validate({
        "path": str(shared_data / "healthbench" / "oss_eval_sample.jsonl"), "template": "chat",
        "fields": {"messages": "prompt", "rubric": "rubrics", "id": "prompt_id"}})
    samples = load_samples(cfg)
    assert len(samples) == 20
    assert all(s.messages and s.messages[-1]["role"] == "user" for s in samples)
    rubrics = [sample_rubric(s) for s in samples]
    criteria = [c for r in rubrics for c in r.criteria]
    assert len(criteria) == 265
    assert sum(c.tier == "veto" for c in criteria) == 73  # the negative-point items
    for r in rubrics:
        assert math.isclose(sum(c.weight for c in r.criteria if c.tier == "main"), 1.0)
    assert {"accuracy", "completeness", "context_awareness"} <= {a for c in criteria
                                                                 for a in c.axes}


# --- aggregation --------------------------------------------------------------------------------


def test_promedical_reward_by_hand():
    # S1 over the applicable main criteria: (0.5*1 + 0.3*0.5) / (0.5 + 0.3) = 0.8125
    tiers = ["main", "main", "main", "bonus", "bonus", "veto"]
    weights = [0.5, 0.3, 0.2, 1.0, 1.0, 1.0]
    safe = tier_scores(tiers, weights, [1.0, 0.5, None, 0.9, 0.2, 0.1])
    assert safe == TierScores(0.8125, 1, 0)
    kw = {"alpha": 0.1, "beta": 0.2, "veto_penalty": 2.0}
    assert promedical_reward(*safe, **kw) == pytest.approx(0.9125)
    unsafe = tier_scores(tiers, weights, [1.0, 0.5, None, 0.9, 0.2, 0.7])
    assert promedical_reward(*unsafe, **kw) == pytest.approx(0.9125 - 2.0)
    assert promedical_reward(1.0, 5, 0, **kw) == pytest.approx(1.2)  # clipped at 1 + beta
    assert promedical_reward(None, 0, 1, **kw) == -2.0  # no main criterion applies: S1 adds 0
    assert proficiency([0.5, 0.5], [None, None]) is None


def test_healthbench_score_by_hand():
    assert healthbench_score([10, 5, -5], [1.0, 0.0, 0.8]) == pytest.approx(5 / 15)
    assert healthbench_score([10, 5, -5], [1.0, None, 0.8]) == pytest.approx(5 / 10)
    assert healthbench_score([3, -10], [1.0, 1.0]) == 0.0  # clipped below
    assert healthbench_score([3, -10], [None, 1.0]) is None  # nothing to earn
    assert healthbench_score([4, 6], [0.49, 0.5]) == pytest.approx(0.6)  # met from 0.5 on


def test_aggregate_dims_per_axis_and_none():
    rubric = parse_rubric([
        {"criterion": "a", "points": 6, "tags": ["axis:completeness"]},
        {"criterion": "b", "points": 4, "tags": ["axis:accuracy"]},
        {"criterion": "c", "points": -5, "tags": ["axis:accuracy"]},
        {"criterion": "d", "points": -3, "tags": ["axis:safety_only"]},
    ], uid="q")
    verdicts = [0.8, None, 0.9, 0.1]
    score, dims = aggregate(rubric, verdicts, aggregation="promedical", params=PARAMS)
    assert dims == {"s1": 0.8, "s2": 0.0, "s3": 1.0, "axis:completeness": 0.8,
                    "axis:accuracy": None, "axis:safety_only": None}
    assert score == pytest.approx(0.8 - DEFAULT_VETO_PENALTY)
    score, dims = aggregate(rubric, verdicts, aggregation="healthbench")
    assert score == pytest.approx(max((6 - 5) / 6, 0.0))
    assert dims["axis:accuracy"] is None  # its only applicable criterion is a penalty
    assert dims["axis:completeness"] == 1.0
    assert aggregate(rubric, [None] * 4, aggregation="promedical", params=PARAMS)[0] is None


def test_preference_is_lexicographic_veto_then_s1_then_s2():
    assert prefer(TierScores(0.1, 0, 0), TierScores(1.0, 9, 1)) == 1
    assert prefer(TierScores(0.6, 0, 1), TierScores(0.5, 9, 1)) == 1
    assert prefer(TierScores(0.5, 1, 0), TierScores(0.5, 2, 0)) == -1
    assert prefer(TierScores(None, 3, 0), TierScores(0.9, 2, 0)) == 1  # None ties on S1
    assert prefer(TierScores(0.5, 1, 2), TierScores(0.5, 1, 2)) == 0


verdict = st.one_of(st.none(), st.floats(0.0, 1.0))


@st.composite
def rubric_and_two_responses(draw):
    n_main, n_bonus, n_veto = draw(st.integers(0, 5)), draw(st.integers(0, 5)), \
        draw(st.integers(1, 5))
    raw = draw(st.lists(st.floats(0.01, 10.0), min_size=n_main, max_size=n_main))
    items = [{"criterion": f"m{i}", "tier": "main", "weight": w / sum(raw)}
             for i, w in enumerate(raw)]
    items += [{"criterion": f"b{i}", "tier": "bonus"} for i in range(n_bonus)]
    items += [{"criterion": f"v{i}", "tier": "veto"} for i in range(n_veto)]
    rubric = parse_rubric(items, uid="p")

    def response(violates: bool):
        rest = draw(st.lists(verdict, min_size=n_main + n_bonus, max_size=n_main + n_bonus))
        if violates:
            vetoes = draw(st.lists(verdict, min_size=n_veto, max_size=n_veto))
            vetoes[draw(st.integers(0, n_veto - 1))] = draw(st.floats(0.5, 1.0))
        else:
            vetoes = draw(st.lists(st.one_of(st.none(), st.floats(0.0, 0.4999)),
                                   min_size=n_veto, max_size=n_veto))
            if all(v is None for v in rest + vetoes):
                vetoes[0] = 0.0  # a response some criterion applies to
        return rest + vetoes
    return rubric, response(True), response(False)


@settings(max_examples=300, deadline=None)
@given(case=rubric_and_two_responses(), alpha=st.floats(0.0, 0.999),
       beta=st.floats(0.001, 5.0), extra=st.floats(1e-6, 5.0))
def test_a_veto_violation_scores_below_every_response_without_one(case, alpha, beta, extra):
    rubric, unsafe, safe = case
    veto_penalty = 1 + beta + extra
    check_promedical_params(alpha, beta, veto_penalty)
    params = resolve_params("promedical", alpha, beta, veto_penalty)
    bad, bad_dims = aggregate(rubric, unsafe, aggregation="promedical", params=params)
    good, good_dims = aggregate(rubric, safe, aggregation="promedical", params=params)
    assert bad < good
    assert bad_dims["s3"] >= 1 and good_dims["s3"] == 0
    criteria = rubric.criteria
    tiers = [tier_scores([c.tier for c in criteria], [c.weight for c in criteria], v)
             for v in (unsafe, safe)]
    assert prefer(*tiers) == -1


@pytest.mark.parametrize("kwargs, name", [
    ({"alpha": 1.0}, "kwargs.alpha"), ({"alpha": -0.1}, "kwargs.alpha"),
    ({"beta": 0.0}, "kwargs.beta"), ({"veto_penalty": 1.2}, "kwargs.veto_penalty"),
    ({"beta": 0.5, "veto_penalty": 1.5}, "kwargs.veto_penalty"),
    ({"alpha": float("nan")}, "kwargs.alpha"),
])
def test_promedical_constants_are_checked_by_name(kwargs, name):
    with pytest.raises(UserError, match=name):
        RubricReward(model="rm", **kwargs)


def test_our_defaults_meet_the_constraints_and_healthbench_refuses_them():
    assert PARAMS == (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_VETO_PENALTY)
    check_promedical_params(*PARAMS)
    with pytest.raises(UserError, match="alpha, veto_penalty apply to aggregation promedical"):
        RubricReward(model="rm", aggregation="healthbench", alpha=0.1, veto_penalty=3.0)
    assert RubricReward(model="rm", aggregation="healthbench").params is None


# --- the criterion reward model -----------------------------------------------------------------


def tiny_rm(folder, *, num_labels=1, zero_head=False):
    """A random 1-layer Qwen2ForSequenceClassification with the bundled tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from medrl.align.models import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config)
    if zero_head:  # every logit 0: every verdict exactly 0.5 (met, and every veto violated)
        torch.nn.init.zeros_(model.score.weight)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return tiny_rm(tmp_path_factory.mktemp("rubric") / "rm")


def answer(uid, question, text, rubric=None):
    return Sample(uid=uid, group_id=uid.split("/")[0], row={"rubric": rubric},
                  messages=[{"role": "user", "content": question}], completion_text=text)


PAIRS_TEXT = [("Chest pain radiating to the left arm?", "Call an ambulance now.",
               "Recommends emergency care."),
              ("Chest pain radiating to the left arm?", "Call an ambulance now.",
               "Mentions aspirin if not allergic."),
              ("Fever and a stiff neck?", "This could be meningitis; go to the ED.",
               "Names meningitis as a possibility."),
              ("Can I double my metformin?", "No.", "Advises against self-adjusting doses.")]


def test_rm_input_is_the_documented_text():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is this?"}]}]
    assert instruction_text(messages) == "system: Be brief.\nuser: What is this?"
    assert rm_input("user: Q", "Gives the dose.", "5 mg.") == (
        "Instruction:\nuser: Q\n\nCriterion:\nGives the dose.\n\nResponse:\n5 mg.")


def test_reward_model_scores_all_pairs_in_batches_equal_to_one_by_one(rm_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    samples = {}
    pairs = []
    for q, a, criterion in PAIRS_TEXT:
        s = samples.setdefault((q, a), answer(f"u{len(samples)}/0", q, a))
        pairs.append(CriterionPair(s, criterion))
    scorer = RewardModelScorer.load(rm_dir, device="cpu", batch_size=3, max_length=512)
    calls = []
    scorer.model.register_forward_hook(lambda *args: calls.append(1))
    batched = scorer.score(pairs)
    assert len(calls) == 2  # 4 pairs in batches of 3: two forward passes, not one per pair

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    alone = []
    for p in pairs:  # one at a time, unpadded: the sigmoid of the single logit
        text = rm_input(instruction_text(p.sample.messages), p.criterion,
                        p.sample.completion_text)
        with torch.no_grad():
            logit = model(**tok(text, return_tensors="pt")).logits[0, 0]
        alone.append(torch.sigmoid(logit).item())
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len({round(v, 5) for v in batched}) == 4  # the model tells the pairs apart
    assert all(0.0 < v < 1.0 for v in batched)
    one = RewardModelScorer.load(rm_dir, device="cpu", batch_size=1, max_length=512)
    assert one.score(pairs) == pytest.approx(batched, abs=1e-5)
    assert scorer.score([]) == []


def test_long_inputs_lose_the_conversation_start_not_the_criterion(rm_dir):
    scorer = RewardModelScorer.load(rm_dir, device="cpu", batch_size=4, max_length=48)
    long = answer("l/0", "history " * 500, "Go to the ED.")
    short = answer("s/0", "history " * 5, "Go to the ED.")
    texts = [rm_input(instruction_text(s.messages), "Advises the ED.", s.completion_text)
             for s in (long, short)]
    ids = [scorer.tokenizer(t, truncation=True, max_length=48)["input_ids"] for t in texts]
    assert ids[0][-20:] == ids[1][-20:]  # the same ending: criterion and response kept
    assert len(scorer.score([CriterionPair(long, "Advises the ED.")])) == 1


def test_a_classifier_with_two_labels_is_refused(tmp_path):
    folder = tiny_rm(tmp_path / "two", num_labels=2)
    with pytest.raises(UserError, match="has 2 labels"):
        RewardModelScorer.load(folder, device="cpu", batch_size=2, max_length=64)
    with pytest.raises(UserError, match="no config.json"):
        RewardModelScorer.load(tmp_path, device="cpu", batch_size=2, max_length=64)


# --- the reward through the runner --------------------------------------------------------------


HB_RUBRIC = [{"criterion": "Recommends emergency care.", "points": 8,
              "tags": ["axis:accuracy"]},
             {"criterion": "Explains why.", "points": 2, "tags": ["axis:completeness"]},
             {"criterion": "Suggests waiting a week.", "points": -9, "tags": ["axis:accuracy"]}]
# no main tier: s1 does not apply (None) while the other tiers do
NO_MAIN = [{"criterion": "Cites a guideline.", "tier": "bonus"},
           {"criterion": "Doubles the dose.", "tier": "veto"}]


def rubric_batch():
    return [answer("hb/0", "Crushing chest pain?", "Call an ambulance.", HB_RUBRIC),
            answer("hb/1", "Crushing chest pain?", "Rest and see.", HB_RUBRIC),
            answer("nm/0", "Can I double my dose?", "No.", NO_MAIN),
            answer("none/0", "Hello?", "Hi.", None)]


def test_rubric_reward_through_the_runner(rm_dir):
    base = rm_dir.parent
    loaded = load_rewards([{"name": "rubric", "kwargs": {"model": rm_dir.name,
                                                         "batch_size": 4}}], base_dir=base)
    runner = RewardRunner(loaded, ctx=RewardContext(base_dir=base))
    samples = rubric_batch()
    report = runner.score(samples)
    hb = samples[0]
    verdicts = hb.reward_info["rubric"]["verdicts"]
    assert len(verdicts) == 3 and all(0 < v < 1 for v in verdicts)
    assert set(hb.reward_dims["rubric"]) == {"s1", "s2", "s3", "axis:accuracy",
                                             "axis:completeness"}
    want, dims = aggregate(parse_rubric(HB_RUBRIC, uid="x"), verdicts,
                           aggregation="promedical", params=PARAMS)
    assert hb.rewards["rubric"] == pytest.approx(want) and hb.reward_dims["rubric"] == dims
    assert samples[2].reward_dims["rubric"]["s1"] is None  # no main tier: s1 does not apply
    assert samples[3].rewards["rubric"] is None  # a null rubric: the reward does not apply
    # s1 applies to neither the rubric without main criteria nor the sample without a rubric
    assert report.metrics["rewards/rubric/s1/not_applicable"] == pytest.approx(2 / 4)
    assert report.metrics["rewards/rubric/not_applicable"] == pytest.approx(1 / 4)
    info = repr([s.reward_info for s in samples])
    assert "emergency" not in info and "ambulance" not in info  # indices and values only
    ident = runner.identities()[0]
    assert ident["model_sha256"] == hash_folder(rm_dir)
    runner.close()


def test_a_dim_of_none_is_accepted_and_never_vetoes():
    checked = check_result(RewardResult(0.5, dims={"s1": None, "s3": 1}), Sample("a", "a"))
    assert not isinstance(checked, Failure) and checked.dims == {"s1": None, "s3": 1.0}
    bad = check_result(RewardResult(0.5, dims={"s1": float("nan")}), Sample("a", "a"))
    assert isinstance(bad, Failure) and "dim 's1'" in bad.cause


def test_the_s3_dim_drives_a_veto(tmp_path):
    rm = tiny_rm(tmp_path / "rm0", zero_head=True)  # every verdict 0.5: every veto violated
    runner = RewardRunner.from_config(
        {"functions": [{"name": "rubric", "kwargs": {"model": str(rm)}}],
         "veto": [{"score": "rubric.s3", "threshold": 0.5, "when": "above"},
                  {"score": "rubric.s1", "threshold": 0.1}], "floor": -5.0},
        ctx=RewardContext())
    safe_rubric = [{"criterion": "Gives the dose.", "tier": "main", "weight": 1.0}]
    samples = [answer("g/0", "Dose?", "5 mg.", safe_rubric),
               answer("g/1", "Dose?", "10 mg.", HB_RUBRIC),
               answer("g/2", "Dose?", "No.", NO_MAIN)]
    report = runner.score(samples)
    assert [s.reward_dims["rubric"]["s3"] for s in samples] == [0.0, 1.0, 1.0]
    assert samples[0].rewards["rubric"] == 0.5  # S1 = 0.5, no bonus, no violation
    assert samples[0].reward == 0.5 and samples[1].reward == -5.0 and samples[2].reward == -5.0
    assert samples[2].reward_info["_veto"] == ["rubric.s3"]  # its s1 is None: never fires
    assert report.metrics["rewards/vetoed/rubric.s3"] == pytest.approx(2 / 3)
    runner.close()


def test_healthbench_aggregation_refuses_a_tiered_rubric(rm_dir):
    reward = RubricReward(model=str(rm_dir), aggregation="healthbench")
    reward.setup(RewardContext())
    scores = reward(rubric_batch()[:2])
    assert [r.score for r in scores] == [
        healthbench_score([8, 2, -9], r.info["verdicts"]) for r in scores]
    with pytest.raises(UserError, match="sample 'nm/0': aggregation healthbench needs"):
        reward(rubric_batch()[2:3])


@pytest.mark.slow
def test_rubric_reward_in_an_actor(ray_local, rm_dir):
    base = rm_dir.parent
    runner = RewardRunner.from_config(
        {"functions": [{"name": "rubric", "actor": True, "num_cpus": 1,
                        "kwargs": {"model": rm_dir.name, "aggregation": "healthbench"}}]},
        base_dir=base, ctx=RewardContext(base_dir=base))
    try:
        in_actor = rubric_batch()[:2]
        runner.score(in_actor)
        here = RubricReward(model=str(rm_dir), aggregation="healthbench")
        here.setup(RewardContext())
        want = [r.score for r in here(rubric_batch()[:2])]
        assert [s.rewards["rubric"] for s in in_actor] == pytest.approx(want, abs=1e-6)
    finally:
        runner.close()


# --- registration and the documented recipe -----------------------------------------------------


def test_rubric_is_a_built_in_reward_and_its_kwargs_are_checked_on_load():
    import subprocess
    import sys

    code = "import medrl.rewards as r; assert 'rubric' in r.registered()"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(UserError, match="argument 'scorer'"):
        load_rewards([{"name": "rubric", "kwargs": {"model": "rm", "scorer": "keywords"}}])
    with pytest.raises(UserError, match="argument 'aggregation'"):
        load_rewards([{"name": "rubric", "kwargs": {"model": "rm", "aggregation": "mean"}}])


def test_the_documented_rubric_recipe_validates_and_loads(tmp_path):
    import re
    from pathlib import Path

    import yaml

    from medrl.launch.recipe import DataConfig, RewardsConfig

    doc = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()
    snippet = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "name: rubric" in b)
    recipe = yaml.safe_load(snippet)
    data = DataConfig.model_validate(recipe["data"])
    assert (data.fields.messages, data.fields.rubric) == ("prompt", "rubrics")
    rewards = RewardsConfig.model_validate(recipe["rewards"])
    assert [(v.score, v.threshold, v.when) for v in rewards.veto] == [("rubric.s3", 0.5, "above")]
    loaded = load_rewards([f.model_dump() for f in rewards.functions], base_dir=tmp_path,
                          veto=[v.model_dump() for v in rewards.veto])
    RubricReward(**loaded[0].kwargs)  # the documented constants meet the constraints
