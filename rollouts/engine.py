"""The generation seam: sampling parameters, the engine protocol, and sync verification.

Every rollout engine (Hugging Face ``generate`` in :mod:`medrl.rollouts.hf_engine`, vLLM in
:mod:`medrl.rollouts.vllm_engine`) turns prompts into groups of completions with the same
conventions, so the learner never needs to know which one ran:

``completion_ids``
    every sampled token, up to and including the token that ended the completion: an eos
    token or the chat template's end of turn (``<|im_end|>`` for Qwen chat models,
    :func:`medrl.align.encode.end_of_turn_id`) when the model stopped itself, the token that
    completed a stop string when one matched, or the ``max_new_tokens``-th token. The eos is
    kept so that the learner also trains the decision to stop.
``completion_text``
    ``tokenizer.decode(completion_ids, skip_special_tokens=True)``: text and ids always agree
    (the text may run a few characters past a stop string when one token straddles it).
``rollout_logprobs``
    one float per completion token: the log-probability of the sampled token under the
    distribution it was drawn from, ``log_softmax(processed_logits)[token]`` in float32, where
    ``processed_logits = logits / temperature`` with the top-k / top-p / min-new-tokens masks
    applied. With ``top_k=-1``, ``top_p=1.0`` and after the first ``min_new_tokens`` tokens
    this is exactly ``log_softmax(logits / T)`` over the full vocabulary, i.e. the learner's
    ``token_logprobs(..., temperature=T)``. With truncation on, the two differ by design; the
    learner then recomputes old log-probs itself. ``temperature=0`` means greedy decoding and
    log-probs at temperature 1.
``finish_reason``
    ``"stop"`` (eos or stop string) or ``"length"`` (``max_new_tokens`` reached).
``policy_version``
    the version passed with the last completed :meth:`RolloutEngine.update_weights`
    (0 for the start-up weights).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medrl.align.records import Sample, UserError, source_digests


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn.

    ``top_k=-1`` and ``top_p=1.0`` switch truncation off. ``n`` completions per prompt form
    one GRPO group. ``seed`` makes a call reproducible (same engine, prompts and seed -> same
    completions); ``None`` lets the engine advance its own seed.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature={self.temperature} (must be >= 0; 0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} (must be in (0, 1])")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"top_k={self.top_k} (must be -1 for off, or >= 1)")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} (must be >= 1)")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(f"min_new_tokens={self.min_new_tokens} (must be in "
                            f"[0, max_new_tokens={self.max_new_tokens}])")
        if self.n < 1:
            problems.append(f"n={self.n} (completions per prompt must be >= 1)")
        if any(not s for s in self.stop):
            problems.append("stop contains an empty string")
        if problems:
            raise UserError("rollout: invalid sampling settings: " + "; ".join(problems)
                            + ". Fix these fields in the recipe's rollout section.")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def truncated(self) -> bool:
        """True when top-k or top-p changes the distribution (log-probs then differ from the
        learner's full-vocabulary ``log_softmax(logits / T)``)."""
        return self.top_k != -1 or self.top_p < 1.0

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


# generation_config.json keys that name tokens, caching or outputs, not how a token is drawn.
_NOT_SAMPLING = frozenset({"bos_token_id", "eos_token_id", "pad_token_id",
                           "decoder_start_token_id", "use_cache", "transformers_version",
                           "_from_model_config", "output_attentions", "output_hidden_states"})


def ignored_generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The sampling settings a model's own ``generation_config.json`` asks for, which the
    rollout engines ignore: e.g. ``{"repetition_penalty": 1.05, "top_k": 20}`` for
    Qwen2.5-Instruct.

    Both engines draw tokens exactly as :class:`SamplingParams` says and nothing else, so the
    rollout log-probs are those of the distribution the learner recomputes; a repetition
    penalty or n-gram block left on by a model's defaults would make them disagree. The
    driver notes what is returned here once per run. Missing file: ``{}``.
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return {k: v for k, v in sorted(config.items()) if k not in _NOT_SAMPLING}


class RolloutEngine(Protocol):
    """What the rollout workers and the driver need from a generation engine."""

    policy_version: int
    supports_sleep: bool

    def generate(self, prompts: list[Sample], sampling: SamplingParams) -> list[Sample]:
        """``prompts``: one Sample per prompt with ``messages`` (and ``images``).

        Returns ``len(prompts) * sampling.n`` Samples, prompt by prompt, made with
        ``prompt.with_completion(i)`` and filled as the module docstring describes.
        """
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int, *,
                       last_bucket: bool = True) -> None:
        """Load new weights (Hugging Face parameter names, any float dtype) in place.

        Weights may arrive in several buckets: call once per bucket with
        ``last_bucket=False`` and set ``last_bucket=True`` on the final one. The new weights
        are in use, and ``policy_version == version``, once the last bucket returns.
        Unknown names raise :class:`WeightSyncError` naming them.
        """
        ...

    def score(self, samples: Sequence[Sample]) -> list[list[float]]:
        """Log-probs (temperature 1, float32) of each sample's fixed ``completion_ids``
        given its ``prompt_ids``: one list per sample, one float per completion token."""
        ...

    def sleep(self) -> None:
        """Free memory between rollouts where the engine supports it (else a no-op)."""
        ...

    def wake(self) -> None:
        ...


class WeightSyncError(RuntimeError):
    """Weights pushed to an engine do not fit it, or the engine's log-probs disagree with the
    learner's after a push (a bug in the sync path, not a user mistake)."""


def finished_sample(prompt: Sample, index: int, *, prompt_ids: Sequence[int],
                    completion_ids: Sequence[int], logprobs: Sequence[float],
                    finish_reason: str, tokenizer, policy_version: int) -> Sample:
    """Completion ``index`` of ``prompt`` with every engine-filled field set."""
    if len(logprobs) != len(completion_ids):
        raise WeightSyncError(f"sample {prompt.group_id}/{index}: {len(logprobs)} log-probs "
                              f"for {len(completion_ids)} completion tokens")
    out = prompt.with_completion(index)
    out.prompt_ids = [int(t) for t in prompt_ids]
    out.prompt_source = source_digests(prompt)
    out.completion_ids = [int(t) for t in completion_ids]
    out.completion_text = tokenizer.decode(out.completion_ids, skip_special_tokens=True)
    out.rollout_logprobs = [float(x) for x in logprobs]
    out.finish_reason = finish_reason
    out.policy_version = policy_version
    return out


def check_context(prompts: Sequence[Sample], prompt_ids: Sequence[Sequence[int]],
                  max_new_tokens: int, max_model_len: int | None) -> None:
    """Refuse prompts whose tokens plus ``max_new_tokens`` exceed the engine's context.

    prompts / prompt_ids: the samples and their encoded prompts, in the same order. The error
    names the sample, not its text (prompts hold patient text).
    """
    if max_model_len is None:
        return
    for sample, ids in zip(prompts, prompt_ids):
        if len(ids) + max_new_tokens > max_model_len:
            raise UserError(
                f"sample {sample.group_id}: its prompt is {len(ids)} tokens (chat template "
                f"included), and with rollout.max_new_tokens={max_new_tokens} it does not fit "
                f"the engines' context of {max_model_len} tokens (rollout.max_prompt_tokens + "
                "max_new_tokens, capped by the model's max_position_embeddings). Raise "
                "rollout.max_prompt_tokens if the model allows, shorten the prompt (system "
                "prompt, context), or drop the row from the data.")


def check_weight_names(names: Iterable[str], known: set[str], where: str) -> None:
    """Raise :class:`WeightSyncError` when any pushed name is not a parameter of the model."""
    unknown = sorted(set(names) - known)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8
                                          else "")
        raise WeightSyncError(
            f"{where}: {len(unknown)} pushed weight name(s) are not parameters of the rollout "
            f"model: {shown}. Push Hugging Face state-dict names of the same architecture "
            "(strip wrapper prefixes such as 'module.' or PEFT's 'base_model.model.' and merge "
            "LoRA adapters first).")


def verify_sync(engine: RolloutEngine,
                reference_logprobs_fn: Callable[[Sequence[Sample]], list[list[float]]],
                samples: Sequence[Sample], atol: float) -> float:
    """Check that the engine scores completions as the learner does, after a weight push.

    ``reference_logprobs_fn(samples)`` returns the learner's temperature-1 log-probs of each
    sample's ``completion_ids`` (one list per sample). One scoring pass per side, so the loop
    can afford it every ``rollout.verify_sync_every`` steps on a few samples.

    Returns the largest absolute difference; raises :class:`WeightSyncError` above ``atol``
    naming the worst sample and token.
    """
    samples = [s for s in samples if s.completion_ids]
    if not samples:
        return 0.0
    engine_lp = engine.score(samples)
    ref_lp = reference_logprobs_fn(samples)
    if len(engine_lp) != len(samples) or len(ref_lp) != len(samples):
        raise WeightSyncError(f"verify_sync: got {len(engine_lp)} engine and {len(ref_lp)} "
                              f"reference rows for {len(samples)} samples")
    worst, where = 0.0, None
    for sample, a, b in zip(samples, engine_lp, ref_lp):
        if len(a) != len(sample.completion_ids) or len(b) != len(sample.completion_ids):
            raise WeightSyncError(f"verify_sync: sample {sample.uid}: {len(a)} engine and "
                                  f"{len(b)} reference log-probs for "
                                  f"{len(sample.completion_ids)} completion tokens")
        for pos, (x, y) in enumerate(zip(a, b)):
            diff = abs(x - y) if math.isfinite(x) and math.isfinite(y) else math.inf
            if diff > worst or where is None:
                worst, where = max(worst, diff), (sample.uid, pos, x, y)
    if worst > atol:
        uid, pos, x, y = where
        raise WeightSyncError(
            f"verify_sync: rollout engine and learner disagree after the weight push "
            f"(policy version {engine.policy_version}): max |diff| {worst:.3g} > atol {atol:g} "
            f"at sample {uid}, completion token {pos} (engine {x:.6f}, learner {y:.6f}). "
            "The engine is generating with stale or wrongly mapped weights.")
    return worst
