"""MedCausalX rewards: reflection format, attribution from the first wrong step, adjacent-step
consistency (rule and a real tiny reward-model judge), and box IoU; through the runner with
the tiny tokenizer."""

from __future__ import annotations

import pytest

from medrl.align.records import Sample, UserError
from medrl.rewards import RewardContext, RewardError, RewardRunner, load_rewards
from medrl.rewards.causal import (CONSISTENCY_CRITERION, CausalAttribution, CausalConsistency,
                                  ReflectionFormat, WordRatio, box_iou, first_failed_step,
                                  gold_steps, normalised_words, reflection_blocks,
                                  shares_content_word, step_pair_text)
from medrl.rewards.repair import token_offsets

ROW = {"question": "Inferior MI: which artery?",
       "options": {"A": "Left anterior descending", "B": "Right coronary",
                   "C": "Left circumflex", "D": "Left main"},
       "answer_idx": "B",
       "gold_chain": ["ST elevation in leads II, III and aVF marks an inferior infarct.",
                      "The inferior wall is usually supplied by the right coronary artery."]}


@pytest.fixture(scope="module")
def tok(tiny_qwen2):
    from medrl.align.models import load_tokenizer

    return load_tokenizer(tiny_qwen2)


def sample(tok, uid: str, segments: list[str], row=None) -> Sample:
    """A completion made of ``segments`` (tokenised one by one, so each segment's tokens are
    known) and the end-of-turn token."""
    ids = [t for seg in segments for t in tok(seg, add_special_tokens=False)["input_ids"]]
    ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    return Sample(uid=uid, group_id=uid.split("/")[0], row=ROW if row is None else row,
                  messages=[{"role": "user", "content": "Which artery?"}],
                  completion_ids=ids, completion_text="".join(segments))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("text, blocks", [
    ("<causal>a</causal> x <verify>b</verify>", [("causal", 0, 18), ("verify", 21, 39)]),
    ("<causal>a <verify>b</verify></causal>", [("causal", 0, 37), ("verify", 10, 28)]),
    ("<causal> </causal><verify><causal></causal></verify>", []),  # empty ones
    ("<causal>a", []),  # never closed
    ("<causal>a<verify>b</causal></verify>", []),  # crossing
    ("</verify><causal>a</causal>", [("causal", 9, 27)]),  # a stray close before
    ("<causal>x <verify>y</verify>", [("verify", 10, 28)]),  # inside an unclosed block
])
def test_valid_blocks_are_closed_nested_and_not_empty(text, blocks):
    assert [(b.tag, b.start, b.end) for b in reflection_blocks(text)] == blocks


def test_format_is_the_share_of_tokens_inside_valid_blocks(tok, tiny_qwen2):
    reward = ReflectionFormat()
    reward.setup(RewardContext(policy_dir=tiny_qwen2))
    before, inside, after = "Intro. ", "<causal>ST rises.</causal>", " The answer is (B)."
    s = sample(tok, "f/0", [before, inside, after])
    total = len(s.completion_ids) - 1  # the end-of-turn token is not counted
    assert reward([s])[0].score == pytest.approx(n_tokens(tok, inside) / total)
    assert reward([sample(tok, "f/1", ["No blocks at all."])])[0].score == 0.0
    assert reward([sample(tok, "f/2", ["<causal>never closed."])])[0].score == 0.0
    whole = sample(tok, "f/3", ["<causal>a.</causal>", "<verify>b.</verify>"])
    assert reward([whole])[0].score == 1.0
    # a token reaching across a block's edge (here "><", unless the tags are added tokens)
    # is not inside it
    assert reward([sample(tok, "f/4", ["<causal>a.</causal><verify>b.</verify>"])])[0].score < 1

    chars = ReflectionFormat(unit="char")
    chars.setup(RewardContext())  # needs no tokenizer
    assert chars([s])[0].score == pytest.approx(len(inside) / len(before + inside + after))
    with pytest.raises(UserError, match="unit: char"):
        ReflectionFormat().setup(RewardContext())


# ----------------------------------------------------------------------------- steps

def test_similarity_ignores_case_punctuation_tags_and_numbering():
    assert normalised_words("<verify>Step 2: The RCA, usually.") == ["the", "rca", "usually"]
    ratio = WordRatio()
    assert ratio.score([("1. The RCA supplies it!", "the rca supplies it")]) == [1.0]
    assert ratio.score([("a b c d", "a b x y")]) == [0.5]  # 2 * 2 matched / 8 words


def test_t_fail_is_the_first_step_below_tau_or_the_first_past_the_gold_chain():
    assert first_failed_step([0.9, 0.5, 0.2], 3, 0.7) == 1
    assert first_failed_step([0.69], 1, 0.7) == 0
    assert first_failed_step([0.9, 0.8], 3, 0.7) == 2  # all match; step 3 has no gold
    assert first_failed_step([0.9, 0.8], 2, 0.7) is None
    assert first_failed_step([], 0, 0.7) is None


def test_gold_chains_are_lists_or_strings_and_bad_types_name_the_field():
    assert gold_steps({"g": "One step. Two steps.\nThree"}, "g", "sentence") == \
        ["One step.", "Two steps.", "Three"]
    assert gold_steps({"g": ["a.", "  ", "b."]}, "g", "sentence") == ["a.", "b."]
    assert gold_steps({}, "g", "sentence") is None and gold_steps({"g": ""}, "g", "line") is None
    for bad in ({"g": 3}, {"g": ["fine", {"x": "secret text"}]}):
        with pytest.raises(ValueError, match="'g'") as err:
            gold_steps(bad, "g", "sentence")
        assert "secret" not in str(err.value)


# ------------------------------------------------------------------------ attribution

def marks_from(tok, s: Sample, start: int) -> list[float]:
    """1 on every token whose text reaches past character ``start``; 0 on the end of turn."""
    pieces = [tok.decode([t]) for t in s.completion_ids[:-1]]
    return [float(end > start) for _, end in token_offsets(pieces)] + [0.0]


def test_marks_run_from_the_first_wrong_step_to_the_end(tok, tiny_qwen2):
    gold = ROW["gold_chain"]
    wrong_step = " So the left anterior descending artery is blocked."
    answer = " The answer is (A)."
    failed = sample(tok, "a/0", [gold[0], wrong_step, answer])
    right = sample(tok, "a/1", [gold[0], " " + gold[1], " The answer is (B)."])
    no_chain = sample(tok, "b/0", ["Guess.", answer], row={k: v for k, v in ROW.items()
                                                            if k != "gold_chain"})
    matched = sample(tok, "c/0", [gold[0], " " + gold[1], answer])  # chain right, answer not
    runner = RewardRunner(load_rewards([{"name": "causal_attribution"}]),
                          ctx=RewardContext(policy_dir=tiny_qwen2))
    report = runner.score([failed, right, no_chain, matched])
    assert [s.rewards["causal_attribution"] for s in report.samples] == [0.0, 1.0, 0.0, 0.0]

    assert failed.token_marks["causal_attribution"] == marks_from(tok, failed, len(gold[0]))
    info = failed.reward_info["causal_attribution"]
    assert info["t_fail"] == 1 and info["steps"] == 3 and info["gold_steps"] == 2
    assert info["similarities"][0] == 1.0 and info["similarities"][1] < 0.7
    # the whole chain matches the gold one: the step past it (the answer) is blamed
    start = len(gold[0]) + 1 + len(gold[1])
    assert matched.token_marks["causal_attribution"] == marks_from(tok, matched, start)
    assert matched.reward_info["causal_attribution"]["t_fail"] == 2
    assert "causal_attribution" not in right.token_marks
    assert "causal_attribution" not in no_chain.token_marks
    m = report.metrics
    assert (m["rewards/causal_attribution/failed"], m["rewards/causal_attribution/attributed"],
            m["rewards/causal_attribution/no_chain"]) == (3.0, 2.0, 1.0)
    assert m["rewards/causal_attribution/t_fail_mean"] == 1.5


def test_steps_are_read_in_the_last_verify_block(tok, tiny_qwen2):
    gold = ROW["gold_chain"]
    causal = "<causal>The pain is pleuritic. So it is pericarditis.</causal>"
    verify_first = "<verify>" + gold[0]
    verify_rest = " The left circumflex artery is blocked.</verify>"
    s = sample(tok, "v/0", [causal, verify_first, verify_rest, " The answer is (C)."])
    reward = CausalAttribution()
    reward.setup(RewardContext(policy_dir=tiny_qwen2))
    result = reward([s])[0]
    assert result.info["t_fail"] == 1 and result.info["steps"] == 2
    start = len(causal + verify_first)
    assert result.token_marks == marks_from(tok, s, start)  # the causal block is not blamed

    everything = CausalAttribution(reasoning="all")
    everything.setup(RewardContext(policy_dir=tiny_qwen2))
    assert everything([s])[0].info["t_fail"] == 0  # the biased chain's first step


def test_a_similarity_plugin_replaces_the_word_ratio(tok, tiny_qwen2, tmp_path):
    (tmp_path / "sim.py").write_text(
        "class Never:\n"
        "    def score(self, pairs):\n"
        "        return [0.0 for _ in pairs]\n")
    reward = CausalAttribution(similarity="sim.py:Never")
    reward.setup(RewardContext(policy_dir=tiny_qwen2, base_dir=tmp_path))
    s = sample(tok, "p/0", [ROW["gold_chain"][0], " The answer is (A)."])
    assert reward([s])[0].token_marks == marks_from(tok, s, 0)
    (tmp_path / "bad.py").write_text("class NoScore:\n    pass\n")
    with pytest.raises(UserError, match="score"):
        CausalAttribution(similarity="bad.py:NoScore").setup(
            RewardContext(policy_dir=tiny_qwen2, base_dir=tmp_path))


def test_outcome_must_be_a_function_reward():
    with pytest.raises(UserError, match="mcq_letter"):
        CausalAttribution(outcome="rubric")


# ------------------------------------------------------------------------ consistency

def test_the_rule_counts_adjacent_steps_sharing_a_content_word(tok):
    assert shares_content_word("ST elevation in leads II and III.", "These leads face the "
                               "inferior wall.")
    assert not shares_content_word("The heart is large.", "Therefore the answer is (B).")
    reward = CausalConsistency()
    reward.setup(RewardContext())
    three = sample(tok, "r/0", ["Troponin is raised. Raised troponin means injury. "
                                "The answer is (B)."])
    one = sample(tok, "r/1", ["The answer is (B)."])
    results = reward([three, one])
    assert results[0].score == 0.5 and results[0].info == {"pairs": 2, "consistent": 1}
    assert results[1].score is None


def test_a_reward_model_judge_scores_each_adjacent_pair(tok, tiny_qwen2):
    from medrl.rewards.rubric_scorers import CriterionPair, build_scorer

    s = sample(tok, "j/0", ["<verify>Troponin is raised. It means injury. So it is an "
                            "infarct.</verify> The answer is (B)."])
    # in this process, or in a judge actor reserving no CPU when a session's Ray is up
    reward = CausalConsistency(scorer="reward_model", model="tiny:qwen2", judge_num_cpus=0)
    reward.setup(RewardContext())
    result = reward([s])[0]
    steps = ["Troponin is raised.", " It means injury.", " So it is an infarct."]
    scorer = build_scorer("reward_model", model=tiny_qwen2, device="cpu", batch_size=4,
                          max_length=2048, tiny=True)
    pairs = [CriterionPair(Sample(uid="j/0", group_id="j", messages=s.messages,
                                  completion_text=step_pair_text(a, b)),
                           CONSISTENCY_CRITERION, k)
             for k, (a, b) in enumerate(zip(steps, steps[1:]))]
    verdicts = scorer.score(pairs)
    assert result.info["pairs"] == 2
    assert result.score == sum(v >= 0.5 for v in verdicts) / 2
    assert reward.batch_metrics()["judge_pairs"] == 2.0
    with pytest.raises(UserError, match="model"):
        CausalConsistency(scorer="judge")


# ------------------------------------------------------------------------------ boxes

def box_sample(text: str, box=(0, 0, 10, 10)) -> Sample:
    return Sample(uid="x/0", group_id="x", row={} if box is None else {"box": list(box)},
                  completion_text=text)


@pytest.mark.parametrize("text, want", [
    ("<box>0,0,10,10</box>", 1.0),
    ("<box>20, 20, 30, 30</box>", 0.0),
    ("<box>5,0,15,10</box>", 50 / 150),  # half of each box overlaps: 50 / (100 + 100 - 50)
    ("<box>10,10,0,0</box>", 1.0),  # corners swapped: the same rectangle
    ("<box>[0.0, 0.0, 5e0, 10]</box>", 0.5),
    ("<box>50,50,60,60</box> then <box>0,0,10,10</box>", 1.0),  # the last box counts
    ("<box>1,2,3</box>", 0.0), ("<box>a,b,c,d</box>", 0.0), ("no box", 0.0),
])
def test_box_iou_on_known_boxes(text, want):
    assert box_iou(box_sample(text)) == pytest.approx(want)


def test_rows_without_a_box_do_not_apply_and_bad_ones_name_the_field():
    assert box_iou(box_sample("<box>0,0,1,1</box>", box=None)) is None
    runner = RewardRunner(load_rewards([{"name": "box_iou"}]), ctx=RewardContext())
    with pytest.raises(RewardError, match="'box'"):
        runner.score([box_sample("<box>0,0,1,1</box>", box=(0, 0, 0, 5))])


def test_an_embedded_cluster_counts_the_consistency_judge_cpus():
    from medrl.rewards.rubric import judge_cpus

    fns = [{"name": "rubric", "kwargs": {"model": "a", "replicas": 2}},
           {"name": "causal_consistency", "kwargs": {"scorer": "judge", "model": "b",
                                                     "judge_num_cpus": 0.5}},
           {"name": "causal_consistency", "kwargs": {"scorer": "rule"}},
           {"name": "mcq_letter"}]
    assert judge_cpus(fns) == 2.5  # the rule scorer and plain rewards start no judge


def test_judge_only_kwargs_are_refused_naming_the_reward():
    from medrl.rewards.causal import CausalConsistency

    with pytest.raises(UserError, match=r"^causal_consistency reward: kwargs max_retries"):
        CausalConsistency(scorer="reward_model", model="tiny:qwen2", max_retries=1)
