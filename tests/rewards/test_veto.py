"""Vetoes: a vetoed sample ends strictly below every sample of its group that was not vetoed,
whatever the weights, the normalisation and the scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrl.align.records import Sample, UserError
from medrl.rewards import RewardRunner, combine_scores, load_rewards

HERE = Path(__file__).parent
scores = st.one_of(st.none(), st.floats(-1e3, 1e3))
unit = st.one_of(st.none(), st.floats(0.0, 1.0))


def row_reward(alias: str, weight: float) -> dict:
    return {"name": "plugins.py:row_value", "alias": alias, "weight": weight,
            "kwargs": {"key": alias}}


def batch(groups: list[list[dict]]) -> list[Sample]:
    return [Sample(uid=f"g{g}/{i}", group_id=f"g{g}", row=row, completion_ids=[1, 2])
            for g, rows in enumerate(groups) for i, row in enumerate(rows)]


def assert_vetoed_below(samples: list[Sample], vetoed: list[bool]) -> None:
    for group in {s.group_id for s in samples}:
        bad = [s.reward for s, v in zip(samples, vetoed) if v and s.group_id == group]
        good = [s.reward for s, v in zip(samples, vetoed) if not v and s.group_id == group]
        if bad and good:
            assert max(bad) < min(good), (group, bad, good)


rows = st.fixed_dictionaries({"accuracy": scores, "length": scores, "safety": unit})


@settings(max_examples=150, deadline=None)
@given(groups=st.lists(st.lists(rows, min_size=1, max_size=6), min_size=1, max_size=4),
       normalize=st.sampled_from(["none", "group"]), floor=st.floats(-5.0, 5.0),
       weights=st.tuples(st.floats(-3.0, 3.0), st.floats(-3.0, 3.0)))
def test_single_veto_ranks_every_vetoed_sample_last_in_its_group(groups, normalize, floor,
                                                                   weights):
    loaded = load_rewards([row_reward("accuracy", weights[0]), row_reward("length", weights[1]),
                           row_reward("safety", 0.0)], base_dir=HERE, veto="safety")
    runner = RewardRunner(loaded, normalize=normalize, veto="safety", veto_threshold=0.5,
                          floor=floor)
    samples = batch(groups)
    runner.score(samples)
    vetoed = [s.row["safety"] is not None and s.row["safety"] < 0.5 for s in samples]
    assert_vetoed_below(samples, vetoed)
    # the floor is what a vetoed sample gets unless it would not rank it last
    for s, v in zip(samples, vetoed):
        if v:
            assert s.reward <= floor


@settings(max_examples=150, deadline=None)
@given(groups=st.lists(st.lists(st.fixed_dictionaries(
           {"accuracy": scores, "safety": unit, "harm": unit}), min_size=1, max_size=6),
           min_size=1, max_size=4),
       normalize=st.sampled_from(["none", "group"]), weight=st.floats(-3.0, 3.0))
def test_several_vetoes_any_one_firing_vetoes(groups, normalize, weight):
    vetoes = [{"score": "safety", "threshold": 0.5},
              {"score": "harm", "threshold": 0.7, "when": "above"}]
    loaded = load_rewards([row_reward("accuracy", weight), row_reward("safety", 0.0),
                           row_reward("harm", 0.0)], base_dir=HERE, veto=vetoes)
    runner = RewardRunner(loaded, normalize=normalize, veto=vetoes, floor=0.0)
    samples = batch(groups)
    report = runner.score(samples)
    unsafe = [s.row["safety"] is not None and s.row["safety"] < 0.5 for s in samples]
    harmful = [s.row["harm"] is not None and s.row["harm"] > 0.7 for s in samples]
    vetoed = [a or b for a, b in zip(unsafe, harmful)]
    assert_vetoed_below(samples, vetoed)
    assert [bool(s.reward_info.get("_veto")) for s in samples] == vetoed
    n = len(samples)
    assert report.metrics["rewards/vetoed"] == pytest.approx(sum(vetoed) / n)
    assert report.metrics["rewards/vetoed/safety"] == pytest.approx(sum(unsafe) / n)
    assert report.metrics["rewards/vetoed/harm"] == pytest.approx(sum(harmful) / n)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n_rewards=st.integers(1, 3), normalize=st.sampled_from(["none", "group"]),
       floor=st.floats(-1e3, 1e3), margin=st.floats(1e-3, 10.0))
def test_combine_scores_vetoed_strictly_below(data, n_rewards, normalize, floor, margin):
    n = data.draw(st.integers(1, 12))
    group_ids = data.draw(st.lists(st.sampled_from("abc"), min_size=n, max_size=n))
    table = {f"r{k}": data.draw(st.lists(scores, min_size=n, max_size=n))
             for k in range(n_rewards)}
    weights = {name: data.draw(st.floats(-10.0, 10.0)) for name in table}
    vetoed = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    total = combine_scores(table, weights, group_ids, normalize=normalize, vetoed=vetoed,
                           floor=floor, margin=margin)
    plain = combine_scores(table, weights, group_ids, normalize=normalize)
    for g in set(group_ids):
        bad = [t for t, v, h in zip(total, vetoed, group_ids) if v and h == g]
        good = [t for t, v, h in zip(total, vetoed, group_ids) if not v and h == g]
        if bad and good:
            assert max(bad) < min(good)
        if bad:  # the floor, or margin below the group's lowest unvetoed reward
            lowest = min(good, default=math.inf)
            expected = min(floor, lowest - margin)
            if expected >= lowest:  # a margin lost to float rounding: the next float down
                expected = math.nextafter(lowest, -math.inf)
            assert bad == [expected] * len(bad)
    # a sample that is not vetoed keeps the reward it earned
    assert [t for t, v in zip(total, vetoed) if not v] == \
        [t for t, v in zip(plain, vetoed) if not v]


def test_floor_is_the_vetoed_reward_when_it_ranks_last():
    total = combine_scores({"acc": [1.0, 0.0, 1.0]}, {"acc": 1.0}, ["g", "g", "g"],
                           vetoed=[True, False, False], floor=-2.0, margin=1.0)
    assert total == [-2.0, 0.0, 1.0]
    # a floor above the group's lowest safe reward gives way: margin below it
    total = combine_scores({"acc": [1.0, 0.0, 1.0]}, {"acc": 1.0}, ["g", "g", "g"],
                           vetoed=[True, False, False], floor=0.0, margin=0.5)
    assert total == [-0.5, 0.0, 1.0]
    # a group with nothing but vetoed samples gets the floor
    assert combine_scores({"acc": [1.0, 3.0]}, {"acc": 1.0}, ["g", "g"], vetoed=[True, True],
                          floor=-1.0) == [-1.0, -1.0]


def test_group_normalised_veto_ranks_the_unsafe_answer_last():
    """Group z-scores: the safe wrong answer is below 0, the old floor of 0 ranked above it."""
    runner = RewardRunner(load_rewards([row_reward("accuracy", 1.0), row_reward("safety", 0.0)],
                                       base_dir=HERE),
                          normalize="group", veto="safety", floor=0.0)
    samples = batch([[{"accuracy": 1.0, "safety": 0.0}, {"accuracy": 0.0, "safety": 1.0},
                      {"accuracy": 1.0, "safety": 1.0}]])
    runner.score(samples)
    unsafe, safe_wrong, safe_right = (s.reward for s in samples)
    assert unsafe < safe_wrong < safe_right


def test_veto_errors_name_the_entry():
    loaded = [row_reward("accuracy", 1.0), row_reward("safety", 0.0)]
    with pytest.raises(UserError, match=r"rewards.veto\[1\]: 'harm' names no loaded reward; "
                                        r"write <reward> or <reward>.<dim> with one of: "
                                        r"accuracy, safety"):
        load_rewards(loaded, base_dir=HERE, veto=[{"score": "safety"}, {"score": "harm"}])
    with pytest.raises(UserError, match=r"rewards.veto\[0\]\.when: 'sometimes' is not one of "
                                        r"below, above"):
        load_rewards(loaded, base_dir=HERE, veto=[{"score": "safety", "when": "sometimes"}])
    with pytest.raises(UserError, match=r"rewards.veto: 'safety' is vetoed on twice"):
        load_rewards(loaded, base_dir=HERE, veto=[{"score": "safety"},
                                                  {"score": "safety", "when": "above"}])
    with pytest.raises(UserError, match=r"rewards.veto_margin must be a number > 0"):
        RewardRunner(load_rewards(loaded, base_dir=HERE), veto="safety", veto_margin=0.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(0, 5), st.booleans()), min_size=2,
                max_size=8))
def test_a_penalty_in_the_reward_keeps_vetoed_samples_last(rows):
    """KL in the reward is subtracted after the veto: a vetoed answer with a small penalty
    must still end below every safe answer of its group."""
    from medrl.rewards.combine import rank_vetoed_last, subtract_penalty

    vetoed = [v for _, _, v in rows]
    groups = ["g"] * len(rows)
    total = rank_vetoed_last([r for r, _, _ in rows], vetoed, groups, floor=0.0, margin=1.0)
    out = subtract_penalty(total, [p for _, p, _ in rows], vetoed, groups, floor=0.0,
                           margin=1.0)
    safe = [x for x, v in zip(out, vetoed) if not v]
    for x, v in zip(out, vetoed):
        if v and safe:
            assert x < min(safe)
    assert safe == [t - p for (t, (_, p, v)) in zip(total, rows) if not v]
