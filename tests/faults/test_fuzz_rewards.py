"""Fuzzing the reward runner with plugins that misbehave: function rewards that raise or
return anything (NaN, infinity, text, None, booleans, numpy scalars, tensors, huge ints,
RewardResults with bad dims or token weights), batch rewards that return the wrong number of
results, rewards that hang past ``timeout_s``, and plugin files that fail to import.

Every case ends as docs/rewards.md says: a usable value is scored; any other failure on a
sample stops the run with a RewardError naming the reward and the sample (``on_error:
raise``) or drops that sample, counts it and appends it to ``reward_failures.jsonl``
(``on_error: skip_sample``); a plugin that cannot be loaded is a UserError naming the
reference and the file. Never another exception, and never a returned text in a message.
`MEDRL_FUZZ_EXAMPLES` sets the number of cases per test (CI: the default; thousands:
MEDRL_FUZZ_EXAMPLES=5000)."""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medrl.align.records import Sample, UserError
from medrl.rewards import (RewardContext, RewardError, RewardResult, RewardRunner,
                           load_rewards)

EXAMPLES = int(os.environ.get("MEDRL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
SECRET_LEN = 20
# the reward plugins of the reward tests, for what they already define
REWARD_PLUGINS = Path(__file__).resolve().parents[1] / "rewards" / "plugins.py"
FIX = "Fix the reward, or set rewards.on_error: skip_sample to drop such samples and go on."
RUNS = itertools.count()

PLUGINS = '''
import sys
import time

from medrl.rewards import RewardResult


def from_row(sample):
    """Whatever the row says: the test decides every return value."""
    return sample.row["value"]


def raises(sample):
    raise sample.row["error"]


def sleeps(sample):
    if sample.row.get("sleep"):
        time.sleep(sample.row["sleep"])
    return 1.0


class FromBatch:
    """A batched reward that returns the first row's ``batch`` as its whole result."""

    def setup(self, ctx):
        pass

    def __call__(self, samples):
        return samples[0].row["batch"]


class SleepyBatch:
    def setup(self, ctx):
        pass

    def __call__(self, samples):
        time.sleep(samples[0].row.get("sleep", 0))
        return [1.0 for _ in samples]


class BrokenInit:
    def __init__(self):
        raise RuntimeError("no model here")

    def setup(self, ctx):
        pass

    def __call__(self, samples):
        return [1.0 for _ in samples]


class ExitingSetup:
    def setup(self, ctx):
        sys.exit(2)

    def __call__(self, samples):
        return [1.0 for _ in samples]
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "misbehaving.py").write_text(PLUGINS)
    return folder


def make_runner(plugin_dir: Path, name: str, on_error: str = "raise", **spec) -> RewardRunner:
    """A runner of ``misbehaving.py``'s ``name`` (or of ``name`` itself, a ``file.py:fn``)."""
    plugin = name if ":" in name else f"misbehaving.py:{name}"
    loaded = load_rewards([{"name": plugin, **spec}], base_dir=plugin_dir)
    run_dir = plugin_dir / f"run{next(RUNS)}"
    return RewardRunner(loaded, on_error=on_error, ctx=RewardContext(run_dir=run_dir))


def samples_with(rows: list[dict], n_tokens: int = 3) -> list[Sample]:
    return [Sample(uid=f"g0/{i}", group_id="g0", row=row, completion_ids=list(range(n_tokens)),
                   completion_text="Answer: B") for i, row in enumerate(rows)]


def long_texts(value: Any) -> list[str]:
    """The strings longer than SECRET_LEN inside a returned value (never in a message)."""
    if isinstance(value, str):
        return [value] if len(value) > SECRET_LEN else []
    if isinstance(value, RewardResult):
        return long_texts([value.score, value.dims, value.token_weights])
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in long_texts(k) + long_texts(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in long_texts(v)]
    return []


# --- what a usable value is, as docs/rewards.md and RewardResult's docstring say --------------


def usable_number(x: Any) -> bool:
    """A real number (bools, numpy scalars included) that a float holds and that is finite."""
    if not isinstance(x, numbers.Real):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def expected_score(value: Any, n_tokens: int) -> tuple[bool, float | None]:
    """(usable, the score it gives) for one value a function reward returned."""
    if value is None:
        return True, None
    if not isinstance(value, RewardResult):
        return (True, float(value)) if usable_number(value) else (False, None)
    if value.score is not None and not usable_number(value.score):
        return False, None
    if value.dims is not None and not (isinstance(value.dims, dict) and all(
            v is None or usable_number(v) for v in value.dims.values())):
        return False, None
    w = value.token_weights
    if w is not None:
        if isinstance(w, np.ndarray) and w.ndim != 1:
            return False, None
        if not isinstance(w, (list, tuple, np.ndarray)) or len(w) != n_tokens \
                or not all(usable_number(x) for x in w):
            return False, None
        if any(float(x) < 0 for x in w):  # a negative weight would flip the objective's sign
            return False, None
    return True, None if value.score is None else float(value.score)


# --- returned values --------------------------------------------------------------------------

TEXT = st.one_of(st.text(max_size=10), st.text(min_size=SECRET_LEN + 1, max_size=40))
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.integers(-10**400, 10**400), st.integers(-5, 5))
NUMPY = st.one_of(st.builds(np.float32, st.floats(width=32, allow_nan=True)),
                  st.builds(np.float64, st.floats(allow_nan=True)),
                  st.builds(np.int64, st.integers(-2**63, 2**63 - 1)),
                  st.builds(np.bool_, st.booleans()),
                  st.builds(lambda x: np.array([x]), st.floats()),
                  st.builds(np.array, st.floats()))
TENSOR = st.one_of(st.builds(torch.tensor, st.floats(width=32)),
                   st.builds(lambda n: torch.ones(n), st.integers(0, 4)))
SCALAR = st.one_of(NUMBER, NUMPY, TENSOR, TEXT, st.none(), st.just(complex(1, 2)),
                   st.just(object()))
LISTS = st.lists(st.one_of(NUMBER, st.none(), TEXT), max_size=5)
WEIGHTS = st.one_of(
    st.none(), LISTS, st.builds(tuple, LISTS), st.builds(np.asarray, st.lists(st.floats(),
                                                                                max_size=5)),
    st.builds(lambda n: np.ones((n, 1)), st.integers(1, 3)), TENSOR, TEXT,
    st.integers(), st.dictionaries(TEXT, NUMBER, max_size=3),
    st.builds(lambda n: iter([1.0] * n), st.integers(0, 4)),
    st.lists(st.floats(0, 2), min_size=3, max_size=3))  # the right length for 3 tokens
DIMS = st.one_of(st.none(), st.dictionaries(st.sampled_from(["safety", "accuracy", "s1"]),
                                            st.one_of(st.none(), SCALAR), max_size=3),
                 LISTS, TEXT, st.integers())
RESULT = st.builds(RewardResult, score=SCALAR, dims=DIMS, token_weights=WEIGHTS,
                   info=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), SCALAR,
                                                             max_size=2)))
VALUE = st.one_of(SCALAR, RESULT, LISTS, st.dictionaries(TEXT, NUMBER, max_size=2))


def check_reward_error(err: RewardError, name: str, uids: list[str], values: list[Any]):
    text = str(err)
    assert text.startswith(f"reward {name!r} failed on sample"), text
    assert all(repr(u) in text for u in uids) and text.endswith(FIX), text
    assert err.reward == name and set(err.uids) <= set(uids)
    for secret in long_texts(values):
        assert secret not in text, f"a returned text in the message: {text}"


@FUZZ
@given(values=st.lists(VALUE, min_size=1, max_size=4), on_error=st.sampled_from(
    ["raise", "skip_sample"]))
def test_any_returned_value_is_scored_or_a_reward_failure(plugin_dir, values, on_error):
    runner = make_runner(plugin_dir, "from_row", on_error)
    batch = samples_with([{"value": v} for v in values])
    expected = [expected_score(v, 3) for v in values]
    bad = [s.uid for s, (ok, _) in zip(batch, expected) if not ok]
    if on_error == "raise" and bad:
        with pytest.raises(RewardError) as err:
            runner.score(batch, step=1)
        check_reward_error(err.value, "from_row", [bad[0]], values)
        return
    report = runner.score(batch, step=1)
    assert report.dropped == bad
    assert [s.uid for s in report.samples] == [s.uid for s in batch if s.uid not in bad]
    for s in report.samples:
        assert s.rewards["from_row"] == expected[int(s.uid.split("/")[1])][1]
        assert s.reward is None or math.isfinite(s.reward)
    assert report.metrics["rewards/from_row/errors"] == len(bad)
    assert report.metrics["rewards/skipped_samples"] == len(bad)
    log = runner.ctx.run_dir / "reward_failures.jsonl"
    logged = [json.loads(line) for line in log.read_text().splitlines()] if bad else []
    assert [(e["reward"], e["uid"], e["step"]) for e in logged] == \
        [("from_row", u, 1) for u in bad]
    for f in report.failures:
        assert not any(t in f.cause for t in long_texts(values)), f.cause


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("unprintable")


EXCEPTIONS = {
    "ValueError": (ValueError("bad row"), "raised ValueError: bad row"),
    "KeyError": (KeyError("rubric"), "raised KeyError: 'rubric'"),
    "ZeroDivisionError": (ZeroDivisionError("division by zero"),
                          "raised ZeroDivisionError: division by zero"),
    "AssertionError": (AssertionError(), "raised AssertionError: "),
    "RecursionError": (RecursionError("too deep"), "raised RecursionError: too deep"),
    "MemoryError": (MemoryError(), "raised MemoryError: "),
    "a UserError": (UserError("the reward says no"), "raised UserError: the reward says no"),
    "SystemExit": (SystemExit(3), "raised SystemExit: 3"),
    "an unprintable exception": (BadStr(), "raised BadStr: (its message could not be read)"),
}


@pytest.mark.parametrize("kind", sorted(EXCEPTIONS))
@pytest.mark.parametrize("on_error", ["raise", "skip_sample"])
def test_a_reward_that_raises_is_a_reward_failure(plugin_dir, kind, on_error):
    error, cause = EXCEPTIONS[kind]
    runner = make_runner(plugin_dir, "raises", on_error)
    batch = samples_with([{"error": error}])
    if on_error == "raise":
        with pytest.raises(RewardError) as err:
            runner.score(batch, step=2)
        assert str(err.value) == f"reward 'raises' failed on sample 'g0/0': {cause}. {FIX}"
        assert err.value.details  # the plugin's traceback, for the logs
        return
    report = runner.score(batch, step=2)
    assert report.dropped == ["g0/0"] and report.failures[0].cause == cause
    line = json.loads((runner.ctx.run_dir / "reward_failures.jsonl").read_text())
    assert line == {"step": 2, "reward": "raises", "uid": "g0/0", "cause": cause}


@FUZZ
@given(message=st.text(max_size=30))
def test_an_exception_message_is_the_cause_as_written(plugin_dir, message):
    runner = make_runner(plugin_dir, "raises", "skip_sample")
    report = runner.score(samples_with([{"error": RuntimeError(message)}]), step=0)
    assert report.failures[0].cause == f"raised RuntimeError: {message}"


def test_keyboard_interrupt_still_stops_the_run(plugin_dir):
    runner = make_runner(plugin_dir, "raises", "skip_sample")
    with pytest.raises(KeyboardInterrupt):
        runner.score(samples_with([{"error": KeyboardInterrupt()}]))


@FUZZ
@given(n=st.integers(1, 5), returned=st.one_of(
    st.integers(0, 7).map(lambda k: [1.0] * k), st.integers(0, 7).map(lambda k: (0.5,) * k),
    SCALAR, st.dictionaries(st.integers(0, 5), st.floats(0, 1), max_size=5),
    st.integers(0, 5).map(lambda k: np.ones(k)), st.integers(0, 5).map(torch.ones),
    st.integers(0, 5).map(lambda k: iter([1.0] * k))),
    on_error=st.sampled_from(["raise", "skip_sample"]))
def test_a_batch_reward_with_the_wrong_count_fails_the_whole_batch(plugin_dir, n, returned,
                                                                    on_error):
    runner = make_runner(plugin_dir, "FromBatch", on_error)
    batch = samples_with([{"batch": returned}] + [{}] * (n - 1))
    right = isinstance(returned, (list, tuple)) and len(returned) == n
    if right:  # the right count of usable scores
        report = runner.score(batch)
        assert [s.rewards["FromBatch"] for s in report.samples] == [float(x) for x in returned]
        return
    if on_error == "raise":
        with pytest.raises(RewardError) as err:
            runner.score(batch)
        uids = [s.uid for s in batch]
        check_reward_error(err.value, "FromBatch", uids, [returned])
        assert "for %d samples (a batched reward returns a list with one result per sample, " \
               "in order)" % n in str(err.value)
        return
    report = runner.score(batch)
    assert report.dropped == [s.uid for s in batch] and report.samples == []
    assert report.metrics["rewards/skipped_samples"] == n


@FUZZ
@given(n_tokens=st.integers(0, 6), weights=WEIGHTS)
@example(n_tokens=2, weights=[0.5, -1.0])  # negative weights are refused, every run
@example(n_tokens=2, weights=[0.0, 2.0])
def test_token_weights_of_the_wrong_length_or_type_are_reward_failures(plugin_dir, n_tokens,
                                                                       weights):
    runner = make_runner(plugin_dir, "from_row", "skip_sample")
    value = RewardResult(1.0, token_weights=weights)
    ok, _ = expected_score(value, n_tokens)
    report = runner.score(samples_with([{"value": value}], n_tokens=n_tokens))
    if ok:
        assert report.dropped == []
        got = report.samples[0].token_weights.get("from_row")
        assert got is None if weights is None else got == [float(w) for w in weights]
    else:
        assert report.dropped == ["g0/0"]
        assert "token" in report.failures[0].cause, report.failures[0].cause


@pytest.mark.parametrize("name,row", [("sleeps", {"sleep": 3.0}), ("SleepyBatch", {"sleep": 3.0})])
@pytest.mark.parametrize("on_error", ["raise", "skip_sample"])
def test_a_reward_that_hangs_fails_at_its_timeout(plugin_dir, name, row, on_error):
    import time

    runner = make_runner(plugin_dir, name, on_error, timeout_s=0.2)
    batch = samples_with([dict(row), {}])
    start = time.monotonic()
    if on_error == "raise":
        with pytest.raises(RewardError, match=r"exceeded its timeout of 0.2 s\. " + FIX):
            runner.score(batch)
    else:
        report = runner.score(batch)
        hung = ["g0/0"] if name == "sleeps" else ["g0/0", "g0/1"]  # a batch fails whole
        assert report.dropped == hung
        assert report.metrics[f"rewards/{name}/errors"] == len(hung)
    assert time.monotonic() - start < 2.0, "the run does not wait for the hung call"


@pytest.mark.parametrize("name,says", [
    ("BrokenInit", "RuntimeError: no model here"), ("ExitingSetup", "SystemExit: 2")])
def test_a_class_reward_that_fails_to_build_names_the_reward(plugin_dir, name, says):
    runner = make_runner(plugin_dir, name)
    with pytest.raises(RewardError) as err:
        runner.start()
    assert str(err.value) == f"reward {name!r} failed in setup(ctx): {says}"


# --- plugin files that cannot be loaded -------------------------------------------------------

BROKEN_FILES = {
    # name: (file bytes, attribute named, what the message says)
    "a syntax error": (b"def score(sample:\n    return 1.0\n", "score", "SyntaxError"),
    "raising at import": (b"raise RuntimeError('needs a GPU')\n", "score",
                          "RuntimeError: needs a GPU"),
    "sys.exit at import": (b"import sys\nsys.exit(1)\n", "score", "SystemExit: 1"),
    "a missing import": (b"import no_such_module_here\n", "score", "ModuleNotFoundError"),
    "bytes that are not UTF-8": (b"def score(sample):\n    return '\xff'\n", "score",
                                 "SyntaxError"),
    "a null byte": (b"def score(sample):\n    return 1.0\x00\n", "score", "failed"),
    "an empty file": (b"", "score", "has no attribute 'score'"),
    "the name missing": (b"def other(sample):\n    return 1.0\n", "score",
                         "it defines: other"),
    "not callable": (b"score = 0.5\n", "score", "is a float, not a function or a class"),
    "a class without setup": (b"class Score:\n    def __call__(self, samples):\n"
                              b"        return [1.0]\n", "Score", "has no setup(ctx) method"),
    "a function without a sample": (b"def score():\n    return 1.0\n", "score",
                                    "takes the sample as its first positional argument"),
    "a builtin without a signature": (b"score = max\n", "score", "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_plugin_files_that_cannot_be_loaded_name_the_reward_and_file(tmp_path, case):
    content, attr, says = BROKEN_FILES[case]
    path = tmp_path / f"broken_{sorted(BROKEN_FILES).index(case)}.py"
    path.write_bytes(content)
    ref = f"{path.name}:{attr}"
    with pytest.raises(UserError) as err:
        load_rewards([{"name": ref}], base_dir=tmp_path)
    text = str(err.value)
    assert f"rewards.functions[0] ({ref})" in text and says in text, text
    if "import" in case or "error" in case or "byte" in case:
        assert str(path) in text, text


def test_a_module_that_raises_as_it_is_imported_names_the_reward(tmp_path, monkeypatch):
    (tmp_path / "lab_rewards_broken.py").write_text("raise ValueError('config missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as err:
        load_rewards([{"name": "lab_rewards_broken:score"}])
    assert "rewards.functions[0] (lab_rewards_broken:score): importing module " \
           "'lab_rewards_broken' for reward 'lab_rewards_broken:score' failed: ValueError: " \
           "config missing" in str(err.value)


# --- in a reward actor -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name,row,says", [
    ("from_row", {"value": math.nan}, "reward 'from_row' failed on sample 'g0/0': returned a "
                                      "non-finite score (nan)"),
    (f"{REWARD_PLUGINS}:MetricsFromRow", {"metrics": ValueError("bad metric")},
     "reward 'MetricsFromRow': batch_metrics() failed: ValueError: bad metric")],
    ids=["from_row", "MetricsFromRow"])
def test_a_misbehaving_reward_in_its_actor_names_the_reward(ray_local, plugin_dir, name, row,
                                                           says):
    runner = make_runner(plugin_dir, name, actor=True, num_cpus=0.5)
    try:
        with pytest.raises(RewardError) as err:
            runner.score(samples_with([row]))
        assert str(err.value).startswith(says), str(err.value)
    finally:
        runner.close()
