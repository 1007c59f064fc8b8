"""medrl.rewards."""
