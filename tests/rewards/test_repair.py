"""Difference Feedback: the alignment marks, the widening to steps, the repairers, and the
reward through the runner, with the tiny tokenizer and (for the policy repairer) a real HF
engine on a tiny model."""

from __future__ import annotations

import pytest

from medrl.align.records import Sample, UserError
from medrl.rewards import RewardContext, RewardRunner, load_rewards
from medrl.rewards.repair import (DifferenceFeedback, Reference, RuleRepairer,
                                  difference_marks, reference_of, repair_messages, step_spans,
                                  token_offsets, widen_marks)

MCQ_ROW = {"question": "Inferior MI: which artery?",
           "options": {"A": "Left anterior descending", "B": "Right coronary",
                       "C": "Left circumflex", "D": "Left main"},
           "answer": "Right coronary", "answer_idx": "B"}
CHAIN = ("ST elevation is seen in leads II, III and aVF.\n"
         "These leads face the inferior wall.\n"
         "So the answer is (A).")


# ----------------------------------------------------------------------------- alignment

def test_marks_cover_exactly_the_replaced_and_deleted_tokens():
    failed = [5, 6, 7, 8, 9, 10]
    assert difference_marks(failed, failed) == [0.0] * 6
    # 7, 8 replaced by 70; 10 deleted
    assert difference_marks(failed, [5, 6, 70, 9]) == [0, 0, 1, 1, 0, 1]
    # an insertion marks the token at the insertion point; an append marks the last token
    assert difference_marks(failed, [5, 6, 99, 7, 8, 9, 10]) == [0, 0, 1, 0, 0, 0]
    assert difference_marks(failed, failed + [11, 12]) == [0, 0, 0, 0, 0, 1]
    assert difference_marks([], [1, 2]) == []


def test_long_answers_are_not_misaligned_by_frequent_tokens():
    # 300 tokens where one id is very frequent: difflib's junk heuristic (on by default above
    # 200 items) would drop it from matching and mark unchanged tokens
    failed = [1, 2] * 150
    repaired = list(failed)
    repaired[151] = 3
    marks = difference_marks(failed, repaired)
    assert marks.index(1.0) == 151 and sum(marks) == 1


def test_step_spans_cover_the_text_in_steps():
    text = "One. Two? Three\nFour"
    assert [text[a:b] for a, b in step_spans(text, "sentence")] == \
        ["One.", " Two?", " Three\n", "Four"]
    assert [text[a:b] for a, b in step_spans(text, "line")] == ["One. Two? Three\n", "Four"]
    blocks = "<causal>a.\nb</causal>\nthen <verify>c</verify>"
    assert [blocks[a:b] for a, b in step_spans(blocks, "block")] == \
        ["<causal>a.\nb</causal>", "\n", "then ", "<verify>c</verify>"]


def test_widening_marks_every_token_of_the_enclosing_step():
    pieces = ["One", ".", " Two", " is", " wrong", ".", " Three", "."]
    offsets = token_offsets(pieces)
    text = "".join(pieces)
    marks = [0, 0, 0, 0, 1, 0, 0, 0]
    assert widen_marks(marks, offsets, step_spans(text, "sentence")) == \
        [0, 0, 1, 1, 1, 1, 0, 0]
    assert widen_marks(marks, offsets, step_spans(text, "line")) == [1] * 8


def test_widened_marks_through_the_tokenizer_are_exactly_the_last_line(tiny_qwen2):
    from medrl.align.models import load_tokenizer

    tok = load_tokenizer(tiny_qwen2)
    reward = DifferenceFeedback(widen="line")
    reward.setup(RewardContext(policy_dir=tiny_qwen2))
    ids = tok(CHAIN, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(
        "<|im_end|>")]
    repaired = CHAIN.replace("(A)", "(B)")
    pieces = [tok.decode([t]) for t in ids[:-1]]
    last_line = CHAIN.rindex("\n") + 1
    expected = [1.0 if a >= last_line else 0.0 for a, _ in token_offsets(pieces)] + [0.0]
    assert reward.marks(ids, repaired) == expected
    # unwidened: only tokens inside the last line, the end-of-turn token never
    plain = DifferenceFeedback()
    plain.setup(RewardContext(policy_dir=tiny_qwen2))
    marks = plain.marks(ids, repaired)
    assert any(marks) and marks[-1] == 0.0
    assert all(m == 0 or e == 1 for m, e in zip(marks, expected))
    assert sum(marks) < sum(expected)


# ----------------------------------------------------------------------------- repairers

@pytest.mark.parametrize("text, fixed", [
    ("Reasoning. <answer>A</answer>", "Reasoning. <answer>B</answer>"),
    ("I think option C, but the answer is (A).", "I think option C, but the answer is (B)."),
    ("Answer: D", "Answer: B"),
    ("No idea.", "No idea.\nThe answer is (B)."),
])
def test_rule_repairer_puts_the_gold_letter_where_the_answer_is(text, fixed):
    ref = reference_of(MCQ_ROW)
    assert ref == Reference("B", "Right coronary", None)
    assert RuleRepairer.repair_one(text, ref, {k: "" for k in "ABCD"}) == fixed


def test_rule_repairer_on_pubmedqa_rows_writes_yes_no_maybe():
    row = {"question": "q", "options": {"A": "yes", "B": "no", "C": "maybe"}, "answer": "no",
           "answer_idx": "B", "answer_rationale": "The trial found no effect."}
    ref = reference_of(row, "answer_rationale")
    assert ref.rationale == "The trial found no effect."
    opts = {"A": "yes", "B": "no", "C": "maybe"}
    assert RuleRepairer.repair_one("The answer is yes.", ref, opts) == "The answer is no."
    assert RuleRepairer.repair_one("<answer>maybe</answer>", ref, opts) == "<answer>no</answer>"
    user = repair_messages("q", "The answer is yes.", ref)[1]["content"]
    assert "(B) no" in user and "The trial found no effect." in user


def test_outcome_must_be_a_function_reward():
    with pytest.raises(UserError, match="not a registered function reward"):
        DifferenceFeedback(outcome="rubric")


# -------------------------------------------------------------------- the reward, end to end

def chat_sample(tok, uid, group, text, row=MCQ_ROW):
    messages = [{"role": "user", "content": row["question"]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    ids = tok(text, add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<|im_end|>")]
    return Sample(uid=uid, group_id=group, row=row, messages=messages, prompt_ids=list(prompt),
                  completion_ids=ids, completion_text=text, policy_version=0)


def test_runner_gives_marks_to_failed_answers_only(tiny_qwen2):
    from medrl.align.models import load_tokenizer

    tok = load_tokenizer(tiny_qwen2)
    wrong = chat_sample(tok, "g/0", "g", CHAIN)
    right = chat_sample(tok, "g/1", "g", CHAIN.replace("(A)", "(B)"))
    runner = RewardRunner(load_rewards([{"name": "difference_feedback",
                                         "kwargs": {"widen": "sentence"}}]),
                          ctx=RewardContext(policy_dir=tiny_qwen2))
    report = runner.score([wrong, right])
    assert [s.rewards["difference_feedback"] for s in report.samples] == [0.0, 1.0]
    assert "difference_feedback" not in right.token_marks
    marks = wrong.token_marks["difference_feedback"]
    assert len(marks) == len(wrong.completion_ids) and marks[-1] == 0.0
    last = CHAIN.rindex("\n") + 1  # the last sentence is the last line here
    pieces = [tok.decode([t]) for t in wrong.completion_ids[:-1]]
    assert marks[:-1] == [1.0 if a >= last else 0.0 for a, _ in token_offsets(pieces)]
    assert report.metrics["rewards/difference_feedback/repaired"] == 1.0
    assert report.metrics["rewards/difference_feedback/failed"] == 1.0
    assert wrong.reward_info["difference_feedback"]["marked"] == int(sum(marks))


def test_policy_repairer_uses_the_engines_current_weights(tiny_qwen2):
    import torch

    from medrl.align.models import load_tokenizer
    from medrl.launch.reward_hooks import GenerateHook
    from medrl.rewards.repair import PolicyRepairer
    from medrl.rollouts.hf_engine import HFEngine

    tok = load_tokenizer(tiny_qwen2)
    engine = HFEngine(tiny_qwen2, max_model_len=512)
    hook = GenerateHook(engine)
    # sampled (a random tiny model's greedy answer is blank lines), seeded by the run seed
    # and the batch's policy version
    reward = DifferenceFeedback(repairer="policy", max_new_tokens=12, temperature=1.0)
    reward.setup(RewardContext(policy_dir=tiny_qwen2, generate=hook, seed=7))
    assert isinstance(reward.repairer, PolicyRepairer)
    failed = [chat_sample(tok, f"g/{i}", "g", CHAIN.replace("(A)", f"({x})"))
              for i, x in enumerate("ACD")]
    first = reward(failed)
    again = reward(failed)  # seeded: the same repairs, as a resumed run would make them
    assert [r.token_marks for r in first] == [r.token_marks for r in again]
    texts = reward.repairer.repair(failed, [reference_of(MCQ_ROW)] * 3)
    assert any(texts)
    for s, r, text in zip(failed, first, texts):  # None: the model wrote nothing
        assert r.token_marks == (None if text is None else reward.marks(s.completion_ids, text))

    # new weights in the engine -> other repairs, the same as a fresh engine with them
    state = {k: v + 0.05 * torch.randn_like(v, generator=torch.Generator().manual_seed(1))
             if v.is_floating_point() else v for k, v in engine.model.state_dict().items()}
    engine.update_weights(list(state.items()), version=1)
    moved = reward.repairer.repair(failed, [reference_of(MCQ_ROW)] * 3)
    assert moved != texts
    fresh = HFEngine(tiny_qwen2, max_model_len=512)
    fresh.update_weights(list(state.items()), version=1)
    assert PolicyRepairer(GenerateHook(fresh), max_new_tokens=12, temperature=1.0,
                          seed=7).repair(
        failed, [reference_of(MCQ_ROW)] * 3) == moved
    assert hook.calls == 4


def test_generate_hook_pickled_into_an_actor_refuses_clearly():
    import pickle

    from medrl.launch.reward_hooks import GenerateHook

    hook = pickle.loads(pickle.dumps(GenerateHook(object(), stop=("\n\n",))))
    assert hook.stop == ("\n\n",)
    with pytest.raises(UserError, match="actor: false"):
        hook([Sample(uid="x", group_id="x")], max_new_tokens=4)
