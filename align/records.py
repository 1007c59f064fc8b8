"""The record that flows through the loop, and the one error type users see.

A :class:`Sample` is one prompt x one completion. Stages add fields as the sample moves
(data loader -> rollout engine -> rewards -> advantages -> learner); nothing is copied into
parallel lists. Only the learner's ``collate`` turns samples into padded tensors.

``rollouts`` and ``rewards`` import this module only; it depends on nothing else in medrl.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing file, bad sample).

    The message is one paragraph that names the file, field or sample and says what to do.
    The CLI prints it without a traceback and exits with code 2.
    """


@dataclass
class Sample:
    """One prompt x one completion.

    Filled by the data loader: ``uid``, ``group_id``, ``row``, ``messages``, ``images``, ``volume``.
    Filled by the rollout engine: ``prompt_ids`` .. ``policy_version``.
    Filled by rewards: ``rewards``, ``reward_dims``, ``token_weights``, ``token_marks``,
    ``reward_info``.
    Filled by the driver: ``reward`` (combined), ``advantage`` / ``token_advantages``.
    """

    uid: str
    group_id: str
    row: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # paths (str) or PIL images / arrays
    volume: Any = None  # path (str) or a [D, H, W] array
    data_dir: str | None = None  # folder of the data file: relative media paths resolve here

    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    completion_text: str = ""
    rollout_logprobs: list[float] = field(default_factory=list)  # one per completion token
    finish_reason: str | None = None  # "stop" | "length"
    policy_version: int = -1
    # digests of what prompt_ids were made from ({} when not made by an engine): see
    # source_digests; the policy log-prob hook re-encodes or refuses edited copies with them
    prompt_source: dict[str, str] = field(default_factory=dict)

    rewards: dict[str, float | None] = field(default_factory=dict)
    reward_dims: dict[str, dict[str, float | None]] = field(default_factory=dict)  # None: n/a
    token_weights: dict[str, list[float]] = field(default_factory=dict)
    # reward -> one mark in [0, 1] per completion token: where the reasoning went wrong
    # (medrl.align.process turns marks into per-token advantages)
    token_marks: dict[str, list[float]] = field(default_factory=dict)
    reward_info: dict[str, Any] = field(default_factory=dict)
    reward: float | None = None
    advantage: float | None = None
    token_advantages: list[float] | None = None

    def with_completion(self, index: int) -> "Sample":
        """A fresh copy for completion ``index`` of this prompt (same group, new uid)."""
        return dataclasses.replace(
            self,
            uid=f"{self.group_id}/{index}",
            row=self.row,  # shared, read-only by convention
            messages=self.messages,
            images=self.images,
            prompt_ids=list(self.prompt_ids),
            completion_ids=[],
            rollout_logprobs=[],
            rewards={},
            reward_dims={},
            token_weights={},
            token_marks={},
            reward_info={},
        )

    def to_log(self, *, include_text: bool) -> dict[str, Any]:
        """A JSON-able summary; patient text only when the recipe asks for it."""
        out: dict[str, Any] = {
            "uid": self.uid,
            "group_id": self.group_id,
            "n_prompt_tokens": len(self.prompt_ids),
            "n_completion_tokens": len(self.completion_ids),
            "finish_reason": self.finish_reason,
            "policy_version": self.policy_version,
            "rewards": self.rewards,
            "reward": self.reward,
            "advantage": self.advantage,
        }
        if include_text:
            out["messages"] = self.messages
            out["completion_text"] = self.completion_text
        return out


# The fields a prompt is made from. The learner reads prompt_ids and images; messages and
# images are what prompt_ids were encoded from; row and volume only reach the model through
# the data loader (the template, the slices), before the engine ever saw the sample.
PROMPT_SOURCES = ("messages", "images", "row", "volume")


def _digest(value: Any) -> str:
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if hasattr(v, "tobytes") and hasattr(v, "size"):  # numpy arrays, PIL images
            h.update(repr((type(v).__name__, getattr(v, "shape", None), getattr(v, "mode", None),
                           getattr(v, "dtype", None), v.size)).encode())
            h.update(v.tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(json.dumps(str(k)).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(b"[%d" % len(v))
            for x in v:
                feed(x)
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


def _size(image: Any) -> str:
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL: (width, height)
        return "%dx%d" % tuple(image.size)
    shape = getattr(image, "shape", None)
    return "x".join(map(str, shape)) if shape is not None else "?"  # "?": a path, not read


def source_digests(sample: Sample) -> dict[str, str]:
    """{field: sha256} of each of :data:`PROMPT_SOURCES` of ``sample`` (images and arrays by
    their bytes), and ``image_sizes``: the images' sizes, ``?`` for one not loaded yet."""
    out = {name: _digest(getattr(sample, name)) for name in PROMPT_SOURCES}
    out["image_sizes"] = ",".join(_size(im) for im in sample.images)
    return out
