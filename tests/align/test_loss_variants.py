"""The GRPO-family variants of policy_loss (GSPO, GSPO-token, CISPO), the entropy bonus and
truncated-completion masking: values and gradients against hand computations on small
tensors, and the cases where a variant must reduce to GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from medrl.align.grpo import loss_clip_defaults, policy_loss, sequence_ratio

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.7]], dtype=torch.float64)
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)


def _lp(log_ratios):
    return (OLD + torch.tensor(log_ratios, dtype=torch.float64)).requires_grad_(True)


def test_gspo_sequence_ratio_and_objective_by_hand():
    log_r = [[0.1, -0.3, 0.05], [0.02, 0.04, 9.0]]  # the padded 9.0 is ignored
    lp = _lp(log_r)
    s0, s1 = math.exp((0.1 - 0.3 + 0.05) / 3), math.exp((0.02 + 0.04) / 2)
    assert torch.allclose(sequence_ratio(lp, OLD, MASK.bool()),
                          torch.tensor([s0, s1], dtype=torch.float64))
    loss, m = policy_loss(lp, OLD, ADV, MASK, loss="gspo", clip_low=0.5, clip_high=0.5,
                          agg="seq_mean")
    # unclipped (s within [0.5, 1.5]): per sequence s_i * A_i, mean over the two sequences
    assert loss.item() == pytest.approx(-(s0 * 1.0 + s1 * -2.0) / 2)
    loss.backward()
    # d/d lp_it of -(1/2) s_i A_i = -(1/2) A_i s_i / n_i on row i's kept tokens
    expected = torch.tensor([[-s0 / 3 / 2] * 3, [2.0 * s1 / 2 / 2] * 2 + [0.0]],
                            dtype=torch.float64)
    assert torch.allclose(lp.grad, expected)
    assert m["ratio_max"] == pytest.approx(max(s0, s1))


def test_gspo_clips_the_whole_sequence():
    lp = _lp([[0.3, 0.3, 0.3], [0.0, 0.0, 0.0]])  # s_0 = e^0.3 = 1.35 > 1 + 4e-4, A_0 > 0
    low, high = loss_clip_defaults("gspo")
    loss, m = policy_loss(lp, OLD, ADV, MASK, loss="gspo", clip_low=low, clip_high=high)
    loss.backward()
    assert torch.all(lp.grad[0] == 0) and torch.all(lp.grad[1, :2] != 0)
    assert m["clip_frac_high"] == pytest.approx(3 / 5)


def test_gspo_and_gspo_token_are_grpo_for_one_token_completions():
    old, mask = OLD[:, :1], torch.ones(2, 1)
    results = {}
    for loss_name in ("grpo", "gspo", "gspo_token"):
        lp = (old + torch.tensor([[0.1], [-0.3]], dtype=torch.float64)).requires_grad_(True)
        loss, _ = policy_loss(lp, old, ADV, mask, loss=loss_name, clip_low=0.2, clip_high=0.2)
        loss.backward()
        results[loss_name] = (loss.item(), lp.grad.clone())
    for name in ("gspo", "gspo_token"):
        assert results[name][0] == pytest.approx(results["grpo"][0])
        assert torch.allclose(results[name][1], results["grpo"][1])


def test_gspo_token_equals_gspo_for_sequence_advantages_and_takes_token_weights():
    log_r = [[0.1, -0.3, 0.05], [0.02, 0.04, 0.0]]
    out = {}
    for loss_name in ("gspo", "gspo_token"):
        lp = _lp(log_r)
        loss, _ = policy_loss(lp, OLD, ADV, MASK, loss=loss_name, clip_low=0.5, clip_high=0.5)
        loss.backward()
        out[loss_name] = (loss.item(), lp.grad.clone())
    assert out["gspo_token"][0] == pytest.approx(out["gspo"][0])
    assert torch.allclose(out["gspo_token"][1], out["gspo"][1])
    weights = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    lp = _lp(log_r)
    loss, _ = policy_loss(lp, OLD, ADV, MASK, loss="gspo_token", clip_low=0.5, clip_high=0.5,
                          token_weights=weights)
    loss.backward()
    assert lp.grad[0, 1] == 0 and lp.grad[0, 0] != 0  # a weight of 0 silences its token
    with pytest.raises(ValueError, match="gspo_token"):
        policy_loss(_lp(log_r), OLD, ADV, MASK, loss="gspo", token_weights=weights)
    with pytest.raises(ValueError, match="one advantage per sequence"):
        policy_loss(_lp(log_r), OLD, torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]]), MASK,
                    loss="gspo")


def test_cispo_clips_the_weight_not_the_gradient():
    log_r = [[math.log(2.0), 0.0, math.log(0.5)], [0.0, math.log(3.0), 0.0]]
    lp = _lp(log_r)
    low, high = loss_clip_defaults("cispo")
    assert (low, high) == (1.0, 0.28)
    loss, m = policy_loss(lp, OLD, ADV, MASK, loss="cispo", clip_low=low, clip_high=high)
    loss.backward()
    # d loss / d lp = -sg(clip(r, 0, 1.28)) * A / N, N = 5 tokens (token_mean)
    w = torch.tensor([[1.28, 1.0, 0.5], [1.0, 1.28, 0.0]], dtype=torch.float64)
    expected = -w * ADV[:, None] / 5 * MASK
    assert torch.allclose(lp.grad, expected)
    # GRPO would cut the clipped tokens' gradients (r=2 with A>0; r=3 with A<0 is unclipped
    # from below in GRPO's min, so compare only the first)
    lp2 = _lp(log_r)
    grpo, _ = policy_loss(lp2, OLD, ADV, MASK, clip_low=0.2, clip_high=0.28)
    grpo.backward()
    assert lp2.grad[0, 0] == 0 and lp.grad[0, 0] != 0
    assert m["clip_frac_high"] == pytest.approx(2 / 5)


def test_entropy_bonus_by_hand_and_its_gradient():
    lp = _lp([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 7.0]], dtype=torch.float64,
                           requires_grad=True)
    base, _ = policy_loss(lp, OLD, ADV, MASK, entropy=entropy.detach())
    loss, m = policy_loss(lp, OLD, ADV, MASK, entropy=entropy, entropy_coef=0.1)
    assert loss.item() == pytest.approx(base.item() - 0.1 * (1 + 2 + 3 + 0.5 + 0.5) / 5)
    loss.backward()
    assert torch.allclose(entropy.grad, -0.1 * MASK.double() / 5)
    assert m["entropy"] == pytest.approx(7 / 5)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(_lp([[0.0] * 3] * 2), OLD, ADV, MASK, entropy_coef=0.1)


def test_a_micro_batch_without_tokens_gives_zero_loss_and_gradient():
    lp = _lp([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    loss, m = policy_loss(lp, OLD, ADV, torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0 and torch.all(lp.grad == 0) and m["tokens"] == 0
    assert m["ratio_min"] == math.inf and m["ratio_max"] == -math.inf  # min/max identities


def test_collate_masks_truncated_completions_only_when_asked():
    from medrl.align.batch import collate
    from medrl.align.records import Sample

    samples = [Sample(uid=f"s{i}", group_id="g", prompt_ids=[5, 6], completion_ids=[7, 8, 9],
                      advantage=1.0, finish_reason=reason)
               for i, reason in enumerate(["stop", "length"])]
    plain = collate(samples, pad_token_id=0)
    masked = collate(samples, pad_token_id=0, mask_truncated=True)
    assert plain.completion_mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert masked.completion_mask.tolist() == [[1, 1, 1], [0, 0, 0]]


@pytest.mark.parametrize("loss, overrides, expected", [
    ("grpo", [], (0.2, 0.2)),
    ("gspo", [], (3e-4, 4e-4)),
    ("cispo", [], (1.0, 0.28)),
    ("gspo", ["algorithm.clip_high=0.001"], (3e-4, 0.001)),  # a value set is kept
])
def test_recipe_resolves_each_losss_clip_defaults(loss, overrides, expected):
    from medrl.launch.recipe import load_recipe
    from tests.conftest import REPO

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"algorithm.loss={loss}",
                                                                *overrides])
    assert (recipe.algorithm.clip_low, recipe.algorithm.clip_high) == expected


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.clip_low=1"], "no floor"),
    (["algorithm.mask_truncated=true", "algorithm.loss_agg=seq_mean"], "token_mean"),
    (["algorithm.entropy_coef=-1"], "entropy_coef"),
])
def test_recipe_refuses_variant_settings_that_cannot_work(overrides, message):
    from medrl.launch.recipe import RecipeError, load_recipe
    from tests.conftest import REPO

    with pytest.raises(RecipeError, match=message):
        load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)


def test_learner_trains_with_a_variant_and_leaves_truncated_rows_out(make_learner):
    from learner_samples import make_samples

    learner = make_learner(zero_stage=2, loss="cispo", clip_low=1.0, clip_high=0.28,
                           entropy_coef=0.01, mask_truncated=True)
    samples = make_samples(4, advantages=[1.0, -1.0, 1.0, -1.0])
    samples[3].finish_reason = "length"
    metrics = learner.train_step(learner.collate(samples))
    kept = sum(len(s.completion_ids) for s in samples[:3])
    assert metrics["tokens"] == kept and math.isfinite(metrics["loss"])
    assert metrics["entropy"] > 0


def test_token_budget_split_and_trim():
    """Consecutive rows while rows x (longest prompt + longest completion) fits the budget;
    each micro-batch keeps only its own widths, its log-prob columns unchanged."""
    from medrl.align.batch import collate
    from medrl.align.records import Sample

    lengths = [(3, 2), (3, 2), (8, 6), (2, 1), (2, 1), (2, 1)]  # (prompt, completion)
    samples = [Sample(uid=f"s{i}", group_id="g", prompt_ids=list(range(10, 10 + p)),
                      completion_ids=list(range(50, 50 + c)), advantage=1.0,
                      rollout_logprobs=[-0.1 * (j + 1) for j in range(c)])
               for i, (p, c) in enumerate(lengths)]
    batch = collate(samples, pad_token_id=0)
    assert tuple(batch.input_ids.shape) == (6, 8 + 6)
    parts = batch.split(micro_batch_size=99, max_tokens=15)
    # [s0 s1]: 2 x 5 = 10; + s2 would be 3 x 14. [s2] alone (14). [s3 s4 s5]: 3 x 3 = 9.
    assert [mb.size for mb in parts] == [2, 1, 3]
    assert [tuple(mb.input_ids.shape) for mb in parts] == [(2, 5), (1, 14), (3, 3)]
    assert torch.allclose(parts[0].rollout_logprobs, torch.tensor([[-0.1, -0.2]] * 2))
    assert parts[2].input_ids.tolist() == [[10, 11, 50]] * 3
    by_rows = batch.split(micro_batch_size=4)
    assert [tuple(mb.input_ids.shape) for mb in by_rows] == [(4, 14), (2, 3)]
