"""Samples -> padded tensors: the learner's only way in.

:func:`collate` turns a list of :class:`~medrl.align.records.Sample` into a :class:`TrainBatch`.
Each row is ``[prompt (left-padded to P) | completion (right-padded to T)]``, so every
completion starts at column ``P`` and the completion tokens are always the last ``T`` columns:
the log-probs of the completion are the model's log-probs of the last ``T`` tokens.

For vision-language models the prompt ids already hold the expanded image tokens (the
rollout engine rendered them); only the processor's image processor runs here, on the
sample's images, in sample order, and ``mm_token_type_ids`` marks the image tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from medrl.align.encode import sample_image
from medrl.align.records import Sample, UserError


@dataclass
class TrainBatch:
    """One batch of B samples, P prompt columns and T completion columns.

    Optional fields are ``None`` when no sample carries them.
    """

    input_ids: torch.Tensor  # [B, P+T] long; prompt left-padded, completion right-padded
    attention_mask: torch.Tensor  # [B, P+T] long; 1 on real tokens
    completion_mask: torch.Tensor  # [B, T] float; 1 on real completion tokens
    rollout_logprobs: torch.Tensor | None = None  # [B, T] float; the engine's (0 on padding)
    policy_versions: torch.Tensor | None = None  # [B] long; the policy that sampled each row
    old_logprobs: torch.Tensor | None = None  # [B, T] float; pi_old, set by the learner step
    advantages: torch.Tensor | None = None  # [B] float; one advantage per sample
    token_advantages: torch.Tensor | None = None  # [B, T] float; per-token advantages
    token_weights: torch.Tensor | None = None  # [B, T] float; product of all weight lists
    # Vision-language models only:
    pixel_values: torch.Tensor | None = None  # [sum of patches, C*tp*p*p] float
    image_grid_thw: torch.Tensor | None = None  # [N_images, 3] long; (t, h, w) patches
    num_images: torch.Tensor | None = None  # [B] long; images of each sample, in order
    mm_token_type_ids: torch.Tensor | None = None  # [B, P+T] int; 1 on image tokens

    @property
    def size(self) -> int:
        """B, the number of samples."""
        return int(self.input_ids.shape[0])

    @property
    def num_completion_tokens(self) -> int:
        """T, the number of completion columns."""
        return int(self.completion_mask.shape[1])

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Extra keyword arguments for the model's forward pass (image inputs), if any."""
        out = {}
        for name in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def advantage_tensor(self) -> torch.Tensor:
        """Advantages as ``policy_loss`` takes them: [B, T] if per-token, else [B]."""
        if self.token_advantages is not None:
            return self.token_advantages
        if self.advantages is None:
            raise UserError("The training batch has no advantages: every sample needs "
                            "`advantage` (or `token_advantages`) set before the learner step.")
        return self.advantages

    def to(self, device: torch.device | str) -> "TrainBatch":
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """Samples ``start:stop`` as a batch (image patches sliced to match; no image
        fields when these samples have no images, as the vision tower rejects empty input)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("pixel_values", "image_grid_thw"):
                continue
            out[f.name] = value[start:stop]
        if self.num_images is not None and int(self.num_images[start:stop].sum()) > 0:
            first_image = int(self.num_images[:start].sum())
            last_image = int(self.num_images[:stop].sum())
            patches = self.image_grid_thw.prod(dim=-1)
            out["image_grid_thw"] = self.image_grid_thw[first_image:last_image]
            out["pixel_values"] = self.pixel_values[
                int(patches[:first_image].sum()):int(patches[:last_image].sum())]
        return TrainBatch(**out)

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt tokens [B], completion tokens [B]) of each row, padding excluded."""
        P = self.input_ids.shape[1] - self.num_completion_tokens
        return self.attention_mask[:, :P].sum(-1), self.attention_mask[:, P:].sum(-1)

    def trim(self) -> "TrainBatch":
        """The same rows without the columns that are padding in every row: the prompt part
        keeps its longest prompt (left), the completion part its longest completion
        (right). Log-probs are the same; the forward pass is shorter."""
        prompt, completion = self.lengths()
        P, T = self.input_ids.shape[1] - self.num_completion_tokens, self.num_completion_tokens
        p, t = int(prompt.max()), max(1, int(completion.max()))
        if (p, t) == (P, T):
            return self
        wide = {"input_ids", "attention_mask", "mm_token_type_ids"}  # [B, P+T] fields
        out = {}
        for name, value in self:
            if value is not None and value.dim() == 2 and name in wide:
                value = value[:, P - p:P + t]
            elif value is not None and value.dim() == 2 and value.shape[1] == T:
                value = value[:, :t]  # [B, T] fields: completion columns, right-padded
            out[name] = value
        return TrainBatch(**out)

    def split(self, micro_batch_size: int,
              max_tokens: int | None = None) -> list["TrainBatch"]:
        """Consecutive micro-batches, each trimmed to its own widths (:meth:`trim`).

        Without ``max_tokens``: at most ``micro_batch_size`` samples each. With it (a token
        budget, verl's dynamic batch size): as many consecutive samples as fit
        ``rows x (longest prompt + longest completion) <= max_tokens``, a longer sample
        alone; ``micro_batch_size`` is not used then. Consecutive samples keep a GRPO group's
        rows together, so prompt sharing still finds them.
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if max_tokens is None:
            bounds = [(i, min(i + micro_batch_size, self.size))
                      for i in range(0, self.size, micro_batch_size)]
        else:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
            prompt, completion = (x.tolist() for x in self.lengths())
            bounds, start = [], 0
            for i in range(1, self.size + 1):
                rows = i - start
                width = max(prompt[start:i]) + max(completion[start:i])
                if rows > 1 and rows * width > max_tokens:
                    bounds.append((start, i - 1))
                    start = i - 1
            bounds.append((start, self.size))
        return [self.rows(a, b).trim() for a, b in bounds]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))




def _check(sample: Sample) -> None:
    if not sample.prompt_ids or not sample.completion_ids:
        raise UserError(f"Sample {sample.uid}: empty prompt_ids or completion_ids; the learner "
                        "needs rolled-out samples (prompt and completion token ids).")
    n = len(sample.completion_ids)
    if sample.rollout_logprobs and len(sample.rollout_logprobs) != n:
        raise UserError(f"Sample {sample.uid}: {len(sample.rollout_logprobs)} rollout_logprobs "
                        f"for {n} completion tokens; the rollout engine must return one per token.")
    if sample.token_advantages is not None and len(sample.token_advantages) != n:
        raise UserError(f"Sample {sample.uid}: {len(sample.token_advantages)} token_advantages "
                        f"for {n} completion tokens.")
    for name, weights in sample.token_weights.items():
        if len(weights) != n:
            raise UserError(f"Sample {sample.uid}: reward {name!r} gave {len(weights)} token "
                            f"weights for {n} completion tokens; it must give one per token.")


def collate(samples: Sequence[Sample], *, pad_token_id: int, processor: Any = None,
            mask_truncated: bool = False) -> TrainBatch:
    """Pad ``samples`` into a :class:`TrainBatch` (see the module docstring for the layout).

    ``processor``: the VLM processor (its ``image_processor`` is used, and ``image_token_id``
    or its tokenizer's ``<|image_pad|>`` id marks image tokens); ``None`` for text models.
    ``mask_truncated``: completions cut at the token limit (``finish_reason == "length"``)
    get an all-zero ``completion_mask`` row, so the loss leaves them out (DAPO).
    A field that only some samples have is padded with a neutral value for the others
    (old log-probs 0, advantage 0, weights 1) only where that is meaningful; mixed presence
    of old log-probs or advantages is an error.
    """
    if not samples:
        raise UserError("collate got no samples; the learner step needs at least one.")
    for s in samples:
        _check(s)
    B = len(samples)
    P = max(len(s.prompt_ids) for s in samples)
    T = max(len(s.completion_ids) for s in samples)
    input_ids = torch.full((B, P + T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    completion_mask = torch.zeros((B, T), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, t = len(s.prompt_ids), len(s.completion_ids)
        input_ids[i, P - p:P] = torch.tensor(s.prompt_ids, dtype=torch.long)
        input_ids[i, P:P + t] = torch.tensor(s.completion_ids, dtype=torch.long)
        attention_mask[i, P - p:P + t] = 1
        completion_mask[i, :t] = 0.0 if mask_truncated and s.finish_reason == "length" else 1.0
    batch = TrainBatch(input_ids=input_ids, attention_mask=attention_mask,
                       completion_mask=completion_mask)

    has_old = [bool(s.rollout_logprobs) for s in samples]
    if any(has_old):
        if not all(has_old):
            missing = next(s.uid for s, h in zip(samples, has_old) if not h)
            raise UserError(f"Sample {missing} has no rollout_logprobs while others in the batch "
                            "do; set algorithm.old_logprobs: recompute, or fix the rollout engine.")
        batch.rollout_logprobs = _pad([s.rollout_logprobs for s in samples], T, 0.0)
    batch.policy_versions = torch.tensor([s.policy_version for s in samples], dtype=torch.long)

    if any(s.token_advantages is not None for s in samples):
        batch.token_advantages = _pad(
            [s.token_advantages if s.token_advantages is not None
             else [_advantage(s)] * len(s.completion_ids) for s in samples], T, 0.0)
    elif any(s.advantage is not None for s in samples):
        batch.advantages = torch.tensor([_advantage(s) for s in samples], dtype=torch.float32)

    if any(s.token_weights for s in samples):
        rows = []
        for s in samples:
            row = [1.0] * len(s.completion_ids)
            for weights in s.token_weights.values():
                row = [a * float(b) for a, b in zip(row, weights)]
            rows.append(row)
        batch.token_weights = _pad(rows, T, 0.0)

    if any(s.images for s in samples):
        _add_images(batch, samples, processor)
    return batch


def _advantage(sample: Sample) -> float:
    if sample.advantage is None or not math.isfinite(sample.advantage):
        raise UserError(f"Sample {sample.uid}: advantage is {sample.advantage!r}; compute "
                        "finite advantages for every sample before the learner step.")
    return float(sample.advantage)


def _pad(rows: list[list[float]], width: int, value: float) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def _image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


def _add_images(batch: TrainBatch, samples: Sequence[Sample], processor: Any) -> None:
    """Fill the image fields; image tokens must already be expanded in ``prompt_ids``."""
    if processor is None or getattr(processor, "image_processor", None) is None:
        raise UserError("Samples carry images but the policy has no image processor; use a "
                        "vision-language model (its folder needs preprocessor_config.json).")
    images = [sample_image(im, s) for s in samples for im in s.images]
    out = processor.image_processor(images=images, return_tensors="pt")
    batch.pixel_values = out["pixel_values"]
    batch.image_grid_thw = out["image_grid_thw"].long()
    batch.num_images = torch.tensor([len(s.images) for s in samples], dtype=torch.long)
    # Image tokens live in the prompt: one that a rollout sampled in a completion is a plain
    # token there (the engines embedded it as text while decoding).
    image_token = _image_token_id(processor)
    P = batch.input_ids.shape[1] - batch.completion_mask.shape[1]
    batch.mm_token_type_ids = torch.zeros_like(batch.input_ids, dtype=torch.int)
    batch.mm_token_type_ids[:, :P] = (batch.input_ids[:, :P] == image_token).to(torch.int)

    # Each image expands to (t*h*w / merge^2) tokens; a mismatch means the prompt was
    # rendered with other image sizes than the ones processed here.
    merge = getattr(processor.image_processor, "merge_size", 2)
    expected = batch.image_grid_thw.prod(dim=-1) // (merge * merge)
    start = 0
    for i, s in enumerate(samples):
        n = len(s.images)
        want = int(expected[start:start + n].sum())
        got = int(batch.mm_token_type_ids[i].sum())
        start += n
        if want != got:
            raise UserError(f"Sample {s.uid}: prompt_ids hold {got} image tokens but its "
                            f"{n} image(s) need {want}; render the prompt with the same "
                            "processor settings (min/max pixels) as the learner's.")
