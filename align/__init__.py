"""medrl.align: records, GRPO maths, the learner, checkpoints and single-learner stages."""

from medrl.align.records import Sample, UserError

__all__ = ["Sample", "UserError"]
