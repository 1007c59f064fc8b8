"""The DeepSpeed learner on one rank (real DeepSpeed over gloo, tiny Qwen2 / Qwen2-VL)."""

from __future__ import annotations

import math

import pytest
import torch

from medrl.align.batch import collate
from medrl.align.records import Sample, UserError
from medrl.align.reference import Reference, reference_placement
from learner_samples import make_samples


def full_weights(learner, bucket_mb: float = 256) -> dict[str, torch.Tensor]:
    return {name: t for bucket in learner.state_dict_for_sync(bucket_mb=bucket_mb)
            for name, t in bucket}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_collate_pads_prompts_left_completions_right():
    samples = make_samples(3)
    samples[0].rollout_logprobs = [-1.0, -2.0]
    samples[1].rollout_logprobs = [-0.5] * 4
    samples[2].rollout_logprobs = [-0.25] * 6
    samples[1].token_weights = {"a": [1.0, 0.5, 1.0, 0.0], "b": [2.0, 2.0, 1.0, 1.0]}
    batch = collate(samples, pad_token_id=7)
    assert batch.input_ids.shape == (3, 5 + 6) and batch.completion_mask.shape == (3, 6)
    # Sample 0: prompt of 3 ends at column P=5, completion of 2 starts there.
    assert batch.input_ids[0, :2].tolist() == [7, 7]
    assert batch.input_ids[0, 2:5].tolist() == samples[0].prompt_ids
    assert batch.input_ids[0, 5:7].tolist() == samples[0].completion_ids
    assert batch.input_ids[0, 7:].tolist() == [7] * 4
    assert batch.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert batch.completion_mask.sum(1).tolist() == [2, 4, 6]
    assert batch.rollout_logprobs[0].tolist() == [-1.0, -2.0, 0, 0, 0, 0]
    assert batch.old_logprobs is None  # the learner step decides pi_old
    assert batch.advantages.tolist() == [1.0, -0.5, 1.0]
    # Weights: product of every reward's list for sample 1, ones for the others (on tokens).
    assert batch.token_weights[1, :4].tolist() == [2.0, 1.0, 1.0, 0.0]
    assert batch.token_weights[0].tolist() == [1.0, 1.0, 0, 0, 0, 0]
    parts = batch.split(2)
    assert [p.size for p in parts] == [2, 1]
    assert torch.equal(parts[1].input_ids, batch.input_ids[2:])

    samples[2].token_advantages = [0.1] * 6
    per_token = collate(samples, pad_token_id=7)
    assert per_token.advantages is None and per_token.token_advantages.shape == (3, 6)
    assert per_token.token_advantages[0, :2].tolist() == [1.0, 1.0]

    samples[0].rollout_logprobs = [-1.0]
    with pytest.raises(UserError, match="s0.*1 rollout_logprobs for 2"):
        collate(samples, pad_token_id=7)


def test_train_step_raises_the_likelihood_of_rewarded_completions(make_learner):
    learner = make_learner(zero_stage=2, clip_high=10.0)
    batch = learner.collate(make_samples(4, advantages=[1.0, 1.0, 1.0, 1.0]))
    batch.old_logprobs = learner.logprobs(batch)  # held fixed, like rollout log-probs
    before = (batch.old_logprobs * batch.completion_mask).sum()
    losses = [learner.train_step(batch)["loss"] for _ in range(3)]
    after = (learner.logprobs(batch) * batch.completion_mask).sum()
    assert losses[0] == pytest.approx(-1.0, abs=1e-6)  # ratio 1 at the start
    assert losses[2] < losses[1] < losses[0]
    assert after > before
    metrics = learner.train_step(batch, ppo_epochs=2)  # one optimiser step per epoch
    assert learner.engine.global_steps == 5 and metrics["ratio_max"] > 1.0


MAX_LEN = 16  # the run's maximum completion length: above every test completion's


def _plain_torch_step(model_dir, samples, lr, max_grad_norm, pad_token_id, agg):
    """The reference update: HF model + torch AdamW, one pass over the whole batch."""
    from medrl.align.grpo import policy_loss
    from medrl.align.logprobs import token_logprobs
    from medrl.align.models import load_model

    model = load_model(model_dir)
    batch = collate(samples, pad_token_id=pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask,
                        num_completion_tokens=batch.num_completion_tokens, share_prompt=False)
    loss, _ = policy_loss(lp, lp.detach(), batch.advantages, batch.completion_mask, agg=agg,
                          max_completion_length=MAX_LEN)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}, float(norm), loss.item()


@pytest.mark.parametrize("zero_stage,micro_batch_size,agg,max_tokens", [
    (2, 1, "token_mean", None), (3, 3, "token_mean", None), (2, 2, "seq_mean", None),
    (1, 2, "seq_sum_norm", None),
    # token budgets: micro-batches of unequal row counts, each trimmed to its own widths
    (2, 4, "token_mean", 40), (3, 4, "seq_mean", 30)])
def test_micro_batches_give_the_update_of_one_big_batch(make_learner, tiny_qwen2, zero_stage,
                                                        micro_batch_size, agg, max_tokens):
    # 5 samples of different lengths in micro-batches of 1 (ZeRO-2) or 3 + 2 (ZeRO-3) must
    # equal one AdamW step on the whole batch in plain PyTorch. Adam divides by sqrt(v), so
    # float rounding in the accumulated gradients shows up at ~1e-6 in the weights; the
    # tolerance 2e-5 is 20x below one lr-sized (1e-4) update.
    samples = make_samples(5)
    learner = make_learner(zero_stage=zero_stage, micro_batch_size=micro_batch_size, lr=1e-4,
                           lr_schedule="constant", loss_agg=agg, max_completion_length=MAX_LEN,
                           max_tokens_per_micro_batch=max_tokens)
    expected, norm, loss = _plain_torch_step(tiny_qwen2, samples, lr=1e-4, max_grad_norm=1.0,
                                             pad_token_id=learner.pad_token_id, agg=agg)
    batch = learner.collate(samples)
    if max_tokens:
        parts = batch.split(micro_batch_size, max_tokens)
        assert len({mb.size for mb in parts}) > 1  # really a split by tokens, not by rows
        assert all(mb.attention_mask.numel() <= max_tokens or mb.size == 1 for mb in parts)
    metrics = learner.train_step(batch)
    assert metrics["loss"] == pytest.approx(loss, abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert metrics["tokens"] == sum(len(s.completion_ids) for s in samples)
    assert max_diff(full_weights(learner), expected) < 2e-5


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_shared_prompts_give_the_update_of_unshared_passes(make_learner, tiny_qwen2, zero_stage):
    # Two prompts x 3 completions, groups interleaved and split across micro-batches (4 + 2):
    # the learner runs each prompt of a micro-batch once; the update must equal plain
    # PyTorch running every row in full.
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 1000, (n,), generator=g).tolist() for n in (9, 4)]
    samples = [Sample(uid=f"s{i}", group_id=f"g{i % 2}", prompt_ids=prompts[i % 2],
                      completion_ids=torch.randint(100, 1000, (2 + i,), generator=g).tolist(),
                      advantage=(-1.0) ** i * (0.5 + 0.1 * i)) for i in range(6)]
    learner = make_learner(zero_stage=zero_stage, micro_batch_size=4, lr=1e-4,
                           lr_schedule="constant")
    expected, norm, loss = _plain_torch_step(tiny_qwen2, samples, lr=1e-4, max_grad_norm=1.0,
                                             pad_token_id=learner.pad_token_id, agg="token_mean")
    metrics = learner.train_step(learner.collate(samples))
    assert metrics["loss"] == pytest.approx(loss, abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert max_diff(full_weights(learner), expected) < 2e-5


def test_sync_weights_are_the_full_model_and_load_into_hf(make_learner, tiny_qwen2):
    from transformers import AutoModelForCausalLM

    learner = make_learner(zero_stage=2)
    batch = learner.collate(make_samples(3))
    learner.train_step(batch)
    buckets = list(learner.state_dict_for_sync(bucket_mb=0.3))  # the model is ~0.8 MB
    assert len(buckets) > 2
    synced = {name: t for bucket in buckets for name, t in bucket}
    own = learner.model.state_dict()
    assert set(own) - set(synced) == {"lm_head.weight"}  # tied to the embeddings
    assert all(torch.equal(synced[k], own[k]) for k in synced)

    fresh = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    missing, unexpected = fresh.load_state_dict(synced, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    from medrl.align.logprobs import token_logprobs

    with torch.no_grad():
        lp = token_logprobs(fresh, batch.input_ids, batch.attention_mask,
                            num_completion_tokens=batch.num_completion_tokens)
    assert torch.allclose(lp, learner.logprobs(batch), atol=1e-5)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_save_then_load_continues_exactly(make_learner, tmp_path, monkeypatch, zero_stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(zero_stage=zero_stage, micro_batch_size=2, kl_coef=0.1, warmup_steps=2,
                  total_steps=6, reference=Reference.BESIDE)
    first = make_learner(**kwargs)
    batch = first.collate(make_samples(3))
    m1 = first.train_step(batch)
    assert m1["kl"] == pytest.approx(0.0, abs=1e-7)  # reference == policy so far
    first.save(tmp_path / "ckpt")
    m2 = first.train_step(batch)
    assert m2["kl"] > 0 and m2["lr"] > m1["lr"]  # frozen reference; warm-up advances
    w2 = full_weights(first)

    resumed = make_learner(**kwargs)
    loads = []
    real_load = torch.load

    def spy_load(*args, **kw):  # every read of the DeepSpeed files must be weights-only
        loads.append(kw.get("weights_only"))
        return real_load(*args, **kw)

    monkeypatch.setattr(torch, "load", spy_load)
    resumed.load(tmp_path / "ckpt")
    monkeypatch.undo()
    assert loads and all(w is True for w in loads)
    r2 = resumed.train_step(resumed.collate(make_samples(3)))
    assert r2 == m2
    assert max_diff(full_weights(resumed), w2) == 0.0

    policy = tmp_path / "ckpt" / "policy"
    model = AutoModelForCausalLM.from_pretrained(policy)
    assert AutoTokenizer.from_pretrained(policy).pad_token == "<|endoftext|>"
    assert (tmp_path / "ckpt" / "learner" / "learner.json").is_file()
    assert not list(policy.glob("*.bin"))


def test_lora_merges_for_sync_and_uses_base_as_reference(make_learner, tiny_qwen2, tmp_path):
    from medrl.align.logprobs import token_logprobs
    from medrl.align.models import load_model

    lora = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    placement = reference_placement("auto", kl_coef=0.1, lora=True)
    learner = make_learner(zero_stage=2, kl_coef=0.1, lr=1e-2, lora=lora, reference=placement)
    assert learner.reference is Reference.ADAPTERS and learner.ref_model is None
    base = load_model(tiny_qwen2)
    batch = learner.collate(make_samples(3))
    before = full_weights(learner)
    learner.train_step(batch)
    metrics = learner.train_step(batch)
    after = full_weights(learner)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1)
                       for p in ("q_proj", "v_proj")}
    assert torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                       base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert metrics["kl"] > 0
    with torch.no_grad():
        base_lp = token_logprobs(base, batch.input_ids, batch.attention_mask,
                                 num_completion_tokens=batch.num_completion_tokens)
    assert torch.allclose(learner.ref_logprobs(batch), base_lp, atol=1e-5)
    assert not torch.allclose(learner.logprobs(batch), base_lp, atol=1e-4)

    learner.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "policy").state_dict()
    assert all(torch.equal(saved[k], after[k]) for k in after)


def test_vlm_collate_and_train_step(make_learner, tiny_qwen2_vl):
    from PIL import Image

    from medrl.align.models import load_tokenizer

    processor = load_tokenizer(tiny_qwen2_vl)
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": "Lesion?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = processor(text=[text], images=[image], return_tensors="pt")
    prompt_ids = encoded["input_ids"][0].tolist()
    samples = [Sample(uid="img", group_id="g", images=[image], prompt_ids=prompt_ids,
                      completion_ids=[300, 301, 302], advantage=1.0),
               Sample(uid="txt", group_id="g", prompt_ids=[200, 201, 202],
                      completion_ids=[400, 401], advantage=-1.0)]
    learner = make_learner(tiny_qwen2_vl, zero_stage=2, micro_batch_size=1)
    batch = learner.collate(samples)
    patches = int(batch.image_grid_thw.prod())
    assert batch.pixel_values.shape[0] == patches and batch.num_images.tolist() == [1, 0]
    assert int(batch.mm_token_type_ids[0].sum()) == patches // 4  # 2x2 patches per token
    assert int(batch.mm_token_type_ids[1].sum()) == 0
    first, second = batch.split(1)
    assert first.pixel_values.shape[0] == patches and second.pixel_values is None

    vision = {k: v.clone() for k, v in full_weights(learner).items() if "visual" in k}
    assert vision
    metrics = learner.train_step(batch)
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    after = full_weights(learner)
    assert any(not torch.equal(after[k], v) for k, v in vision.items())

    samples[0].prompt_ids = prompt_ids[:5] + prompt_ids[7:]  # two image tokens lost
    with pytest.raises(UserError, match="img: prompt_ids hold"):
        learner.collate(samples)
