"""``medrl eval``: how well a model answers medical multiple-choice benchmarks.

A model (a Hugging Face folder, a run folder: its latest complete checkpoint, a checkpoint
folder, or ``tiny:<arch>``) x datasets (:mod:`medrl.launch.eval_data`) x one scoring mode, on
the rollout engines (HF or vLLM) in ``--workers`` Ray actors (:class:`RolloutGroup`, items
split between them). Modes:

- ``loglik``, lm-evaluation-harness's multiple-choice definition: the context is
  ``"Question: {question}\\nA. {option}\\n...Answer:"`` (PubMedQA-style rows with a separate
  context: ``"Abstract: {context}\\n"`` first; yes/no/maybe items list no options), plain
  text without a chat template; each option's continuation is ``" " + choice`` (the letter, or
  the word yes/no/maybe) and is scored by the engine's log-probs given the context.
  ``acc``: the option with the highest summed log-prob; ``acc_norm``: the highest log-prob per
  character of the choice (the space before it not counted).
- ``generate``: the prompt the training loader renders (chat template, options, instruction),
  ``--samples N`` completions per item (greedy for N = 1, else ``--temperature``), the answer
  extracted by the rule rewards' extractors. ``acc``: pass@1, the mean correctness of the
  samples (the unbiased estimator); with N > 1 also ``maj@N`` (the most frequent answer) and
  ``pass@N``.

Rubric datasets (HealthBench) are always generated, and each completion is graded against the
row's physician rubric by the ``rubric`` reward with HealthBench's aggregation (points of the
criteria met / sum of positive points, clipped to [0, 1]), its criteria scored by ``--judge``
(a criterion reward model, or a judge LM with ``--judge-scorer judge``) in the shared judge
actors; ``score`` is the mean over items with a 95% bootstrap interval, also per theme and
per axis (``axis:<name>``).

Any reward of the plugin system is a metric too (``--reward NAME``, generated items): each
item's mean over its samples, averaged over the items with a bootstrap interval, as
``reward:<name>``.

Every accuracy is reported with its n and a 95% Wilson interval. Items that cannot be scored
(the prompt does not fit the engine's context) are counted per dataset (``too_long``), as are
rows without a gold answer (``unlabelled``). Output in ``OUT``
(:func:`medrl.launch.eval_report.write_report`): ``results.json``,
``<dataset>/predictions.jsonl`` (uids, gold and predicted letters, log-probs; completion text
only with ``log_text``), ``summary.md`` and ``plots/accuracy.png``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from medrl.align.records import Sample, UserError
from medrl.launch.eval_data import EvalDataset
from medrl.launch.eval_metrics import choose_option
from medrl.launch.eval_scoring import Mode, dataset_results, scoring_mode



# --------------------------------------------------------------------- log-likelihood items


def loglik_context(row: dict[str, Any], choices: str) -> str:
    """The plain-text context of a multiple-choice row (module docstring)."""
    parts = []
    context = row.get("context")
    if context:
        # as the harness writes it: the passages one per line, nothing stripped
        text = "\n".join(map(str, context)) if isinstance(context, (list, tuple)) \
            else str(context)
        parts.append(f"Abstract: {text}")
    parts.append(f"Question: {row['question']}")
    if choices == "letters":
        parts += [f"{k}. {v}" for k, v in row["options"].items()]
    return "\n".join(parts) + "\nAnswer:"


def continuations(row: dict[str, Any], choices: str) -> list[str]:
    """One continuation per option, in option order: ``" A"``..., or ``" yes"``..."""
    if choices == "letters":
        return [f" {k}" for k in row["options"]]
    return [f" {str(v).strip().lower()}" for v in row["options"].values()]


def encode_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the whole text is encoded once and split where the
    context's own encoding ends, so merges across the boundary tokenise as the model would see
    them; if the whole text does not start with the context's ids, both are encoded apart."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return list(ctx), list(whole[len(ctx):])
    return list(ctx), list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def loglik_requests(tokenizer, item: Sample, choices: str) -> list[Sample]:
    """One sample per option: the context as prompt ids, the continuation as completion ids."""
    context = loglik_context(item.row, choices)
    out = []
    for i, cont in enumerate(continuations(item.row, choices)):
        ctx_ids, cont_ids = encode_continuation(tokenizer, context, cont)
        out.append(replace(item, uid=f"{item.uid}/{i}", prompt_ids=ctx_ids,
                           completion_ids=cont_ids, images=[], volume=None))
    return out


# ---------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """One item's outcome. ``choice`` / ``choice_norm``: letters picked (loglik);
    ``answers``: the extracted answer of each sample (generate; None = none found)."""

    uid: str
    gold: str
    category: str | None = None
    choice: str | None = None
    choice_norm: str | None = None
    logprobs: list[float] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)  # rubric: one per sample
    dims: dict[str, float] = field(default_factory=dict)  # rubric: axis means over samples
    verdicts: list[list[float | None]] = field(default_factory=list)  # rubric: by criterion
    rewards: dict[str, list[float | None]] = field(default_factory=dict)  # --reward, by sample
    spans: list[str | None] = field(default_factory=list)  # fact checking: quoted passages
    counts: list[dict[str, tuple[int, int, int]]] = field(default_factory=list)  # extraction
    parsed: list[bool] = field(default_factory=list)  # extraction: a record was found

    def record(self, log_text: bool) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if v not in (None, [], {})}
        if not log_text:  # quoted passages are text of the item too
            out.pop("completions", None)
            out.pop("spans", None)
        return out


def loglik_prediction(item: Sample, scores: Sequence[Sequence[float]], choices: str,
                      category: str | None) -> Prediction:
    """The choices of one item from its options' continuation log-probs."""
    letters = list(item.row["options"])
    sums = [float(sum(s)) for s in scores]
    # acc_norm divides by the choice's own length, the delimiting space not counted
    plain, normed = choose_option(sums, [len(c) - 1 for c in continuations(item.row, choices)])
    return Prediction(uid=item.uid, gold=item.row["gold"], category=category,
                      choice=letters[plain], choice_norm=letters[normed], logprobs=sums)


def extracted_letter(text: str, row: dict[str, Any], choices: str) -> str | None:
    """The option letter a completion answers (None when it names none)."""
    from medrl.rewards.rules import extract_letter, extract_yes_no_maybe

    options = {str(k).upper(): str(v) for k, v in row["options"].items()}  # lettered by the loader
    if choices == "letters":
        return extract_letter(text, options)
    word = extract_yes_no_maybe(text, options)
    return next((k for k, v in options.items() if v.strip().lower() == word), None)


def generate_prediction(item: Sample, completions: Sequence[Sample], choices: str,
                        category: str | None) -> Prediction:
    texts = [c.completion_text for c in completions]
    return Prediction(uid=item.uid, gold=item.row["gold"], category=category,
                      answers=[extracted_letter(t, item.row, choices) for t in texts],
                      completions=texts)


def task_prediction(item: Sample, completions: Sequence[Sample], kind: str) -> Prediction:
    """A fact-checking or extraction item's parsed samples (:mod:`medrl.launch.eval_tasks`)."""
    from medrl.launch.eval_tasks import extraction_counts, parse_record, parse_verdict

    texts = [c.completion_text for c in completions]
    if kind == "factcheck":
        verdicts = [parse_verdict(t) for t in texts]
        return Prediction(uid=item.uid, gold=item.row["gold"], completions=texts,
                          answers=[None if v is None else ("error" if v else "correct")
                                   for v, _ in verdicts],
                          spans=[span for _, span in verdicts])
    records = [parse_record(t) for t in texts]
    return Prediction(uid=item.uid, gold="", completions=texts, parsed=[r is not None
                                                                        for r in records],
                      counts=[extraction_counts(r, item.row["gold"]) for r in records])


def rubric_prediction(item: Sample, completions: Sequence[Sample], results: Sequence[Any],
                      category: str | None) -> Prediction:
    """One rubric item's grades (``results``: the rubric reward's, one per completion)."""
    dims: dict[str, list[float]] = defaultdict(list)
    for r in results:
        for key, value in (r.dims or {}).items():
            if key.startswith("axis:") and value is not None:
                dims[key].append(float(value))
    return Prediction(uid=item.uid, gold="", category=category,
                      scores=[r.score for r in results],
                      verdicts=[list((r.info or {}).get("verdicts", [])) for r in results],
                      dims={k: sum(v) / len(v) for k, v in sorted(dims.items())},
                      completions=[c.completion_text for c in completions])


# ------------------------------------------------------------------------------ the runs


@dataclass
class EvalOptions:
    """How ``medrl eval`` scores (its command-line options as plain values)."""

    mode: Mode = "loglik"
    samples: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    log_text: bool = False
    judge: str | None = None  # rubric datasets: the criterion scorer's model
    judge_scorer: Literal["reward_model", "judge"] = "reward_model"
    # reward plugins scored on generated items, as metrics: specs as in rewards.functions
    # ({"name": ..., "kwargs": {...}})
    rewards: tuple[dict[str, Any], ...] = ()


def fits(sample: Sample, max_len: int, new_tokens: int = 0) -> bool:
    return len(sample.prompt_ids) + len(sample.completion_ids) + new_tokens <= max_len


def evaluate_dataset(group, processor, ds: EvalDataset, opts: EvalOptions, max_len: int,
                     grader=None, rewards=None) -> tuple[list[Prediction], int]:
    """(predictions, items too long for the context) of one dataset on the engine group;
    ``processor``: the model's tokenizer (or a VLM's processor);
    ``grader(completions) -> RewardResults``: the rubric reward, for rubric datasets;
    ``rewards(completions) -> {name: [value per completion]}``: the ``--reward`` plugins."""
    from medrl.align.encode import encode_prompt, text_tokenizer
    from medrl.launch.data import load_media
    from medrl.rollouts.engine import SamplingParams

    def category(item):
        return None if ds.category is None else item.row.get(ds.category)

    if scoring_mode(ds, opts.mode) == "loglik":
        tokenizer = text_tokenizer(processor)
        requests = [(item, loglik_requests(tokenizer, item, ds.choices)) for item in ds.items]
        kept = [(item, reqs) for item, reqs in requests if all(fits(r, max_len) for r in reqs)]
        flat = [r for _, reqs in kept for r in reqs]
        scores = group.score(flat) if flat else []
        out, at = [], 0
        for item, reqs in kept:
            out.append(loglik_prediction(item, scores[at:at + len(reqs)], ds.choices,
                                         category(item)))
            at += len(reqs)
        return out, len(requests) - len(kept)
    # pixels are read here, for the items of this call (a volume becomes its slices)
    items = [load_media(item, ds.volume) if ds.media else item for item in ds.items]
    prompts = [replace(item, prompt_ids=encode_prompt(processor, item).prompt_ids[0])
               for item in items]
    kept = [p for p in prompts if fits(p, max_len, opts.max_new_tokens)]
    greedy = opts.samples == 1
    sampling = SamplingParams(temperature=0.0 if greedy else opts.temperature,
                              max_new_tokens=opts.max_new_tokens, n=opts.samples, seed=opts.seed)
    completions = group.generate(kept, sampling) if kept else []
    k = opts.samples
    if ds.kind == "rubric":
        results = grader(completions) if completions else []
        out = [rubric_prediction(item, completions[i * k:(i + 1) * k],
                                 results[i * k:(i + 1) * k], category(item))
               for i, item in enumerate(kept)]
    elif ds.kind in ("factcheck", "extract"):
        out = [task_prediction(item, completions[i * k:(i + 1) * k], ds.kind)
               for i, item in enumerate(kept)]
    else:
        out = [generate_prediction(item, completions[i * k:(i + 1) * k], ds.choices,
                                   category(item)) for i, item in enumerate(kept)]
    if rewards is not None and completions:
        values = rewards(completions)
        for i, p in enumerate(out):
            p.rewards = {name: v[i * k:(i + 1) * k] for name, v in values.items()}
    return out, len(prompts) - len(kept)


def resolve_target(target: str, *, seed: int = 0) -> tuple[Path, str]:
    """(model folder, a name for the report) of a run folder, checkpoint folder, HF folder or
    ``tiny:<arch>``; a folder without weights is a :class:`UserError` naming it."""
    from medrl.align.models import resolve_policy

    folder = resolve_policy(target, seed=seed)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise UserError(f"{folder} holds no model weights (*.safetensors or *.bin); point "
                        "medrl eval at a finished checkpoint or a complete model folder.")
    name = folder.parent.name if folder.name == "policy" else folder.name
    return folder, name


def default_out_dir(target: str, name: str) -> Path:
    """``RUN_DIR/eval/<checkpoint>`` for a run or checkpoint folder, else ``eval/<name>``."""
    path = Path(target).expanduser()
    if (path / "checkpoints").is_dir():
        return path / "eval" / name
    if (path / "policy").is_dir() and path.parent.name == "checkpoints":
        return path.parent.parent / "eval" / name
    return Path("eval") / name


def run_eval(target: str, datasets: Sequence[EvalDataset], out_dir: Path, opts: EvalOptions,
             *, workers: int = 1, backend: str = "hf", cpus_per_worker: float = 1.0,
             max_model_len: int = 4096, progress=None) -> tuple[dict[str, Any], str]:
    """Score ``datasets`` with the model of ``target`` on ``workers`` engine actors (Ray must
    be initialised); writes the report into ``out_dir``. Returns (results, summary)."""
    from medrl.align.models import context_length, load_tokenizer
    from medrl.rollouts.worker import RolloutGroup

    folder, _ = resolve_target(target, seed=opts.seed)
    positions = context_length(folder)
    max_len = min(max_model_len, positions) if positions else max_model_len
    processor = load_tokenizer(folder)  # a VLM's processor
    grader = rubric_grader(opts, out_dir) if any(d.kind == "rubric" for d in datasets) else None
    rewards = reward_metric_fn(opts.rewards) if opts.rewards else None
    group = RolloutGroup(workers, backend, str(folder),
                         {"dtype": "float32", "max_model_len": max_len, "seed": opts.seed},
                         num_cpus_per_worker=cpus_per_worker, max_restarts=0)
    results, predictions = {}, {}
    try:
        for ds in datasets:
            preds, too_long = evaluate_dataset(group, processor, ds, opts, max_len, grader,
                                               rewards)
            results[ds.name] = dataset_results(ds, preds, opts.mode, too_long, opts.seed)
            predictions[ds.name] = preds
            if progress is not None:
                progress(ds.name, results[ds.name])
    finally:
        group.shutdown()
    from medrl.launch.eval_report import write_report

    summary = write_report(out_dir, model=str(folder), opts=opts, results=results,
                           predictions=predictions)
    return results, summary


def rubric_grader(opts: EvalOptions, out_dir: Path):
    """The ``rubric`` reward with HealthBench's aggregation on ``opts.judge`` (its judge
    actors shared and started on the current Ray cluster), as ``grader(samples)``."""
    from medrl.rewards import RewardContext
    from medrl.rewards.rubric import RubricReward

    if not opts.judge:
        raise UserError("a rubric dataset (healthbench) is graded criterion by criterion: pass "
                        "--judge MODEL (a criterion reward model folder or reward_model run, "
                        "or a judge LM with --judge-scorer judge; tiny:qwen2 for a smoke run "
                        "with meaningless grades).")
    reward = RubricReward(model=opts.judge, scorer=opts.judge_scorer, aggregation="healthbench")
    reward.setup(RewardContext(run_dir=out_dir, base_dir=Path.cwd(), seed=opts.seed))
    return reward


def run_checkpoints(run_dir: Path, steps: str) -> list[Path]:
    """The complete checkpoints of a run that ``--checkpoints`` names: "all", or
    comma-separated steps. A step without a complete checkpoint is a UserError naming it."""
    from medrl.align.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir} has no complete checkpoint to compare; --checkpoints needs "
                        "a run folder with checkpoints/step-*/COMPLETE.")
    if steps == "all":
        return found
    by_step = {int(p.name.split("-")[1]): p for p in found}
    try:
        wanted = [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--checkpoints {steps!r}: write all, or steps like 100,200.") from None
    missing = [s for s in wanted if s not in by_step]
    if missing:
        raise UserError(f"{run_dir}: no complete checkpoint at step(s) "
                        f"{', '.join(map(str, missing))}; it has {', '.join(map(str, by_step))}.")
    return [by_step[s] for s in wanted]


def reward_metric_fn(specs: Sequence[dict[str, Any]]):
    """``fn(completions) -> {name: [value per completion]}`` of reward plugins given as in a
    recipe's ``rewards.functions`` (a registered name, ``module:fn`` or ``file.py:fn``, with
    its ``kwargs``), run by the reward runner (a failing reward stops the evaluation, naming
    itself and the sample)."""
    from medrl.rewards import RewardContext, RewardRunner, load_rewards

    runner = RewardRunner(load_rewards(list(specs), base_dir=Path.cwd()),
                          ctx=RewardContext(run_dir=None, base_dir=Path.cwd()))
    runner.start()

    def score(completions: list[Sample]) -> dict[str, list[float | None]]:
        scored = runner.score(completions, step=0).samples
        return {r.name: [s.rewards.get(r.name) for s in scored] for r in runner.rewards}

    return score
