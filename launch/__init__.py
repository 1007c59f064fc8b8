"""medrl.launch."""
