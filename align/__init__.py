"""medrl.align: records, GRPO maths, the learner, checkpoints and single-learner stages."""

from medrl.align.grpo import GroupAdvantages, group_advantages, policy_loss, sequence_kl
from medrl.align.records import Sample, UserError

__all__ = ["Sample", "UserError", "GroupAdvantages", "group_advantages", "policy_loss",
           "sequence_kl"]
