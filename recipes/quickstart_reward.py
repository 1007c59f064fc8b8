"""The quickstart's reward: a file plugin, named in quickstart.yaml as
``quickstart_reward.py:letter_first``.

A policy that starts from random weights almost never writes ``Answer: B``, so a reward for
the full format would stay at zero. This one pays for opening the answer with an option
letter (0.5) and more for the right one (1.0), which a tiny model learns within minutes.
"""

import re

from medrl.rewards import reward

LEADING_LETTER = re.compile(r"\s*\(?([A-Z])(?![A-Za-z])")


@reward("letter_first")
def letter_first(sample, *, letters: str = "ABCD") -> float | None:
    """1.0: opens with the correct option letter; 0.5: with another option letter; else 0."""
    answer = str(sample.row.get("answer") or "").strip()
    if not answer:
        return None  # unlabelled row: not applicable
    match = LEADING_LETTER.match(sample.completion_text)
    if not match or match.group(1) not in letters:
        return 0.0
    return 1.0 if match.group(1) == answer[:1] else 0.5
