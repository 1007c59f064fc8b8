"""Prompt templates: one dataset row -> a list of chat messages.

Three templates, chosen by the recipe's ``data.template``:

- ``mcq``: an optional context passage, the question, the options one per line as
  ``A. text``, and the instruction :data:`MCQ_INSTRUCTION`;
- ``open``: the prompt (or the question, after an optional context) as it is;
- ``chat``: the row already holds a list of ``{"role", "content"}`` messages.

The recipe's ``system_prompt``, when set, becomes the first message (``chat`` keeps a system
message the row already has). Text-only messages carry a plain string as ``content``, which
every chat template understands. With media, the user content becomes a list of parts: one
``{"type": "image"}`` part per image first (a CT volume counts as its ``num_slices`` slice
images, after the row's own images), then one ``{"type": "text", "text": ...}`` part. The
pixels themselves travel in ``Sample.images`` in the same order; the processor pairs the
n-th image part with the n-th image.

Everything here is a pure, deterministic function of its arguments.
"""

from __future__ import annotations

import string
from typing import Any, Mapping, Sequence

from medrl.align.records import UserError

Messages = list[dict[str, Any]]

MCQ_INSTRUCTION = "Answer with the letter of the correct option."
LETTERS = string.ascii_uppercase
TEMPLATES = ("mcq", "open", "chat")


def letter_options(options: Mapping[str, Any] | Sequence[Any]) -> dict[str, str]:
    """Options as an ordered ``{letter: text}`` dict.

    A mapping keeps its own keys and order (``{"A": ..., "B": ...}``); entries whose value is
    None are dropped (Arrow struct columns fill a row's absent keys with None). A list or
    tuple is lettered A, B, C, ... in order. Values become strings.
    """
    if isinstance(options, Mapping):
        return {str(k): str(v) for k, v in options.items() if v is not None}
    if isinstance(options, (list, tuple)):
        if len(options) > len(LETTERS):
            raise ValueError(f"{len(options)} options: at most {len(LETTERS)} can be lettered")
        return {LETTERS[i]: str(v) for i, v in enumerate(options)}
    raise TypeError(f"options must be a dict or a list, not {type(options).__name__}")


def format_options(options: Mapping[str, str]) -> str:
    """``{"A": "x", "B": "y"}`` -> ``"A. x\\nB. y"``."""
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def format_context(context: str | Sequence[str] | None) -> str:
    """A context passage: a string as is, a list of strings joined by blank lines."""
    if context is None:
        return ""
    if isinstance(context, str):
        return context.strip()
    return "\n\n".join(str(part).strip() for part in context if part is not None)


def mcq_text(question: str, options: Mapping[str, str], *,
             context: str | Sequence[str] | None = None, instruction: str = MCQ_INSTRUCTION) -> str:
    """The user text of a multiple-choice item: context, question, options, instruction."""
    blocks = [format_context(context), question.strip(), format_options(options), instruction]
    return "\n\n".join(b for b in blocks if b)


def open_text(question: str, *, context: str | Sequence[str] | None = None) -> str:
    """The user text of an open question: the context, then the question as it is."""
    return "\n\n".join(b for b in (format_context(context), question.strip()) if b)


def user_content(text: str, num_images: int = 0) -> str | list[dict[str, Any]]:
    """A user message's content: the text alone, or ``num_images`` image parts then the text."""
    if num_images <= 0:
        return text
    return [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]


def _with_system(messages: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def mcq_messages(question: str, options: Mapping[str, Any] | Sequence[Any], *,
                 context: str | Sequence[str] | None = None, system_prompt: str | None = None,
                 num_images: int = 0) -> Messages:
    """Messages for a multiple-choice item (options as a dict or a list, see letter_options)."""
    text = mcq_text(question, letter_options(options), context=context)
    return _with_system([{"role": "user", "content": user_content(text, num_images)}],
                        system_prompt)


def open_messages(prompt: str, *, context: str | Sequence[str] | None = None,
                  system_prompt: str | None = None, num_images: int = 0) -> Messages:
    """Messages for an open question or a ready prompt."""
    text = open_text(prompt, context=context)
    return _with_system([{"role": "user", "content": user_content(text, num_images)}],
                        system_prompt)


def count_image_parts(messages: Sequence[Mapping[str, Any]]) -> int:
    """How many ``{"type": "image"}`` parts the messages hold (= images the prompt needs)."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, Mapping) and p.get("type") == "image")


def _has_image_part(messages: Messages) -> bool:
    return count_image_parts(messages) > 0


def chat_messages(messages: Sequence[Mapping[str, Any]], *, system_prompt: str | None = None,
                  num_images: int = 0) -> Messages:
    """A copy of a ready conversation.

    When the row has media but no message holds an image part yet, the image parts are put in
    front of the first user message's text. Messages that already place their image parts are
    kept as they are (the row then decides where each image goes).
    """
    out: Messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} is not a {{'role': ..., 'content': ...}} mapping")
        content = m["content"]
        out.append({"role": str(m["role"]),
                    "content": [dict(p) for p in content] if isinstance(content, list)
                    else content})
    if num_images > 0 and not _has_image_part(out):
        users = [i for i, m in enumerate(out) if m["role"] == "user"]
        if not users:
            raise ValueError("the conversation has media but no user message to attach it to")
        first = out[users[0]]
        text = first["content"]
        if isinstance(text, list):
            first["content"] = [{"type": "image"} for _ in range(num_images)] + text
        else:
            first["content"] = user_content(str(text), num_images)
    return _with_system(out, system_prompt)


def render_messages(row: Mapping[str, Any], *, template: str, system_prompt: str | None = None,
                    num_images: int = 0) -> Messages:
    """Messages for one canonical row (as the data loader builds it).

    Reads ``row["prompt"]`` (takes precedence) or ``row["question"]``, ``row["options"]``,
    ``row["context"]`` and, for ``chat``, ``row["messages"]``. Raises :class:`UserError` when
    the template needs a field the row lacks; the caller adds the file and sample to the text.
    """
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "chat":
        messages = row.get("messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise UserError("the chat template needs a non-empty list of messages")
        try:
            return chat_messages(messages, system_prompt=system_prompt, num_images=num_images)
        except ValueError as exc:
            raise UserError(f"bad messages: {exc}") from None
    context = row.get("context")
    prompt = row.get("prompt")
    if template == "open" and prompt is not None:
        return open_messages(str(prompt), context=context, system_prompt=system_prompt,
                             num_images=num_images)
    question = prompt if prompt is not None else row.get("question")
    if question is None or not str(question).strip():
        raise UserError("the question is empty")
    if template == "open":
        return open_messages(str(question), context=context, system_prompt=system_prompt,
                             num_images=num_images)
    options = row.get("options")
    if options is None:
        raise UserError("the mcq template needs options, and this row has none")
    try:
        lettered = letter_options(options)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad options: {exc}") from None
    if len(lettered) < 2:
        raise UserError(f"the mcq template needs at least 2 options, got {len(lettered)}")
    return mcq_messages(str(question), lettered, context=context, system_prompt=system_prompt,
                        num_images=num_images)
