"""What a run lends its rewards through ``RewardContext``: the policy's log-probs and its
engines' generation.

``policy_logprobs`` asks the learner ranks (the current weights, what the loss sees), for the
samples as given: a counterfactual reward passes edited copies (:func:`current_prompts`);
``generate`` asks the rollout engines, which hold the weights of the last push: during the
score phase of step k these are the weights that sampled step k's batch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from medrl.align.records import Sample, UserError, source_digests


def logprob_lists(learner, samples: list[Sample], *, temperature: float | None = None
                  ) -> list[list[float]]:
    """The learner's current log-probs of each sample's completion tokens, as lists.

    ``temperature`` None: the rollout temperature (what the loss sees); 1.0: raw log-probs,
    which is what the engines' ``score`` returns for sync verification.
    """
    return [lp.tolist() for lp in learner.logprobs(samples, temperature=temperature)]


class PromptEncoder:
    """The policy's tokenizer or processor, loaded on first use (in the process that calls:
    the driver, or a reward's actor)."""

    def __init__(self, policy_dir: str | Path):
        self.policy_dir, self._encoder = str(policy_dir), None

    def __getstate__(self) -> dict:
        return {"policy_dir": self.policy_dir, "_encoder": None}

    def prompt_ids(self, sample: Sample) -> list[int]:
        from medrl.align.encode import encode_prompt, sample_image
        from medrl.align.models import load_tokenizer

        if self._encoder is None:
            self._encoder = load_tokenizer(self.policy_dir)
        images = [sample_image(im, sample) for im in sample.images]  # as the learner reads them
        return encode_prompt(self._encoder, dataclasses.replace(sample, images=images)
                             ).prompt_ids[0]


def current_prompts(samples: list[Sample], encoder: PromptEncoder) -> list[Sample]:
    """``samples`` as the learner must see them. The learner reads ``prompt_ids`` and
    ``images``; a copy whose ``messages`` or ``images`` differ from what the engine encoded
    (``Sample.prompt_source``) is encoded again, so the edit takes effect; a copy whose
    ``row`` or ``volume`` differ is refused, as the learner never reads them (the data loader
    turned them into messages and slice images before the rollout). Samples not made by an
    engine (empty ``prompt_source``) and edits of ``prompt_ids`` itself pass as they are.
    Images replaced by images of the same sizes (a masked region) keep their ``prompt_ids``:
    a processor's image tokens depend on the image's size, not its pixels."""
    out = []
    for s in samples:
        if not s.prompt_source:
            out.append(s)
            continue
        now = source_digests(s)
        changed = [k for k, v in now.items() if s.prompt_source.get(k) != v]
        ignored = [k for k in changed if k in ("row", "volume")]
        if ignored:
            raise UserError(
                f"a reward passed ctx.policy_logprobs a copy of sample {s.uid} with its "
                f"{' and '.join(ignored)} edited; the learner never reads them (the prompt "
                "was made from them before the rollout), so the edit would change nothing. "
                "Edit the copy's messages or images instead (they are encoded again), or its "
                "prompt_ids.")
        if not changed:
            out.append(s)
            continue
        same_tokens = changed == ["images"] and "?" not in now["image_sizes"] \
            and now["image_sizes"] == s.prompt_source.get("image_sizes")
        out.append(dataclasses.replace(
            s, prompt_ids=list(s.prompt_ids) if same_tokens else encoder.prompt_ids(s),
            prompt_source={**s.prompt_source, **now}))
    return out


def policy_hook(learner, *, async_: bool, policy_dir: str | Path
                ) -> Callable[[list[Sample]], list[list[float]]]:
    """``ctx.policy_logprobs`` for the rewards: the learner's current log-probs of the
    samples given, edited copies included (:func:`current_prompts`).

    In async mode the training loop uses the learner ranks while rewards score the next
    batch. The group serialises the calls of the driver's threads, but a reward in its own
    actor (another process) would reach the ranks unserialised, so there it is refused.
    """
    driver_pid = os.getpid()
    encoder = PromptEncoder(policy_dir)

    def policy_logprobs(samples: list[Sample]) -> list[list[float]]:
        if async_ and os.getpid() != driver_pid:
            raise UserError("a reward running in its own actor (actor: true) called "
                            "ctx.policy_logprobs with algorithm.async: true; the training loop "
                            "uses the learner ranks at the same time. Set actor: false for "
                            "this reward (it then runs in the driver, serialised with the "
                            "loop), or algorithm.async: false.")
        return logprob_lists(learner, current_prompts(samples, encoder))

    return policy_logprobs


class GenerateHook:
    """``ctx.generate``: one completion per prompt sample from ``engines``.

    engines: anything with ``generate(prompts, sampling) -> samples`` (a
    :class:`~medrl.rollouts.worker.RolloutGroup`, or one engine). stop: the run's stop
    strings (a repair ends where a rollout would).

    The engines' handles stay in the driver: pickled into a reward actor the hook keeps
    only its settings, and a call there is a clear error rather than a second client of the
    rollout workers racing the loop.
    """

    def __init__(self, engines: Any, *, stop: tuple[str, ...] = ()):
        self.engines = engines
        self.stop = tuple(stop)
        self.calls = 0  # generate calls so far (tests and metrics read it)

    def __getstate__(self) -> dict:
        return {"engines": None, "stop": self.stop, "calls": self.calls}

    def __call__(self, prompts: list[Sample], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[Sample]:
        from medrl.rollouts.engine import SamplingParams

        if self.engines is None:
            raise UserError("ctx.generate was called by a reward running in its own actor "
                            "(actor: true); the rollout engines serve rewards that run in the "
                            "driver. Set actor: false for this reward.")
        if not prompts:
            return []
        self.calls += 1
        sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                  stop=self.stop, n=1, seed=seed)
        return self.engines.generate(list(prompts), sampling)
