"""Error marks -> per-token advantages (medrl.align.process), and what they do to the loss's
gradient on a tiny real model through the learner's own collate and log-prob pass."""

from __future__ import annotations

import pytest
import torch

from medrl.align.batch import collate
from medrl.align.grpo import group_advantages, policy_loss
from medrl.align.logprobs import token_logprobs
from medrl.align.process import apply_token_marks, combined_marks, token_advantages
from medrl.align.records import Sample


def test_token_advantages_by_case():
    marks = [0.0, 1.0, 0.5]
    assert token_advantages(-2.0, marks, zero_variance=False, alpha=1.0) == [-2.0, -4.0, -3.0]
    assert token_advantages(-2.0, marks, zero_variance=False, mode="marked_only") == \
        [-0.0, -2.0, -1.0]
    assert token_advantages(1.5, marks, zero_variance=False) is None  # A >= 0: unchanged
    assert token_advantages(-2.0, [0.0, 0.0], zero_variance=False) is None  # nothing marked
    assert token_advantages(0.0, marks, zero_variance=True, failed_group_advantage=0.5) == \
        [-0.0, -0.5, -0.25]
    assert token_advantages(0.0, marks, zero_variance=True, failed_group_advantage=0) is None
    assert token_advantages(-2.0, marks, zero_variance=False, alpha=0.0) == [-2.0] * 3
    for bad in (dict(alpha=-1.0), dict(failed_group_advantage=float("nan")),
                dict(mode="sign")):
        with pytest.raises(ValueError):
            token_advantages(-1.0, marks, zero_variance=False, **bad)
    with pytest.raises(ValueError, match="marks"):
        token_advantages(-1.0, [2.0], zero_variance=False)


def test_marks_of_several_rewards_combine_by_maximum():
    s = Sample(uid="a", group_id="g", completion_ids=[1, 2, 3])
    assert combined_marks(s) is None
    s.token_marks = {"x": [1.0, 0.0, 0.0], "y": [0.0, 0.5, 0.0]}
    assert combined_marks(s) == [1.0, 0.5, 0.0]


# ------------------------------------------------------------ the gradient on a tiny model

COMPLETIONS = [[11, 12, 13, 14, 15, 2], [21, 22, 23, 24, 2], [31, 32, 33, 34, 35, 36], [41, 42, 2]]
PROMPT = [1, 5, 6, 7, 8]


def batch_samples(rewards, marks):
    """One group of four completions of one prompt, rewarded and (some) marked."""
    out = []
    for i, (ids, r, m) in enumerate(zip(COMPLETIONS, rewards, marks)):
        s = Sample(uid=f"g/{i}", group_id="g", prompt_ids=list(PROMPT), completion_ids=ids)
        s.reward = r
        if m is not None:
            s.token_marks = {"difference_feedback": m}
        out.append(s)
    return out


def marks_on(ids, positions):
    return [1.0 if t in positions else 0.0 for t in range(len(ids))]


def prepare(samples, **process):
    adv = group_advantages([s.reward for s in samples], [s.group_id for s in samples])
    for s, a in zip(samples, adv.advantages.tolist()):
        s.advantage = a
    apply_token_marks(samples, adv.zero_variance.tolist(), **process)
    return samples


def loss_and_grads(model, samples):
    """(loss, d loss / d logprob [B, T], parameter gradients) of one GRPO step on-policy."""
    batch = collate(samples, pad_token_id=0)
    model.zero_grad()
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask,
                        num_completion_tokens=batch.num_completion_tokens)
    lp.retain_grad()
    loss, _ = policy_loss(lp, lp.detach(), batch.advantage_tensor(), batch.completion_mask)
    loss.backward()
    params = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), lp.grad.clone(), params, batch.completion_mask


@pytest.fixture(scope="module")
def model(tiny_qwen2):
    from medrl.align.models import load_model

    return load_model(tiny_qwen2).float()


def test_alpha_zero_is_plain_grpo_exactly(model):
    rewards = [0.0, 1.0, 0.0, 1.0]
    marks = [marks_on(COMPLETIONS[0], {1, 2}), None, marks_on(COMPLETIONS[2], {4}), None]
    plain = loss_and_grads(model, prepare(batch_samples(rewards, [None] * 4)))
    zero = loss_and_grads(model, prepare(batch_samples(rewards, marks), alpha=0.0,
                                         failed_group_advantage=0.0))
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
    assert all(torch.equal(a, b) for a, b in zip(plain[2], zero[2]))


def test_weight_mode_puts_more_of_the_negative_signal_on_marked_tokens(model):
    rewards = [0.0, 1.0, 0.0, 1.0]
    marked = {1, 2}
    marks = [marks_on(COMPLETIONS[0], marked), None, None, None]
    plain = loss_and_grads(model, prepare(batch_samples(rewards, [None] * 4)))
    weighted = loss_and_grads(model, prepare(batch_samples(rewards, marks), alpha=2.0))
    # on-policy, d loss / d logprob_t = -A_t / N: the marked tokens of the failed answer get
    # (1 + alpha) times plain GRPO's share, everything else exactly plain GRPO's
    ratio = weighted[1][0] / plain[1][0]
    n = len(COMPLETIONS[0])
    for t in range(n):
        assert ratio[t].item() == pytest.approx(3.0 if t in marked else 1.0, rel=1e-6)
    assert torch.equal(weighted[1][1:], plain[1][1:])


def test_marked_only_concentrates_the_gradient_on_marked_tokens(model):
    rewards = [0.0, 1.0, 0.0, 1.0]
    marks = [marks_on(COMPLETIONS[0], {3}), None, marks_on(COMPLETIONS[2], {0, 5}), None]
    _, dlp, _, mask = loss_and_grads(model, prepare(batch_samples(rewards, marks),
                                                    mode="marked_only"))
    for row, keep in ((0, {3}), (2, {0, 5})):
        nonzero = {t for t in range(len(COMPLETIONS[row])) if dlp[row, t] != 0}
        assert nonzero == keep
    assert (dlp[1] != 0).sum() == mask[1].sum()  # correct answers keep every token's credit


def test_an_all_failed_group_learns_on_its_marked_tokens_only(model):
    rewards = [0.0, 0.0, 0.0, 0.0]  # zero variance: plain GRPO learns nothing here
    marks = [marks_on(COMPLETIONS[0], {2}), marks_on(COMPLETIONS[1], {0, 1}), None,
             marks_on(COMPLETIONS[3], set())]
    plain = loss_and_grads(model, prepare(batch_samples(rewards, [None] * 4)))
    assert all(g.abs().max() == 0 for g in plain[2])
    loss, dlp, params, mask = loss_and_grads(
        model, prepare(batch_samples(rewards, marks), failed_group_advantage=1.0))
    assert max(g.abs().max() for g in params) > 0
    nonzero = {(b, t) for b in range(4) for t in range(dlp.shape[1]) if dlp[b, t] != 0}
    assert nonzero == {(0, 2), (1, 0), (1, 1)}
    # the marked tokens are pushed down: d loss / d logprob > 0; zero-advantage tokens still
    # count in token_mean's normaliser (all 20 completion tokens)
    n = mask.sum().item()
    assert n == sum(len(c) for c in COMPLETIONS)
    for b, t in nonzero:
        assert dlp[b, t].item() == pytest.approx(1.0 / n, rel=1e-6)


def test_apply_token_marks_reports_what_it_did():
    samples = prepare(batch_samples([0.0, 0.0, 0.0, 0.0],
                                    [marks_on(COMPLETIONS[0], {2}), None, None, None]))
    assert samples[0].token_advantages == [-1.0 if t == 2 else -0.0 for t in range(6)]
    assert samples[1].token_advantages is None
    m = apply_token_marks(samples, [True] * 4)
    assert m["process/marked_samples"] == 1.0 and m["process/failed_group_samples"] == 1.0
    assert m["process/marked_token_share"] == pytest.approx(1 / 6)
