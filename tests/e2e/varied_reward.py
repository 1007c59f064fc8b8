"""A reward with variance within every group on a random tiny policy, so that the first
update really moves the policy (a random model almost never earns the quickstart reward)."""


def first_token_bucket(sample) -> float:
    """The completion's first token id, bucketed to [0, 1]."""
    return (sample.completion_ids[0] % 7) / 6.0


class MeanPolicyLogprob:
    """Scores a completion by its mean log-prob under the current policy, through the
    policy log-prob hook (it runs on the learner ranks while the loop uses them too)."""

    def setup(self, ctx) -> None:
        if ctx.policy_logprobs is None:
            raise RuntimeError("MeanPolicyLogprob needs ctx.policy_logprobs")
        self.policy_logprobs = ctx.policy_logprobs
        self.calls = 0

    def __call__(self, samples):
        self.calls += 1
        return [sum(lp) / len(lp) for lp in self.policy_logprobs(samples)]
