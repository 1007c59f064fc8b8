"""Rubric rewards with a safety veto (ProMedical): rubric data, the aggregation, the reward.

A rubric is a list of physician-written criteria in three tiers:

- **main** (proficiency): criteria c_i with weights w_i summing to 1,
  S1 = sum_i w_i * v_i, v_i in [0, 1] the degree to which the response meets c_i;
- **bonus** (excellence): S2 = number of bonus criteria met;
- **veto** (safety): S3 = number of veto criteria violated. A veto criterion is written as
  the behaviour to avoid (as HealthBench's negative-point items are), so "met" means
  "violated".

The ProMedical reward is r = clip(S1 + alpha * S2, 0, 1 + beta) - veto_penalty * S3 with
0 <= alpha < 1, beta > 0 and veto_penalty > 1 + beta, so that one violation puts a response
below every response without one. A verdict counts as met (a bonus earned, a veto violated,
a HealthBench criterion met) when it is at least :data:`MET` (0.5). A criterion that does not
apply to a response has the verdict None: it is skipped, and the main weights are
renormalised over the applicable main criteria.

Two data layouts are read (:func:`parse_rubric`), both as a list of items:

- tiered: ``{criterion, tier: main | bonus | veto, weight, tags}`` (weight on main items
  only; tags optional);
- HealthBench: ``{criterion, points, tags}``. Our reconstruction of the tiers (the
  HealthBench authors define none): positive points -> main with weight
  points / sum(positive points); negative points -> veto; no bonus tier. ``axis:<name>``
  tags give per-axis sub-scores.

HealthBench's own aggregation is the alternative (``aggregation="healthbench"``): points of
the criteria met (penalties included) / sum of positive points, clipped to [0, 1].
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Sequence

from pydantic import Field

from medrl.align.records import Sample, UserError
from medrl.rewards.api import RewardContext, RewardResult, reward
from medrl.rewards.judge import JudgeClient, JudgeSpec, OnMalformed, connect_judge
from medrl.rewards.loader import hash_folder
from medrl.rewards.rubric_scorers import (CriterionPair, CriterionScorer, Dtype, ScorerKind,
                                          scorer_model)

Tier = Literal["main", "bonus", "veto"]
TIERS: tuple[str, ...] = ("main", "bonus", "veto")
Layout = Literal["tiered", "healthbench"]
Aggregation = Literal["promedical", "healthbench"]

MET = 0.5  # a verdict at or above this counts as met (bonus, HealthBench) or violated (veto)
WEIGHT_TOLERANCE = 1e-6  # how far the main weights of a tiered rubric may sum from 1
# Ours, not the paper's (it publishes none): see docs/rewards.md, "Rubric rewards".
DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_VETO_PENALTY = 0.1, 0.2, 2.0


# --- rubric data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """One rubric item.

    text: the criterion as written (patient-facing content: never logged).
    tier: main, bonus or veto. weight: main: w_i (a rubric's main weights sum to 1); bonus
    and veto: 1.0 (they count). points: the HealthBench points as written (None in the
    tiered layout). tags: as written (HealthBench), e.g. ``axis:accuracy``.
    """

    text: str
    tier: Tier
    weight: float = 1.0
    points: float | None = None
    tags: tuple[str, ...] = ()

    @property
    def axes(self) -> tuple[str, ...]:
        """The names of the ``axis:<name>`` tags."""
        return tuple(t[len("axis:"):] for t in self.tags if t.startswith("axis:"))


@dataclass(frozen=True)
class Rubric:
    """The criteria of one dataset row, in their order (verdicts use the same indices)."""

    criteria: tuple[Criterion, ...]
    layout: Layout


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def _item(item: Any, where: str) -> tuple[Layout, dict[str, Any]]:
    """One raw rubric item -> its layout and the fields of its Criterion (weights of
    HealthBench items are set later, from the whole rubric)."""
    if not isinstance(item, dict):
        raise UserError(f"{where} is a {type(item).__name__}; a rubric item is an object "
                        "{criterion, tier, weight} or {criterion, points, tags}.")
    text = item.get("criterion")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where} has an empty or missing 'criterion'; every item needs its "
                        "criterion text.")
    tags = item.get("tags") or ()
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise UserError(f"{where}: 'tags' must be a list of strings.")
    tier, points, weight = item.get("tier"), item.get("points"), item.get("weight")
    if tier is not None and points is not None:
        raise UserError(f"{where} has both 'tier' (tiered layout) and 'points' (HealthBench "
                        "layout); give one.")
    if tier is not None:
        if tier not in TIERS:
            raise UserError(f"{where}: unknown tier {str(tier)[:30]!r}; a tier is one of "
                            f"{', '.join(TIERS)}.")
        if tier == "main" and not (_number(weight) and weight > 0):
            raise UserError(f"{where}: a main criterion needs a 'weight' that is a number "
                            f"> 0 (got {type(weight).__name__}).")
        if tier != "main" and weight is not None:
            raise UserError(f"{where}: a {tier} criterion takes no 'weight' (bonus and veto "
                            "criteria count); remove it.")
        return "tiered", {"text": text, "tier": tier, "weight": float(weight or 1.0),
                          "tags": tuple(tags)}
    if points is None:
        raise UserError(f"{where} has neither 'tier' (tiered layout) nor 'points' (HealthBench "
                        "layout).")
    if not _number(points) or points == 0:
        shown = points if _number(points) else type(points).__name__
        raise UserError(f"{where}: 'points' must be a non-zero number (positive: a criterion "
                        f"to meet, negative: a penalty); got {shown}.")
    return "healthbench", {"text": text, "tier": "main" if points > 0 else "veto",
                           "points": float(points), "tags": tuple(tags)}


def parse_rubric(value: Any, *, uid: str) -> Rubric:
    """A row's ``rubric`` field (a list of items, or that list as a JSON string) -> Rubric.

    Raises :class:`UserError` naming the sample uid and the item index, never the criterion
    text: an item that is not an object, an empty criterion, an unknown tier, non-numeric
    points or weights, mixed layouts, or main weights of a tiered rubric that do not sum to 1.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"sample {uid!r}: the rubric is a string but not JSON ({exc.msg} "
                            f"at character {exc.pos}).") from None
    if not isinstance(value, (list, tuple)) or not value:
        got = "an empty list" if isinstance(value, (list, tuple)) else \
            f"a {type(value).__name__}"
        raise UserError(f"sample {uid!r}: the rubric must be a non-empty list of criteria, not "
                        f"{got}.")
    parsed = [_item(item, f"sample {uid!r}, rubric item {i}") for i, item in enumerate(value)]
    layout = parsed[0][0]
    for i, (other, _) in enumerate(parsed):
        if other != layout:
            raise UserError(f"sample {uid!r}, rubric item {i} uses the {other} layout but item 0 "
                            f"the {layout} layout; a rubric uses one layout.")
    fields = [f for _, f in parsed]
    if layout == "healthbench":
        positive = sum(f["points"] for f in fields if f["points"] > 0)
        for f in fields:
            f["weight"] = f["points"] / positive if f["points"] > 0 else 1.0
    else:
        total = sum(f["weight"] for f in fields if f["tier"] == "main")
        if any(f["tier"] == "main" for f in fields) and abs(total - 1.0) > WEIGHT_TOLERANCE:
            mains = [str(i) for i, f in enumerate(fields) if f["tier"] == "main"]
            raise UserError(f"sample {uid!r}: the weights of the main criteria (items "
                            f"{', '.join(mains)}) sum to {total:.6g}, not 1; rescale them.")
    return Rubric(tuple(Criterion(**f) for f in fields), layout)


def sample_rubric(sample: Sample) -> Rubric | None:
    """The sample's rubric (``row["rubric"]``, where ``data.fields.rubric`` puts it); None
    when the row's rubric is empty (null), so the reward does not apply to it."""
    if "rubric" not in sample.row:
        raise UserError(f"sample {sample.uid!r} has no 'rubric' field; map data.fields.rubric to "
                        "the column that holds the rubric (HealthBench: rubrics).")
    value = sample.row["rubric"]
    return None if value is None else parse_rubric(value, uid=sample.uid)


# --- aggregation (pure functions on plain lists) ------------------------------------------------


class TierScores(NamedTuple):
    """s1: proficiency in [0, 1], None when no main criterion applies; s2: bonus criteria
    met; s3: veto criteria violated."""

    s1: float | None
    s2: int
    s3: int


def proficiency(weights: Sequence[float], verdicts: Sequence[float | None]) -> float | None:
    """S1 = sum_i w_i v_i / sum_i w_i over the main criteria that apply (v_i not None).

    weights, verdicts: [n_main]. Renormalising keeps S1 in [0, 1] whichever criteria apply;
    None when none does.
    """
    applicable = [(w, v) for w, v in zip(weights, verdicts, strict=True) if v is not None]
    total = sum(w for w, _ in applicable)
    if not applicable or total <= 0:
        return None
    return sum(w * v for w, v in applicable) / total


def count_met(verdicts: Sequence[float | None]) -> int:
    """How many verdicts are at least :data:`MET` (None: not applicable, not counted)."""
    return sum(1 for v in verdicts if v is not None and v >= MET)


def tier_scores(tiers: Sequence[str], weights: Sequence[float],
                verdicts: Sequence[float | None]) -> TierScores:
    """S1, S2, S3 of one response. tiers, weights, verdicts: [n_criteria]."""
    def pick(tier):
        return [(w, v) for t, w, v in zip(tiers, weights, verdicts, strict=True) if t == tier]
    main = pick("main")
    return TierScores(proficiency([w for w, _ in main], [v for _, v in main]),
                      count_met([v for _, v in pick("bonus")]),
                      count_met([v for _, v in pick("veto")]))


def check_promedical_params(alpha: float, beta: float, veto_penalty: float) -> None:
    """Raise :class:`UserError` naming the kwarg unless 0 <= alpha < 1, beta > 0 and
    veto_penalty > 1 + beta (strictly: at equality a violating response that maxes the clip
    ties with an empty safe one at 0)."""
    for name, value in (("alpha", alpha), ("beta", beta), ("veto_penalty", veto_penalty)):
        if not _number(value):
            raise UserError(f"rubric reward: kwargs.{name} must be a finite number, not "
                            f"{value!r}.")
    if not 0 <= alpha < 1:
        raise UserError(f"rubric reward: kwargs.alpha is {alpha:g}; it must be in [0, 1) so "
                        "that one bonus criterion is worth less than the whole main tier.")
    if not beta > 0:
        raise UserError(f"rubric reward: kwargs.beta is {beta:g}; it must be > 0 (the room "
                        "above 1 that bonus criteria can earn).")
    if not veto_penalty > 1 + beta:
        raise UserError(f"rubric reward: kwargs.veto_penalty is {veto_penalty:g}; it must be "
                        f"> 1 + beta = {1 + beta:g} so that one safety violation ranks a "
                        "response below every response without one.")


def promedical_reward(s1: float | None, s2: float, s3: float, *, alpha: float, beta: float,
                      veto_penalty: float) -> float:
    """r = clip(S1 + alpha * S2, 0, 1 + beta) - veto_penalty * S3; S1 None counts as 0."""
    return min(max((s1 or 0.0) + alpha * s2, 0.0), 1.0 + beta) - veto_penalty * s3


def healthbench_score(points: Sequence[float],
                      verdicts: Sequence[float | None]) -> float | None:
    """HealthBench's score of one response: points of the criteria met / sum of positive
    points, over the applicable criteria, clipped to [0, 1] (HealthBench clips its mean over
    examples; a reward clips each response). points, verdicts: [n_criteria]. None when no
    applicable criterion has positive points (HealthBench's None)."""
    applicable = [(p, v) for p, v in zip(points, verdicts, strict=True) if v is not None]
    possible = sum(p for p, _ in applicable if p > 0)
    if possible <= 0:
        return None
    earned = sum(p for p, v in applicable if v >= MET)
    return min(max(earned / possible, 0.0), 1.0)


def prefer(a: TierScores, b: TierScores) -> int:
    """Lexicographic preference between two responses to one rubric (e.g. to build preference
    pairs): 1 if ``a`` is preferred, -1 if ``b``, 0 if neither.

    Fewer veto violations first, then higher S1, then more bonus criteria met. An S1 of None
    on either side ties on S1 (the comparison goes on to S2).
    """
    if a.s3 != b.s3:
        return 1 if a.s3 < b.s3 else -1
    if a.s1 is not None and b.s1 is not None and a.s1 != b.s1:
        return 1 if a.s1 > b.s1 else -1
    if a.s2 != b.s2:
        return 1 if a.s2 > b.s2 else -1
    return 0


class PromedicalParams(NamedTuple):
    """The constants of :func:`promedical_reward` (checked by :func:`resolve_params`)."""

    alpha: float
    beta: float
    veto_penalty: float


def aggregate(rubric: Rubric, verdicts: Sequence[float | None], *, aggregation: Aggregation,
              params: PromedicalParams | None = None
              ) -> tuple[float | None, dict[str, float | None]]:
    """(score, dims) of one response to ``rubric``; verdicts: [n_criteria], by criterion index.

    dims: ``s1``, ``s2``, ``s3`` (:class:`TierScores`) and one ``axis:<name>`` per axis tag:
    under ``promedical`` the S1 of that axis's main criteria, under ``healthbench`` the
    HealthBench score of that axis's criteria (as HealthBench scores its tags); None where
    nothing applies. The score is None when no criterion applies.
    """
    criteria = rubric.criteria
    tiers = tier_scores([c.tier for c in criteria], [c.weight for c in criteria], verdicts)
    if aggregation == "promedical":
        if params is None:
            raise ValueError("aggregation promedical needs its PromedicalParams")
        score = promedical_reward(*tiers, **params._asdict())
    elif aggregation == "healthbench":
        if rubric.layout != "healthbench":
            raise ValueError("aggregation healthbench needs a rubric in the HealthBench layout")
        score = healthbench_score([c.points for c in criteria], verdicts)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    if all(v is None for v in verdicts):
        score = None
    dims: dict[str, float | None] = {"s1": tiers.s1, "s2": float(tiers.s2),
                                     "s3": float(tiers.s3)}
    for axis in sorted({a for c in criteria for a in c.axes}):
        on_axis = [(c, v) for c, v in zip(criteria, verdicts) if axis in c.axes]
        if aggregation == "promedical":
            main = [(c.weight, v) for c, v in on_axis if c.tier == "main"]
            value = proficiency([w for w, _ in main], [v for _, v in main])
        else:
            value = healthbench_score([c.points for c, _ in on_axis], [v for _, v in on_axis])
        dims[f"axis:{axis}"] = value
    return score, dims


def resolve_params(aggregation: Aggregation, alpha: float | None, beta: float | None,
                   veto_penalty: float | None) -> PromedicalParams | None:
    """The ProMedical constants (defaults filled in, checked), or None under healthbench,
    which refuses them (they would do nothing there)."""
    given = {k: v for k, v in (("alpha", alpha), ("beta", beta),
                               ("veto_penalty", veto_penalty)) if v is not None}
    if aggregation == "healthbench":
        if given:
            raise UserError(f"rubric reward: kwargs {', '.join(given)} apply to aggregation "
                            "promedical only; remove them, or set aggregation: promedical.")
        return None
    params = PromedicalParams(given.get("alpha", DEFAULT_ALPHA), given.get("beta", DEFAULT_BETA),
                              given.get("veto_penalty", DEFAULT_VETO_PENALTY))
    check_promedical_params(*params)
    return params


def judge_options(kind: ScorerKind, max_new_tokens: int | None, max_retries: int | None,
                  on_malformed: OnMalformed | None, *, reward_name: str = "rubric"
                  ) -> tuple[int, int, OnMalformed]:
    """The judge-only kwargs with their defaults (32, 2, "error"); a reward model has none
    and refuses them (they would do nothing). reward_name: who asks, for the message."""
    given = [k for k, v in (("max_new_tokens", max_new_tokens), ("max_retries", max_retries),
                            ("on_malformed", on_malformed)) if v is not None]
    if kind != "judge":
        if given:
            raise UserError(f"{reward_name} reward: kwargs {', '.join(given)} apply to scorer: "
                            "judge only; remove them, or set scorer: judge.")
        return 0, 0, "error"
    return (32 if max_new_tokens is None else max_new_tokens,
            2 if max_retries is None else max_retries, on_malformed or "error")


# Built-in rewards that score through shared judge actors (:func:`connect_criterion_judge`,
# or their own JudgeSpec: med3d_consistency reads raw logits of a chat-rendered input).
JUDGE_REWARDS = ("rubric", "causal_consistency", "med3d_consistency")


def judge_cpus(functions: Sequence[dict[str, Any]]) -> float:
    """Logical CPUs the judge actors of a recipe's judge rewards (:data:`JUDGE_REWARDS`)
    reserve (``replicas`` x ``judge_num_cpus`` per distinct scorer model and kind; rewards
    sharing one judge count it once), so an embedded cluster is started with room for them.
    functions: the recipe's ``rewards.functions`` as dicts."""
    judges: dict[tuple[Any, Any], float] = {}
    for f in functions:
        k = f.get("kwargs") or {}
        if f.get("name") not in JUDGE_REWARDS or k.get("scorer") == "rule":
            continue
        # the judge's outputs as JudgeSpec keys them: rewards differing here get actors each
        raw = f.get("name") == "med3d_consistency"
        key = (str(k.get("model")), k.get("scorer", "reward_model"),
               "logit" if raw else "probability",
               k.get("rendering", "chat") if raw else "criterion")
        need = float(k.get("replicas", 1)) * float(k.get("judge_num_cpus", 1.0))
        judges[key] = max(judges.get(key, 0.0), need)
    return sum(judges.values())


def connect_criterion_judge(r: Any, ctx: RewardContext) -> JudgeClient:
    """The shared judge of a judge reward ``r`` (its ``model_path``, ``scorer_kind``,
    ``dtype``, ``batch_size``, ``max_length``, ``max_new_tokens``, ``max_retries``,
    ``on_malformed``, ``replicas``, ``judge_num_cpus``, ``judge_num_gpus``,
    ``judge_timeout_s``), on ``ctx.device``; sampled retries are seeded by the run seed."""
    folder, tiny = scorer_model(r.model_path, ctx.base_dir)
    spec = JudgeSpec(r.scorer_kind, str(folder.resolve()), tiny, r.dtype, r.batch_size,
                     r.max_length, ctx.device, r.max_new_tokens, r.max_retries,
                     ctx.seed if r.scorer_kind == "judge" else 0)
    return connect_judge(spec, run_dir=ctx.run_dir, replicas=r.replicas,
                         num_cpus=r.judge_num_cpus, num_gpus=r.judge_num_gpus,
                         timeout_s=r.judge_timeout_s, on_malformed=r.on_malformed)


# --- the reward ---------------------------------------------------------------------------------


@reward("rubric")
class RubricReward:
    """Scores each response against its row's rubric; see the module docstring.

    model: the scorer's folder (relative to the recipe), or ``tiny:qwen2`` (random weights:
    meaningless scores, for smoke runs). scorer: reward_model or judge. aggregation:
    promedical (alpha, beta, veto_penalty: None for our defaults) or healthbench.
    batch_size: (sample, criterion) pairs per forward pass / generate call. max_length:
    longest scorer input in tokens. dtype: of the scorer's weights.
    Judge only (None: defaults 32, 2, "error"; refused for reward_model): max_new_tokens,
    max_retries, on_malformed (see :mod:`medrl.rewards.judge`).
    With Ray initialised the scorer runs in ``replicas`` shared judge actors, each reserving
    judge_num_cpus / judge_num_gpus; judge_timeout_s bounds their answer to one batch.
    Result: score, dims (see :func:`aggregate`), info ``{"verdicts": [float | None]}`` by
    criterion index; no criterion or response text. :meth:`batch_metrics`: the judge's.
    """

    def __init__(self, model: str, *, scorer: ScorerKind = "reward_model",
                 aggregation: Aggregation = "promedical", alpha: float | None = None,
                 beta: float | None = None, veto_penalty: float | None = None,
                 batch_size: Annotated[int, Field(gt=0)] = 16,
                 max_length: Annotated[int, Field(gt=0)] = 2048, dtype: Dtype = "float32",
                 max_new_tokens: Annotated[int, Field(gt=0)] | None = None,
                 max_retries: Annotated[int, Field(ge=0)] | None = None,
                 on_malformed: OnMalformed | None = None,
                 replicas: Annotated[int, Field(gt=0)] = 1,
                 judge_num_cpus: Annotated[float, Field(ge=0)] = 1.0,
                 judge_num_gpus: Annotated[float, Field(ge=0)] = 0.0,
                 judge_timeout_s: Annotated[float, Field(gt=0)] | None = None):
        self.params = resolve_params(aggregation, alpha, beta, veto_penalty)
        self.model_path, self.scorer_kind, self.aggregation = model, scorer, aggregation
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype
        self.max_new_tokens, self.max_retries, self.on_malformed = judge_options(
            scorer, max_new_tokens, max_retries, on_malformed)
        self.replicas, self.judge_timeout_s = replicas, judge_timeout_s
        self.judge_num_cpus, self.judge_num_gpus = judge_num_cpus, judge_num_gpus
        self.judge: JudgeClient | None = None

    @staticmethod
    def identity_extra(kwargs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
        """Pins the exact scorer model in checkpoints (a hash over the whole folder)."""
        folder, _ = scorer_model(kwargs["model"], base_dir)
        return {"model_dir": str(folder), "model_sha256": hash_folder(folder)}

    def setup(self, ctx: RewardContext) -> None:
        self.judge = connect_criterion_judge(self, ctx)

    @property
    def scorer(self) -> CriterionScorer | None:
        """The loaded scorer when it runs in this process (None in judge actors)."""
        return self.judge.host.scorer if self.judge and self.judge.host else None

    def batch_metrics(self) -> dict[str, float]:
        """The last call's judge metrics: judge_seconds, judge_pairs, judge_pairs_per_s,
        judge_malformed, judge_retries, judge_generate_calls."""
        return self.judge.metrics() if self.judge else {}

    def _rubric(self, sample: Sample) -> Rubric | None:
        rubric = sample_rubric(sample)
        if rubric is not None and self.aggregation == "healthbench" \
                and rubric.layout != "healthbench":
            raise UserError(f"sample {sample.uid!r}: aggregation healthbench needs a rubric in "
                            "the HealthBench layout (points); this one is tiered. Use "
                            "aggregation: promedical.")
        return rubric

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        parsed: dict[int, Rubric | None] = {}  # the G completions of a prompt share its row
        rubrics = []
        for s in samples:
            if id(s.row) not in parsed:
                parsed[id(s.row)] = self._rubric(s)
            rubrics.append(parsed[id(s.row)])
        pairs = [CriterionPair(s, c.text, i) for s, r in zip(samples, rubrics)
                 if r is not None for i, c in enumerate(r.criteria)]
        verdicts = self.judge.score(pairs)  # one call for the whole batch
        if len(verdicts) != len(pairs):
            raise ValueError(f"the {self.scorer_kind} scorer returned {len(verdicts)} verdicts "
                             f"for {len(pairs)} (sample, criterion) pairs")
        out, at = [], 0
        for s, r in zip(samples, rubrics):
            if r is None:
                out.append(RewardResult(None))
                continue
            mine = [None if v is None else float(v) for v in verdicts[at:at + len(r.criteria)]]
            at += len(r.criteria)
            for i, v in enumerate(mine):
                if v is not None and not 0.0 <= v <= 1.0:  # NaN fails this too
                    raise ValueError(f"the {self.scorer_kind} scorer gave criterion {i} of "
                                     f"sample {s.uid!r} the verdict {v!r}; verdicts are in "
                                     "[0, 1] or None")
            score, dims = aggregate(r, mine, aggregation=self.aggregation, params=self.params)
            out.append(RewardResult(score, dims=dims, info={"verdicts": mine}))
        return out
