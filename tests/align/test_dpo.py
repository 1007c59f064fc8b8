"""The dpo stage's pieces: the DPO loss against a hand computation, MedCausalX's shared-prefix
contrast (what it changes and what it cannot), the encoding of a pair, pairs from MCQ rows,
the recipe section, and the loss on a real tiny learner (full weights and LoRA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from medrl.align.records import Sample, UserError
from medrl.align.stages.dpo import (DPOLoss, dpo_loss, encode_pair, encode_pairs, pair_count,
                                    pair_metrics, response_scores, shared_prefix_length,
                                    with_reference)

REPO = Path(__file__).resolve().parents[2]
SAMPLE_PAIRS = REPO / "recipes" / "data" / "causal_pairs_sample.jsonl"


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------- the loss


def test_dpo_loss_equals_a_hand_computation():
    pc, pr = torch.tensor([-4.0, -6.0, -3.0]), torch.tensor([-5.0, -5.5, -3.0])
    rc, rr = torch.tensor([-4.5, -5.0, -2.0]), torch.tensor([-4.5, -6.0, -2.0])
    beta = 0.1
    z = [beta * ((a - b) - (c - d)) for a, b, c, d in
         zip(pc.tolist(), rc.tolist(), pr.tolist(), rr.tolist())]
    assert z == pytest.approx([0.1, -0.15, 0.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(sum(-log_sigmoid(v) for v in z) / 3, rel=1e-6)
    assert m["accuracy"] == pytest.approx(1 / 3)  # a tie (the third pair) counts as wrong
    assert m["margin"] == pytest.approx(sum(z) / 3, abs=1e-7)
    assert m["reward_chosen"] == pytest.approx(beta * (0.5 - 1.0 - 1.0) / 3)
    assert m["reward_rejected"] == pytest.approx(beta * (-0.5 + 0.5 - 1.0) / 3)

    eps = 0.2
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    by_hand = sum(-(1 - eps) * log_sigmoid(v) - eps * log_sigmoid(-v) for v in z) / 3
    assert smoothed.item() == pytest.approx(by_hand, rel=1e-6)


def test_the_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-4.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -2.5], requires_grad=True)
    ref = torch.tensor([-3.0, -3.0])
    loss, _ = dpo_loss(pc, pr, ref, ref, beta=0.5)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises pi(y_w), lowers pi(y_l)
    # d loss / d pi_c = -beta * sigmoid(-z) / P
    z = 0.5 * ((pc - ref) - (pr - ref)).detach()
    assert pc.grad.tolist() == pytest.approx((-0.5 * torch.sigmoid(-z) / 2).tolist(), rel=1e-6)
    assert pr.grad.tolist() == pytest.approx((-pc.grad).tolist(), rel=1e-6)


def test_response_scores_sum_or_average_the_scored_tokens():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert response_scores(lp, mask, average=False).tolist() == [-6.0, -9.0]
    assert response_scores(lp, mask, average=True).tolist() == [-2.0, -4.5]


# --------------------------------------------------- MedCausalX's shared-prefix contrast


def two_responses(prefix_pi, prefix_ref):
    """Per-token log-probs [2, 8] of a chosen (7 tokens) and a rejected (8 tokens) response
    that share their first 4 tokens: the prefix has the same context in both, so the same
    log-probs in both rows. The chosen row's last column is padding."""
    tail = {"pi": ([-0.5, -0.7, -0.2, 0.0], [-1.5, -2.5, -0.9, -0.3]),
            "ref": ([-1.0, -0.9, -0.4, 0.0], [-1.2, -1.8, -0.6, -0.5])}
    pi = torch.tensor([prefix_pi + tail["pi"][0], prefix_pi + tail["pi"][1]])
    ref = torch.tensor([prefix_ref + tail["ref"][0], prefix_ref + tail["ref"][1]])
    return pi, ref


FULL = torch.tensor([[1.0] * 7 + [0.0], [1.0] * 8])
AFTER_PREFIX = torch.tensor([[0.0] * 4 + [1.0] * 3 + [0.0], [0.0] * 4 + [1.0] * 4])


def loss_of(pi, ref, mask, average):
    p, r = (response_scores(x, mask, average=average) for x in (pi, ref))
    return dpo_loss(p[:1], p[1:], r[:1], r[1:], beta=0.1)[0].item()


def test_with_summed_logprobs_the_shared_prefix_cancels_exactly():
    pi, ref = two_responses([-2.0, -0.1, -3.0, -0.4], [-1.0, -0.3, -2.0, -0.2])
    assert loss_of(pi, ref, FULL, False) == pytest.approx(loss_of(pi, ref, AFTER_PREFIX, False),
                                                          abs=1e-7)


def test_with_averaged_logprobs_the_variant_changes_the_loss():
    pi, ref = two_responses([-2.0, -0.1, -3.0, -0.4], [-1.0, -0.3, -2.0, -0.2])
    full, after = loss_of(pi, ref, FULL, True), loss_of(pi, ref, AFTER_PREFIX, True)
    assert abs(full - after) > 1e-4, (full, after)


@pytest.mark.parametrize("average", [False, True], ids=["sum", "average"])
def test_the_prefix_variant_does_not_see_the_prefix_logprobs(average):
    pi, ref = two_responses([-2.0, -0.1, -3.0, -0.4], [-1.0, -0.3, -2.0, -0.2])
    pi2, ref2 = two_responses([-0.2, -5.0, -0.1, -7.0], [-3.0, -0.1, -0.5, -4.0])
    assert loss_of(pi, ref, AFTER_PREFIX, average) == loss_of(pi2, ref2, AFTER_PREFIX, average)
    if average:  # the full contrast's means (over 7 and 8 tokens) do move with them
        assert loss_of(pi, ref, FULL, True) != pytest.approx(loss_of(pi2, ref2, FULL, True))


# ------------------------------------------------------------------------ encoding a pair


def pair_sample(uid: str, chosen: str, rejected: str) -> Sample:
    return Sample(uid=uid, group_id=uid, row={"chosen": chosen, "rejected": rejected},
                  messages=[{"role": "user", "content": "Fever and neck stiffness: next step?"}])


SHARED = "Step 1: fever and neck stiffness suggest meningitis."
CHOSEN = f"{SHARED} Step 2: start ceftriaxone now. Answer: C."
REJECTED = f"{SHARED} Step 2: wait for a CT scan first. Answer: D."


@pytest.fixture(scope="module")
def tok(tiny_qwen2):
    from medrl.align.models import load_tokenizer

    return load_tokenizer(tiny_qwen2)


def test_encoding_moves_the_shared_prefix_into_the_context(tok):
    from medrl.align.encode import encode_prompt, end_of_turn_id

    pair = pair_sample("p1", CHOSEN, REJECTED)
    prompt = encode_prompt(tok, pair).prompt_ids[0]
    full_c, full_r = encode_pair(tok, pair, max_length=512, contrast="full")
    cut_c, cut_r = encode_pair(tok, pair, max_length=512, contrast="after_shared_prefix")
    assert (full_c.uid, full_r.uid) == ("p1/chosen", "p1/rejected")
    assert full_c.prompt_ids == prompt and full_c.completion_ids[-1] == end_of_turn_id(tok)
    k = shared_prefix_length(full_c.completion_ids, full_r.completion_ids)
    assert k >= len(tok(SHARED, add_special_tokens=False)["input_ids"]) - 1
    for full, cut in ((full_c, cut_c), (full_r, cut_r)):
        assert cut.prompt_ids == prompt + full_c.completion_ids[:k]  # same context, both sides
        assert cut.prompt_ids + cut.completion_ids == full.prompt_ids + full.completion_ids
    assert cut_c.completion_ids[0] != cut_r.completion_ids[0]  # the contrast starts where
    # they part


def test_encoding_refuses_identical_responses_and_a_prompt_that_fills_the_budget(tok):
    with pytest.raises(UserError, match="pair p2: the chosen and rejected responses are the "
                                        "same tokens"):
        encode_pair(tok, pair_sample("p2", CHOSEN, CHOSEN), max_length=512)
    with pytest.raises(UserError, match="pair p3: the prompt has .* dpo.max_length 8"):
        encode_pair(tok, pair_sample("p3", CHOSEN, REJECTED), max_length=8)
    # a chosen response that is the start of the rejected one: its end-of-turn token is then
    # the only token of it that is scored
    from medrl.align.encode import end_of_turn_id

    c, r = encode_pair(tok, pair_sample("p4", SHARED, SHARED + " Then more."),
                       max_length=512, contrast="after_shared_prefix")
    assert c.completion_ids == [end_of_turn_id(tok)] and len(r.completion_ids) > 1


# ----------------------------------------------------------------- pairs from data rows


def mcq_rows(tmp_path, rows, template="mcq"):
    from medrl.launch.data import load_samples
    from medrl.launch.recipe import DataConfig

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_samples(DataConfig(path=str(path), template=template))


OPTIONS = {"A": "Insulin glargine", "B": "Glibenclamide", "C": "Metformin", "D": "Pioglitazone"}


def test_mcq_pairs_name_the_right_option_against_a_seeded_distractor(tmp_path):
    from medrl.launch.dpo_stage import dpo_pairs

    rows = [{"question": f"Q{i}: first-line drug?", "options": OPTIONS, "answer": "Metformin",
             "answer_idx": "C"} for i in range(12)]  # MedQA's layout: text + letter
    samples = mcq_rows(tmp_path, rows)
    pairs = dpo_pairs(samples, source="mcq", seed=3)
    distractors = set()
    for p in pairs:
        assert p.row["chosen"] == "Answer: C. Metformin"
        letter = p.row["rejected"].split()[1].rstrip(".")
        assert letter in "ABD" and p.row["rejected"] == f"Answer: {letter}. {OPTIONS[letter]}"
        distractors.add(letter)
        assert p.messages == next(s.messages for s in samples if s.uid == p.uid)
    assert len(distractors) > 1  # drawn per row, not one fixed distractor
    again = {p.uid: p.row for p in dpo_pairs(list(reversed(samples)), source="mcq", seed=3)}
    assert all(again[p.uid] == p.row for p in pairs)  # the seed and the row decide, not order
    other = dpo_pairs(samples, source="mcq", seed=4)
    assert [p.row for p in other] != [p.row for p in pairs]


def test_mcq_pairs_from_real_medqa_rows(shared_data, tmp_path):
    from medrl.launch.data import load_samples
    from medrl.launch.dpo_stage import dpo_pairs
    from medrl.launch.recipe import DataConfig

    samples = load_samples(DataConfig(path=str(shared_data / "medqa" / "test.jsonl"),
                                      max_samples=20))
    for s, p in zip(samples, dpo_pairs(samples, source="mcq", seed=0), strict=True):
        gold = s.row["answer_idx"]
        assert p.row["chosen"] == f"Answer: {gold}. {s.row['options'][gold]}"
        assert not p.row["rejected"].startswith(f"Answer: {gold}.")


def test_a_row_without_its_chosen_response_is_named(tmp_path):
    from medrl.launch.data import load_samples
    from medrl.launch.dpo_stage import dpo_pairs
    from medrl.launch.recipe import DataConfig

    rows = [{"id": "ok-1", "question": "Q?", "chosen": "yes", "rejected": "no"},
            {"id": "bad-7", "question": "Q?", "rejected": "no"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_samples(DataConfig(path=str(path), template="open",
                                      fields={"id": "id", "options": None}))
    with pytest.raises(UserError, match=r"sample bad-7: the chosen response in column "
                                        r"'chosen' \(dpo.chosen_field\).*it is missing or null"):
        dpo_pairs(samples, source="explicit")
    with pytest.raises(UserError, match="sample ok-1: dpo.pairs is mcq, but the row has no "
                                        "options"):
        dpo_pairs(samples[:1], source="mcq")


# ------------------------------------------------------------------------ the recipe section


def test_the_dpo_section_belongs_to_the_dpo_stage(tmp_path):
    from medrl.launch.recipe import RecipeError, load_recipe
    from medrl.launch.stages import check_recipe

    data = yaml.safe_load((REPO / "recipes" / "dpo_medcausalx.yaml").read_text())
    data["data"]["path"] = str(SAMPLE_PAIRS)
    grpo = dict(data, run={**data["run"], "stage": "grpo"},
                rewards={"functions": [{"name": "mcq_letter"}]})
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(grpo))
    with pytest.raises(RecipeError, match="the dpo: section is read only by run.stage dpo"):
        load_recipe(path)

    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path, ["dpo.batch_size=3"])
    assert (recipe.dpo.beta, recipe.dpo.epochs) == (0.1, 2)  # MedCausalX's settings
    checked = check_recipe(recipe, tmp_path)
    assert "dpo: 12 training and 4 held-out pairs, 8 steps" in checked  # ceil(2 * 12 / 3)
    with pytest.raises(UserError, match="learner.ref_model is none"):
        check_recipe(load_recipe(path, ["learner.ref_model=none"]), tmp_path)


# --------------------------------------------------------------- on a real tiny learner


def step_on(learner, samples, loss_fn):
    """One DPO step the way the stage takes it: reference log-probs first, then the update."""
    batch = learner.collate(samples)
    ref = learner.ref_logprobs(batch)
    ref_rows = [ref[i, :len(s.completion_ids)] for i, s in enumerate(samples)]
    return learner.train_step_with(loss_fn, learner.collate(with_reference(samples, ref_rows)),
                                   size_fn=pair_count)


def held_out_metrics(learner, samples, average):
    batch = learner.collate(samples)
    rows = lambda lp: [lp[i, :len(s.completion_ids)] for i, s in enumerate(samples)]  # noqa: E731
    return pair_metrics(rows(learner.logprobs(batch, temperature=1.0)),
                        rows(learner.ref_logprobs(batch)), beta=0.1, average_logprobs=average)


def train_pairs():
    return [pair_sample("a", CHOSEN, REJECTED),
            pair_sample("b", f"{SHARED} Step 2: give antibiotics at once. Answer: C.",
                        f"{SHARED} Step 2: send the patient home. Answer: A.")]


def test_on_the_tiny_model_dpo_learns_and_the_prefix_facts_hold(make_learner, tok):
    from medrl.align.reference import Reference

    learner = make_learner(reference=Reference.CPU, micro_batch_size=2, lr=1e-3, seed=0)
    full = encode_pairs(tok, train_pairs(), max_length=512)
    cut = encode_pairs(tok, train_pairs(), max_length=512, contrast="after_shared_prefix")
    loss_fn = DPOLoss(beta=0.1)
    first = step_on(learner, full, loss_fn)  # policy = reference: every margin is 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["accuracy"] == 0.0 and first["margin"] == pytest.approx(0.0, abs=1e-5)
    for _ in range(2):
        last = step_on(learner, full, loss_fn)
    assert last["margin"] > 0 and last["loss"] < math.log(2) and last["accuracy"] == 1.0

    # Now the policy differs from the reference: the prefix variant's loss equals the full one
    # with sums (the prefix cancels), and differs with averages.
    summed = [held_out_metrics(learner, s, False)["eval/loss"] for s in (full, cut)]
    averaged = [held_out_metrics(learner, s, True)["eval/loss"] for s in (full, cut)]
    assert summed[0] == pytest.approx(summed[1], abs=2e-5)
    assert abs(averaged[0] - averaged[1]) > 1e-4, averaged


def test_lora_dpo_uses_the_adapters_off_as_reference(make_learner, tok, tmp_path):
    from medrl.align.reference import Reference

    learner = make_learner(reference=Reference.ADAPTERS, lora={"r": 4, "alpha": 8},
                           micro_batch_size=2, lr=5e-2, seed=0)
    assert learner.ref_model is None  # no second copy of the weights
    pairs = encode_pairs(tok, train_pairs(), max_length=512, contrast="after_shared_prefix")
    loss_fn = DPOLoss(beta=0.1, average_logprobs=True)
    first = step_on(learner, pairs, loss_fn)  # the adapters start as a no-op
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for _ in range(2):
        last = step_on(learner, pairs, loss_fn)
    assert last["margin"] > 0
    learner.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter").is_dir() and (tmp_path / "ckpt" / "policy").is_dir()
