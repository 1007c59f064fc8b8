"""Generative judges: strict answer parsing, a tiny judge trained here to answer in JSON, retries
and the malformed policy, and judges as shared, replicated Ray actors (one load per judge for
every reward that names it, batches split over the replicas, timeouts that leave the actor
running), the reward model served the same way, and ``tiny:qwen2`` scorers."""

from __future__ import annotations

import random

import pytest

from medrl.align.records import Sample, UserError
from medrl.rewards import RewardContext, RewardRunner, hash_folder, load_rewards
from medrl.rewards import judge as judge_module
from medrl.rewards.judge import (JUDGE_SYSTEM, GenerativeJudge, JudgeSpec, JudgeTimeout,
                                 MalformedAnswer, connect_judge, judge_messages, parse_verdict)
from medrl.rewards.rubric import RubricReward
from medrl.rewards.rubric_scorers import CriterionPair, RewardModelScorer, rm_input

# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ('{"verdict": "met"}', 1.0),
    (' \n{"verdict":"not_met"}\n', 0.0),
    ('{"verdict": "not_applicable"}', None),
    ('```json\n{"verdict": "met"}\n```', 1.0),
    ('```\n{"verdict": "not_met"}\n```\n', 0.0),
    ('{"score": 0.25}', 0.25),
    ('{"score": 1}', 1.0),
])
def test_accepted_answers(text, want):
    assert parse_verdict(text) == want


@pytest.mark.parametrize("text", [
    "", "met", '"met"', '{"verdict": "met"} Thanks!', 'Verdict: {"verdict": "met"}',
    '{"verdict": "met"}}', '{"Verdict": "met"}', '{"result": "met"}', '{"verdict": "MET"}',
    '{"verdict": "yes"}', '{"verdict": 1}', '{"verdict": "met", "reason": "it does"}',
    '{"verdict": "met", "verdict": "met"}', '[{"verdict": "met"}]', '{"score": 1.5}',
    '{"score": -0.1}', '{"score": true}', '{"score": NaN}', '{"score": "0.5"}',
    '```json\n{"verdict": "met"}\n``` ok', '```json\n```json\n{"verdict": "met"}\n```\n```',
    '```python\n{"verdict": "met"}\n```', '```json\n{"verdict": "met"}',
])
def test_anything_else_is_malformed(text):
    with pytest.raises(MalformedAnswer):
        parse_verdict(text)


def test_the_prompt_is_the_reward_model_text_under_a_system_message(tiny_qwen2):
    assert judge_messages("user: Q", "Gives the dose.", "5 mg.") == [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": rm_input("user: Q", "Gives the dose.", "5 mg.")}]
    judge = GenerativeJudge.load(tiny_qwen2, device="cpu", batch_size=4, max_length=2048,
                                 dtype="float32", max_new_tokens=4, max_retries=0, seed=0)
    short = judge.prompt_ids("user: history", "Gives the dose.", "5 mg.")
    text = judge.tokenizer.decode(short)
    assert text.startswith("<|im_start|>system\n" + JUDGE_SYSTEM + "<|im_end|>\n")
    assert text.endswith("Response:\n5 mg.<|im_end|>\n<|im_start|>assistant\n")
    judge.max_length = len(short) + 10
    long = judge.prompt_ids("user: " + "history " * 400, "Gives the dose.", "5 mg.")
    assert len(long) <= judge.max_length and long[-30:] == short[-30:]  # criterion, response
    assert judge.tokenizer.decode(long).startswith("<|im_start|>system\n" + JUDGE_SYSTEM)


# --- a judge that learned the answer format -----------------------------------------------------

WORDS = ["dose", "clinician", "emergency", "route", "allergy", "guideline", "warning", "fever",
         "rest", "fluids"]


def criterion(rng: random.Random, met: bool) -> str:
    """The trained judge's rule: a criterion ending in "zebra." is met, any other is not."""
    return "Mentions " + " and ".join(rng.sample(WORDS, 2)) + (" zebra." if met else ".")


def answer(uid, question, text, rubric):
    return Sample(uid=uid, group_id=uid.split("/")[0], row={"rubric": rubric},
                  messages=[{"role": "user", "content": question}], completion_text=text)


def train_judge(base, out, steps=60):
    """A few dozen AdamW steps on tiny:qwen2: answer {"verdict": "met"} or "not_met".

    Conversations and responses keep one short form ("question N?", "answer N."): the tiny
    model learns where the marker sits, not language."""
    import torch
    from torch.nn.functional import cross_entropy

    judge = GenerativeJudge.load(base, device="cpu", batch_size=16, max_length=512,
                                 dtype="float32", max_new_tokens=16, max_retries=0, seed=0)
    model, tok = judge.model, judge.tokenizer
    rng = random.Random(0)
    rows, labels = [], []
    for i in range(32):
        met = i % 2 == 0
        prompt = judge.prompt_ids(f"user: question {i % 5}?", criterion(rng, met),
                                  f"answer {i % 7}.")
        target = tok('{"verdict": "%s"}' % ("met" if met else "not_met"),
                     add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    targets = torch.tensor([x + [-100] * (width - len(x)) for x in labels])[:, 1:]
    torch.manual_seed(0)
    optim = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):  # logits of the answer tokens only (the vocabulary is the cost)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        keep = targets != -100
        loss = cross_entropy(model.lm_head(hidden[keep]), targets[keep])
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


HELD_OUT = random.Random(7)
CASES = [(criterion(HELD_OUT, met), met) for met in (True, False, False, True, True, False)]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tiny_qwen2):
    out = train_judge(tiny_qwen2, tmp_path_factory.mktemp("judge") / "judge")
    judge = GenerativeJudge.load(out, device="cpu", batch_size=4, max_length=2048,
                                 dtype="float32", max_new_tokens=16, max_retries=0, seed=0)
    sample = answer("check/0", "question 9?", "answer 8.", None)
    verdicts = judge.score([CriterionPair(sample, c, i) for i, (c, _) in enumerate(CASES)])
    assert verdicts == [float(met) for _, met in CASES]  # it learned the rule, held-out criteria
    return out


def judged_batch():
    """Two prompts x two completions; HealthBench-layout rubrics (promedical reads them too)."""
    rubric_a = [{"criterion": c, "points": 5 if i < 2 else -5} for i, (c, _) in
                enumerate(CASES[:3])]  # met, not met, a penalty not met
    rubric_b = [{"criterion": c, "points": 4} for c, _ in CASES[3:]]  # met, met, not met
    return [answer("a/0", "question 1?", "answer 1.", rubric_a),
            answer("a/1", "question 1?", "answer 2.", rubric_a),
            answer("b/0", "question 2?", "answer 3.", rubric_b),
            answer("b/1", "question 2?", "answer 4.", None)]


WANT = {"a/0": [1.0, 0.0, 0.0], "a/1": [1.0, 0.0, 0.0], "b/0": [1.0, 1.0, 0.0], "b/1": None}


def judge_spec(folder, **changes) -> JudgeSpec:
    """The spec a rubric reward builds from its defaults (batch_size 16, max_length 2048,
    max_new_tokens 32, max_retries 2, seed 0 from the context)."""
    fields = dict(kind="judge", model=str(folder.resolve()), tiny=False, dtype="float32",
                  batch_size=16, max_length=2048, device="cpu", max_new_tokens=32,
                  max_retries=2, seed=0)
    return JudgeSpec(**{**fields, **changes})


def pairs_of(samples):
    return [CriterionPair(s, item["criterion"], i) for s in samples if s.row["rubric"]
            for i, item in enumerate(s.row["rubric"])]


@pytest.fixture(scope="module")
def shared(ray_local, judge_dir):
    """The trained judge in two replicas, held for the module (rewards join these actors)."""
    return connect_judge(judge_spec(judge_dir), replicas=2, num_cpus=0.5)


def info(actor) -> dict:
    import ray

    return ray.get(actor.info.remote())


# --- judges as shared Ray actors ----------------------------------------------------------------


@pytest.mark.slow
def test_rewards_naming_one_judge_share_its_actors_and_report_metrics(shared, judge_dir):
    base = judge_dir.parent
    kwargs = {"model": judge_dir.name, "scorer": "judge", "judge_num_cpus": 0.5}
    runner = RewardRunner(load_rewards([
        {"name": "rubric", "alias": "pro", "kwargs": kwargs},
        {"name": "rubric", "alias": "hb", "kwargs": {**kwargs, "aggregation": "healthbench"}},
        {"name": "rubric", "alias": "in_actor", "actor": True, "num_cpus": 0.25,
         "kwargs": kwargs},
    ], base_dir=base), ctx=RewardContext(base_dir=base))
    first = info(shared.actors[0])
    try:
        samples = judged_batch()
        report = runner.score(samples)
        for s in samples:
            for name in ("pro", "hb", "in_actor"):
                got = s.reward_info.get(name, {}).get("verdicts")
                assert got == WANT[s.uid], (name, s.uid)
        assert samples[0].rewards["hb"] == pytest.approx(0.5)  # 5 of 10 positive points
        assert samples[2].rewards["pro"] == pytest.approx(2 / 3)  # S1, no veto, no bonus
        for name in ("pro", "hb", "in_actor"):  # the batch metrics, through RewardWorker too
            assert report.metrics[f"rewards/{name}/judge_pairs"] == 9.0
            assert report.metrics[f"rewards/{name}/judge_seconds"] > 0
            assert report.metrics[f"rewards/{name}/judge_pairs_per_s"] > 0
            assert report.metrics[f"rewards/{name}/judge_malformed"] == 0.0
        driver = runner._workers["pro"].instance.judge.actors
        assert [a._actor_id for a in driver] == [a._actor_id for a in shared.actors[:1]]
        after = info(shared.actors[0])
        assert after["pid"] == first["pid"] and after["loads"] == 1  # loaded once for all
        assert after["calls"] == first["calls"] + 3  # one call per reward, none per criterion
    finally:
        runner.close()


@pytest.mark.slow
def test_replicas_split_a_batch_in_order(shared, judge_dir):
    one = connect_judge(judge_spec(judge_dir), replicas=1, num_cpus=0.5)
    assert one.actors[0]._actor_id == shared.actors[0]._actor_id
    pairs = pairs_of(judged_batch())
    before = [info(a)["pairs"] for a in shared.actors]
    split = shared.score(pairs)
    after = [info(a)["pairs"] for a in shared.actors]
    assert [b - a for a, b in zip(before, after)] == [5, 4]  # contiguous chunks of 9 pairs
    assert split == one.score(pairs) == [v for s in judged_batch() if WANT[s.uid]
                                         for v in WANT[s.uid]]
    assert [info(a)["loads"] for a in shared.actors] == [1, 1]


@pytest.mark.slow
def test_a_timeout_fails_the_batch_and_leaves_the_actor_running(shared, judge_dir):
    hasty = connect_judge(judge_spec(judge_dir), replicas=1, num_cpus=0.5, timeout_s=0.001)
    before = info(shared.actors[0])
    pairs = pairs_of(judged_batch())
    with pytest.raises(JudgeTimeout, match=r"judge 'judge' \(judge, \w+\) did not answer 9 "
                                           r".*judge_timeout_s = 0.001 s"):
        hasty.score(pairs)
    patient = connect_judge(judge_spec(judge_dir), replicas=1, num_cpus=0.5, timeout_s=60)
    assert patient.score(pairs)[:3] == WANT["a/0"]
    after = info(shared.actors[0])
    assert after["pid"] == before["pid"] and after["loads"] == 1
    assert after["calls"] == before["calls"] + 2  # it finished the late batch, then this one


# --- malformed answers --------------------------------------------------------------------------


@pytest.mark.slow
def test_malformed_answers_are_retried_then_named_or_counted(ray_local, tiny_qwen2):
    """The untrained tiny:qwen2 answers garbage: every pair is asked 1 + max_retries times."""
    kwargs = {"model": "tiny:qwen2", "scorer": "judge", "max_new_tokens": 4,
              "judge_num_cpus": 0.5}
    samples = judged_batch()[2:]  # b/0 with three criteria; b/1 without a rubric
    strict = RubricReward(**kwargs)
    strict.setup(RewardContext())
    with pytest.raises(ValueError) as err:
        strict(samples)
    message = str(err.value)
    assert "3 malformed answer(s) after 2 retries (sample 'b/0' criteria 0, 1, 2)" in message
    assert "zebra" not in message and "Mentions" not in message  # ids only, no text
    metrics = strict.batch_metrics()
    assert metrics["judge_generate_calls"] == 3.0  # greedy, then two sampled retries
    assert metrics["judge_retries"] == 6.0 and metrics["judge_malformed"] == 3.0

    runner = RewardRunner(load_rewards([{"name": "rubric", "kwargs": kwargs}]),
                          ctx=RewardContext())
    with pytest.raises(UserError, match="reward 'rubric' failed on samples 'b/0', 'b/1': "
                                        "raised ValueError: .*3 malformed"):
        runner.score(judged_batch()[2:])
    lenient = RewardRunner(load_rewards([{"name": "rubric", "kwargs": {
        **kwargs, "on_malformed": "not_applicable"}}]), ctx=RewardContext())
    scored = judged_batch()[2:]
    report = lenient.score(scored)
    assert scored[0].reward_info["rubric"]["verdicts"] == [None, None, None]
    assert scored[0].rewards["rubric"] is None
    assert report.metrics["rewards/rubric/judge_malformed"] == 3.0
    assert report.metrics["rewards/rubric/judge_generate_calls"] == 3.0


@pytest.mark.slow
def test_a_judge_whose_owner_died_is_started_again(ray_local, tiny_qwen2):
    import ray

    spec = judge_spec(tiny_qwen2, max_new_tokens=2, max_retries=0)
    client = connect_judge(spec, num_cpus=0.5, on_malformed="not_applicable")
    old = client.actors[0]._actor_id
    ray.kill(client.actors[0])
    assert client.score(pairs_of(judged_batch()[2:3])) == [None, None, None]
    assert client.actors[0]._actor_id != old and client.last["malformed"] == 3


# --- the reward model in judge actors, tiny: scorers, refusals ----------------------------------


@pytest.mark.slow
def test_the_reward_model_is_served_by_actors_too_and_tiny_gets_a_seeded_head(ray_local,
                                                                              tiny_qwen2):
    here = RewardModelScorer.load(tiny_qwen2, device="cpu", batch_size=4, max_length=256,
                                  new_head=True)
    pairs = pairs_of(judged_batch())
    want = here.score(pairs)
    assert len({round(v, 6) for v in want}) > 1 and all(0 < v < 1 for v in want)
    reward = RubricReward(model="tiny:qwen2", batch_size=4, max_length=256,
                          judge_num_cpus=0.5)
    reward.setup(RewardContext())
    assert reward.scorer is None and len(reward.judge.actors) == 1  # it runs in the actor
    got = [v for r in reward(judged_batch()) if r.info for v in r.info["verdicts"]]
    assert got == pytest.approx(want, abs=1e-5)  # the same random head in every process
    ident = RubricReward.identity_extra({"model": "tiny:qwen2"}, None)
    assert ident["model_sha256"] == hash_folder(tiny_qwen2)


def test_without_ray_the_judge_runs_in_process_shared_while_used(monkeypatch, judge_dir):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process without Ray
    loads = judge_module.LOADS
    a = RubricReward(model=str(judge_dir), scorer="judge")
    b = RubricReward(model=str(judge_dir), scorer="judge", aggregation="healthbench")
    a.setup(RewardContext())
    b.setup(RewardContext())
    assert a.scorer is b.scorer and judge_module.LOADS == loads + 1
    assert [r.info["verdicts"] if r.info else None for r in b(judged_batch())] == \
        list(WANT.values())


@pytest.mark.slow
def test_actors_that_cannot_be_placed_fail_setup_naming_the_reservation(ray_local, judge_dir,
                                                                        monkeypatch):
    monkeypatch.setattr(judge_module, "PLACE_TIMEOUT_S", 3.0)
    with pytest.raises(UserError, match=r"1 of its 1 actor\(s\) could not be placed within 3 s; "
                                        r"each reserves 64 CPU and 0 GPU"):
        connect_judge(judge_spec(judge_dir, batch_size=3), num_cpus=64)


def test_judge_only_kwargs_and_an_idle_gpu_are_refused(ray_local, judge_dir):
    with pytest.raises(UserError, match="max_retries, on_malformed apply to scorer: judge"):
        RubricReward(model="rm", max_retries=1, on_malformed="error")
    with pytest.raises(UserError, match="argument 'on_malformed'"):
        load_rewards([{"name": "rubric", "kwargs": {"model": "rm", "scorer": "judge",
                                                    "on_malformed": "zero"}}])
    with pytest.raises(UserError, match="set judge_num_gpus instead"):
        connect_judge(judge_spec(judge_dir, device="cuda"), num_gpus=0)


def test_the_documented_judge_recipe_validates_and_builds():
    import re
    from pathlib import Path

    import yaml

    from medrl.launch.recipe import RewardsConfig

    doc = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()
    snippet = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "scorer: judge" in b)
    rewards = RewardsConfig.model_validate(yaml.safe_load(snippet)["rewards"])
    loaded = load_rewards([f.model_dump() for f in rewards.functions])
    built = [RubricReward(**r.kwargs) for r in loaded]
    assert [(b.scorer_kind, b.aggregation, b.replicas) for b in built] == [
        ("judge", "promedical", 2), ("judge", "healthbench", 2)]
    assert built[1].judge_num_gpus == 1 and built[1].max_retries == 2
