"""New vocabulary tokens for a policy (``model.special_tokens``): the tokenizer and the model.

MedCausalX teaches a policy to reason in ``<causal>`` and ``<verify>`` blocks; each tag
should be one token, so that the policy writes (and the learner scores) one decision per
tag. :func:`prepare_policy` writes a copy of the policy folder with the tokens added:

- **Tokenizer.** Each token becomes an added token (never split by the BPE, one id each),
  *not* flagged ``special``: both rollout engines decode completions with
  ``skip_special_tokens=True``, which would drop a special tag from ``completion_text`` and
  leave the format and attribution rewards nothing to read.
- **Embeddings.** A new id past the embedding matrix grows it (and an untied LM head) to
  ``len(tokenizer)`` rows; a new id that falls on a spare row (Qwen2.5 folders have ~270
  rows past their tokenizer) reuses it. Every new id's row, input and output alike, is set to
  the mean of the rows of the tokens the tokenizer had before: a neutral start whose logit is
  the average token's, instead of a random row that could dominate sampling. Rows of the old
  tokens are untouched, so the old tokens' logits do not change.

Tokens that already encode to one id are left alone; when every token does, the original
folder is used as it is. The copy is written to a temporary sibling and renamed into place,
with :data:`MARKER` naming its source and tokens: a later call with the same source and
tokens (a resumed run) reuses it, anything else re-makes it, and the result is the same
bytes each time (no random numbers are drawn).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from medrl.align.records import UserError

POLICY_INIT = "policy_init"  # the prepared folder's name inside a run folder
MARKER = "special_tokens.json"  # {"source": ..., "tokens": [...], "new_ids": [...]}
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")  # not copied over


def checked_tokens(tokens: Sequence[str]) -> list[str]:
    """``tokens`` as a list, or ValueError naming the first bad one: each must be a non-empty
    string without whitespace, listed once."""
    out: list[str] = []
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise ValueError(f"entry {i} ({token!r}) is not a token: write each as a non-empty "
                             "string without spaces, e.g. '<causal>'")
        if token in out:
            raise ValueError(f"{token!r} is listed twice; list each token once")
        out.append(token)
    return out


def single_id(tokenizer, token: str) -> int | None:
    """The one id ``token`` encodes to with ``tokenizer`` (a plain tokenizer), else None."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def missing_tokens(tokenizer, tokens: Sequence[str]) -> list[str]:
    """The tokens of ``tokens`` that do not yet encode to one id."""
    return [t for t in tokens if single_id(tokenizer, t) is None]


def prepare_policy(policy_dir: str | Path, tokens: Sequence[str], out_dir: str | Path) -> Path:
    """The policy folder to train: ``policy_dir`` itself when every token of ``tokens`` is
    already one id, else ``out_dir`` holding a copy with them added (see the module
    docstring). Raises :class:`UserError` for a bad token list."""
    from medrl.align.encode import text_tokenizer
    from medrl.align.models import load_tokenizer

    try:
        tokens = checked_tokens(tokens)
    except ValueError as exc:
        raise UserError(f"model.special_tokens: {exc}.") from None
    policy_dir, out_dir = Path(policy_dir), Path(out_dir)
    if not tokens or not missing_tokens(text_tokenizer(load_tokenizer(policy_dir)), tokens):
        return policy_dir
    want = {"source": str(policy_dir.resolve()), "tokens": tokens}
    try:
        have = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        have = None
    if isinstance(have, dict) and {k: have.get(k) for k in want} == want \
            and (out_dir / "config.json").is_file():
        return out_dir  # made before for this source and these tokens (a resumed run)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        new_ids = write_with_tokens(policy_dir, tokens, tmp)
        (tmp / MARKER).write_text(json.dumps({**want, "new_ids": new_ids}, indent=1) + "\n")
        if out_dir.exists():  # made for another source or token list: replaced
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_with_tokens(policy_dir: Path, tokens: Sequence[str], out_dir: Path) -> list[int]:
    """Save ``policy_dir`` with ``tokens`` added into the existing folder ``out_dir``; returns
    the new ids whose embedding rows were (re)initialised. Loads the whole model on the CPU in
    its own dtype (``dtype="auto"``)."""
    import torch
    from tokenizers import AddedToken

    from medrl.align.encode import text_tokenizer
    from medrl.align.models import load_model, load_tokenizer

    tokenizer = text_tokenizer(load_tokenizer(policy_dir))
    old_len = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False,
                                     lstrip=False, rstrip=False) for t in tokens])
    ids = [single_id(tokenizer, t) for t in tokens]
    if any(i is None for i in ids):  # e.g. a token that is a prefix of another added one
        bad = [t for t, i in zip(tokens, ids) if i is None]
        raise UserError(f"model.special_tokens: {', '.join(map(repr, bad))} still encode to "
                        f"several ids after being added to the tokenizer of {policy_dir}; "
                        "choose tokens that do not overlap the tokenizer's own added tokens.")
    new_ids = sorted({i for i in ids if i >= old_len})

    model = load_model(policy_dir, dtype="auto")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # tied weights are set twice to the same values
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is None:
                continue
            weight = layer.weight  # [vocab, hidden]
            weight[new_ids] = weight[:old_len].float().mean(0).to(weight.dtype)
            bias = getattr(layer, "bias", None)
            if bias is not None:
                bias[new_ids] = bias[:old_len].float().mean().to(bias.dtype)
    # Everything but the weights as it was (processor and generation settings, chat
    # template), then the new weights, config and tokenizer files over it.
    for src in policy_dir.iterdir():
        if src.is_file() and not src.name.endswith(WEIGHT_FILES) and src.name != MARKER:
            shutil.copy2(src, out_dir / src.name)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return new_ids
