"""Samples for the learner tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from medrl.align.records import Sample


def make_samples(n: int = 4, *, seed: int = 0, advantages=None) -> list[Sample]:
    """Samples of different prompt and completion lengths (ids >= 100: no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(100, 1000, (3 + i,), generator=g).tolist()
        completion = torch.randint(100, 1000, (2 + 2 * i,), generator=g).tolist()
        adv = advantages[i] if advantages is not None else (1.0 if i % 2 == 0 else -0.5)
        out.append(Sample(uid=f"s{i}", group_id="g", prompt_ids=prompt,
                          completion_ids=completion, advantage=adv))
    return out
