"""Preference pairs for the reward-model stage, built from data rows.

Each pair becomes a :class:`~medrl.align.records.Sample` whose ``row`` holds the two texts the
reward model reads, ``chosen`` and ``rejected``, each ``rm_input(instruction, criterion,
response)`` (:mod:`medrl.rewards.rubric_scorers`: the format the ``rubric`` reward scores
with), and the criterion's ``tier``. Two sources (``reward_model.pairs``):

- ``explicit``: a row is one pair: the responses in ``chosen_field`` and ``rejected_field``,
  the criterion in ``criterion_field`` (absent or null: an empty criterion, a plain RM) and
  its tier in ``tier_field`` (optional).
- ``rubric``: a row holds a rubric (``data.fields.rubric``, either layout) and graded responses
  in ``responses_field``: a list of ``{"text": str, "verdicts": [v per criterion]}``, v in
  [0, 1] or a boolean, null where the criterion does not apply. Every two responses with a
  strict lexicographic preference (:func:`medrl.rewards.rubric.prefer`: fewer veto violations,
  then higher S1, then more bonus criteria met) make a pair, expanded into one example per
  criterion that applies to both and on which their verdicts differ; its chosen text is the
  response that meets that criterion more. The reward model's output is read as the degree a
  criterion is met (for a veto criterion, written as the behaviour to avoid: violated), so each
  example teaches that reading; criteria with equal verdicts carry no preference.

Pair uids are ``<row uid>/<k>``; the held-out split is made on rows (``data.eval_fraction``,
``data.eval_path``) before pairs are built, so no row has pairs on both sides.
"""

from __future__ import annotations

import numbers
from dataclasses import replace
from typing import Any, Literal, Sequence

from medrl.align.records import Sample, UserError
from medrl.rewards.rubric import Rubric, parse_rubric, prefer, tier_scores
from medrl.rewards.rubric_scorers import instruction_text, rm_input

PairSource = Literal["explicit", "rubric"]


def _text(row: dict, field: str, uid: str, what: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"sample {uid}: the {what} in column {field!r} (reward_model."
                        f"{what}_field) must be a non-empty string, not "
                        f"{'null' if value is None else type(value).__name__}.")
    return value


def _pair(sample: Sample, k: int, instruction: str, criterion: str, chosen: str,
          rejected: str, tier: str) -> Sample:
    return replace(sample, uid=f"{sample.uid}/{k}", group_id=f"{sample.uid}/{k}",
                   images=[], volume=None, row={
                       "chosen": rm_input(instruction, criterion, chosen),
                       "rejected": rm_input(instruction, criterion, rejected), "tier": tier})


def explicit_pairs(sample: Sample, *, chosen_field: str, rejected_field: str,
                   criterion_field: str | None, tier_field: str | None) -> list[Sample]:
    """The one pair of an explicit-pair row."""
    row, uid = sample.row, sample.uid
    chosen = _text(row, chosen_field, uid, "chosen")
    rejected = _text(row, rejected_field, uid, "rejected")
    criterion = row.get(criterion_field) if criterion_field else None
    if criterion is not None and not isinstance(criterion, str):
        raise UserError(f"sample {uid}: the criterion in column {criterion_field!r} "
                        f"(reward_model.criterion_field) must be a string or null, not "
                        f"{type(criterion).__name__}.")
    tier = row.get(tier_field) if tier_field else None
    return [_pair(sample, 0, instruction_text(sample.messages), criterion or "", chosen,
                  rejected, "" if tier is None else str(tier))]


def _verdict(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise UserError(f"{where}: a verdict must be a number in [0, 1], true/false or null, "
                    f"not {value!r}.")


def graded_responses(sample: Sample, rubric: Rubric, field: str
                     ) -> list[tuple[str, list[float | None]]]:
    """(text, verdicts by criterion) of each graded response of a rubric row."""
    value = sample.row.get(field)
    if not isinstance(value, list) or len(value) < 2:
        raise UserError(f"sample {sample.uid}: column {field!r} (reward_model.responses_field) "
                        "must be a list of at least two graded responses "
                        '{"text": ..., "verdicts": [...]}.')
    out = []
    for j, item in enumerate(value):
        where = f"sample {sample.uid}, response {j}"
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) \
                or not item["text"].strip():
            raise UserError(f"{where}: a graded response is an object with a non-empty "
                            '"text" and its "verdicts".')
        verdicts = item.get("verdicts")
        if not isinstance(verdicts, list) or len(verdicts) != len(rubric.criteria):
            got = len(verdicts) if isinstance(verdicts, list) else type(verdicts).__name__
            raise UserError(f"{where}: \"verdicts\" must hold one verdict per rubric criterion "
                            f"({len(rubric.criteria)}), got {got}.")
        out.append((item["text"], [_verdict(v, f"{where}, verdict {i}")
                                   for i, v in enumerate(verdicts)]))
    return out


def lexicographic_pairs(tiers: Sequence[str], weights: Sequence[float],
                        graded: Sequence[Sequence[float | None]]) -> list[tuple[int, int]]:
    """(winner, loser) response indices of every two responses with a strict preference
    (:func:`~medrl.rewards.rubric.prefer` of their tier scores), in index order."""
    scores = [tier_scores(tiers, weights, v) for v in graded]
    out = []
    for a in range(len(graded)):
        for b in range(a + 1, len(graded)):
            order = prefer(scores[a], scores[b])
            if order:
                out.append((a, b) if order > 0 else (b, a))
    return out


def criterion_examples(winner: Sequence[float | None], loser: Sequence[float | None]
                       ) -> list[tuple[int, bool]]:
    """(criterion index, winner meets it more) for each criterion that applies to both
    responses and on which their verdicts differ."""
    return [(i, win > lose) for i, (win, lose) in enumerate(zip(winner, loser, strict=True))
            if win is not None and lose is not None and win != lose]


def rubric_pairs(sample: Sample, *, responses_field: str) -> list[Sample]:
    """The per-criterion pairs of a row with a rubric and graded responses (module docstring)."""
    if sample.row.get("rubric") is None:
        raise UserError(f"sample {sample.uid}: reward_model.pairs is rubric, but the row has no "
                        "rubric; map data.fields.rubric to its column.")
    rubric = parse_rubric(sample.row["rubric"], uid=sample.uid)
    graded = graded_responses(sample, rubric, responses_field)
    criteria = rubric.criteria
    instruction = instruction_text(sample.messages)
    out = []
    for win, lose in lexicographic_pairs([c.tier for c in criteria],
                                         [c.weight for c in criteria], [v for _, v in graded]):
        for i, winner_more in criterion_examples(graded[win][1], graded[lose][1]):
            chosen, rejected = (win, lose) if winner_more else (lose, win)
            out.append(_pair(sample, len(out), instruction, criteria[i].text, graded[chosen][0],
                             graded[rejected][0], criteria[i].tier))
    return out


def preference_pairs(samples: Sequence[Sample], *, source: PairSource, chosen_field: str,
                     rejected_field: str, criterion_field: str | None, tier_field: str | None,
                     responses_field: str) -> list[Sample]:
    """Every pair of ``samples`` (loaded rows), in row order."""
    out: list[Sample] = []
    for s in samples:
        if source == "explicit":
            out += explicit_pairs(s, chosen_field=chosen_field, rejected_field=rejected_field,
                                  criterion_field=criterion_field, tier_field=tier_field)
        else:
            out += rubric_pairs(s, responses_field=responses_field)
    return out
