"""Rollouts with Hugging Face ``generate``: small machines, CPU runs, and VLMs without vLLM.

Conventions (what ``completion_ids``, ``rollout_logprobs`` and ``finish_reason`` mean) are
those of :mod:`medrl.rollouts.engine`. Stopping is decided by one stopping criterion that
records, per row, the step at which the row finished (eos, or a stop string once
``min_new_tokens`` tokens exist); the completion is cut there, so tokens ``generate`` pads
finished rows with never leak into a completion, even when the pad id was also sampled.

Sampling is exactly what :class:`~medrl.rollouts.engine.SamplingParams` says: the model's own
``generation_config`` (a repetition penalty, ``min_p``, an n-gram block...) is replaced by a
neutral one at load, and temperature / top-k / top-p are logits processors this module
passes itself, ahead of the one that records each drawn token's log-prob. ``generate`` never
keeps every step's full-vocabulary scores (``output_scores``): only the current step's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medrl.align.models import (load_model, load_tokenizer, resolve_dtype,
                                text_embedded_completions)
from medrl.align.records import Sample
from medrl.align.encode import EncodedBatch, encode_batch, end_of_turn_id, text_tokenizer
from medrl.rollouts.engine import (SamplingParams, WeightSyncError, check_context,
                                   check_weight_names, finished_sample)


class _FinishTracker:
    """A ``StoppingCriteria`` that remembers when each row finished.

    ``finished_at[row]`` is the number of generated tokens (the ending token included) when
    row ``row`` met eos or a stop string, or ``None`` while it runs.
    """

    def __init__(self, tokenizer, prompt_len: int, rows: int, eos_ids: set[int],
                 stop: Sequence[str], min_new_tokens: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.eos_ids = eos_ids
        self.stop = list(stop)
        self.min_new_tokens = min_new_tokens
        self.finished_at: list[int | None] = [None] * rows

    def _hits_stop_string(self, generated: list[int]) -> bool:
        # Like vLLM, stop strings count only in text produced after min_new_tokens tokens.
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        start = (len(self.tokenizer.decode(generated[:self.min_new_tokens],
                                           skip_special_tokens=True))
                 if self.min_new_tokens else 0)
        return any(s in text[start:] for s in self.stop)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        generated = input_ids[:, self.prompt_len:]
        steps = generated.shape[1]
        for row, done in enumerate(self.finished_at):
            if done is not None:
                continue
            last = int(generated[row, -1])
            if last in self.eos_ids or (
                    self.stop and steps > self.min_new_tokens
                    and self._hits_stop_string(generated[row].tolist())):
                self.finished_at[row] = steps
        return torch.tensor([d is not None for d in self.finished_at], dtype=torch.bool,
                            device=input_ids.device)


class _DrawnLogprobs:
    """A logits processor run after every other one: it keeps the current step's processed
    scores ``[rows, vocab]`` and, once the next step shows which token was drawn from them,
    keeps only that token's log-prob.

    ``generate``'s own ``output_scores`` keeps every step's scores instead: float32
    ``[rows, vocab]`` per step, about 40 GB at 64 rows x 1,024 tokens x a 152k vocabulary.
    """

    def __init__(self):
        self._scores = None  # [rows, vocab] float32, the last step's processed scores
        self._logz = None  # [rows], their log-sum-exp
        self._steps = []  # one [rows] tensor per generated token

    def _keep(self, drawn):
        self._steps.append(self._scores.gather(1, drawn[:, None]).squeeze(1) - self._logz)

    def __call__(self, input_ids, scores):
        import torch

        if self._scores is not None:  # input_ids now ends with the token drawn last step
            self._keep(input_ids[:, -1])
        self._scores, self._logz = scores, torch.logsumexp(scores, dim=-1)
        return scores

    def finish(self, sequences):
        """``[rows, steps]`` log-probs of the drawn tokens, given ``generate``'s output
        ``sequences`` (whose last column is the final step's token)."""
        import torch

        if self._scores is not None:
            self._keep(sequences[:, -1])
            self._scores = self._logz = None
        return torch.stack(self._steps, dim=1)


def _warpers(sampling: SamplingParams) -> list:
    """Temperature, then top-k, then top-p (vLLM's order); none for greedy decoding, whose
    log-probs are at temperature 1 (the conventions of :mod:`medrl.rollouts.engine`)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if sampling.temperature == 0:
        return []
    out = [] if sampling.temperature == 1.0 else [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k != -1:
        out.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=sampling.top_p))
    return out


class HFEngine:
    """A rollout engine around a Hugging Face model in this process.

    ``model_dir``: a local Hugging Face folder (text or vision-language model).
    ``dtype``: a ``model.dtype`` name or ``torch.dtype`` ("auto": bf16 on GPU, fp32 on CPU);
    ``seed``: base seed for calls whose ``SamplingParams.seed`` is None; ``num_threads``: torch
    intra-op threads (None: leave); ``max_model_len``: prompt + completion tokens a call may
    need (None: unchecked); ``attn_implementation``: the model's attention kernel.
    """

    supports_sleep = False

    def __init__(self, model_dir: str | Path, *, dtype: Any = "float32", seed: int = 0,
                 num_threads: int | None = None, max_model_len: int | None = None,
                 attn_implementation: str = "sdpa"):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_dir = Path(model_dir)
        self.dtype = resolve_dtype(dtype, on_gpu=torch.cuda.is_available())
        model = load_model(self.model_dir, dtype=self.dtype,
                           attn_implementation=attn_implementation).eval()
        self._setup(model, load_tokenizer(self.model_dir), seed=seed, max_model_len=max_model_len)
        # The model's sampling defaults would otherwise fill every field a call leaves unset
        # (the driver notes them: medrl.launch.driver.sampling_note).
        self.model.generation_config = self.neutral_config

    @classmethod
    def around(cls, model, processor, *, seed: int = 0,
               max_model_len: int | None = None) -> "HFEngine":
        """An engine on a model already in memory (an sft learner's, between its steps): no
        second copy is loaded. The model's own ``generation_config`` (saved with its
        checkpoints) is only swapped for the neutral one during each ``generate`` call; the
        caller chooses the model's train/eval mode."""
        engine = cls.__new__(cls)
        engine.model_dir = None
        engine.dtype = next(model.parameters()).dtype
        engine._setup(model, processor, seed=seed, max_model_len=max_model_len)
        return engine

    def _setup(self, model, processor, *, seed: int, max_model_len: int | None) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.processor = processor  # a processor for VLMs
        self.tokenizer = text_tokenizer(processor)
        self.is_vision = "vision_config" in model.config.to_dict()
        self.max_model_len = max_model_len
        self.seed = seed
        self._calls = 0
        self.policy_version = 0
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None
                                                 else self.tokenizer.eos_token_id]
        # The chat template's end of turn ends completions too: SFT taught the model to end
        # its answers with it, and it is not always among the eos ids the model lists.
        self.eos_ids = {int(e) for e in eos} | {end_of_turn_id(self.processor)}
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else min(self.eos_ids))
        self.neutral_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)

    # -- generation ---------------------------------------------------------------------

    def generate(self, prompts: list[Sample], sampling: SamplingParams) -> list[Sample]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        if not prompts:
            return []
        # One row per completion (prompt-major): images repeat with their prompt, and greedy
        # decoding works for n > 1 too (generate's num_return_sequences refuses it).
        batch = encode_batch(self.processor, [p for p in prompts for _ in range(sampling.n)])
        check_context(prompts, batch.prompt_ids[::sampling.n], sampling.max_new_tokens,
                      self.max_model_len)
        prompt_len = batch.inputs["input_ids"].shape[1]
        rows = len(prompts) * sampling.n
        tracker = _FinishTracker(self.tokenizer, prompt_len, rows, self.eos_ids, sampling.stop,
                                 sampling.min_new_tokens)
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
            do_sample=not greedy, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            # Neutral values switch generate's own processors off (None would mean top_k 50);
            # ours below are explicit, so both engines draw from the same distribution.
            temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, return_dict_in_generate=False)
        drawn = _DrawnLogprobs()
        processors = LogitsProcessorList(_warpers(sampling) + [drawn])
        seed = sampling.seed if sampling.seed is not None else self.seed + self._calls
        self._calls += 1
        # generate fills what a call leaves unset from the model's generation_config: the
        # neutral one, for this call (a wrapped PEFT model keeps it on its base model)
        owner = self.model.get_base_model() if hasattr(self.model, "get_base_model") \
            else self.model
        saved, owner.generation_config = owner.generation_config, self.neutral_config
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                sequences = self.model.generate(**batch.inputs, generation_config=config,
                                                logits_processor=processors,
                                                stopping_criteria=StoppingCriteriaList([tracker]))
        finally:
            owner.generation_config = saved
        generated = sequences[:, prompt_len:]
        logprobs = drawn.finish(sequences)  # [rows, steps], under the sampling distribution

        samples = []
        for row in range(rows):
            prompt_index, index = divmod(row, sampling.n)
            end = tracker.finished_at[row]
            reason = "stop"
            if end is None:
                end, reason = generated.shape[1], "length"
                if end != sampling.max_new_tokens:
                    raise RuntimeError(f"row {row} unfinished after {end} of "
                                       f"{sampling.max_new_tokens} tokens")
            samples.append(finished_sample(
                prompts[prompt_index], index, prompt_ids=batch.prompt_ids[row],
                completion_ids=generated[row, :end].tolist(),
                logprobs=logprobs[row, :end].tolist(), finish_reason=reason,
                tokenizer=self.tokenizer, policy_version=self.policy_version))
        return samples

    # -- scoring ------------------------------------------------------------------------

    def _encode_for_scoring(self, sample: Sample) -> EncodedBatch:
        if self.is_vision:  # pixel tensors come from re-encoding the prompt
            enc = encode_batch(self.processor, [sample])
            if enc.prompt_ids[0] != list(sample.prompt_ids):
                raise WeightSyncError(f"sample {sample.uid}: re-encoding its prompt gives "
                                      "different ids than the rollout recorded")
            return enc
        import torch

        ids = torch.tensor([list(sample.prompt_ids)])
        return EncodedBatch(inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                            prompt_ids=[list(sample.prompt_ids)])

    def score(self, samples: Sequence[Sample]) -> list[list[float]]:
        """Temperature-1 log-probs of each sample's completion: one unpadded forward pass
        per sample (exact, and cheap at the few samples a sync check uses)."""
        import torch

        out = []
        with torch.no_grad():
            for sample in samples:
                inputs = dict(self._encode_for_scoring(sample).inputs)
                completion = torch.tensor([list(sample.completion_ids)])
                inputs["input_ids"] = torch.cat([inputs["input_ids"], completion], dim=1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                if "mm_token_type_ids" in inputs:  # completion tokens are text (type 0)
                    inputs["mm_token_type_ids"] = torch.cat(
                        [inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
                if self.is_vision:  # a sampled placeholder id is text, as while decoding
                    inputs.update(text_embedded_completions(
                        self.model, inputs["input_ids"], len(sample.prompt_ids)))
                logits = self.model(**inputs).logits[0].float()
                n = completion.shape[1]
                start = inputs["input_ids"].shape[1] - n - 1
                lp = torch.log_softmax(logits[start:start + n], dim=-1)
                out.append(lp.gather(1, completion[0][:, None]).squeeze(1).tolist())
        return out

    # -- weights ------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int, *,
                       last_bucket: bool = True) -> None:
        """Copy tensors into the model's parameters in place (``copy_`` under no_grad)."""
        import torch

        state = self.model.state_dict()  # shares storage with the parameters
        named_tensors = list(named_tensors)
        check_weight_names((n for n, _ in named_tensors), set(state), "HF rollout engine")
        with torch.no_grad():
            for name, tensor in named_tensors:
                if tuple(tensor.shape) != tuple(state[name].shape):
                    raise WeightSyncError(f"HF rollout engine: weight {name} has shape "
                                          f"{tuple(tensor.shape)}, the model expects "
                                          f"{tuple(state[name].shape)}")
                state[name].copy_(tensor)
        if last_bucket:
            self.policy_version = version

    def sleep(self) -> None:
        """Not supported: the model stays in memory."""

    def wake(self) -> None:
        """Not supported (see :meth:`sleep`)."""
