"""Chat messages (+ images) -> prompt token ids, with the model's tokenizer or processor.

The chat template is applied with ``add_generation_prompt=True`` so the completion starts
right after the assistant header. For a vision-language model the processor expands each
``{"type": "image"}`` placeholder into the image's patch tokens, so ``prompt_ids`` are the
exact ids the model sees, and the pixel tensors come back beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrl.align.records import Sample, UserError


@dataclass
class EncodedBatch:
    """Model inputs for a batch of prompts, left-padded.

    ``inputs``: ``input_ids`` / ``attention_mask`` ``[B, L]`` (int64) and, for a VLM,
    ``pixel_values`` ``[num_patches, C*T*P*P]``, ``image_grid_thw`` ``[num_images, 3]`` and
    any extra id tensors the processor returns (``mm_token_type_ids`` ``[B, L]``).
    ``prompt_ids``: the unpadded ids of each prompt. ``texts``: the rendered templates.
    """

    inputs: dict[str, Any]
    prompt_ids: list[list[int]]
    texts: list[str] = field(default_factory=list)


def text_tokenizer(tokenizer_or_processor):
    """The plain tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def is_processor(tokenizer_or_processor) -> bool:
    return hasattr(tokenizer_or_processor, "image_processor")


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


def _text_only(messages: list[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
    """Messages with list content flattened to strings (text models' templates expect them)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                else:
                    raise UserError(
                        f"sample {uid}: message part of type {kind!r} sent to a text-only "
                        "model. Use a vision-language model (model.policy) for image data, "
                        "or drop the images from the data.")
            content = "".join(parts)
        out.append({**m, "content": content})
    return out


def render(tokenizer_or_processor, sample: Sample) -> str:
    """The chat template applied to ``sample.messages``, ending with the assistant header."""
    if not sample.messages:
        raise UserError(f"sample {sample.uid}: no chat messages to generate from; the prompt "
                        "builder must fill Sample.messages before rollout.")
    messages = sample.messages
    if not is_processor(tokenizer_or_processor):
        messages = _text_only(messages, sample.uid)
    try:
        return tokenizer_or_processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja errors are cryptic: name the sample, keep the cause
        raise UserError(f"sample {sample.uid}: the model's chat template failed on its "
                        f"messages ({type(err).__name__}: {err}). Check that every message "
                        "has 'role' and 'content' (a string or a list of "
                        "{'type': 'text'|'image'} parts).") from err


def _check_images(sample: Sample) -> list[Any]:
    wanted = count_images(sample.messages)
    images = list(sample.images or [])
    if wanted != len(images):
        raise UserError(f"sample {sample.uid}: its messages hold {wanted} image placeholder(s) "
                        f"but {len(images)} image(s) are attached. Every {{'type': 'image'}} "
                        "part needs exactly one loaded image in Sample.images, in order.")
    for i, image in enumerate(images):
        if isinstance(image, str):
            raise UserError(f"sample {sample.uid}: image {i} is still a path ({image!r}); "
                            "load it into a PIL image before rollout.")
    return images


def encode_batch(tokenizer_or_processor, samples: list[Sample]) -> EncodedBatch:
    """Tokenise a batch of prompts (left padding) for ``generate`` or a forward pass."""
    texts = [render(tokenizer_or_processor, s) for s in samples]
    tok = text_tokenizer(tokenizer_or_processor)
    if is_processor(tokenizer_or_processor):
        images = [img for s in samples for img in _check_images(s)]
        inputs = tokenizer_or_processor(text=texts, images=images or None, padding=True,
                                        padding_side="left", return_tensors="pt")
    else:
        for s in samples:
            if s.images:
                raise UserError(f"sample {s.uid}: has images but the model is text-only. "
                                "Use a vision-language model, or drop the images.")
        inputs = tok(texts, add_special_tokens=False, padding=True, padding_side="left",
                     return_tensors="pt")
    inputs = dict(inputs)
    mask = inputs["attention_mask"].bool()
    prompt_ids = [row[m].tolist() for row, m in zip(inputs["input_ids"], mask)]
    return EncodedBatch(inputs=inputs, prompt_ids=prompt_ids, texts=texts)


def encode_prompt(tokenizer_or_processor, sample: Sample) -> EncodedBatch:
    """One prompt: ``prompt_ids[0]`` are its ids; ``inputs`` hold pixel tensors for a VLM."""
    return encode_batch(tokenizer_or_processor, [sample])


_TURN_MARK = "MEDRLENDOFTURNMARK"  # one word: templates that trim or strip content keep it


def end_of_turn_id(tokenizer_or_processor) -> int:
    """The token id the chat template closes an assistant turn with (``int``).

    SFT answers end with it and both rollout engines stop at it, so training and rollouts
    agree on when an answer ends. It is not always the tokenizer's eos: a Qwen2.5 base model's
    eos is ``<|endoftext|>`` while its template closes turns with ``<|im_end|>``, and Llama-3
    templates close with ``<|eot_id|>`` while older tokenizer configs name
    ``<|end_of_text|>``.

    Found by rendering a user turn and an assistant turn holding a marker word, without a
    generation prompt, and taking the first special token the template writes after the
    marker. A template that writes none there (or a tokenizer with no chat template) falls
    back to the eos token; raises :class:`UserError` naming the model folder when there is
    neither.
    """
    tok = text_tokenizer(tokenizer_or_processor)
    folder = getattr(tok, "name_or_path", "") or "(unknown folder)"
    template_owner = tokenizer_or_processor
    if getattr(template_owner, "chat_template", None) is None:
        template_owner = tok
    if getattr(template_owner, "chat_template", None) is not None:
        answer: Any = _TURN_MARK
        if is_processor(template_owner):  # processors' templates take lists of parts
            answer = [{"type": "text", "text": _TURN_MARK}]
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}]
        try:
            text = template_owner.apply_chat_template(messages, add_generation_prompt=False,
                                                      tokenize=False)
        except Exception as err:  # jinja errors are cryptic: name the model, keep the cause
            raise UserError(f"model {folder}: its chat template failed on a plain user + "
                            f"assistant exchange ({type(err).__name__}: {err}), so the token "
                            "that ends an answer cannot be found. Fix the chat template in "
                            "its tokenizer_config.json or chat_template.jinja.") from err
        if _TURN_MARK in text:
            tail = text.rsplit(_TURN_MARK, 1)[1]
            special = set(tok.all_special_ids) | {
                i for i, added in tok.added_tokens_decoder.items() if added.special}
            for token in tok(tail, add_special_tokens=False)["input_ids"]:
                if token in special:
                    return int(token)
    if tok.eos_token_id is None:
        raise UserError(f"model {folder}: its chat template closes an assistant turn with no "
                        "special token and the tokenizer has no eos token, so answers cannot "
                        "end. Set eos_token in its tokenizer_config.json (the token the model "
                        "ends an answer with).")
    return int(tok.eos_token_id)


def sample_image(image: Any, sample: Sample):
    """A PIL RGB image from a PIL image, an array, or a path (relative to the data folder)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_absolute() and sample.data_dir:
            path = Path(sample.data_dir) / path
        if not path.is_file():
            raise UserError(f"Sample {sample.uid}: image {str(image)!r} not found (looked at "
                            f"{path}). Fix the image path in the data file.")
        with Image.open(path) as im:
            return im.convert("RGB")
    try:
        import numpy as np

        return Image.fromarray(np.asarray(image)).convert("RGB")
    except (TypeError, ValueError) as err:
        raise UserError(f"Sample {sample.uid}: image of type {type(image).__name__} cannot be "
                        "read; give a path, a PIL image or an [H, W(, C)] array.") from err
