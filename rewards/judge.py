"""Generative judges, and judges as shared, replicated Ray actors.

**The judge scorer** (``scorer: judge``): a local causal LM answers :func:`judge_messages`
(rendered with its tokenizer's chat template) with one JSON object, parsed strictly by
:func:`parse_verdict`. The first answer is greedy; a malformed one is asked again up to
``max_retries`` times, sampled; a pair still malformed is None and listed in the stats, and
:class:`JudgeClient` applies the ``on_malformed`` policy (never a silent 0).

**Shared judges.** A :class:`JudgeSpec` holds every setting that changes a judge's outputs.
With Ray initialised the judge lives in ``replicas`` named actors (:class:`JudgeHost`, any
scorer :func:`build_scorer` builds), named from the run folder and the spec's hash: every
reward of a run naming the same judge gets the same actors, so the model loads once per
replica; a batch is split into contiguous chunks, one per replica. Actors live while some
process holds a handle. Without Ray the judge runs in the caller's process, shared alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from medrl.align.records import Sample, UserError
from medrl.rewards.rubric_scorers import (CriterionPair, CriterionScorer, Dtype, RmOutput,
                                          RmRendering, ScorerKind, build_scorer,
                                          check_model_folder, instruction_text, rm_input)

OnMalformed = Literal["error", "not_applicable"]
VERDICTS: dict[str, float | None] = {"met": 1.0, "not_met": 0.0, "not_applicable": None}
RETRY_TEMPERATURE = 0.7  # retries sample (the model's own top_k / top_p apply)
NAMESPACE = "medrl-judges"  # Ray namespace of the judge actors

JUDGE_SYSTEM = (
    "Does the response meet the criterion? Reply with one JSON object only: "
    '{"verdict": "met"}, {"verdict": "not_met"}, or {"verdict": "not_applicable"} if the '
    "criterion does not apply.")


# --- prompt and answer --------------------------------------------------------------------------


def judge_messages(instruction: str, criterion: str, response: str) -> list[dict[str, str]]:
    """The chat the judge answers: the system message :data:`JUDGE_SYSTEM`, then one user
    message holding :func:`rm_input` (the reward model's text, in the same order)."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": rm_input(instruction, criterion, response)}]


class MalformedAnswer(ValueError):
    """The judge's answer is not exactly one of the accepted JSON objects."""


_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?```", re.S)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise MalformedAnswer("a key appears twice")
    return dict(pairs)


def parse_verdict(text: str) -> float | None:
    """The verdict of one answer, parsed strictly; raises :class:`MalformedAnswer`.

    Accepted, after stripping whitespace and at most one code fence (```` ```json ```` or
    ```` ``` ```` on its own line, closed by ```` ``` ````): a JSON object with exactly one
    key, either ``"verdict"`` with the string ``"met"`` (1.0), ``"not_met"`` (0.0) or
    ``"not_applicable"`` (None), or ``"score"`` with a finite number in [0, 1] (not a
    bool). Anything else (text around the object, other or extra keys, other values, a list,
    a duplicated key) is malformed.
    """
    body = text.strip()
    fenced = _FENCE.fullmatch(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError:
        raise MalformedAnswer("not one JSON value") from None
    if not isinstance(value, dict) or len(value) != 1:
        raise MalformedAnswer("not a JSON object with exactly one key")
    (key, v), = value.items()
    if key == "verdict" and isinstance(v, str) and v in VERDICTS:
        return VERDICTS[v]
    if key == "score" and isinstance(v, (int, float)) and not isinstance(v, bool) \
            and math.isfinite(v) and 0.0 <= v <= 1.0:
        return float(v)
    raise MalformedAnswer("an unknown key or value")


# --- the judge scorer ---------------------------------------------------------------------------


class GenerativeJudge:
    """A causal LM that answers :func:`judge_messages` with a JSON verdict.

    batch_size: pairs per ``generate`` call (left-padded, similar lengths together).
    max_length: longest prompt in tokens; a longer one loses the start of its conversation
    first (then its left end). max_new_tokens: the answer's budget. max_retries: new tries of
    a malformed answer. seed: retries sample with seeds drawn from it, the call count and the
    try (the caller's torch RNG is left as it was).
    ``last_stats`` after each :meth:`score`: ``generate_calls``, ``retries`` (answers asked
    again, a pair asked twice counting twice), ``malformed`` (positions still malformed:
    their verdict is None).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, max_length: int,
                 max_new_tokens: int, max_retries: int, seed: int):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.max_new_tokens, self.max_retries, self.seed = max_new_tokens, max_retries, seed
        self.calls, self.generate_calls = 0, 0
        self.last_stats: dict[str, Any] = {}

    @classmethod
    def load(cls, folder: Path, *, device: str, batch_size: int, max_length: int,
             dtype: Dtype, max_new_tokens: int, max_retries: int,
             seed: int) -> "GenerativeJudge":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from medrl.align.models import ensure_pad_token, resolve_dtype

        check_model_folder(folder, "causal LM (AutoModelForCausalLM)")
        tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(folder), folder)
        if not tokenizer.chat_template:
            raise UserError(f"rubric reward: the judge's tokenizer in {folder} has no chat "
                            "template; use an instruction-tuned model folder (its "
                            "tokenizer_config.json or chat_template.jinja holds one).")
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=resolve_dtype(dtype, on_gpu=device.startswith("cuda")))
        return cls(model.to(device).eval(), tokenizer, batch_size=batch_size,
                   max_length=max_length, max_new_tokens=max_new_tokens,
                   max_retries=max_retries, seed=seed)

    def _render(self, instruction: str, criterion: str, response: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            judge_messages(instruction, criterion, response), tokenize=False,
            add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, instruction: str, criterion: str, response: str) -> list[int]:
        """The token ids of one prompt, at most ``max_length`` long."""
        ids = self._render(instruction, criterion, response)
        excess = len(ids) - self.max_length
        if excess > 0:  # drop the oldest conversation turns first: keep criterion and response
            inst = self.tokenizer(instruction, add_special_tokens=False)["input_ids"]
            ids = self._render(self.tokenizer.decode(inst[excess:]), criterion, response)
            ids = ids[-self.max_length:]
        return ids

    def _generate(self, prompts: list[list[int]], seed: int | None) -> list[str]:
        """One answer per prompt, ``batch_size`` per ``generate`` call; greedy when seed is
        None, else sampled from that seed."""
        import torch

        pad = self.tokenizer.pad_token_id
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        sampling = {"do_sample": False} if seed is None else \
            {"do_sample": True, "temperature": RETRY_TEMPERATURE}
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [""] * len(prompts)
        device = self.model.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i]
                                    for i in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i])
                                     for i in chunk], device=device)
                with torch.no_grad():
                    generated = self.model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                        pad_token_id=pad, eos_token_id=eos, **sampling)
                self.generate_calls += 1
                texts = self.tokenizer.batch_decode(generated[:, width:],
                                                    skip_special_tokens=True)
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out

    def score(self, pairs: Sequence[CriterionPair]) -> list[float | None]:
        instructions: dict[int, str] = {}
        prompts = []
        for p in pairs:
            if id(p.sample) not in instructions:
                instructions[id(p.sample)] = instruction_text(p.sample.messages)
            prompts.append(self.prompt_ids(instructions[id(p.sample)], p.criterion,
                                           p.sample.completion_text))
        self.calls += 1
        calls_before = self.generate_calls
        verdicts: list[float | None] = [None] * len(pairs)
        todo, retries = list(range(len(pairs))), 0
        for attempt in range(self.max_retries + 1):
            if not todo:
                break
            seed = None if attempt == 0 else \
                (self.seed * 1_000_003 + self.calls * 1_009 + attempt) % 2**31
            still = []
            for i, text in zip(todo, self._generate([prompts[i] for i in todo], seed)):
                try:
                    verdicts[i] = parse_verdict(text)
                except MalformedAnswer:
                    still.append(i)
            retries += len(still) if attempt < self.max_retries else 0
            todo = still
        self.last_stats = {"generate_calls": self.generate_calls - calls_before,
                           "retries": retries, "malformed": todo}
        return verdicts


# --- shared judges ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeSpec:
    """Everything that decides a judge's outputs: two rewards with equal specs share it.

    kind, model (an absolute folder), tiny, dtype, batch_size, max_length, device: as
    :func:`build_scorer` takes them; max_new_tokens, max_retries, seed: the judge's (0 for a
    reward model, which has none); output, rendering: the reward model's (a raw-logit user
    and a probability user of one folder get different specs, so different actors).
    """

    kind: ScorerKind
    model: str
    tiny: bool
    dtype: Dtype
    batch_size: int
    max_length: int
    device: str
    max_new_tokens: int = 0
    max_retries: int = 0
    seed: int = 0
    output: RmOutput = "probability"
    rendering: RmRendering = "criterion"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """How messages name the judge (its kind, model folder name and key)."""
        return f"judge {Path(self.model).name!r} ({self.kind}, {self.key()})"

    def build(self) -> CriterionScorer:
        return build_scorer(**{**asdict(self), "model": Path(self.model)})


LOADS = 0  # judges loaded in this process (a judge actor's process holds one)


class JudgeHost:
    """Holds one scorer: the body of a judge actor, and the in-process judge. Built light
    (so that a new actor answers :meth:`info` as soon as it is placed); :meth:`load` loads."""

    def __init__(self, spec: JudgeSpec):
        self.spec, self.scorer = spec, None
        self.calls, self.pairs = 0, 0

    def load(self) -> None:
        """Load the scorer, once (an actor shared by several rewards is asked by each)."""
        global LOADS
        if self.scorer is None:
            self.scorer = self.spec.build()
            LOADS += 1

    def score(self, pairs: Sequence[CriterionPair]) -> tuple[list[float | None], dict]:
        """(verdicts, stats): stats as the scorer's ``last_stats`` (empty when it has none)."""
        self.load()
        verdicts = self.scorer.score(pairs)
        self.calls, self.pairs = self.calls + 1, self.pairs + len(pairs)
        return list(verdicts), dict(getattr(self.scorer, "last_stats", None) or {})

    def info(self) -> dict[str, int]:
        """pid, loads (judges loaded by this process), calls and pairs scored so far."""
        return {"pid": os.getpid(), "loads": LOADS, "calls": self.calls, "pairs": self.pairs}


_LOCAL: "weakref.WeakValueDictionary[str, JudgeHost]" = weakref.WeakValueDictionary()


def _text_only(sample: Sample) -> Sample:
    """What a scorer reads of a sample, without media: the copy sent to judge actors."""
    messages = [{**m, "content": [p for p in m["content"]
                                  if isinstance(p, dict) and p.get("type") == "text"]}
                if isinstance(m.get("content"), list) else dict(m) for m in sample.messages]
    return Sample(uid=sample.uid, group_id=sample.group_id, messages=messages,
                  completion_text=sample.completion_text)


class JudgeTimeout(TimeoutError):
    """A judge's replicas did not answer a batch within ``judge_timeout_s``."""


class JudgeClient:
    """What a reward holds: scores pairs on its judge and applies the malformed policy.

    actors: the judge's Ray actor handles (empty: ``host`` runs in this process).
    timeout_s: the longest wait for the actors' answer to a batch (None: no limit; an
    in-process judge has none: the reward's own ``timeout_s`` bounds it); past it the batch
    fails with :class:`JudgeTimeout` and the actors keep running (they finish that batch).
    on_malformed: "error" (raise ValueError naming the sample uids and criterion indices)
    or "not_applicable" (their verdict is None; counted). ``last`` holds the last call's
    ``seconds``, ``pairs``, ``malformed``, ``retries``, ``generate_calls``.
    """

    def __init__(self, spec: JudgeSpec, *, actors: list[Any] | None = None,
                 host: JudgeHost | None = None, timeout_s: float | None = None,
                 on_malformed: OnMalformed = "error", make_actors: Any = None):
        self.spec, self.actors, self.host = spec, list(actors or []), host
        self.timeout_s, self.on_malformed, self._make_actors = timeout_s, on_malformed, make_actors
        self.last: dict[str, float] = {}

    def _remote(self, pairs: list[CriterionPair]) -> list[tuple[list, dict]]:
        import ray

        slim: dict[int, Sample] = {}
        pairs = [p._replace(sample=slim.setdefault(id(p.sample), _text_only(p.sample)))
                 for p in pairs]
        size = -(-len(pairs) // len(self.actors))  # contiguous chunks, results back in order
        chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
        for attempt in (0, 1):
            refs = [a.score.remote(c) for a, c in zip(self.actors, chunks)]
            try:
                return ray.get(refs, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise JudgeTimeout(
                    f"the {self.spec.label} did not answer {len(pairs)} (sample, criterion) "
                    f"pairs within kwargs.judge_timeout_s = {self.timeout_s:g} s; this batch "
                    "fails, the judge actors keep running. Raise judge_timeout_s or "
                    "replicas.") from None
            except ray.exceptions.ActorDiedError:
                # Its owner (another reward's process) went away: start it again, once.
                if attempt or self._make_actors is None:
                    raise
                self.actors = self._make_actors()
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None) or exc
                raise RuntimeError(f"the {self.spec.label} failed in its actor: "
                                   f"{type(cause).__name__}: {cause}") from None
        raise AssertionError("unreachable")

    def score(self, pairs: Sequence[CriterionPair]) -> list[float | None]:
        """One verdict per pair, in order (see the class docstring for malformed answers)."""
        start = time.perf_counter()
        parts = (self._remote(list(pairs)) if self.actors else [self.host.score(pairs)]) \
            if pairs else []
        verdicts, malformed, offset = [], [], 0
        stats = {"retries": 0, "generate_calls": 0}
        for part_verdicts, part_stats in parts:
            malformed += [offset + i for i in part_stats.get("malformed", ())]
            for key in stats:
                stats[key] += part_stats.get(key, 0)
            verdicts += part_verdicts
            offset += len(part_verdicts)
        self.last = {"seconds": time.perf_counter() - start, "pairs": len(pairs),
                     "malformed": len(malformed), **stats}
        if malformed and self.on_malformed == "error":
            raise ValueError(self._malformed_message([pairs[i] for i in malformed]))
        return verdicts

    def _malformed_message(self, bad: list[CriterionPair]) -> str:
        by_uid: dict[str, list[str]] = {}
        for p in bad:
            by_uid.setdefault(p.sample.uid, []).append(str(p.index))
        where = "; ".join(f"sample {uid!r} criteria {', '.join(ix)}"
                          for uid, ix in by_uid.items())
        return (f"the {self.spec.label} gave {len(bad)} malformed answer(s) after "
                f"{self.spec.max_retries} retries ({where}). A judge answers one JSON object "
                '{"verdict": "met" | "not_met" | "not_applicable"}; use a judge that does, '
                "raise max_new_tokens or max_retries, or set kwargs.on_malformed: "
                "not_applicable to score such pairs None (counted in judge_malformed)")

    def metrics(self) -> dict[str, float]:
        """The last call's ``judge_<key>`` of ``last``, and ``judge_pairs_per_s``."""
        out = {f"judge_{k}": float(v) for k, v in self.last.items()}
        if self.last.get("pairs") and self.last["seconds"] > 0:
            out["judge_pairs_per_s"] = self.last["pairs"] / self.last["seconds"]
        return out


def run_prefix(run_dir: str | Path | None) -> str:
    """Judge actor names start with a hash of the run folder: two runs never share."""
    where = str(Path(run_dir).resolve()) if run_dir is not None else "no-run-dir"
    return hashlib.sha256(where.encode()).hexdigest()[:8]


def connect_judge(spec: JudgeSpec, *, run_dir: str | Path | None = None, replicas: int = 1,
                  num_cpus: float = 1.0, num_gpus: float = 0.0,
                  timeout_s: float | None = None,
                  on_malformed: OnMalformed = "error") -> JudgeClient:
    """The judge of ``spec``, started or joined: ``replicas`` Ray actors when Ray is
    initialised (each reserving num_cpus / num_gpus, on "cuda" when num_gpus > 0, else the
    CPU), else a scorer in this process on ``spec.device``. Load errors are raised here."""
    check_model_folder(Path(spec.model), "model")
    import ray

    if not ray.is_initialized():
        host = _LOCAL.get(spec.key())
        if host is None:
            host = JudgeHost(spec)
            host.load()
            _LOCAL[spec.key()] = host
        return JudgeClient(spec, host=host, timeout_s=timeout_s, on_malformed=on_malformed)
    if spec.device.startswith("cuda") and num_gpus == 0:
        raise UserError(f"the {spec.label} runs in its own Ray actors, which reserve no GPU "
                        "(kwargs.judge_num_gpus: 0), while the reward's own actor reserved one "
                        "(num_gpus); set judge_num_gpus instead: the judge, not the reward, "
                        "needs the GPU.")
    spec = replace(spec, device="cuda" if num_gpus > 0 else "cpu")
    name = f"medrl-judge-{run_prefix(run_dir)}-{spec.key()}"
    return JudgeClient(spec, actors=start_actors(spec, name, replicas, num_cpus, num_gpus),
                       timeout_s=timeout_s, on_malformed=on_malformed,
                       make_actors=lambda: start_actors(spec, name, replicas, num_cpus, num_gpus))


PLACE_TIMEOUT_S = 120.0  # how long new judge actors may wait for the resources they reserve


def start_actors(spec: JudgeSpec, name: str, replicas: int, num_cpus: float,
                 num_gpus: float) -> list[Any]:
    """Replicas ``name-0`` .. ``name-<replicas - 1>``, joined or started, loaded. Raises
    :class:`UserError` when they cannot be placed (not enough free CPUs / GPUs) or load."""
    import ray

    actors = [ray.remote(JudgeHost).options(
        name=f"{name}-{i}", namespace=NAMESPACE, get_if_exists=True, num_cpus=num_cpus,
        num_gpus=num_gpus).remote(spec) for i in range(replicas)]
    refs = [a.info.remote() for a in actors]
    _, unplaced = ray.wait(refs, num_returns=len(refs), timeout=PLACE_TIMEOUT_S)
    if unplaced:
        free = ray.available_resources()
        for ref, actor in zip(refs, actors):
            if ref in unplaced:  # withdraw its resource request
                ray.kill(actor)
        raise UserError(
            f"the {spec.label}: {len(unplaced)} of its {replicas} actor(s) could not be placed "
            f"within {PLACE_TIMEOUT_S:.0f} s; each reserves {num_cpus:g} CPU and {num_gpus:g} "
            f"GPU (kwargs.judge_num_cpus / judge_num_gpus), the cluster has "
            f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free. Give the cluster "
            "more (cluster.num_cpus), lower the judge's reservation or replicas, or drop "
            "actor: true from the reward (the judge actors hold the model).")
    try:
        ray.get([a.load.remote() for a in actors])
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or str(exc).strip().splitlines()[-1]
        raise UserError(f"the {spec.label} could not load in its actor: {cause}") from None
    return actors
