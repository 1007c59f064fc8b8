"""The benchmarks' models: Qwen2-shaped, random weights (head_dim 64, the bundled byte-level
BPE tokenizer), written once into a cache folder, like ``tiny:qwen2`` but at benchmark sizes.

- :func:`build_model`: a causal LM of one of :data:`MODEL_SIZES`, the model every comparison
  uses;
- :func:`qwen2_folder`: any Qwen2 shape, as a causal LM or a one-label sequence classifier (a
  reward model), for benchmarks that need another shape;
- :func:`count_parameters`: distinct parameters of a folder's model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

# Qwen2-shaped text models; every size keeps head_dim 64 (vLLM's CPU attention needs >= 64).
# Parameter counts with the bundled 1024-token vocabulary (tied embeddings).
MODEL_SIZES: dict[str, dict[str, int]] = {
    # ~5.2M parameters: the size every comparison uses
    "5m": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=5,
               num_attention_heads=4, num_key_value_heads=2),
    # ~40M parameters: a larger state dict for the weight-update measurements
    "40m": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=10,
                num_attention_heads=8, num_key_value_heads=4),
}


def bench_cache_dir() -> Path:
    """Where benchmark models are written (``$MEDRL_CACHE/bench``, default ~/.cache/medrl)."""
    from medrl.align.models import default_cache_dir

    return default_cache_dir() / "bench"


def build_model(size: str = "5m", *, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The folder of the ``size`` causal LM (random weights seeded by ``seed``)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model size {size!r} unknown; choose one of {', '.join(MODEL_SIZES)}")
    out_dir = Path(cache_dir or bench_cache_dir()) / f"qwen2-{size}-seed{seed}"
    return qwen2_folder(out_dir, MODEL_SIZES[size], seed=seed)


def qwen2_folder(out_dir: Path, shape: dict[str, int], *, seed: int = 0,
                 head: Literal["lm", "value"] = "lm", tie_word_embeddings: bool = True) -> Path:
    """A Hugging Face folder holding a Qwen2 model of ``shape`` (its config's sizes) with
    random weights seeded by ``seed``: a causal LM (``head="lm"``: eos ``<|im_end|>``, pad
    ``<|endoftext|>`` in its generation config) or a one-label sequence classifier
    (``head="value"``). Built once: a folder that exists is returned as it is; it is written
    to a temporary sibling renamed into place, so an interrupted build is never taken for a
    finished one."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Qwen2Config,
                              Qwen2ForSequenceClassification)

    from medrl.align.models import TOKENIZER_DIR

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=eos,
                         pad_token_id=pad, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         tie_word_embeddings=tie_word_embeddings,
                         **({"num_labels": 1} if head == "value" else {}), **shape)
    torch.manual_seed(seed)
    if head == "value":
        model = Qwen2ForSequenceClassification(config)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = pad
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def count_parameters(model_dir: str | Path) -> int:
    """Number of distinct parameters (tied weights once), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())
