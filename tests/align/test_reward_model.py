"""The reward-model stage's pieces on one in-process learner: the Bradley-Terry loss, the value
head against transformers' own classifier forward, the exported folder, LoRA, and a learned
criterion-dependent preference that cannot be learned without the criterion."""

from __future__ import annotations

import math
import random

import pytest
import torch

from medrl.align.records import Sample
from medrl.align.stages.reward_model import (bt_loss, encode_pair, encode_pairs, pair_count,
                                             pair_loss, pair_metrics)


def pair_sample(uid: str, chosen: str, rejected: str, tier: str = "") -> Sample:
    return Sample(uid=uid, group_id=uid, row={"chosen": chosen, "rejected": rejected,
                                              "tier": tier}, messages=[])


def test_bt_loss_equals_a_hand_computation():
    chosen = torch.tensor([2.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 0.5, 0.0])
    loss, metrics = bt_loss(chosen, rejected)
    by_hand = sum(-math.log(1 / (1 + math.exp(-(win - lose))))
                  for win, lose in [(2.0, 1.0), (0.5, 0.5), (-1.0, 0.0)]) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert metrics["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)  # a tie counts one half
    assert metrics["margin"] == pytest.approx((1.0 + 0.0 - 1.0) / 3)
    # interleaved [w0, l0, w1, l1, ...] as the learner hands them over
    values = torch.stack([chosen, rejected], dim=1).reshape(-1)
    assert pair_loss(values, None)[0].item() == pytest.approx(by_hand, rel=1e-6)


def test_pair_metrics_per_tier():
    values = [1.0, 0.0,   0.0, 1.0,   2.0, 1.0]  # right, wrong, right
    out = pair_metrics(values, ["main", "veto", "main"])
    assert out["eval/accuracy"] == pytest.approx(2 / 3)
    assert out["eval/accuracy/main"] == 1.0 and out["eval/accuracy/veto"] == 0.0
    assert "eval/accuracy/" not in " ".join(pair_metrics(values, ["", "", ""]))


def test_encoding_keeps_the_right_end_and_puts_the_last_token_in_the_completion(tiny_qwen2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    text = "Criterion:\nmentions aspirin\n\nResponse:\nTake aspirin daily."
    chosen, rejected = encode_pair(tok, pair_sample("p", text, "Response:\nRest."), 8)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert chosen.prompt_ids + chosen.completion_ids == ids[-8:]
    assert len(chosen.completion_ids) == 1 and chosen.uid == "p/chosen"
    assert rejected.uid == "p/rejected"


def test_value_head_matches_the_classifier_forward_and_exports_a_loadable_folder(
        make_learner, tiny_qwen2, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from medrl.align.stages.reward_model import encode_text

    learner = make_learner(head="value", micro_batch_size=4, lr=1e-3)
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    texts = ["a short text", "a somewhat longer text with more tokens in it", "mid length one"]
    samples = []
    for i, t in enumerate(texts):
        ids = encode_text(tok, t, 64)
        samples.append(Sample(uid=str(i), group_id=str(i), prompt_ids=ids[:-1],
                              completion_ids=ids[-1:]))
    values = learner.logprobs(learner.collate(samples))
    assert values.shape == (3,)
    batch = encode_pairs(tok, [pair_sample("a", "yes it does", "no it does not"),
                               pair_sample("b", "it is there", "absent here")], 64)
    metrics = learner.train_step_with(pair_loss, learner.collate(batch), size_fn=pair_count)
    assert math.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    learner.save(tmp_path / "ckpt")
    after = learner.logprobs(learner.collate(samples))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt" / "policy")
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    with torch.no_grad():  # one unpadded row at a time: HF's own forward, no padding at all
        own = torch.tensor([model(**tok(t, return_tensors="pt")).logits[0, 0].item()
                            for t in texts])
    assert torch.allclose(after, own, atol=1e-4), (after, own)
    assert not torch.allclose(values, after, atol=1e-6)  # the step changed the model


def test_lora_reward_model_trains_its_head_and_exports_it_merged(make_learner, tmp_path,
                                                                 tiny_qwen2):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    learner = make_learner(head="value", lora={"r": 4, "alpha": 8})
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    batch = encode_pairs(tok, [pair_sample("a", "yes it does", "no it does not")], 64)
    learner.train_step_with(pair_loss, learner.collate(batch), size_fn=pair_count)
    values = learner.logprobs(learner.collate(batch))
    learner.save(tmp_path / "ckpt")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt" / "policy")
    with torch.no_grad():
        own = [model(**tok(t, return_tensors="pt")).logits[0, 0].item()
               for t in ("yes it does", "no it does not")]
    assert values.tolist() == pytest.approx(own, abs=1e-4)


WORDS = ["fever", "cough", "rash", "headache", "nausea", "fatigue", "dizziness", "pain"]


def mention_pairs(rng: random.Random, n: int, *, blank: bool) -> list[Sample]:
    """Pairs over the same two responses, one mentioning "aspirin" and one not; the preferred
    one depends on the criterion alone (blank: the criterion text is removed)."""
    out = []
    for i in range(n):
        base = " ".join(rng.sample(WORDS, 3))
        with_x, without_x = f"{base} aspirin", f"{base} rest"
        for k, (criterion, chosen, rejected) in enumerate([
                ("mentions aspirin", with_x, without_x),
                ("does not mention aspirin", without_x, with_x)]):
            shown = "" if blank else criterion
            out.append(pair_sample(f"{i}/{k}", f"Criterion: {shown}\nResponse: {chosen}",
                                   f"Criterion: {shown}\nResponse: {rejected}"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("blank", [False, True], ids=["with_criterion", "blanked"])
def test_learns_a_criterion_dependent_preference_only_with_the_criterion(make_learner,
                                                                         tiny_qwen2, blank):
    from transformers import AutoTokenizer

    from medrl.align.stages.reward_model import evaluate

    class OneRank:  # the PairLearner protocol on an in-process learner
        def __init__(self, learner):
            self.learner = learner

        def values(self, samples, *, unit=1):
            return self.learner.logprobs(self.learner.collate(samples)).tolist()

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    rng = random.Random(0)
    train, held = mention_pairs(rng, 48, blank=blank), mention_pairs(rng, 16, blank=blank)
    learner = make_learner(head="value", micro_batch_size=32, lr=3e-3, seed=0)
    for step in range(30):
        batch = rng.sample(train, 16)
        learner.train_step_with(pair_loss, learner.collate(encode_pairs(tok, batch, 64)),
                                size_fn=pair_count)
    accuracy = evaluate(OneRank(learner), encode_pairs(tok, held, 64), [""] * len(held),
                        16)["eval/accuracy"]
    if blank:  # each response pair appears once each way: exactly one of the two is right
        assert accuracy == pytest.approx(0.5, abs=0.1)
    else:
        assert accuracy >= 0.9
