"""The statistics of medrl eval on known inputs."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from medrl.launch.eval_metrics import (bootstrap_interval, choose_option, majority, pass_at_k,
                                       wilson_interval)


def test_wilson_interval_matches_published_values():
    low, high = wilson_interval(8, 10)  # the textbook 95% interval of 8/10
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] == pytest.approx(
        0.1611, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample():
    for n, c, k in [(5, 2, 2), (6, 1, 3), (4, 0, 2), (4, 4, 1), (7, 3, 7)]:
        correct = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        share = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(share)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_breaks_ties_by_first_appearance_and_skips_unanswered():
    assert majority(["B", None, "A", "A", "B"]) == "B"
    assert majority([None, "C", "A", "A"]) == "A"
    assert majority([None, None]) is None


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    rng = random.Random(1)
    values = [rng.random() for _ in range(200)]
    a, b = bootstrap_interval(values, seed=3), bootstrap_interval(values, seed=3)
    assert a == b
    mean = sum(values) / len(values)
    assert a[0] < mean < a[1] and a[1] - a[0] < 0.2
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_interval([]))


def test_choose_option_by_sum_and_by_characters():
    # option 1 has the higher sum, option 0 the higher log-prob per byte
    assert choose_option([-4.0, -3.0], [8, 2]) == (1, 0)
    assert choose_option([-1.0, -1.0], [3, 3]) == (0, 0)  # ties: the first option


def test_wilson_interval_holds_the_proportion_exactly_at_the_edges():
    for n in range(1, 60):
        low, high = wilson_interval(0, n)
        assert low == 0.0 <= high
        low, high = wilson_interval(n, n)
        assert low <= 1.0 == high


def test_expected_calibration_error_by_hand():
    from medrl.launch.eval_metrics import (calibration_bins, expected_calibration_error,
                                           option_confidence)

    # two options at log-probs (log 3, log 1): the chosen one holds 3/4 of the mass
    assert option_confidence([math.log(3), 0.0]) == pytest.approx(0.75)
    conf = [0.95, 0.95, 0.55, 0.55, 0.55, 0.25]
    ok = [True, False, True, True, False, False]
    bins = calibration_bins(conf, ok)
    assert bins[9][2] == 2 and bins[5] == (pytest.approx(0.55), pytest.approx(2 / 3), 3)
    assert bins[2] == (0.25, 0.0, 1) and math.isnan(bins[0][0]) and bins[0][2] == 0
    # (2/6)|0.5 - 0.95| + (3/6)|2/3 - 0.55| + (1/6)|0 - 0.25|
    expected = 2 / 6 * 0.45 + 3 / 6 * (2 / 3 - 0.55) + 1 / 6 * 0.25
    assert expected_calibration_error(conf, ok) == pytest.approx(expected)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0  # 1.0 in the last bin


def test_bootstrap_statistics_are_seeded_and_hold_the_point_value():
    from medrl.launch.eval_metrics import bootstrap_statistics

    rng = random.Random(0)
    items = [rng.random() ** 2 for _ in range(30)]

    def spread(xs):
        return (max(xs) - min(xs), sum(xs) / len(xs))

    first = bootstrap_statistics(items, spread, seed=3)
    assert first == bootstrap_statistics(items, spread, seed=3)
    assert first != bootstrap_statistics(items, spread, seed=4)
    for (low, high), value in zip(first, spread(items)):
        assert low <= value <= high
