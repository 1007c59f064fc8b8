"""The benchmark reward as a medrl reward plugin: ``bench.common.letter_reward`` on a Sample.

Named in the end-to-end benchmark's recipes as ``<this file>:bench_letter``, so medrl scores
completions exactly as TRL and the raw loop do in ``bench.bench_trl``.
"""

from __future__ import annotations

from bench.common import letter_reward
from medrl.rewards import reward


@reward("bench_letter")
def bench_letter(sample) -> float:
    """Letter accuracy plus 0.01 per option letter written (see ``letter_reward``)."""
    return letter_reward(sample.completion_text, sample.row)
