"""Combination, veto, token weights, metrics and the failure policy (driver-side runner)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from medrl.align.records import Sample, UserError
from medrl.rewards import (RewardContext, RewardError, RewardResult, RewardRunner,
                           combine_scores, combined_token_weights, group_normalize, load_rewards)

HERE = Path(__file__).parent
FIX = ". Fix the reward, or set rewards.on_error: skip_sample to drop such samples and go on."


def make_samples(rows, n_tokens=4, groups=1):
    out = []
    for i, row in enumerate(rows):
        g = f"g{i % groups}"
        out.append(Sample(uid=f"{g}/{i}", group_id=g, row=row,
                          completion_ids=list(range(n_tokens)), completion_text="x"))
    return out


def runner(*specs, **options):
    loaded = load_rewards([s if isinstance(s, dict) else {"name": s} for s in specs],
                          base_dir=HERE)
    return RewardRunner(loaded, **options)


# -- combination -------------------------------------------------------------------------
def test_weighted_sum_none_excluded_and_metrics():
    r = runner({"name": "plugins.py:length_score", "weight": 0.5, "kwargs": {"scale": 2.0}},
               {"name": "plugins.py:Rubric", "weight": 2.0})
    rows = [{"accuracy": 1, "safety": 1}, {"accuracy": 0, "safety": 1, "na": True}, {}]
    samples = make_samples(rows, n_tokens=3)
    report = r.score(samples)
    # length_score = 2*3 = 6 (None for row 1); rubric = accuracy (None for row 2)
    assert [s.rewards["length_score"] for s in samples] == [6.0, None, 6.0]
    assert [s.rewards["test_rubric"] for s in samples] == [1.0, 0.0, None]
    assert [s.reward for s in samples] == [0.5 * 6 + 2 * 1, 2 * 0.0, 0.5 * 6]
    assert samples[0].reward_dims["test_rubric"] == {"accuracy": 1.0, "safety": 1.0}
    m = report.metrics
    assert m["rewards/length_score/mean"] == 6.0
    assert m["rewards/length_score/not_applicable"] == pytest.approx(1 / 3)
    assert m["rewards/test_rubric/mean"] == 0.5 and m["rewards/test_rubric/std"] == 0.5
    assert m["rewards/test_rubric/safety/mean"] == 1.0
    assert m["rewards/test_rubric/accuracy/not_applicable"] == pytest.approx(1 / 3)
    assert m["rewards/test_rubric/errors"] == 0.0 and m["rewards/skipped_samples"] == 0.0
    assert m["rewards/combined/mean"] == pytest.approx((5 + 0 + 3) / 3)
    assert report.dropped == [] and len(report.samples) == 3


def test_group_normalisation_before_summing():
    scores = {"a": [1.0, 3.0, 10.0, 10.0], "b": [0.0, 100.0, None, 5.0]}
    combined = combine_scores(scores, {"a": 1.0, "b": 0.5}, ["x", "x", "y", "y"],
                              normalize="group")
    # group x: a -> (-1, 1), b -> (-1, 1); group y: a constant -> 0, b has one score -> 0
    assert combined == pytest.approx([-1.5, 1.5, 0.0, 0.0], abs=1e-5)
    assert group_normalize([2.0, None, 4.0], ["g", "g", "g"]) == pytest.approx([-1, None, 1],
                                                                                abs=1e-5)


def test_group_normalize_option_in_runner():
    r = runner("plugins.py:length_score", normalize="group")
    samples = [Sample(uid=f"g/{n}", group_id="g", completion_ids=[0] * n) for n in (2, 4)]
    r.score(samples)
    assert [s.rewards["length_score"] for s in samples] == [2.0, 4.0]  # raw scores kept
    assert [s.reward for s in samples] == pytest.approx([-1.0, 1.0], abs=1e-5)


@pytest.mark.parametrize("veto", ["test_rubric.safety", "test_rubric"])
def test_veto_floors_unsafe_answers(veto):
    r = runner("plugins.py:Rubric", "plugins.py:length_score", veto=veto, veto_threshold=0.5,
               floor=-1.0)
    rows = [{"accuracy": 1, "safety": 0.2}, {"accuracy": 1, "safety": 0.9}, {}]
    samples = make_samples(rows, n_tokens=2)
    report = r.score(samples)
    if veto.endswith(".safety"):  # safety 0.2 < 0.5: floored despite accuracy 1 and length 2
        assert [s.reward for s in samples] == [-1.0, 3.0, 2.0]
        assert report.metrics["rewards/vetoed"] == pytest.approx(1 / 3)
    else:  # the rubric score itself is 1.0: no veto; the n/a sample is never vetoed
        assert [s.reward for s in samples] == [3.0, 3.0, 2.0]
        assert report.metrics["rewards/vetoed"] == 0.0


def test_veto_must_name_a_loaded_reward():
    with pytest.raises(UserError, match=r"rewards.veto: 'safety' names no loaded reward"):
        load_rewards([{"name": "plugins.py:Rubric"}], base_dir=HERE, veto="safety")


def test_veto_dim_missing_is_loud():
    r = runner("plugins.py:inf_dim", veto="inf_dim.toxicity")
    with pytest.raises(RewardError) as err:
        r.score(make_samples([{}]))
    assert str(err.value) == ("reward 'inf_dim' failed on sample 'g0/0': returned no dim "
                              "'toxicity', which rewards.veto (inf_dim.toxicity) needs "
                              "(dims: safety)" + FIX)


def test_token_weights_multiply():
    r = runner("plugins.py:ramp_weights", "plugins.py:short_token_weights")
    samples = make_samples([{}], n_tokens=4)
    r.score(samples)
    assert samples[0].token_weights["ramp_weights"] == [0.25, 0.5, 0.75, 1.0]
    assert combined_token_weights(samples[0]) == [0.125, 0.25, 0.375, 0.5]
    assert combined_token_weights(Sample(uid="u", group_id="g")) is None


# -- failures: one test per cause, exact messages ----------------------------------------
@pytest.mark.parametrize("spec,row,cause", [
    ("plugins.py:ok_or_boom", {"boom": True}, "raised ValueError: bad row"),
    ("plugins.py:nan_when_asked", {"nan": True},
     "returned a non-finite score (nan); a score is a finite number, or None when the reward "
     "does not apply"),
    ("plugins.py:inf_dim", {"inf": True}, "returned a non-finite value for dim 'safety' (inf)"),
    ("plugins.py:short_token_weights", {"short": True},
     "returned 3 token weights for a completion of 4 tokens (one weight per token of "
     "completion_ids)"),
    ({"name": "plugins.py:sleepy", "kwargs": {"seconds": 3.0}, "timeout_s": 0.2},
     {"sleep": True}, "exceeded its timeout of 0.2 s"),
])
def test_failure_stops_the_run_naming_reward_sample_and_cause(spec, row, cause):
    r = runner(spec)
    name = (spec if isinstance(spec, str) else spec["name"]).split(":")[1]
    samples = make_samples([{}, row, {}])
    with pytest.raises(RewardError) as err:
        r.score(samples)
    assert str(err.value) == f"reward {name!r} failed on sample 'g0/1': {cause}{FIX}"
    assert err.value.reward == name and err.value.uids == ["g0/1"]
    assert isinstance(err.value, UserError)


ONE_PER_TOKEN = " with one number per token of completion_ids"


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no message")


@pytest.mark.parametrize("value,cause", [
    (RewardResult(1.0, dims=[1.0, 0.0]), "returned dims of type list; dims map a name to a "
                                         "finite number, or to None where it does not apply"),
    (RewardResult(1.0, token_weights=4),
     "returned token_weights of type int; they are a list" + ONE_PER_TOKEN),
    (RewardResult(1.0, token_weights=iter([1.0] * 4)),
     "returned token_weights of type list_iterator; they are a list" + ONE_PER_TOKEN),
    (RewardResult(1.0, token_weights="1234"),
     "returned token_weights of type str; they are a list" + ONE_PER_TOKEN),
    (RewardResult(1.0, token_weights=torch.ones(4)),
     "returned token_weights of type Tensor; they are a list" + ONE_PER_TOKEN),
    (RewardResult(1.0, token_weights=[1.0, None, 1.0, 1.0]),
     "returned None as the token weight at position 1; it is a finite number"),
    (RewardResult(1.0, token_weights=[1.0, -0.5, 1.0, 1.0]),
     "returned a negative token weight (-0.5) at position 1; weights scale the policy "
     "objective and are >= 0 (to push a token down, lower the reward or return token_marks)"),
    (RewardResult(1.0, token_marks=[0.0, 1.5, 0.0, 0.0]),
     "returned a token mark of 1.5 at position 1; marks are in [0, 1] (1: this token is "
     "where the answer went wrong)"),
    (RewardResult(1.0, token_marks=[1.0, 0.0]),
     "returned 2 token marks for a completion of 4 tokens (one mark per token of "
     "completion_ids)"),
    (RewardResult(1.0, token_marks=[1.0, float("nan"), 0.0, 0.0]),
     "returned a non-finite token mark at position 1 (nan)"),
    (10 ** 400, "returned a score too large for a float; a score is a finite number, or None "
                "when the reward does not apply"),
    (RewardResult("Mrs Jones needs heparin now"), "returned a RewardResult whose score is a "
                                                  "str; a score is a finite number, or None "
                                                  "when the reward does not apply"),
    (RewardResult(1.0, dims={"safety": "Mrs Jones is safe enough"}),
     "returned a str as the value for dim 'safety'; it is a finite number"),
], ids=["dims a list", "weights an int", "weights an iterator", "weights a str",
        "weights a tensor", "a weight None", "a negative weight", "a mark above 1",
        "too few marks", "a NaN mark", "a huge int", "a text score", "a text dim"])
def test_unusable_results_fail_naming_what_is_wrong_not_the_value(value, cause):
    r = runner("plugins.py:returns_row_value")
    with pytest.raises(RewardError) as err:
        r.score(make_samples([{"value": value}]))
    assert str(err.value) == f"reward 'returns_row_value' failed on sample 'g0/0': {cause}{FIX}"


@pytest.mark.parametrize("error,cause", [
    (Unprintable(), "raised Unprintable: (its message could not be read)"),
    (SystemExit(3), "raised SystemExit: 3"),
])
def test_odd_exceptions_in_a_reward_are_reward_failures(error, cause):
    r = runner("plugins.py:raises_row_error", on_error="skip_sample")
    report = r.score(make_samples([{"error": error}]))
    assert [(f.uid, f.cause) for f in report.failures] == [("g0/0", cause)]
    assert report.dropped == ["g0/0"]


def test_a_reward_exiting_in_setup_names_the_reward():
    with pytest.raises(RewardError, match=r"^reward 'ExitsInSetup' failed in setup\(ctx\): "
                                          r"SystemExit: 2$"):
        runner("plugins.py:ExitsInSetup").start()


@pytest.mark.parametrize("metrics,says", [
    (ValueError("no clock"), "batch_metrics() failed: ValueError: no clock"),
    ([1.0], "batch_metrics() failed: TypeError: batch_metrics() returned a list, not a mapping"),
    ({"seconds": "Mrs Jones"}, "batch_metrics()['seconds'] is a str; batch metrics are finite "
                               "numbers."),
    ({"seconds": math.nan}, "batch_metrics()['seconds'] is nan"),
    ({"seconds": 1.5}, None),
])
def test_batch_metrics_that_misbehave_name_the_reward(metrics, says):
    r = runner("plugins.py:MetricsFromRow")
    if says is None:
        assert r.score(make_samples([{"metrics": metrics}])).metrics[
            "rewards/MetricsFromRow/seconds"] == 1.5
        return
    with pytest.raises(RewardError) as err:
        r.score(make_samples([{"metrics": metrics}]))
    assert str(err.value).startswith(f"reward 'MetricsFromRow': {says}"), str(err.value)
    assert "Mrs Jones" not in str(err.value)  # the value's text stays out


def test_scores_near_a_floats_limit_give_finite_statistics():
    r = runner("plugins.py:returns_row_value")
    report = r.score(make_samples([{"value": 0.0}, {"value": 2.7e154}]))
    assert report.metrics["rewards/returns_row_value/std"] == pytest.approx(1.35e154)
    assert report.metrics["rewards/combined/mean"] == pytest.approx(1.35e154)


def test_a_combined_reward_that_overflows_stops_the_run_naming_the_samples():
    r = runner("plugins.py:returns_row_value",
               {"name": "plugins.py:returns_row_value", "alias": "again"})
    with pytest.raises(RewardError) as err:
        r.score(make_samples([{"value": 1.0}, {"value": 1.5e308}]))
    assert str(err.value).startswith("the combined reward of 1 sample(s) ('g0/1') overflows a "
                                     "float")
    assert err.value.uids == ["g0/1"]


def test_wrong_count_names_every_sample_of_the_batch():
    r = runner("plugins.py:WrongCount")
    with pytest.raises(RewardError) as err:
        r.score(make_samples([{}, {}]))
    assert str(err.value) == ("reward 'WrongCount' failed on samples 'g0/0', 'g0/1': returned "
                              "1 results for 2 samples (a batched reward returns a list with "
                              "one result per sample, in order)" + FIX)


def test_batch_reward_timeout():
    r = runner({"name": "plugins.py:SleepyBatch", "kwargs": {"seconds": 3.0}, "timeout_s": 0.2})
    with pytest.raises(RewardError, match=r"^reward 'SleepyBatch' failed on samples 'g0/0', "
                                          r"'g0/1': exceeded its timeout of 0.2 s\."):
        r.score(make_samples([{"sleep": True}, {}]))


def test_skip_sample_drops_counts_and_goes_on():
    r = runner("plugins.py:ok_or_boom", "plugins.py:nan_when_asked",
               "plugins.py:length_score", on_error="skip_sample", normalize="group")
    rows = [{}, {"boom": True}, {"nan": True}, {}, {"boom": True, "nan": True}]
    samples = make_samples(rows, n_tokens=2)
    samples[3].completion_ids = [0] * 6
    report = r.score(samples)
    assert report.dropped == ["g0/1", "g0/2", "g0/4"]
    assert [s.uid for s in report.samples] == ["g0/0", "g0/3"]
    # dropped samples leave their group: normalisation sees only the two kept ones
    assert [s.reward for s in report.samples] == pytest.approx([-1.0, 1.0], abs=1e-5)
    m = report.metrics
    assert m["rewards/ok_or_boom/errors"] == 2.0 and m["rewards/nan_when_asked/errors"] == 2.0
    assert m["rewards/length_score/errors"] == 0.0 and m["rewards/skipped_samples"] == 3.0
    assert m["rewards/ok_or_boom/mean"] == 1.0  # statistics over the kept samples
    assert report.failures[0].message == ("reward 'ok_or_boom' failed on sample 'g0/1': "
                                          "raised ValueError: bad row" + FIX)
    assert len(report.failures) == 4
    assert samples[1].rewards == {} and samples[1].reward is None  # untouched when dropped
    # the run goes on: the next batch scores normally
    assert r.score(make_samples([{}])).dropped == []


def test_setup_failure_names_the_reward():
    r = runner({"name": "plugins.py:PromptSupport", "kwargs": {"start": 0, "stop": 1}})
    with pytest.raises(RewardError, match=r"^reward 'PromptSupport' failed in setup\(ctx\): "
                                          r"RuntimeError: PromptSupport needs ctx.policy_logprobs"):
        r.start()


def test_bad_options_are_user_errors():
    loaded = load_rewards([{"name": "mcq_letter"}])
    with pytest.raises(UserError, match="rewards.on_error must be 'raise' or 'skip_sample'"):
        RewardRunner(loaded, on_error="ignore")
    assert math.isclose(combine_scores({"a": [1.0]}, {"a": 2.0}, ["g"])[0], 2.0)


def test_from_config_dict():
    r = RewardRunner.from_config(
        {"functions": [{"name": "mcq_letter", "weight": 2.0}], "on_error": "skip_sample"},
        base_dir=HERE)
    s = Sample(uid="u", group_id="g", row={"options": {"A": "a", "B": "b"}, "answer": "A"},
               completion_text="Answer: A")
    r.score([s])
    assert s.rewards == {"mcq_letter": 1.0} and s.reward == 2.0


def test_empty_batch_and_duplicate_uids():
    r = runner("plugins.py:length_score")
    assert r.score([]).samples == []
    twice = make_samples([{}, {}])
    twice[1].uid = twice[0].uid
    with pytest.raises(ValueError, match="sample uids must be unique within a batch"):
        r.score(twice)


# -- the failures log --------------------------------------------------------------------
def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_skipped_failures_are_logged_to_the_run_folder(tmp_path):
    r = runner("plugins.py:ok_or_boom", "plugins.py:length_score", on_error="skip_sample",
               ctx=RewardContext(run_dir=tmp_path))
    rows = [{"question": "62-year-old woman, chest pain"}, {"boom": True}, {}, {"boom": True}]
    report = r.score(make_samples(rows), step=3)
    assert report.dropped == ["g0/1", "g0/3"]
    assert report.metrics["rewards/skipped_samples"] == 2.0  # the count stays a metric
    assert report.metrics["rewards/ok_or_boom/errors"] == 2.0
    assert [(f.reward, f.uid, f.cause) for f in report.failures] == \
        [("ok_or_boom", "g0/1", "raised ValueError: bad row"),
         ("ok_or_boom", "g0/3", "raised ValueError: bad row")]
    assert report.failures[0].message == ("reward 'ok_or_boom' failed on sample 'g0/1': raised "
                                          "ValueError: bad row" + FIX)
    # the next step appends; without an explicit step a batch made by the weights of
    # version v is scored during step v + 1
    later = make_samples([{"boom": True}])
    later[0].policy_version = 4
    r.score(later)
    logged = read_jsonl(tmp_path / "reward_failures.jsonl")
    assert [{k: row[k] for k in ("step", "reward", "uid", "cause")} for row in logged] == [
        {"step": 3, "reward": "ok_or_boom", "uid": "g0/1", "cause": "raised ValueError: bad row"},
        {"step": 3, "reward": "ok_or_boom", "uid": "g0/3", "cause": "raised ValueError: bad row"},
        {"step": 5, "reward": "ok_or_boom", "uid": "g0/0", "cause": "raised ValueError: bad row"}]
    assert "chest pain" not in (tmp_path / "reward_failures.jsonl").read_text()


def test_no_failures_no_file(tmp_path):
    r = runner("plugins.py:ok_or_boom", on_error="skip_sample", ctx=RewardContext(run_dir=tmp_path))
    r.score(make_samples([{}, {}]), step=1)
    assert not (tmp_path / "reward_failures.jsonl").exists()


# -- reward actors -----------------------------------------------------------------------
@pytest.mark.slow
def test_actor_backstop_scales_with_the_batch(ray_local, monkeypatch):
    """timeout_s bounds each sample's call; a batch of samples that each finish in time is not
    a timeout however long the batch takes in total."""
    import time

    from medrl.rewards import runner as runner_module

    # a small slack keeps the test short: the batch (20 x 0.1 s) takes longer than
    # 2 x timeout_s + slack, but each sample stays under timeout_s
    monkeypatch.setattr(runner_module, "BACKSTOP_SLACK_S", 1.0)
    r = runner({"name": "plugins.py:sleepy", "kwargs": {"seconds": 0.1}, "timeout_s": 0.2,
                "actor": True, "num_cpus": 0.5})
    samples = make_samples([{"sleep": True}] * 20)
    try:
        r.start()
        began = time.monotonic()
        report = r.score(samples)
        took = time.monotonic() - began
    finally:
        r.close()
    assert took > 2 * 0.2 + 1.0  # longer than a backstop of 2 x timeout_s + slack
    assert report.dropped == [] and [s.rewards["sleepy"] for s in samples] == [1.0] * 20
    assert runner_module.actor_backstop_s(0.2, 20) == pytest.approx(0.2 * 20 + 1.0)
    assert runner_module.actor_backstop_s(0.2, 1) == pytest.approx(0.2 * 2 + 1.0)  # a class
    assert runner_module.actor_backstop_s(None, 20) is None
