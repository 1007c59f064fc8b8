"""Criterion scorers for the rubric reward: how much a response meets each rubric criterion.

A scorer takes every (sample, criterion) pair of a batch at once and returns one verdict per
pair: a float in [0, 1] (the degree to which the response does what the criterion says), or
None when the criterion does not apply to that response. The rubric reward collects the
pairs of the whole batch and calls :meth:`CriterionScorer.score` once, so a scorer batches
its model calls across samples and criteria alike.

Built in: ``reward_model``, a criterion-conditioned reward model, i.e. any local
``AutoModelForSequenceClassification`` folder with a single label, read on the text of
:func:`rm_input`; the verdict is the sigmoid of its logit. That text is also the input
format the reward-model stage trains on, so keep the two in step through :func:`rm_input`.
A reward that bins the raw logit itself (``med3d_consistency``) asks for ``output="logit"``,
and may have a chat-template reward model read :func:`chat_conversation` instead
(``rendering="chat"``); the rubric reward keeps the defaults.
And ``judge``, a generative judge (any local causal LM answering in JSON), in
:mod:`medrl.rewards.judge`, which also serves any scorer from shared, replicated Ray actors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, Sequence

from medrl.align.records import Sample, UserError

# The scorers a recipe can name (``kwargs.scorer`` of the ``rubric`` reward).
ScorerKind = Literal["reward_model", "judge"]
# The weights' dtype (``kwargs.dtype``); "auto": bf16 on a GPU, fp32 on the CPU.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# What a reward model's score is: sigmoid(logit) in [0, 1] (a verdict), or the logit itself.
RmOutput = Literal["probability", "logit"]
# What a reward model reads: :func:`rm_input`, or :func:`chat_conversation` through its
# tokenizer's chat template.
RmRendering = Literal["criterion", "chat"]
# ``model: tiny:<arch>`` builds random weights with this seed (fixed, so that every replica,
# process and checkpoint identity sees the same folder).
TINY_SEED = 0


class CriterionPair(NamedTuple):
    """One response and one criterion of its rubric, to be scored together; index: the
    criterion's position in its rubric (error messages name it, never the text)."""

    sample: Sample
    criterion: str
    index: int = 0


class CriterionScorer(Protocol):
    """``score(pairs) -> list[float | None]``: one verdict per pair, in order; each in
    [0, 1], or None when the criterion does not apply to that response."""

    def score(self, pairs: Sequence[CriterionPair]) -> list[float | None]: ...


def instruction_text(messages: Sequence[dict[str, Any]]) -> str:
    """The conversation a response answers, one ``"<role>: <text>"`` line per message.

    Multimodal contents keep their text parts (images are not part of the reward model's
    input).
    """
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content
                               if isinstance(part, dict) and part.get("type") == "text")
        lines.append(f"{message.get('role', 'user')}: {content or ''}")
    return "\n".join(lines)


def scorer_model(model: str, base_dir: Path | str | None) -> tuple[Path, bool]:
    """The local folder of ``kwargs.model`` and whether it is a ``tiny:<arch>`` build.

    ``tiny:qwen2`` is written once into the medrl cache (random weights, seed
    :data:`TINY_SEED`): the scores it gives are meaningless; it lets a recipe run end to end
    on a fresh clone. Any other value is a folder, relative to the recipe's folder: a model
    folder, or a run folder of the ``reward_model`` stage (its latest complete checkpoint's
    ``policy/``) or one of its checkpoint folders.
    """
    from medrl.align.models import resolve_policy

    if model.startswith("tiny:"):
        return resolve_policy(model, seed=TINY_SEED), True
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir() and not (path / "config.json").exists() and (
            (path / "checkpoints").is_dir() or (path / "policy").is_dir()):
        return resolve_policy(str(path)), False
    return path, False


def rm_input(instruction: str, criterion: str, response: str) -> str:
    """The one text a criterion-conditioned reward model reads (and is trained on).

    instruction: :func:`instruction_text` of the prompt's messages; criterion: the rubric
    item as written; response: the completion. The three blocks come in this order so that,
    when the text is too long, truncating from the left drops the oldest conversation turns
    first and keeps the criterion and the response whole.
    """
    return f"Instruction:\n{instruction}\n\nCriterion:\n{criterion}\n\nResponse:\n{response}"


def chat_conversation(messages: Sequence[dict[str, Any]], response: str,
                      follow_up: str) -> list[dict[str, str]]:
    """The conversation a chat-template reward model reads (``rendering="chat"``): the
    prompt's messages with their text parts only (images are not its input), the response
    as the assistant's turn, then ``follow_up`` (the criterion) as a last user turn."""
    turns = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content
                               if isinstance(part, dict) and part.get("type") == "text")
        turns.append({"role": str(message.get("role", "user")), "content": content or ""})
    return turns + [{"role": "assistant", "content": response},
                    {"role": "user", "content": follow_up}]


class RewardModelScorer:
    """A single-label sequence classifier: verdict = sigmoid(logit) of :func:`rm_input`.

    model, tokenizer: loaded (see :meth:`load`). batch_size: pairs per forward pass.
    max_length: longest input in tokens; longer inputs lose their left end.
    output: ``probability`` (the sigmoid, in [0, 1]) or ``logit`` (the raw logit, any real:
    for rewards that map it themselves, not for rubric verdicts). rendering: ``criterion``
    (:func:`rm_input`) or ``chat`` (:func:`chat_conversation` through the tokenizer's chat
    template, the criterion as the last user turn).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, max_length: int,
                 output: RmOutput = "probability", rendering: RmRendering = "criterion"):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.output, self.rendering = output, rendering

    @classmethod
    def load(cls, folder: Path, *, device: str, batch_size: int, max_length: int,
             dtype: Dtype = "float32", new_head: bool = False, output: RmOutput = "probability",
             rendering: RmRendering = "criterion") -> "RewardModelScorer":
        """new_head: give a causal LM folder (``tiny:<arch>``) a fresh one-label head,
        initialised from a fixed seed (so every replica gets the same one). output,
        rendering: see the class docstring."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from medrl.align.models import ensure_pad_token, resolve_dtype

        check_model_folder(folder, "AutoModelForSequenceClassification")
        tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(folder), folder)
        tokenizer.truncation_side = "left"  # see rm_input: keep the criterion and response
        if rendering == "chat" and not tokenizer.chat_template:
            raise UserError(f"reward model in {folder}: its tokenizer has no chat template, "
                            "which the chat rendering needs; use a chat reward model folder "
                            "(its tokenizer_config.json or chat_template.jinja holds one), or "
                            "set kwargs.rendering: criterion.")
        torch_dtype = resolve_dtype(dtype, on_gpu=device.startswith("cuda"))
        with torch.random.fork_rng(devices=[]):  # the new head's init leaves no RNG trace
            torch.manual_seed(TINY_SEED)
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=torch_dtype, **({"num_labels": 1} if new_head else {}))
        model = model.to(device).eval()
        if model.config.num_labels != 1:
            raise UserError(f"rubric reward: the model in {folder} has "
                            f"{model.config.num_labels} labels; a criterion reward model has "
                            "one (its sigmoid is the degree a criterion is met). Train it with "
                            "num_labels=1.")
        if model.config.pad_token_id is None:  # needed to find each row's last token
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length,
                   output=output, rendering=rendering)

    def text(self, instruction: str, pair: CriterionPair) -> str:
        """The text the model reads for ``pair``; instruction: :func:`instruction_text` of
        its messages (the criterion rendering's)."""
        if self.rendering == "chat":
            return self.tokenizer.apply_chat_template(
                chat_conversation(pair.sample.messages, pair.sample.completion_text,
                                  pair.criterion), tokenize=False)
        return rm_input(instruction, pair.criterion, pair.sample.completion_text)

    def score(self, pairs: Sequence[CriterionPair]) -> list[float | None]:
        import torch

        instructions: dict[int, str] = {}  # one rendering per sample, shared by its criteria
        texts = []
        for pair in pairs:
            key = id(pair.sample)
            if key not in instructions:
                instructions[key] = instruction_text(pair.sample.messages)
            texts.append(self.text(instructions[key], pair))
        # Similar lengths share a forward pass (less padding); results go back in order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[float | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            # a chat template writes its own special tokens (a second BOS would shift them)
            enc = self.tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length,
                                 add_special_tokens=self.rendering != "chat")
            with torch.no_grad():
                logits = self.model(**enc.to(self.model.device)).logits.float()  # [b, 1]
            values = logits[:, 0] if self.output == "logit" else torch.sigmoid(logits[:, 0])
            for i, v in zip(chunk, values.tolist()):
                out[i] = v
        return out


def check_model_folder(folder: Path, what: str) -> None:
    """Raise :class:`UserError` unless ``folder`` holds a Hugging Face model (config.json)."""
    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"rubric reward: {folder} is not a Hugging Face model folder (no "
                        f"config.json); set kwargs.model to a local {what} folder, or to "
                        "tiny:qwen2 for a smoke test.")


def build_scorer(kind: ScorerKind, *, model: Path, device: str, batch_size: int,
                 max_length: int, dtype: Dtype = "float32", tiny: bool = False,
                 max_new_tokens: int = 32, max_retries: int = 2, seed: int = 0,
                 output: RmOutput = "probability",
                 rendering: RmRendering = "criterion") -> CriterionScorer:
    """The scorer a recipe names, loaded on ``device`` (the one place kinds are resolved).

    tiny: ``model`` is a ``tiny:<arch>`` build (a causal LM: the reward model gets a new
    head). max_new_tokens, max_retries, seed: the judge's (see
    :class:`medrl.rewards.judge.GenerativeJudge`). output, rendering: the reward model's
    (see :class:`RewardModelScorer`; a judge has only the defaults).
    """
    if kind == "reward_model":
        return RewardModelScorer.load(model, device=device, batch_size=batch_size,
                                      max_length=max_length, dtype=dtype, new_head=tiny,
                                      output=output, rendering=rendering)
    if (output, rendering) != ("probability", "criterion"):
        raise ValueError(f"output {output!r} and rendering {rendering!r} are reward-model "
                         f"settings; the {kind!r} scorer has only the defaults")
    if kind == "judge":
        from medrl.rewards.judge import GenerativeJudge

        return GenerativeJudge.load(model, device=device, batch_size=batch_size,
                                    max_length=max_length, dtype=dtype,
                                    max_new_tokens=max_new_tokens, max_retries=max_retries,
                                    seed=seed)
    raise UserError(f"rubric reward: unknown scorer {kind!r}; choose reward_model or judge.")
