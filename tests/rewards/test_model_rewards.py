"""Model-based rewards: the policy log-prob hook, reward actors, Ray task pools, and the
sequence-classifier reward model, all with tiny real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medrl.align.records import Sample
from medrl.rewards import RewardContext, RewardRunner, hash_folder, load_rewards

HERE = Path(__file__).parent


def hf_policy_logprobs(model_dir):
    """``samples -> list[list[float]]``: log p(completion token | prompt, earlier tokens)."""
    import torch

    from medrl.align.models import load_model

    model = load_model(model_dir).eval()

    def policy_logprobs(samples):
        out = []
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [T-1, V]
            per_token = logp.gather(-1, ids[0, 1:, None])[:, 0]  # [T-1]
            out.append(per_token[len(s.prompt_ids) - 1:].tolist())
        return out

    return policy_logprobs, model


def chat_sample(tokenizer, uid, question, answer):
    messages = [{"role": "user", "content": question}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    completion_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return Sample(uid=uid, group_id="g", messages=messages, prompt_ids=list(prompt_ids),
                  completion_ids=completion_ids, completion_text=answer)


def test_counterfactual_reward_through_policy_logprobs_hook(tiny_qwen2):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    hook, model = hf_policy_logprobs(tiny_qwen2)
    samples = [chat_sample(tokenizer, "g/0", "Chest pain radiating to the left arm?", "B) MI"),
               chat_sample(tokenizer, "g/1", "Fever and a stiff neck?", "Meningitis.")]
    # the hook is what the model says: its sum equals the HF loss on the completion tokens
    lp = hook(samples[:1])[0]
    ids = torch.tensor([samples[0].prompt_ids + samples[0].completion_ids])
    labels = ids.clone()
    labels[0, :len(samples[0].prompt_ids)] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    assert len(lp) == len(samples[0].completion_ids)
    assert sum(lp) / len(lp) == pytest.approx(-loss.item(), rel=1e-5)

    ctx = RewardContext(policy_logprobs=hook, seed=0)
    masked, unchanged = (RewardRunner(load_rewards(
        [{"name": "plugins.py:PromptSupport", "kwargs": {"start": a, "stop": b}}],
        base_dir=HERE), ctx=ctx) for a, b in ((3, 12), (5, 5)))
    masked.score(samples)
    scores = [s.rewards["PromptSupport"] for s in samples]
    weights = [s.token_weights["PromptSupport"] for s in samples]
    assert all(s != 0.0 for s in scores)  # masking part of the prompt moves the log-probs
    assert [len(w) for w in weights] == [len(s.completion_ids) for s in samples]
    assert any(w > 1.0 for w in weights[0])
    unchanged.score(samples)  # an empty span changes nothing: exactly zero, weights all 1
    assert [s.rewards["PromptSupport"] for s in samples] == [0.0, 0.0]
    assert all(w == 1.0 for s in samples for w in s.token_weights["PromptSupport"])


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A random 2-label Qwen2ForSequenceClassification with the bundled tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from medrl.align.models import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         num_labels=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("rm") / "tiny_rm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def classifier_samples():
    texts = [("Is aspirin an antiplatelet drug?", "Yes."),
             ("Name a loop diuretic.", "Furosemide, which acts on the thick ascending limb."),
             ("First-line drug for anaphylaxis?", "<answer>Epinephrine</answer>")]
    return [Sample(uid=f"g/{i}", group_id="g", messages=[{"role": "user", "content": q}],
                   completion_text=a) for i, (q, a) in enumerate(texts)]


def expected_classifier_scores(folder, samples):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for s in samples:  # one at a time: no padding, so this also checks the padded batch
        text = tok.apply_chat_template(s.messages + [{"role": "assistant",
                                                      "content": s.completion_text}],
                                       tokenize=False)
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits[0]
        out.append(logits.softmax(-1)[1].item())
    return out


@pytest.mark.slow
def test_sequence_classifier_in_an_actor(ray_local, tiny_classifier):
    base = tiny_classifier.parent
    runner = RewardRunner.from_config(
        {"functions": [{"name": "sequence_classifier", "actor": True, "num_cpus": 1,
                        "kwargs": {"model": tiny_classifier.name, "batch_size": 2}},
                       {"name": f"{HERE}/plugins.py:CountingSetup", "actor": True, "num_cpus": 0.5}]},
        base_dir=base, ctx=RewardContext(base_dir=base, device="cpu"))
    try:
        samples = classifier_samples()
        runner.score(samples)
        want = expected_classifier_scores(tiny_classifier, classifier_samples())
        assert [s.rewards["sequence_classifier"] for s in samples] == pytest.approx(want, abs=1e-5)
        assert len(set(round(w, 6) for w in want)) == 3  # the model really tells them apart
        again = classifier_samples()
        runner.score(again)  # second step: same actors, no second setup
        infos = [s.reward_info["CountingSetup"] for s in samples + again]
        assert {i["setups"] for i in infos} == {1}
        assert {i["pid"] for i in infos} != {os.getpid()} and len({i["pid"] for i in infos}) == 1
        ident = {i["name"]: i for i in runner.identities()}["sequence_classifier"]
        assert ident["model_sha256"] == hash_folder(tiny_classifier)
    finally:
        runner.close()


@pytest.mark.slow
def test_task_pool_and_actor_failures(ray_local):
    pool = RewardRunner(load_rewards([{"name": "plugins.py:where_am_i", "num_cpus": 0.5},
                                      {"name": "plugins.py:ok_or_boom", "num_cpus": 0.5}],
                                     base_dir=HERE), task_pool=2, on_error="skip_sample")
    samples = [Sample(uid=f"g/{i}", group_id="g", row={"boom": i == 3}) for i in range(4)]
    report = pool.score(samples)
    assert {s.reward_info["where_am_i"]["pid"] for s in report.samples}.isdisjoint({os.getpid()})
    assert report.dropped == ["g/3"]
    assert [f.message for f in report.failures] == [
        "reward 'ok_or_boom' failed on sample 'g/3': raised ValueError: bad row. Fix the "
        "reward, or set rewards.on_error: skip_sample to drop such samples and go on."]

    slow = RewardRunner(load_rewards([{"name": "plugins.py:SleepyBatch", "actor": True,
                                       "num_cpus": 0.5, "timeout_s": 0.5,
                                       "kwargs": {"seconds": 5.0}}], base_dir=HERE),
                        on_error="skip_sample")
    try:
        first = slow.score([Sample(uid="a/0", group_id="a", row={"sleep": True}),
                            Sample(uid="a/1", group_id="a")])
        assert first.dropped == ["a/0", "a/1"]  # a batch call that times out loses the batch
        assert first.metrics["rewards/SleepyBatch/errors"] == 2.0
        assert first.failures[0].message.startswith(
            "reward 'SleepyBatch' failed on sample 'a/0': exceeded its timeout of 0.5 s.")
        second = slow.score([Sample(uid="b/0", group_id="b")])  # a fresh actor carries on
        assert second.dropped == [] and second.samples[0].reward == 1.0
    finally:
        slow.close()
