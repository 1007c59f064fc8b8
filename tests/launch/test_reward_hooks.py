"""Edited copies through the policy log-prob hook: an edit of what the prompt was encoded from
(messages, images) takes effect; an edit of what the learner never reads (row, volume) is
refused; the copies an engine did not make pass as they are."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from medrl.align.records import Sample, UserError
from medrl.launch.reward_hooks import PromptEncoder, current_prompts


def engine_sample(processor, *, images=(), question="Which lobe is affected?"):
    """A sample as a rollout engine returns it (prompt_ids and prompt_source set)."""
    from medrl.align.encode import encode_prompt
    from medrl.align.prompts import open_messages
    from medrl.rollouts.engine import finished_sample

    prompt = Sample(uid="g0", group_id="g0", row={"question": question},
                    messages=open_messages(question, num_images=len(images)),
                    images=list(images), volume="ct.nii.gz")
    ids = encode_prompt(processor, prompt).prompt_ids[0]
    return finished_sample(prompt, 0, prompt_ids=ids, completion_ids=[11, 12, 13],
                           logprobs=[-1.0, -1.0, -1.0], finish_reason="stop",
                           tokenizer=getattr(processor, "tokenizer", processor),
                           policy_version=0)


def reworded(sample: Sample, text: str) -> Sample:
    from medrl.align.prompts import open_messages

    return dataclasses.replace(sample, messages=open_messages(text,
                                                              num_images=len(sample.images)))


def test_an_unedited_copy_passes_untouched_and_an_edit_of_messages_is_encoded(tiny_qwen2):
    from medrl.align.encode import encode_prompt
    from medrl.align.models import load_tokenizer

    tok = load_tokenizer(tiny_qwen2)
    encoder = PromptEncoder(tiny_qwen2)
    sample = engine_sample(tok)
    assert set(sample.prompt_source) == {"messages", "images", "row", "volume", "image_sizes"}
    copy = dataclasses.replace(sample)
    assert current_prompts([copy], encoder)[0] is copy

    edited = reworded(sample, "Which lobe is spared?")
    got = current_prompts([edited], encoder)[0]
    assert got.prompt_ids == encode_prompt(tok, edited).prompt_ids[0] != sample.prompt_ids
    assert got.completion_ids == sample.completion_ids
    assert current_prompts([got], encoder)[0] is got  # its sources are now what it holds

    ids = dataclasses.replace(sample, prompt_ids=[0] + sample.prompt_ids[1:])  # token edit
    assert current_prompts([ids], encoder)[0] is ids
    bare = Sample(uid="x", group_id="x", prompt_ids=[1, 2], completion_ids=[3])
    assert current_prompts([bare], encoder)[0] is bare  # not made by an engine
    assert pickle.loads(pickle.dumps(encoder)).policy_dir == encoder.policy_dir


@pytest.mark.parametrize("field, value", [("row", {"question": "Another question?"}),
                                          ("volume", "other.nii.gz")])
def test_an_edit_the_learner_never_reads_is_refused(tiny_qwen2, field, value):
    from medrl.align.models import load_tokenizer

    sample = engine_sample(load_tokenizer(tiny_qwen2))
    with pytest.raises(UserError, match=rf"copy of sample g0/0 with its {field} edited; the "
                       "learner never reads them"):
        current_prompts([dataclasses.replace(sample, **{field: value})],
                        PromptEncoder(tiny_qwen2))


def test_an_edited_image_of_another_size_gets_its_own_image_tokens(tiny_qwen2_vl):
    from PIL import Image

    from medrl.align.models import load_tokenizer

    processor = load_tokenizer(tiny_qwen2_vl)
    encoder = PromptEncoder(tiny_qwen2_vl)
    sample = engine_sample(processor, images=[Image.new("RGB", (56, 56), (120, 30, 30))])
    same_size = dataclasses.replace(sample, images=[Image.new("RGB", (56, 56), (0, 0, 0))])
    got = current_prompts([same_size], encoder)[0]
    assert got.prompt_ids == sample.prompt_ids and got.images == same_size.images
    assert encoder._encoder is None  # same sizes, same image tokens: nothing re-encoded
    bigger = dataclasses.replace(sample, images=[Image.new("RGB", (112, 112), (0, 0, 0))])
    image_token = processor.image_token_id
    got = current_prompts([bigger], encoder)[0]
    assert got.prompt_ids.count(image_token) == 4 * sample.prompt_ids.count(image_token)


def test_the_learner_scores_the_edited_prompt_not_the_stale_ids(tiny_qwen2):
    """What used to happen: the copy's messages changed, its prompt_ids did not, and the
    learner scored the original prompt. Scored here as a learner rank does: medrl's collate,
    then token_logprobs."""
    import torch

    from medrl.align.batch import collate
    from medrl.align.encode import encode_prompt
    from medrl.align.logprobs import token_logprobs
    from medrl.align.models import load_model, load_tokenizer

    tok, model = load_tokenizer(tiny_qwen2), load_model(tiny_qwen2).eval()
    sample = engine_sample(tok)
    stale = reworded(sample, "Is the heart enlarged on this film?")
    fresh = dataclasses.replace(stale, prompt_ids=encode_prompt(tok, stale).prompt_ids[0],
                                prompt_source={})

    def logprobs(samples):
        batch = collate(samples, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            return token_logprobs(model, batch.input_ids, batch.attention_mask,
                                  num_completion_tokens=batch.num_completion_tokens)

    got = logprobs(current_prompts([stale], PromptEncoder(tiny_qwen2)))
    torch.testing.assert_close(got, logprobs([fresh]))
    assert not torch.allclose(got, logprobs([sample]))
