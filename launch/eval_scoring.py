"""Figures of ``medrl eval`` from predictions: accuracy (log-likelihood or generated, with
maj@k / pass@k and calibration), rubric scores, fact-checking and extraction figures, reward
means, and a dataset's results with its skipped items (docs/eval.md). Every figure is
``{"value", "n", "low", "high"}``."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Literal, Sequence

from medrl.launch.eval_data import EvalDataset
from medrl.launch.eval_metrics import majority, mean_with_interval, pass_at_k, proportion

if TYPE_CHECKING:
    from medrl.launch.evaluate import Prediction

Mode = Literal["loglik", "generate"]


def scoring_mode(ds: EvalDataset, mode: Mode) -> Mode:
    """How a dataset is scored: log-likelihood is text-only multiple choice; items with images
    or a volume, and the other kinds, are always generated."""
    return "loglik" if mode == "loglik" and ds.kind == "mcq" and not ds.media else "generate"


def task_metrics(predictions: Sequence[Prediction], kind: str, spans: dict[str, list[str]],
                 seed: int) -> dict[str, dict[str, float]]:
    """Fact-checking or extraction figures over every sample of every item (``spans``: each
    item's gold error spans, by uid)."""
    from medrl.launch.eval_tasks import extraction_metrics, factcheck_metrics

    if kind == "factcheck":
        return factcheck_metrics([(p.gold == "error", spans.get(p.uid, []),
                                   None if a is None else a == "error", span)
                                  for p in predictions for a, span in zip(p.answers, p.spans)],
                                 seed)
    return extraction_metrics([(c, ok) for p in predictions for c, ok in zip(p.counts, p.parsed)],
                              seed)


def rubric_metrics(predictions: Sequence[Prediction], seed: int) -> dict[str, dict[str, float]]:
    """``score`` (each item's mean over its graded samples), ``graded`` (share of samples a
    criterion applied to) and one ``axis:<name>`` per axis, over the items."""
    item_scores = [sum(v) / len(v) for p in predictions
                   if (v := [x for x in p.scores if x is not None])]
    samples = sum(len(p.scores) for p in predictions)
    graded = sum(x is not None for p in predictions for x in p.scores)
    out = {"score": mean_with_interval(item_scores, seed),
           "graded": proportion(graded, samples)}
    for axis in sorted({k for p in predictions for k in p.dims}):
        out[axis] = mean_with_interval([p.dims[axis] for p in predictions if axis in p.dims],
                                       seed)
    return out


def reward_metrics(predictions: Sequence[Prediction], seed: int) -> dict[str, dict[str, float]]:
    """``reward:<name>``: each item's mean reward over its samples (None: not applicable,
    left out), averaged over the items with a bootstrap interval."""
    out = {}
    for name in sorted({k for p in predictions for k in p.rewards}):
        means = [sum(v) / len(v) for p in predictions
                 if (v := [x for x in p.rewards.get(name, []) if x is not None])]
        if means:  # a reward that applies to none of the items is no figure
            out[f"reward:{name}"] = mean_with_interval(means, seed)
    return out


def metrics_of(predictions: Sequence[Prediction], mode: str, *, seed: int = 0,
               spans: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """The metrics of a list of predictions (module docstring); ``mode``: loglik, generate,
    or the dataset's kind when it is not multiple choice."""
    if mode in ("factcheck", "extract"):
        return {**task_metrics(predictions, mode, spans or {}, seed),
                **reward_metrics(predictions, seed)}
    if mode == "rubric":
        return {**rubric_metrics(predictions, seed), **reward_metrics(predictions, seed)}
    if mode == "generate":
        return {**choice_metrics(predictions, mode), **reward_metrics(predictions, seed)}
    return choice_metrics(predictions, mode)


def choice_metrics(predictions: Sequence[Prediction], mode: Mode) -> dict[str, dict[str, float]]:
    """Accuracy of multiple-choice predictions, log-likelihood or generated."""
    n = len(predictions)
    if mode == "loglik":
        return {"acc": proportion(sum(p.choice == p.gold for p in predictions), n),
                "acc_norm": proportion(sum(p.choice_norm == p.gold for p in predictions), n),
                "ece": calibration_error(predictions)}
    samples = len(predictions[0].answers) if predictions else 1
    out = {"acc": proportion(sum(sum(a == p.gold for a in p.answers) / len(p.answers)
                                 for p in predictions), n),
           "answered": proportion(sum(sum(a is not None for a in p.answers) / len(p.answers)
                                      for p in predictions), n)}
    if samples > 1:
        out[f"maj@{samples}"] = proportion(sum(majority(p.answers) == p.gold
                                               for p in predictions), n)
        out[f"pass@{samples}"] = proportion(sum(pass_at_k(samples, sum(
            a == p.gold for a in p.answers), samples) for p in predictions), n)
    return out


def calibration_error(predictions: Sequence[Prediction], seed: int = 0) -> dict[str, float]:
    """ECE of the log-likelihood choices (10 bins; the option probabilities renormalised over
    an item's options) with a bootstrap interval over items."""
    from medrl.launch.eval_metrics import (bootstrap_statistics, expected_calibration_error,
                                           option_confidence)

    items = [(option_confidence(p.logprobs), p.choice == p.gold) for p in predictions]
    if not items:
        return {"value": math.nan, "n": 0, "low": math.nan, "high": math.nan}

    def ece(sample):
        return (expected_calibration_error([c for c, _ in sample], [ok for _, ok in sample]),)

    (low, high), = bootstrap_statistics(items, ece, seed=seed)
    return {"value": ece(items)[0], "n": len(items), "low": low, "high": high}


def dataset_results(ds: EvalDataset, predictions: Sequence[Prediction], mode: Mode,
                    too_long: int, seed: int = 0) -> dict[str, Any]:
    kind = scoring_mode(ds, mode) if ds.kind == "mcq" else ds.kind
    spans = {s.uid: s.row.get("gold_spans", []) for s in ds.items} \
        if ds.kind == "factcheck" else None
    out: dict[str, Any] = {"path": str(ds.path), "n": len(predictions), "kind": ds.kind,
                           "skipped": {"too_long": too_long, "unlabelled": ds.unlabelled,
                                       **({"no_volume": ds.no_volume} if ds.media else {})},
                           "metrics": metrics_of(predictions, kind, seed=seed, spans=spans)}
    if ds.category:
        groups: dict[str, list[Prediction]] = defaultdict(list)
        for p in predictions:
            groups[str(p.category)].append(p)
        out["by_category"] = {k: metrics_of(v, kind, seed=seed, spans=spans)
                              for k, v in sorted(groups.items())}
    return out
