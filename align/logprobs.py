"""Per-token log-probabilities of completions, without holding the full [B, T, V] logits.

The learner scores each completion token under the current policy (and the reference):
log pi(token_j | prompt, tokens_<j). With a vocabulary of ~150k entries, float32 logits for
a batch of long completions are many GiB, so this module runs the model's backbone once,
keeps only the hidden states that predict completion tokens, and projects them through the
LM head and a log-softmax ``chunk_size`` tokens at a time. With gradients on, each chunk is
recomputed in the backward pass (activation checkpointing), so only one chunk's logits
exist at any time in either pass.

Input layout (the learner's ``TrainBatch``): ``input_ids`` is ``[B, P + T]``, the prompt
left-padded to ``P`` columns and the completion right-padded to ``T``. Completion token
``j`` sits at column ``P + j`` and is predicted by the hidden state at column ``P + j - 1``.
Log-probs at padded completion positions are computed like any other and must be masked by
the caller.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _backbone_and_head(model):
    """The transformer body (returns ``last_hidden_state``) and the LM head of ``model``."""
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: the LoRA layers live inside
        model = model.get_base_model()
    head = model.get_output_embeddings()
    body = model.base_model
    if head is None or body is model:
        raise ValueError(f"model: {type(model).__name__} has no separate backbone and LM head; "
                         "pass a causal LM or a vision-language model for generation.")
    text_config = model.config.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(text_config, attr, None) not in (None, 1.0):
            raise ValueError(f"model: config.{attr} is set; logits that are rescaled after the "
                             "LM head are not supported by token_logprobs.")
    return body, head


def _score_chunk(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                 temperature: float, with_entropy: bool):
    """Log-prob of ``targets`` (and entropy) for hidden states [N, H] -> ([N], [N])."""
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    # H = -sum p log p = logsumexp(z) - sum p z
    probs = torch.softmax(logits, dim=-1)
    return logp, lse - (probs * logits).sum(-1)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   num_completion_tokens: int, temperature: float = 1.0, chunk_size: int = 1024,
                   with_entropy: bool = False, **model_inputs):
    """Log-probs of the last ``num_completion_tokens`` tokens of ``input_ids`` given their prefix.

    model: a Hugging Face causal LM or vision-language model (or a PEFT wrapper of one);
    DeepSpeed callers pass ``engine.module``. input_ids, attention_mask: [B, L] (layout in the
    module docstring). num_completion_tokens: T, 1 <= T < L. temperature: logits are divided
    by it before the softmax, as vLLM and HF generate do when sampling, so the result matches
    the rollout's log-probs. chunk_size: tokens scored per LM-head call. model_inputs: passed
    to the backbone as they are (pixel_values, image_grid_thw, mm_token_type_ids, ...). For
    text models without explicit ``position_ids``, positions count from each row's first
    unmasked token.

    Returns float32 Tensor[B, T], or (logprobs, entropy) both [B, T] when ``with_entropy``.
    Gradients flow to the model's parameters through both.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids/attention_mask: expected two [B, L] tensors of one shape, got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}.")
    B, L = input_ids.shape
    T = int(num_completion_tokens)
    if not 1 <= T < L:
        raise ValueError(f"num_completion_tokens: must be in [1, {L - 1}] for inputs of width {L}, "
                         f"got {num_completion_tokens}.")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}.")

    body, head = _backbone_and_head(model)
    config = getattr(model, "config", None)
    if "position_ids" not in model_inputs and not hasattr(config, "vision_config"):
        # Count positions from each sequence's first real token, as HF generate and vLLM do
        # (left padding would otherwise shift them). VLMs derive their own (M-RoPE) positions
        # from the attention mask.
        model_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
               **model_inputs)
    # Columns L-T-1 .. L-2 predict the completion tokens at L-T .. L-1.
    hidden = out.last_hidden_state[:, L - T - 1:L - 1, :]
    hidden = hidden.reshape(B * T, hidden.size(-1)).to(head.weight.device)
    targets = input_ids[:, L - T:].reshape(B * T).to(head.weight.device)

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    logps, entropies = [], []
    for start in range(0, B * T, chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if recompute:
            logp, ent = checkpoint(_score_chunk, h, y, head, temperature, with_entropy,
                                   use_reentrant=False)
        else:
            logp, ent = _score_chunk(h, y, head, temperature, with_entropy)
        logps.append(logp)
        entropies.append(ent)
    logprobs = torch.cat(logps).view(B, T)
    if not with_entropy:
        return logprobs
    return logprobs, torch.cat(entropies).view(B, T)
