"""Where policies come from: tiny models built from configs, local folders, run checkpoints.

No model hub is contacted. ``resolve_policy`` turns a recipe's ``model.policy`` into a local
Hugging Face folder that both the learner and the rollout engines load:

- ``tiny:qwen2`` / ``tiny:qwen2-vl``: random weights from a small config (head_dim 64, so
  vLLM's CPU kernels accept it), with the bundled byte-level BPE tokenizer, written once into
  a cache folder keyed by arch and seed;
- a local Hugging Face folder (has ``config.json``);
- a run folder or one of its ``checkpoints/step-N`` folders: the ``policy/`` of the latest
  complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from medrl.align.records import UserError

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
TINY_ARCHS = ("qwen2", "qwen2-vl")

# Tiny text tower shared by both archs: 2 layers, hidden 128, 2 heads of 64, 1 KV head.
_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
# Images are resized so that one image is at most 8x8 patches of 14 px -> 16 tokens after merge.
VL_MIN_PIXELS = 28 * 28
VL_MAX_PIXELS = 112 * 112


def tiny_config(arch: str, vocab_size: int, special: dict[str, int]):
    """A transformers config for ``tiny:<arch>``."""
    from transformers import Qwen2Config, Qwen2VLConfig

    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            bos_token_id=None,
            eos_token_id=special["<|im_end|>"],
            pad_token_id=special["<|endoftext|>"],
            **_TEXT,
        )
    if arch == "qwen2-vl":
        text = dict(_TEXT, vocab_size=vocab_size, bos_token_id=None,
                    eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
                    rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 8, 8]})
        text.pop("tie_word_embeddings")
        return Qwen2VLConfig(
            text_config=text,
            vision_config=dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=128,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=special["<|image_pad|>"],
            video_token_id=special["<|video_pad|>"],
            vision_start_token_id=special["<|vision_start|>"],
            vision_end_token_id=special["<|vision_end|>"],
            eos_token_id=special["<|im_end|>"],
            pad_token_id=special["<|endoftext|>"],
            tie_word_embeddings=True,
        )
    raise UserError(f"model.policy: unknown tiny architecture {arch!r}; choose one of "
                    f"{', '.join('tiny:' + a for a in TINY_ARCHS)}.")


def materialize_tiny(arch: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write ``tiny:<arch>`` with random weights (seeded) as a Hugging Face folder.

    The folder is written to a temporary sibling and renamed into place, so a crash never
    leaves a half-written model that a later call would take for complete.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():  # before the imports: they cost seconds
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    special.update({t: tokenizer.convert_tokens_to_ids(t)
                    for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                              "<|vision_end|>", "<|im_end|>", "<|endoftext|>")})
    config = tiny_config(arch, len(tokenizer), special)
    torch.manual_seed(seed)
    factory = AutoModelForImageTextToText if arch == "qwen2-vl" else AutoModelForCausalLM
    model = factory.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = special["<|im_end|>"]
    model.generation_config.pad_token_id = special["<|endoftext|>"]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if arch == "qwen2-vl":  # preprocessor_config.json beside the tokenizer files
            build_vl_processor(tokenizer).image_processor.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def build_vl_processor(tokenizer, image_processor=None):
    """A Qwen2-VL processor from a tokenizer and the PIL image processor.

    transformers' video processor needs torchvision, which has no CPU build on the package
    registry; images (and CT volumes, sent as a list of slice images) need only the PIL image
    processor, so the processor is built without a video processor.
    """
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    if image_processor is None:
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": VL_MIN_PIXELS, "longest_edge": VL_MAX_PIXELS})
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     video_processor=None, chat_template=tokenizer.chat_template)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDRL_CACHE", Path.home() / ".cache" / "medrl"))


def resolve_policy(spec: str, *, cache_dir: str | Path | None = None, seed: int = 0,
                   base_dir: str | Path | None = None) -> Path:
    """Turn ``model.policy`` into a local Hugging Face folder (see module docstring).

    ``base_dir`` resolves relative paths (the recipe's folder). Raises :class:`UserError` for
    anything that is not a usable local model.
    """
    if spec.startswith("tiny:"):
        arch = spec.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            tiny_config(arch, 0, {})  # raises the UserError naming the choices
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        return materialize_tiny(arch, cache / "tiny" / f"{arch}-seed{seed}", seed=seed)

    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        if (path / "policy" / "config.json").exists():  # one checkpoint folder
            return path / "policy"
        if (path / "checkpoints").is_dir():  # a run folder: its latest complete checkpoint
            done = sorted(p for p in (path / "checkpoints").glob("step-*")
                          if (p / "COMPLETE").exists())
            if done:
                return done[-1] / "policy"
            raise UserError(f"model.policy: run folder {path} has no complete checkpoint "
                            "(no checkpoints/step-*/COMPLETE). Point at a finished run or at a "
                            "Hugging Face model folder.")
        raise UserError(f"model.policy: {path} is a folder but holds no config.json, policy/ "
                        "or checkpoints/. Point at a Hugging Face model folder, a run folder, "
                        "or use tiny:qwen2 / tiny:qwen2-vl.")
    hint = (" It looks like a hub id, but no model hub is reachable: download the model "
            "elsewhere and set model.policy to its local folder."
            if "/" in spec and not spec.startswith((".", "/", "~")) else "")
    raise UserError(f"model.policy: {spec!r} is not a local folder.{hint} "
                    "Use a local Hugging Face folder, a run folder, or tiny:qwen2 / tiny:qwen2-vl.")


def is_vision_model(model_dir: str | Path) -> bool:
    """True when the folder holds a vision-language model (has a vision_config)."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return "vision_config" in config


def load_tokenizer(model_dir: str | Path):
    """The tokenizer (text models) or processor (VLMs) of a local model folder, with a pad
    token (see :func:`ensure_pad_token`)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if not is_vision_model(model_dir):
        return ensure_pad_token(AutoTokenizer.from_pretrained(model_dir), model_dir)
    try:
        import torchvision  # noqa: F401  (the full processor, video included, needs it)
    except ImportError:
        processor = build_vl_processor(
            AutoTokenizer.from_pretrained(model_dir),
            AutoImageProcessor.from_pretrained(model_dir, backend="pil"))
    else:
        processor = AutoProcessor.from_pretrained(model_dir)
    ensure_pad_token(processor.tokenizer, model_dir)
    return processor


def ensure_pad_token(tokenizer, model_dir: str | Path):
    """``tokenizer`` with a pad token: its own, else its eos token (Llama-3 and Mistral
    tokenizers ship none, and batched prompts must be padded).

    Padding is always masked out (attention mask, loss mask), so which id fills it does not
    change any result. Raises :class:`UserError` when there is neither a pad nor an eos token.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise UserError(f"model {model_dir}: the tokenizer has neither a pad token nor an eos "
                        "token, so prompts cannot be batched and completions cannot end. Set "
                        "pad_token and eos_token in its tokenizer_config.json.")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The recipe's ``model.dtype`` names; "auto" is bf16 on a GPU and fp32 on the CPU.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype, *, on_gpu: bool):
    """The one place a dtype name becomes a ``torch.dtype``: learner and engines alike.

    dtype: a name of ``DTYPE_NAMES``, a ``torch.dtype``, or None (= "auto"). on_gpu: whether
    the caller's process computes on a GPU (decides "auto").
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    if dtype not in DTYPE_NAMES:
        raise UserError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, dtype)


def context_length(model_dir: str | Path) -> int | None:
    """The model's maximum positions (``max_position_embeddings``), None when it has none."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    value = config.get("max_position_embeddings",
                       (config.get("text_config") or {}).get("max_position_embeddings"))
    return int(value) if value else None


# What a learner trains: "lm" a causal LM (or VLM) scored per token, "value" a text model
# with a one-output sequence-classification head (a reward model) scored per sequence.
Head = Literal["lm", "value"]


def load_model(model_dir: str | Path, *, dtype=None, attn_implementation: str = "sdpa",
               head: Head = "lm"):
    """Load the policy as a causal LM (text) or image-text-to-text model (VLM), or, with
    ``head="value"``, a text model as a one-label sequence classifier (a causal LM folder gets
    a new, randomly initialised ``score`` head; a reward-model folder keeps its own).

    dtype: a ``torch.dtype`` (None: float32). attn_implementation: "sdpa", "eager" or
    "flash_attention_2" (the recipe's ``model.attn_implementation``).
    """
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoModelForSequenceClassification)

    vision = is_vision_model(model_dir)
    if head == "value":
        if vision:
            raise UserError(f"model {model_dir}: a reward model is trained on a text model; "
                            "this folder holds a vision-language model.")
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=dtype or torch.float32,
            attn_implementation=attn_implementation)
        if model.config.pad_token_id is None:  # HF's forward finds each row's last token by it
            model.config.pad_token_id = load_tokenizer(model_dir).pad_token_id
        return model
    factory = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    return factory.from_pretrained(model_dir, dtype=dtype or torch.float32,
                                   attn_implementation=attn_implementation)


def add_lora(model, lora: dict, *, seed: int, head: Head = "lm"):
    """``model`` wrapped with PEFT LoRA adapters: ``lora`` is ``{"r", "alpha", "dropout",
    "target_modules"}`` (defaults 8, 16, 0, the attention projections). The adapters' initial
    values come from ``seed`` alone; a value head (``head="value"``) trains in full beside them
    (``modules_to_save``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(
        r=int(lora.get("r", 8)), lora_alpha=float(lora.get("alpha", 16.0)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
        modules_to_save=["score"] if head == "value" else None))


def placeholder_token_ids(config) -> list[int]:
    """The image / video placeholder ids of a vision-language model's config ([] for text)."""
    return [int(v) for k in ("image_token_id", "video_token_id")
            if (v := getattr(config, k, None)) is not None]


def text_embedded_completions(model, input_ids, prompt_len: int) -> dict:
    """Forward arguments that treat placeholder ids sampled in a completion as plain tokens.

    A vision-language model fills every column holding an image placeholder id with image
    features, and refuses a count that does not match the images. While decoding, the
    engines embedded a sampled ``<|image_pad|>`` as the text token it is; this gives the
    same: ``inputs_embeds`` of the real ids, and ``input_ids`` (read only to find the
    placeholders) with completion columns ``>= prompt_len`` holding one cleared.

    model: the VLM (or its backbone); input_ids: [B, L]. Returns ``{"input_ids": ...}`` alone
    when no completion holds a placeholder (the common case: nothing changes).
    """
    import torch

    ids = placeholder_token_ids(model.config)
    if not ids:
        return {"input_ids": input_ids}
    stray = torch.zeros_like(input_ids, dtype=torch.bool)
    stray[:, prompt_len:] = torch.isin(input_ids[:, prompt_len:],
                                       torch.tensor(ids, device=input_ids.device))
    if not stray.any():
        return {"input_ids": input_ids}
    cleared = min(set(range(len(ids) + 1)) - set(ids))  # any id that is not a placeholder
    return {"input_ids": input_ids.masked_fill(stray, cleared),
            "inputs_embeds": model.get_input_embeddings()(input_ids)}
