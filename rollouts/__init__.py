"""medrl.rollouts."""
