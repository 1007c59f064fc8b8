"""medrl.align: records, GRPO maths, the learner, checkpoints and single-learner stages.

The maths is imported lazily: ``rollouts`` and ``rewards`` import ``medrl.align.records``
and should not pay for torch when they do not use it (``medrl validate`` stays fast).
"""

from medrl.align.records import Sample, UserError

_GRPO = ("GroupAdvantages", "group_advantages", "policy_loss", "sequence_kl")
__all__ = ["Sample", "UserError", *_GRPO]


def __getattr__(name: str):
    if name in _GRPO:
        from medrl.align import grpo

        return getattr(grpo, name)
    raise AttributeError(f"module 'medrl.align' has no attribute {name!r}")
