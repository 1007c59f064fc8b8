"""The prompt stream: ``take(n)`` distinct prompts per step, in a seeded order per epoch, with
a cursor that makes a run resumable exactly (see :class:`PromptStream`)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medrl.align.records import Sample, UserError
from medrl.launch.data import load_media, load_train_eval
from medrl.launch.recipe import DataConfig, VolumeConfig


def fingerprint(samples: list[Sample]) -> str:
    """A short hash of the uids in order: a resumed stream checks it sees the same data."""
    digest = hashlib.sha256("\n".join(s.uid for s in samples).encode()).hexdigest()
    return digest[:16]


class PromptStream:
    """``take(n)`` distinct prompts per step: a seeded order per epoch and a resumable cursor.

    Epoch ``e`` visits the samples in ``numpy.random.default_rng(seed + e).permutation(N)``
    order (index order when ``shuffle`` is False); the cursor walks these orders one after
    the other. One ``take`` never returns a sample twice, nor one named in ``exclude``:

    - a sample the cursor reaches that is already in the call (the next epoch's order can
      repeat the previous epoch's tail) or excluded is *deferred*, not dropped: it waits in
      ``deferred``, in cursor order, and the following calls hand deferred samples out first
      (those not excluded again), before the cursor moves on;
    - so every epoch hands out every sample once: the stream has handed out ``epoch`` whole
      epochs plus ``order(epoch)[:position]``, minus the samples still deferred (fewer than
      ``N``, none twice, unless a caller keeps excluding them).

    Without ``exclude`` every call returns exactly ``n`` prompts; ``n`` above the dataset size
    is a :class:`UserError` (no step can hold that many distinct prompts). ``state()`` is the
    cursor ``{"epoch", "position", "deferred", ...}``; ``from_state`` continues from it
    exactly. Media are loaded at take-time, for the taken prompts only (``load_media=False``
    leaves paths).
    """

    def __init__(self, samples: list[Sample], *, seed: int = 0, shuffle: bool = True,
                 volume: VolumeConfig | None = None, load_media: bool = True,
                 epoch: int = 0, position: int = 0):
        if not samples:
            raise UserError("the prompt stream has no samples; check data.path.")
        if not 0 <= position < len(samples) or epoch < 0:
            raise UserError(f"data cursor epoch {epoch}, position {position} is outside a "
                            f"dataset of {len(samples)} prompts.")
        self.samples = samples
        self.seed = int(seed)
        self.shuffle = shuffle
        self.volume = volume or VolumeConfig()
        self.load_media = load_media
        self.epoch = epoch
        self.position = position
        self.deferred: list[int] = []  # sample indices passed over by the cursor, owed next
        self._index = {s.uid: i for i, s in enumerate(samples)}
        self._order_epoch = -1
        self._order = np.arange(0)
        self.eval_samples: list[Sample] = []  # held-out rows, set by from_recipe

    @classmethod
    def from_config(cls, samples: list[Sample], cfg: DataConfig, *, seed: int) -> "PromptStream":
        """A stream over ``samples`` with the recipe's shuffle and volume settings."""
        return cls(samples, seed=seed, shuffle=cfg.shuffle, volume=cfg.volume)

    @classmethod
    def from_recipe(cls, cfg: DataConfig, *, seed: int,
                    recipe_dir: str | Path | None = None) -> "PromptStream":
        """Load ``cfg`` (paths relative to ``recipe_dir``) and stream its training part.

        Held-out rows (``eval_path`` / ``eval_fraction``, see :func:`load_train_eval`) are not
        streamed; they are kept in ``stream.eval_samples``.
        """
        train, held = load_train_eval(cfg, base_dir=recipe_dir)  # seed: the order, not the split
        stream = cls.from_config(train, cfg, seed=seed)
        stream.eval_samples = held
        return stream

    def check_take(self, n: int, *, field: str = "rollout.prompts_per_step") -> None:
        """Raise a :class:`UserError` when one step cannot hold ``n`` distinct prompts.

        ``field``: the recipe key that sets ``n``, named in the message (the sft and qat
        stages take ``sft.batch_size`` examples per step).
        """
        if n > len(self.samples):
            raise UserError(f"{field} is {n}, but the training data has only "
                            f"{len(self.samples)} prompts (after the held-out rows), and a step "
                            f"never holds the same prompt twice; set it to at most "
                            f"{len(self.samples)}, or use more data.")

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch ``epoch`` visits them."""
        if epoch != self._order_epoch:
            n = len(self.samples)
            self._order = (np.random.default_rng(self.seed + epoch).permutation(n)
                           if self.shuffle else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def take(self, n: int, *, exclude: Iterable[str] = ()) -> list[Sample]:
        """The next ``n`` distinct prompts (copies with media loaded); advances the cursor.

        ``exclude``: uids that must not be returned (a refill within a step passes the uids
        the step already holds); they are deferred, not skipped for good. When fewer than
        ``n`` samples lie outside ``exclude``, all of those are returned (an empty list when
        none). Uids that are not in the stream exclude nothing.
        """
        if n < 1:
            raise ValueError(f"take needs n >= 1, got {n}")
        self.check_take(n, field="rollout.prompts_per_step (sft.batch_size in the sft and qat "
                                 "stages)")
        seen = {self._index[uid] for uid in exclude if uid in self._index}
        want = min(n, len(self.samples) - len(seen))
        picked: list[int] = []
        owed: list[int] = []
        for i in self.deferred:
            if len(picked) < want and i not in seen:
                picked.append(i)
                seen.add(i)
            else:
                owed.append(i)
        while len(picked) < want:  # ends: each epoch's order holds every sample once
            i = int(self.order(self.epoch)[self.position])
            self.position += 1
            if self.position == len(self.samples):
                self.epoch, self.position = self.epoch + 1, 0
            if i in seen:
                owed.append(i)
            else:
                picked.append(i)
                seen.add(i)
        self.deferred = owed
        chosen = [self.samples[i] for i in picked]
        if not self.load_media:
            return [dataclasses.replace(s, images=list(s.images)) for s in chosen]
        return [load_media(s, self.volume) for s in chosen]

    def state(self) -> dict[str, Any]:
        """The cursor, JSON-able: epoch, position, deferred sample indices, seed, shuffle,
        dataset size and fingerprint."""
        return {"epoch": self.epoch, "position": self.position, "deferred": list(self.deferred),
                "seed": self.seed, "shuffle": self.shuffle, "num_samples": len(self.samples),
                "fingerprint": fingerprint(self.samples)}

    @classmethod
    def from_state(cls, samples: list[Sample], state: dict[str, Any], *,
                   volume: VolumeConfig | None = None, load_media: bool = True) -> "PromptStream":
        """The stream that continues where ``state`` (from :meth:`state`) left off.

        Raises :class:`UserError` when the data changed since the state was saved (another
        size or other ids), since the same cursor would then pick other prompts.
        """
        stream = cls(samples, seed=state.get("seed", 0), volume=volume, load_media=load_media)
        stream.load_state(state)
        return stream

    def load_state(self, state: dict[str, Any]) -> None:
        """Move this stream's cursor (and seed, shuffle) to a saved :meth:`state`."""
        if state.get("num_samples") != len(self.samples) or \
                state.get("fingerprint", fingerprint(self.samples)) != fingerprint(self.samples):
            raise UserError(f"the data changed since this run was saved: it had "
                            f"{state.get('num_samples')} prompts, now {len(self.samples)} (or "
                            "other ids). Resume with the same data file and data.fields, or "
                            "start a new run.")
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position < len(self.samples) or epoch < 0:
            raise UserError(f"data cursor epoch {epoch}, position {position} is outside a "
                            f"dataset of {len(self.samples)} prompts.")
        deferred = [int(i) for i in state.get("deferred", [])]  # absent in older states
        if any(not 0 <= i < len(self.samples) for i in deferred):
            raise UserError(f"data cursor: a deferred prompt index is outside a dataset of "
                            f"{len(self.samples)} prompts.")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", True))
        self.epoch, self.position, self.deferred = epoch, position, deferred
        self._order_epoch = -1  # the order is recomputed for the restored seed and epoch
