"""Prompt templates: exact texts, image parts, system prompts, and rendering by a chat template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from medrl.align.records import UserError
from medrl.align.prompts import (MCQ_INSTRUCTION, chat_messages, count_image_parts,
                                    letter_options, mcq_messages, open_messages,
                                    render_messages)

OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin"}


def test_letter_options():
    assert letter_options(["x", "y", "z"]) == {"A": "x", "B": "y", "C": "z"}
    assert letter_options({"A": "x", "B": None, "C": 3}) == {"A": "x", "C": "3"}
    assert list(letter_options({"B": "b", "A": "a"})) == ["B", "A"]  # stored order kept
    with pytest.raises(ValueError, match="at most 26"):
        letter_options([str(i) for i in range(27)])
    with pytest.raises(TypeError):
        letter_options("A) x B) y")


def test_mcq_exact_text_and_system_prompt():
    msgs = mcq_messages("Which drug is an anticoagulant?  ", OPTIONS, system_prompt="Be brief.")
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Which drug is an anticoagulant?\n\nA. Aspirin\nB. Heparin\n"
                                    "C. Warfarin\n\n" + MCQ_INSTRUCTION},
    ]
    assert mcq_messages("Q?", ["x", "y"])[0]["content"].endswith("A. x\nB. y\n\n" + MCQ_INSTRUCTION)


def test_context_list_comes_first():
    msgs = open_messages("Is it?", context=["First part.", "Second part. "])
    assert msgs == [{"role": "user", "content": "First part.\n\nSecond part.\n\nIs it?"}]


def test_images_become_parts_before_the_text():
    msgs = mcq_messages("Finding?", OPTIONS, num_images=3)
    content = msgs[0]["content"]
    assert content[:3] == [{"type": "image"}] * 3
    assert content[3]["type"] == "text" and content[3]["text"].startswith("Finding?\n\nA. Aspirin")
    assert len(content) == 4
    assert count_image_parts(msgs) == 3 and count_image_parts(mcq_messages("Q", OPTIONS)) == 0


def test_chat_template_copies_and_attaches_images():
    convo = [{"role": "user", "content": "Describe the scan."},
             {"role": "assistant", "content": "It shows..."}]
    out = chat_messages(convo, system_prompt="S", num_images=2)
    assert out[0] == {"role": "system", "content": "S"}
    assert out[1]["content"] == [{"type": "image"}, {"type": "image"},
                                 {"type": "text", "text": "Describe the scan."}]
    assert convo[0]["content"] == "Describe the scan."  # the row is not modified
    placed = [{"role": "system", "content": "Own."},
              {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
    kept = chat_messages(placed, system_prompt="S", num_images=1)
    assert kept == placed and kept is not placed  # own system prompt and image placement kept
    with pytest.raises(ValueError, match="message 0"):
        chat_messages([{"text": "x"}])


def test_render_messages_dispatch_and_errors():
    row = {"question": "Q?", "options": OPTIONS}
    assert render_messages(row, template="mcq") == mcq_messages("Q?", OPTIONS)
    assert render_messages(row, template="open") == [{"role": "user", "content": "Q?"}]
    assert render_messages({"prompt": "P", "question": "Q"}, template="open")[0]["content"] == "P"
    with pytest.raises(UserError, match="needs options"):
        render_messages({"question": "Q?"}, template="mcq")
    with pytest.raises(UserError, match="at least 2 options"):
        render_messages({"question": "Q?", "options": {"A": "x"}}, template="mcq")
    with pytest.raises(UserError, match="question is empty"):
        render_messages({"question": "  ", "options": OPTIONS}, template="mcq")
    with pytest.raises(UserError, match="non-empty list of messages"):
        render_messages({"question": "Q"}, template="chat")
    with pytest.raises(UserError, match="unknown template"):
        render_messages(row, template="cloze")


def test_rendered_by_the_tiny_chat_template(tiny_qwen2):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    msgs = mcq_messages("Q?", ["x", "y"], system_prompt="Sys.")
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nQ?\n\nA. x\nB. y\n\n"
                    f"{MCQ_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    with_images = tok.apply_chat_template(mcq_messages("Q?", ["x", "y"], num_images=2),
                                          tokenize=False)
    assert with_images.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert with_images.index("<|image_pad|>") < with_images.index("Q?")
