"""Loading rewards by name, module, file and entry point; kwargs checked before the run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from medrl.align.records import Sample, UserError
from medrl.rewards import load_rewards, registered, reward
from medrl.rewards.loader import ENTRY_POINT_GROUP

PLUGIN = textwrap.dedent('''
    from medrl.rewards import RewardResult

    def says_hello(sample, *, word: str = "hello", bonus: float = 0.0):
        return float(word in sample.completion_text) + bonus

    class Batched:
        def __init__(self, threshold: int, *, scale: float = 1.0):
            self.threshold, self.scale = threshold, scale
        def setup(self, ctx):
            pass
        def __call__(self, samples):
            return [RewardResult(self.scale * (len(s.completion_ids) > self.threshold))
                    for s in samples]
''')


def hello_sample():
    return Sample(uid="u", group_id="g", completion_text="hello there", completion_ids=[1, 2])


def test_builtin_names_are_registered():
    assert {"mcq_letter", "yes_no_maybe", "think_answer_format", "overlong_penalty",
            "sequence_classifier"} <= set(registered())
    [r] = load_rewards([{"name": "think_answer_format", "weight": 0.5}])
    assert (r.name, r.kind, r.weight, r.source) == ("think_answer_format", "function", 0.5,
                                                    "medrl.rewards.rules")


def test_file_reference_is_relative_to_the_recipe_folder(tmp_path):
    (tmp_path / "my_rewards").mkdir()
    (tmp_path / "my_rewards" / "hello.py").write_text(PLUGIN)
    specs = [{"name": "my_rewards/hello.py:says_hello", "kwargs": {"word": "there"}},
             {"name": "my_rewards/hello.py:Batched", "alias": "long", "kwargs": {"threshold": 1}}]
    fn, cls = load_rewards(specs, base_dir=tmp_path)
    assert fn.name == "says_hello" and fn.target(hello_sample(), **fn.kwargs) == 1.0
    assert (cls.name, cls.kind) == ("long", "class")
    assert cls.source == str(tmp_path / "my_rewards" / "hello.py")
    with pytest.raises(UserError, match=r"reward file .*nowhere.py does not exist"):
        load_rewards([{"name": "nowhere.py:f"}], base_dir=tmp_path)


def test_module_reference(tmp_path, monkeypatch):
    (tmp_path / "lab_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    [r] = load_rewards([{"name": "lab_rewards:says_hello"}])
    assert r.source == "lab_rewards" and r.target(hello_sample()) == 1.0
    with pytest.raises(UserError, match=r"lab_rewards has no attribute 'nope' .*it defines: "
                                        r"Batched, RewardResult, says_hello"):
        load_rewards([{"name": "lab_rewards:nope"}])
    with pytest.raises(UserError, match=r"cannot import module 'no_such_pkg.mod'"):
        load_rewards([{"name": "no_such_pkg.mod:f"}])


def test_entry_point_group(tmp_path, monkeypatch):
    """An installed package declares ``[medrl.rewards] hello = ...`` in its entry points."""
    (tmp_path / "hello_pkg.py").write_text(PLUGIN)
    info = tmp_path / "hello_pkg-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-pkg\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nhello = hello_pkg:says_hello\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [r] = load_rewards([{"name": "hello", "kwargs": {"bonus": 0.5}}])
    assert r.name == "says_hello" and r.version == "1.2.3"
    assert r.source == "entry point hello_pkg:says_hello"
    assert r.target(hello_sample(), **r.kwargs) == 1.5
    assert r.identity()["version"] == "1.2.3"


def test_unknown_name_lists_known_ones():
    with pytest.raises(UserError) as err:
        load_rewards([{"name": "mcq_leter"}])
    assert "rewards.functions[0] (mcq_leter): unknown reward 'mcq_leter'. Known rewards: " \
        in str(err.value)
    assert "mcq_letter" in str(err.value)


def test_kwargs_checked_against_signature(tmp_path):
    (tmp_path / "p.py").write_text(PLUGIN)
    specs = [{"name": "mcq_letter", "kwargs": {"strictt": True}},
             {"name": "p.py:says_hello", "kwargs": {"bonus": "lots"}},
             {"name": "p.py:Batched", "kwargs": {"scale": 2.0}},
             {"name": "overlong_penalty", "kwargs": {"max_length": 10, "buffer": 0}},
             {"name": "mcq_letter", "kwargs": {"strict": "sometimes"}, "alias": "mcq2"}]
    with pytest.raises(UserError) as err:
        load_rewards(specs, base_dir=tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0] == "5 problem(s) with the rewards:"
    assert lines[1] == ("  - rewards.functions[0] (mcq_letter): unknown argument(s) 'strictt'. "
                        "Accepted arguments: strict=False.")
    assert lines[2] == ("  - rewards.functions[1] (p.py:says_hello): argument 'bonus': Input "
                        "should be a valid number, unable to parse string as a number (got "
                        "'lots'). Accepted arguments: "
                        "word='hello', bonus=0.0.")
    assert lines[3] == ("  - rewards.functions[2] (p.py:Batched): missing required argument(s) "
                        "'threshold'. Accepted arguments: threshold, scale=1.0.")
    assert lines[4] == ("  - rewards.functions[3] (overlong_penalty): argument 'buffer': Input "
                        "should be greater than 0 (got 0). Accepted arguments: max_length, "
                        "buffer.")
    assert lines[5].startswith("  - rewards.functions[4] (mcq_letter): argument 'strict': Input "
                               "should be a valid boolean")


def test_same_reward_twice_needs_an_alias():
    with pytest.raises(UserError, match="the name 'mcq_letter' is used more than once; give "
                                        "each use its own 'alias'"):
        load_rewards([{"name": "mcq_letter"}, {"name": "mcq_letter", "kwargs": {"strict": True}}])
    a, b = load_rewards([{"name": "mcq_letter"},
                         {"name": "mcq_letter", "alias": "mcq_strict", "kwargs": {"strict": True}}])
    assert (a.name, b.name) == ("mcq_letter", "mcq_strict")


def test_registration_conflicts_and_bad_shapes(tmp_path):
    with pytest.raises(UserError, match=r"@reward\('mcq_letter'\): the name is already taken by "
                                        r"medrl.rewards.rules.mcq_letter"):
        reward("mcq_letter")(lambda sample: 1.0)
    (tmp_path / "bad.py").write_text("class NoSetup:\n    def __call__(self, samples): ...\n"
                                     "def no_sample():\n    return 1.0\nVALUE = 3\n")
    with pytest.raises(UserError) as err:
        load_rewards([{"name": "bad.py:NoSetup"}, {"name": "bad.py:no_sample"},
                      {"name": "bad.py:VALUE"}], base_dir=tmp_path)
    text = str(err.value)
    assert "NoSetup is a class but has no setup(ctx) method" in text
    assert "a function reward takes the sample as its first positional argument" in text
    assert "'bad.py:VALUE' is a int, not a function or a class" in text


@pytest.mark.parametrize("content,ref,says", [
    ("import sys\nsys.exit(1)\n", "quits.py:score",
     "importing reward file {dir}/quits.py failed: SystemExit: 1"),
    ("score = max\n", "builtin.py:score",
     "the signature of <built-in function max> cannot be read"),
])
def test_plugins_that_exit_or_hide_their_signature_are_refused(tmp_path, content, ref, says):
    (tmp_path / ref.split(":")[0]).write_text(content)
    with pytest.raises(UserError) as err:
        load_rewards([{"name": ref}], base_dir=tmp_path)
    assert f"rewards.functions[0] ({ref}): " + says.format(dir=tmp_path) in str(err.value)


def test_a_module_failing_as_it_is_imported_is_refused(tmp_path, monkeypatch):
    (tmp_path / "lab_rewards_failing.py").write_text("raise KeyError('MODEL_DIR')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"importing module 'lab_rewards_failing' for reward "
                                        r"'lab_rewards_failing:score' failed: KeyError: "
                                        r"'MODEL_DIR'"):
        load_rewards([{"name": "lab_rewards_failing:score"}])


def test_identity_hashes_the_code(tmp_path):
    path = tmp_path / "p.py"
    path.write_text(PLUGIN)
    first = load_rewards([{"name": "p.py:says_hello", "kwargs": {"word": "x"}}],
                         base_dir=tmp_path)[0].identity()
    assert first["kwargs"] == {"word": "x"} and len(first["code_sha256"]) == 64
    assert first["source"] == str(path)
    # a changed file is a different reward (a fresh module name is needed to re-import it)
    other = tmp_path / "q.py"
    other.write_text(PLUGIN + "\n# changed\n")
    second = load_rewards([{"name": "q.py:says_hello"}], base_dir=tmp_path)[0].identity()
    assert second["code_sha256"] != first["code_sha256"]


def test_hash_folder_follows_the_bytes(tmp_path):
    from medrl.rewards import hash_folder

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 64)
    first = hash_folder(tmp_path / "m")
    assert hash_folder(tmp_path / "m") == first
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert hash_folder(tmp_path / "m") != first


def test_identity_hashes_the_code_that_was_loaded(tmp_path):
    """A reward file is imported once per process: editing it later changes neither the code
    that runs nor the hash the checkpoints record."""
    import hashlib

    path = tmp_path / "p.py"
    path.write_text(PLUGIN)
    loaded_bytes = path.read_bytes()
    [first] = load_rewards([{"name": "p.py:says_hello"}], base_dir=tmp_path)
    path.write_text(PLUGIN.replace("float(word in sample.completion_text)", "100.0"))
    [again] = load_rewards([{"name": "p.py:says_hello"}], base_dir=tmp_path)
    assert again.target(hello_sample()) == 1.0  # still the code imported first
    assert again.identity()["code_sha256"] == hashlib.sha256(loaded_bytes).hexdigest()
    assert first.identity()["code_sha256"] == again.identity()["code_sha256"]
