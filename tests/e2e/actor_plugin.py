"""A class reward that runs in its own Ray actor (for the lost-actor test)."""

from medrl.rewards import RewardResult, reward


@reward("answer_length_actor")
class AnswerLength:
    """Scores shorter completions higher; counts its setups so a restart is visible."""

    def __init__(self, *, max_tokens: int = 8):
        self.max_tokens = max_tokens
        self.setups = 0

    def setup(self, ctx) -> None:
        self.setups += 1

    def __call__(self, samples):
        return [RewardResult(score=1.0 - len(s.completion_ids) / (self.max_tokens + 1),
                             info={"setups": self.setups}) for s in samples]
