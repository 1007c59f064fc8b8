"""``sequence_classifier``: any local ``AutoModelForSequenceClassification`` folder as a reward.

Typically run with ``actor: true`` so the model loads once, in its own process, on its own
device. The text scored is the prompt (the sample's chat ``messages`` rendered with the
classifier tokenizer's chat template, when it has one) followed by the completion as the
assistant turn; ``include_prompt=False`` scores the completion alone.

Score: with one output label, the raw logit; with several, the softmax probability of
``label`` (default: the last label, the "good" class of a binary classifier).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from medrl.align.models import ensure_pad_token
from medrl.align.records import Sample
from medrl.rewards.api import RewardContext, RewardResult, reward
from medrl.rewards.loader import hash_folder


@reward("sequence_classifier")
class SequenceClassifierReward:
    def __init__(self, model: str, *, label: int | None = None, include_prompt: bool = True,
                 max_length: Annotated[int, Field(gt=0)] = 2048,
                 batch_size: Annotated[int, Field(gt=0)] = 8):
        self.model_path, self.label, self.include_prompt = model, label, include_prompt
        self.max_length, self.batch_size = max_length, batch_size
        self.model = self.tokenizer = None

    @staticmethod
    def identity_extra(kwargs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
        """Pins the exact reward model in checkpoints (a hash over the whole folder)."""
        folder = RewardContext(base_dir=base_dir).resolve(kwargs["model"])
        return {"model_dir": str(folder), "model_sha256": hash_folder(folder)}

    def setup(self, ctx: RewardContext) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = ctx.resolve(self.model_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"sequence_classifier: {folder} is not a Hugging Face model "
                                    "folder (no config.json)")
        self.tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(folder), folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32).to(ctx.device).eval()
        if self.model.config.pad_token_id is None:  # needed to find each row's last token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        n = self.model.config.num_labels
        if self.label is not None and not 0 <= self.label < n:
            raise ValueError(f"sequence_classifier: label {self.label} but the model has "
                             f"{n} labels")

    def _text(self, sample: Sample) -> str:
        if not self.include_prompt:
            return sample.completion_text
        turns = [m for m in sample.messages if isinstance(m.get("content"), str)]
        turns.append({"role": "assistant", "content": sample.completion_text})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in turns)

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        import torch

        out: list[RewardResult] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            enc = self.tokenizer([self._text(s) for s in chunk], return_tensors="pt",
                                 padding=True, truncation=True, max_length=self.max_length)
            with torch.no_grad():
                logits = self.model(**enc.to(self.model.device)).logits.float()  # [B, labels]
            if logits.shape[-1] == 1:
                scores = logits[:, 0]
            else:
                label = logits.shape[-1] - 1 if self.label is None else self.label
                scores = logits.softmax(-1)[:, label]
            out.extend(RewardResult(float(v), info={"logits": [round(float(x), 4) for x in row]})
                       for v, row in zip(scores, logits))
        return out
