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

GRPO batches hold G completions of each prompt, and medical prompts (case vignettes, reports)
are often ten times longer than the answers. When rows share their prompt columns, the
backbone runs each distinct prompt once, keeps its attention keys and values, and runs only
the completion columns of every row on top of them (``share_prompt``). The causal mask makes
this the same computation, to float rounding: prompt tokens never attend to completions, and
in the backward pass the gradients of all G rows flow into the one shared prompt pass.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from medrl.align.models import text_embedded_completions


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


def _prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, P: int):
    """Rows with identical prompt columns ``[:, :P]``: (first row of each distinct prompt [U],
    the distinct prompt of each row [B]), or None when every row's prompt is its own."""
    key = torch.cat([input_ids[:, :P], attention_mask[:, :P].to(input_ids.dtype)], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == key.shape[0]:
        return None
    rows = torch.arange(key.shape[0], device=key.device)
    first = torch.full((distinct.shape[0],), key.shape[0], device=key.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def _shared_prompt_hidden(body, input_ids, attention_mask, position_ids, P: int, first, inverse):
    """Hidden states [B, T, H] at columns P-1 .. L-2, running each distinct prompt once.

    The prompt pass over the U distinct prompts returns their keys and values; indexing the
    cache by ``inverse`` gives each of the B rows its prompt's (the backward pass sums the
    rows' gradients into the shared pass); the completion columns then run on top.
    """
    prompt = body(input_ids=input_ids[first, :P], attention_mask=attention_mask[first, :P],
                  position_ids=position_ids[first, :P], use_cache=True)
    cache = prompt.past_key_values
    cache.reorder_cache(inverse)
    rest = body(input_ids=input_ids[:, P:], attention_mask=attention_mask,
                position_ids=position_ids[:, P:], past_key_values=cache, use_cache=True)
    last_prompt = prompt.last_hidden_state[:, -1:, :].index_select(0, inverse)
    return torch.cat([last_prompt, rest.last_hidden_state[:, :-1, :]], dim=1)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   num_completion_tokens: int, temperature: float = 1.0, chunk_size: int = 1024,
                   with_entropy: bool = False, share_prompt: bool = True, **model_inputs):
    """Log-probs of the last ``num_completion_tokens`` tokens of ``input_ids`` given their prefix.

    model: a Hugging Face causal LM or vision-language model (or a PEFT wrapper of one);
    DeepSpeed callers pass ``engine.module``. input_ids, attention_mask: [B, L] (layout in the
    module docstring). num_completion_tokens: T, 1 <= T < L. temperature: logits are divided
    by it before the softmax, as vLLM and HF generate do when sampling, so the result matches
    the rollout's log-probs. chunk_size: tokens scored per LM-head call. share_prompt: run
    each distinct prompt once when rows share one (text models; module docstring); the
    result is the same either way, to float rounding. model_inputs: passed
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
    is_text = not hasattr(config, "vision_config")
    if "position_ids" not in model_inputs and is_text:
        # Count positions from each sequence's first real token, as HF generate and vLLM do
        # (left padding would otherwise shift them). VLMs derive their own (M-RoPE) positions
        # from the attention mask.
        model_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # Columns L-T-1 .. L-2 predict the completion tokens at L-T .. L-1.
    groups = None
    if (share_prompt and is_text and set(model_inputs) == {"position_ids"}
            # HF turns the KV cache off under gradient checkpointing
            and not (body.training and getattr(body, "gradient_checkpointing", False))):
        groups = _prompt_groups(input_ids, attention_mask, L - T)
    if groups is not None:
        hidden = _shared_prompt_hidden(body, input_ids, attention_mask,
                                       model_inputs["position_ids"], L - T, *groups)
    else:
        ids = {"input_ids": input_ids} if is_text else text_embedded_completions(
            body, input_ids, L - T)
        out = body(**ids, attention_mask=attention_mask, use_cache=False, **model_inputs)
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


class Scorer(torch.nn.Module):
    """The policy behind one ``forward`` that returns completion log-probs.

    DeepSpeed hooks its ZeRO bookkeeping (gradient accumulation, ZeRO-3 gathering) onto the
    engine's forward, while :func:`token_logprobs` calls the model's backbone and LM head
    separately; wrapping it in a module lets each micro-batch pass through the engine once.
    """

    def __init__(self, policy: torch.nn.Module, *, temperature: float, chunk_size: int,
                 share_prompt: bool):
        super().__init__()
        self.policy = policy
        self.temperature, self.chunk_size = temperature, chunk_size
        self.share_prompt = share_prompt

    def forward(self, input_ids, attention_mask, num_completion_tokens: int, *,
                with_entropy: bool = False, model_inputs: dict | None = None, fn=None):
        if fn is not None:  # a stage's own per-token quantity (e.g. a full-vocabulary loss)
            return fn(self.policy, input_ids, attention_mask, num_completion_tokens,
                      **(model_inputs or {}))
        return token_logprobs(self.policy, input_ids, attention_mask,
                              num_completion_tokens=num_completion_tokens,
                              temperature=self.temperature, chunk_size=self.chunk_size,
                              with_entropy=with_entropy, share_prompt=self.share_prompt,
                              **(model_inputs or {}))


def sequence_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The one-label head's value of each row, read at its last column, float32 [B].

    model: a Hugging Face ``*ForSequenceClassification`` with ``num_labels=1`` (or a PEFT
    wrapper of one). input_ids, attention_mask: [B, L], left-padded so that column L-1 is
    every row's last token (the learner's layout with a one-token completion block).
    Positions count from each row's first real token, as for a right-padded row in HF's own
    forward, so the value equals ``model(row).logits`` of the row unpadded.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("sequence_values: every row must end at the last column (left padding).")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False)
    return model.score(out.last_hidden_state[:, -1, :]).squeeze(-1).float()


class ValueScorer(torch.nn.Module):
    """A reward model behind the same ``forward`` the learner gives :class:`Scorer`: it
    returns each row's value [B] (:func:`sequence_values`) instead of token log-probs, so one
    learner trains either. ``num_completion_tokens`` and ``with_entropy`` are not used."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.temperature = 1.0  # read and restored by Learner.logprobs

    def forward(self, input_ids, attention_mask, num_completion_tokens: int, *,
                with_entropy: bool = False, model_inputs: dict | None = None):
        if model_inputs:
            raise ValueError("a reward model reads text only (no images)")
        return sequence_values(self.policy, input_ids, attention_mask)
