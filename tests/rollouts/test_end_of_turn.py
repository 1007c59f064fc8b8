"""The chat template's end of turn, found once (``end_of_turn_id``) and honoured by both rollout
engines, for a model whose eos differs from it.

The "base model" below is a copy of the tiny Qwen2 whose tokenizer and generation config name
``<|endoftext|>`` as eos (as Qwen2.5 base models ship), while its chat template still closes
every turn with ``<|im_end|>``, the token SFT ends answers with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from engine_backends import BACKENDS, eager_token_weights, make_engine

from medrl.align.encode import end_of_turn_id
from medrl.align.models import load_model, load_tokenizer
from medrl.align.records import Sample, UserError
from medrl.rollouts.engine import SamplingParams



def base_model_copy(src: Path, dest: Path, *, eos: str | None = "<|endoftext|>",
                    template: str | None = None) -> Path:
    """A copy of a tiny model folder whose tokenizer's ``eos_token`` is ``eos`` (None: no eos),
    with generation_config.json and config.json naming the same id; ``template`` replaces the
    chat template when given."""
    shutil.copytree(src, dest)
    tok_path = dest / "tokenizer_config.json"
    config = json.loads(tok_path.read_text())
    config["eos_token"] = eos
    tok_path.write_text(json.dumps(config))
    if template is not None:
        (dest / "chat_template.jinja").write_text(template)
    eos_id = load_tokenizer(dest).convert_tokens_to_ids(eos) if eos else None
    for name in ("generation_config.json", "config.json"):
        path = dest / name
        model_config = json.loads(path.read_text())
        model_config["eos_token_id"] = eos_id
        path.write_text(json.dumps(model_config))
    return dest


@pytest.fixture(scope="module")
def base_model(tiny_qwen2, tmp_path_factory) -> Path:
    return base_model_copy(tiny_qwen2, tmp_path_factory.mktemp("base") / "model")


def prompt(i: int) -> Sample:
    return Sample(uid=f"q{i}", group_id=f"q{i}", messages=[
        {"role": "user", "content": f"Case {i}: cough and fever. Diagnosis?"}])


# -- finding the end of turn ----------------------------------------------------------------

def test_the_end_of_turn_is_the_templates_not_the_eos(base_model):
    tok = load_tokenizer(base_model)
    assert tok.eos_token == "<|endoftext|>"
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_a_vision_processor_finds_the_same_end_of_turn(tiny_qwen2_vl):
    processor = load_tokenizer(tiny_qwen2_vl)
    assert end_of_turn_id(processor) == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


PLAIN_TEMPLATE = ("{%- for m in messages -%}{{- m['role'] + ': ' + m['content'] + '\n\n' -}}"
                  "{%- endfor -%}{%- if add_generation_prompt -%}assistant: {%- endif -%}")


def test_a_template_without_an_end_token_falls_back_to_the_eos(tiny_qwen2, tmp_path):
    folder = base_model_copy(tiny_qwen2, tmp_path / "plain", template=PLAIN_TEMPLATE)
    tok = load_tokenizer(folder)
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")


def test_neither_an_end_token_nor_an_eos_is_a_clear_error(tiny_qwen2, tmp_path):
    folder = base_model_copy(tiny_qwen2, tmp_path / "noeos", eos=None, template=PLAIN_TEMPLATE)
    with pytest.raises(UserError, match=r"model .*noeos.*no eos token.*eos_token"):
        end_of_turn_id(load_tokenizer(folder))


# -- both engines stop at it ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_rollouts_stop_at_the_end_of_turn(backend, base_model):
    engine = make_engine(backend, base_model)
    try:
        im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert engine.tokenizer.eos_token_id != im_end
        engine.update_weights(eager_token_weights(load_model(base_model), im_end), 1)
        out = engine.generate([prompt(0), prompt(1)], SamplingParams(
            n=4, max_new_tokens=24, min_new_tokens=2, seed=4))
        ended = [s for s in out if s.completion_ids[-1] == im_end]
        assert len(ended) >= 6
        for s in out:
            assert im_end not in s.completion_ids[:-1]  # the end of turn only ever last
            assert len(s.completion_ids) >= 2
        for s in ended:
            assert s.finish_reason == "stop"
            assert "<|im_end|>" not in s.completion_text
    finally:
        if backend == "vllm":
            engine.shutdown()
