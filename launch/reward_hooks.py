"""What a run lends its rewards through ``RewardContext``: the policy's log-probs and its
engines' generation.

``policy_logprobs`` asks the learner ranks (the current weights, what the loss sees);
``generate`` asks the rollout engines, which hold the weights of the last push: during the
score phase of step k these are the weights that sampled step k's batch.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from medrl.align.records import Sample, UserError


def logprob_lists(learner, samples: list[Sample], *, temperature: float | None = None
                  ) -> list[list[float]]:
    """The learner's current log-probs of each sample's completion tokens, as lists.

    ``temperature`` None: the rollout temperature (what the loss sees); 1.0: raw log-probs,
    which is what the engines' ``score`` returns for sync verification.
    """
    return [lp.tolist() for lp in learner.logprobs(samples, temperature=temperature)]


def policy_hook(learner, *, async_: bool) -> Callable[[list[Sample]], list[list[float]]]:
    """``ctx.policy_logprobs`` for the rewards: the learner's current log-probs.

    In async mode the training loop uses the learner ranks while rewards score the next
    batch. The group serialises the calls of the driver's threads, but a reward in its own
    actor (another process) would reach the ranks unserialised, so there it is refused.
    """
    driver_pid = os.getpid()

    def policy_logprobs(samples: list[Sample]) -> list[list[float]]:
        if async_ and os.getpid() != driver_pid:
            raise UserError("a reward running in its own actor (actor: true) called "
                            "ctx.policy_logprobs with algorithm.async: true; the training loop "
                            "uses the learner ranks at the same time. Set actor: false for "
                            "this reward (it then runs in the driver, serialised with the "
                            "loop), or algorithm.async: false.")
        return logprob_lists(learner, samples)

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
