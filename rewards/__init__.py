"""medrl.rewards: the reward plugin API, its loader, combination of rewards, built-in rewards.

Write a reward (see docs/rewards.md)::

    from medrl.rewards import reward

    @reward("short_answer")
    def short_answer(sample, *, max_chars: int = 200) -> float | None:
        return float(len(sample.completion_text) <= max_chars)

What the training loop calls, in order:

1. ``load_rewards(specs, *, base_dir, veto=None) -> list[LoadedReward]``: ``specs`` are the
   recipe's ``rewards.functions`` entries as dicts (``name, alias, weight, kwargs, actor,
   num_cpus, num_gpus, timeout_s``); resolves every reference and binds ``kwargs`` to the
   signatures; imports code but loads no model; checks that every veto (``"<reward>[.<dim>]"``
   or a list of ``{score, threshold, when}``) reads a loaded reward. ``medrl validate`` calls this.
2. ``RewardRunner(loaded, ctx=RewardContext(...), normalize=, veto=, veto_threshold=, floor=,
   veto_margin=, on_error=, task_pool=0)``, or ``RewardRunner.from_config(recipe.rewards,
   base_dir=, ctx=)``;
   once per run. ``ctx.policy_logprobs`` is the hook counterfactual rewards use: bind it to
   the learner's log-prob computation (``samples -> list[list[float]]``, one log-prob per
   completion token).
3. ``runner.start()`` (Ray must be initialised when a reward has ``actor: true``; class
   rewards are built and ``setup(ctx)`` once here).
4. Every step: ``report = runner.score(samples, step=step)``: fills ``sample.rewards[name]``,
   ``reward_dims[name]``, ``token_weights[name]``, ``reward_info[name]`` and ``sample.reward``;
   ``report.samples`` are the kept samples, ``report.dropped`` the uids dropped under
   ``on_error: skip_sample`` (``report.failures`` says why; also appended to
   ``ctx.run_dir/reward_failures.jsonl``), ``report.metrics`` the per-reward / per-dim
   statistics.
   ``combined_token_weights(sample)`` is the product of all rewards' token weights.
   A failing reward raises :class:`RewardError` (a ``UserError``) under ``on_error: raise``.
5. ``runner.identities()`` (or ``LoadedReward.identity()``) for checkpoint provenance;
   ``runner.close()`` at the end stops reward actors.
"""

from medrl.rewards.api import (BatchReward, RewardContext, RewardError, RewardResult,
                               registered, reward)
from medrl.rewards.combine import (combine_scores, group_normalize, multiply_token_weights,
                                   veto_fires)
from medrl.rewards.loader import (ENTRY_POINT_GROUP, LoadedReward, Veto, bind_kwargs,
                                  hash_folder, load_reward, load_rewards, resolve,
                                  resolve_vetoes)
from medrl.rewards.calls import RewardWorker, check_result
from medrl.rewards.runner import (FAILURES_FILE, RewardFailure, RewardRunner, ScoreReport,
                                  combined_token_weights)

# Built-in rewards register themselves on import (no model is loaded by importing them).
from medrl.rewards import classifier as _classifier  # noqa: E402,F401
from medrl.rewards import rules as _rules  # noqa: E402,F401
from medrl.rewards import rubric as _rubric  # noqa: E402,F401
from medrl.rewards import repair as _repair  # noqa: E402,F401
from medrl.rewards import causal as _causal  # noqa: E402,F401
from medrl.rewards import consistency as _consistency  # noqa: E402,F401
from medrl.rewards import counterfactual as _counterfactual  # noqa: E402,F401

__all__ = [
    "BatchReward", "ENTRY_POINT_GROUP", "FAILURES_FILE", "LoadedReward", "RewardContext",
    "RewardError", "RewardFailure", "RewardResult", "RewardRunner", "RewardWorker",
    "ScoreReport", "Veto", "bind_kwargs", "check_result", "combine_scores",
    "combined_token_weights", "group_normalize", "hash_folder", "load_reward", "load_rewards",
    "multiply_token_weights", "registered", "resolve", "resolve_vetoes", "reward",
    "veto_fires",
]
