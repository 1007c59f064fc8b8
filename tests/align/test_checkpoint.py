"""The checkpoint format: atomic saves, completeness, checksums, retention, RNG states."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medrl.align.checkpoint import (
    apply_retention,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    save_checkpoint,
    set_aside_newer,
    verified_checkpoint,
    verify_checkpoint,
)
from medrl.align.rng_state import capture_rng, restore_rng
from medrl.align.records import UserError


def learner_writer(seed: int):
    """Writes policy/ and learner/ the way the learner does (safetensors + JSON)."""

    def write(tmp):
        g = torch.Generator().manual_seed(seed)
        (tmp / "policy").mkdir()
        save_file({"w": torch.randn(4, 3, generator=g)}, str(tmp / "policy" / "model.safetensors"))
        (tmp / "policy" / "config.json").write_text(json.dumps({"hidden": 3}))
        (tmp / "learner").mkdir()
        save_file({"exp_avg": torch.randn(4, 3, generator=g)},
                  str(tmp / "learner" / "optim.safetensors"))

    return write


def test_round_trip(tmp_path):
    state = {"policy_version": 7, "data": {"epoch": 1, "position": 12, "seed": 3},
             "rewards": ["mcq_letter"], "rng": capture_rng()}
    path = save_checkpoint(tmp_path, 200, write=learner_writer(0), state=state)

    assert path == tmp_path / "checkpoints" / "step-000200"
    assert list_checkpoints(tmp_path) == [path]
    assert latest_checkpoint(tmp_path) == path
    assert read_state(path) == {**state, "step": 200}
    files = verify_checkpoint(path)
    assert set(files) == {"policy/model.safetensors", "policy/config.json",
                          "learner/optim.safetensors", "state.json"}
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 200 and marker["files"] == files
    expected = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_file(str(path / "policy" / "model.safetensors"))["w"], expected)
    # nothing temporary is left beside it
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000200"]


def test_crash_inside_write_leaves_nothing(tmp_path):
    save_checkpoint(tmp_path, 10, write=learner_writer(0), state={})

    def crashing(tmp):
        learner_writer(1)(tmp)
        raise RuntimeError("learner died mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        save_checkpoint(tmp_path, 20, write=crashing, state={})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000010"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010"]


def test_failed_resave_of_a_step_keeps_the_old_copy(tmp_path):
    first = save_checkpoint(tmp_path, 10, write=learner_writer(0), state={"v": 1})

    def crashing(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 10, write=crashing, state={"v": 2})
    assert list_checkpoints(tmp_path) == [first]
    assert read_state(first)["v"] == 1
    verify_checkpoint(first)


def test_same_step_is_replaced(tmp_path):
    save_checkpoint(tmp_path, 10, write=learner_writer(0), state={"v": 1})
    path = save_checkpoint(tmp_path, 10, write=learner_writer(1), state={"v": 2})
    assert list_checkpoints(tmp_path) == [path]
    assert read_state(path)["v"] == 2
    verify_checkpoint(path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000010"]


def test_folder_without_complete_is_ignored(tmp_path):
    good = save_checkpoint(tmp_path, 5, write=learner_writer(0), state={})
    partial = tmp_path / "checkpoints" / "step-000009"
    partial.mkdir()
    learner_writer(1)(partial)
    (partial / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-step-000011-abc").mkdir()

    assert list_checkpoints(tmp_path) == [good]
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(UserError, match="available steps: 5"):
        latest_checkpoint(tmp_path, step=9)
    # the next save clears the hidden leftovers of the interrupted one
    save_checkpoint(tmp_path, 12, write=learner_writer(2), state={})
    assert not (tmp_path / "checkpoints" / ".tmp-step-000011-abc").exists()


def test_no_checkpoint_names_the_run_dir(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        latest_checkpoint(tmp_path)


def test_step_lookup(tmp_path):
    paths = [save_checkpoint(tmp_path, s, write=learner_writer(s), state={}) for s in (3, 100, 20)]
    assert list_checkpoints(tmp_path) == [paths[0], paths[2], paths[1]]  # by step, not by name
    assert latest_checkpoint(tmp_path) == paths[1]
    assert latest_checkpoint(tmp_path, step=20) == paths[2]
    with pytest.raises(UserError, match="available steps: 3, 20, 100"):
        latest_checkpoint(tmp_path, step=7)


def test_tampering_fails_verify_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path, 1, write=learner_writer(0), state={})
    weights = path / "learner" / "optim.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="learner/optim.safetensors: checksum does not match"):
        verify_checkpoint(path)


def test_missing_and_extra_files_fail_verify(tmp_path):
    path = save_checkpoint(tmp_path, 1, write=learner_writer(0), state={})
    (path / "policy" / "config.json").unlink()
    with pytest.raises(UserError, match="policy/config.json: listed in COMPLETE but missing"):
        verify_checkpoint(path)
    path = save_checkpoint(tmp_path, 2, write=learner_writer(0), state={})
    (path / "policy" / "stray.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="policy/stray.bin: not part of the saved checkpoint"):
        verify_checkpoint(path)


def flip_byte(path, index=-1, mask=0xFF):
    raw = bytearray(path.read_bytes())
    raw[index] ^= mask
    path.write_bytes(bytes(raw))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-5])


def add_file(path):
    (path.parent / "extra.safetensors").write_bytes(b"x")


# how each damage is named: (file damaged, relative to the checkpoint; what the message says)
DAMAGES = {
    "flipped byte": (flip_byte, "policy/model.safetensors", "checksum does not match"),
    "flipped byte in state": (flip_byte, "state.json", "checksum does not match"),
    "truncated": (truncate, "learner/optim.safetensors", "checksum does not match"),
    "deleted": (lambda p: p.unlink(), "policy/config.json", "listed in COMPLETE but missing"),
    "added": (add_file, "learner/extra.safetensors", "not part of the saved checkpoint"),
    "damaged COMPLETE": (lambda p: flip_byte(p, p.read_text().index('"created"') + 13, 1),
                         "COMPLETE", "its own checksum does not match"),  # a year digit
    "undecodable COMPLETE": (flip_byte, "COMPLETE", "not valid JSON"),
}


def test_a_newest_checkpoint_that_lost_its_complete_is_not_skipped_silently(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 4, 6):
        save_checkpoint(run_dir, step, write=learner_writer(step), state={"v": step})
    newest = run_dir / "checkpoints" / "step-000006"
    (newest / "COMPLETE").unlink()  # saves rename into place with COMPLETE: damage
    with pytest.raises(UserError) as err:
        verified_checkpoint(run_dir)
    assert str(err.value).startswith(f"{newest / 'COMPLETE'}: missing, so checkpoint "
                                     "step-000006 is damaged.")
    assert str(err.value).endswith(f"resume from it with `medrl resume {run_dir} --step 4`.")
    assert verified_checkpoint(run_dir, step=4) == run_dir / "checkpoints" / "step-000004"


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_refuses_a_damaged_checkpoint_naming_the_one_that_verifies(tmp_path, damage):
    run_dir = tmp_path / "run"
    for step in (2, 4, 6):
        save_checkpoint(run_dir, step, write=learner_writer(step), state={"v": step})
    assert verified_checkpoint(run_dir) == run_dir / "checkpoints" / "step-000006"
    act, rel, what = DAMAGES[damage]
    newest = run_dir / "checkpoints" / "step-000006"
    target = newest / (rel if damage != "added" else "learner/optim.safetensors")
    act(target)
    with pytest.raises(UserError) as err:
        verified_checkpoint(run_dir)
    message = str(err.value)
    assert message.startswith(f"{newest / rel}: {what}")
    assert "checkpoint step-000006 is damaged." in message
    assert message.endswith(f"The newest earlier checkpoint that verifies is step 4; resume from "
                            f"it with `medrl resume {run_dir} --step 4`.")
    assert verified_checkpoint(run_dir, step=4) == run_dir / "checkpoints" / "step-000004"


def test_resume_advice_skips_earlier_damaged_checkpoints(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, write=learner_writer(step), state={})
    flip_byte(tmp_path / "checkpoints" / "step-000006" / "policy" / "model.safetensors", 40)
    flip_byte(tmp_path / "checkpoints" / "step-000004" / "state.json", 0)
    with pytest.raises(UserError, match=r"verifies is step 2; resume from it with "
                                        r"`medrl resume .* --step 2`\.$"):
        verified_checkpoint(tmp_path)
    with pytest.raises(UserError, match=r"step-000004/state.json: checksum .* step 2;"):
        verified_checkpoint(tmp_path, step=4)
    flip_byte(tmp_path / "checkpoints" / "step-000002" / "learner" / "optim.safetensors")
    with pytest.raises(UserError, match=r"No earlier checkpoint of this run verifies; start the "
                                        r"run again with `medrl run`"):
        verified_checkpoint(tmp_path)


def test_a_renamed_checkpoint_folder_fails_verify(tmp_path):
    import shutil

    path = save_checkpoint(tmp_path, 2, write=learner_writer(0), state={})
    shutil.copytree(path, tmp_path / "checkpoints" / "step-000008")
    with pytest.raises(UserError, match=r"COMPLETE: written for step 2, but the folder is named "
                                        r"step-000008 \(renamed or copied\)"):
        verified_checkpoint(tmp_path)


def test_complete_without_its_own_checksum_still_verifies(tmp_path):
    """Checkpoints saved before COMPLETE carried a checksum of itself."""
    path = save_checkpoint(tmp_path, 1, write=learner_writer(0), state={})
    marker = json.loads((path / "COMPLETE").read_text())
    del marker["marker_sha256"]
    (path / "COMPLETE").write_text(json.dumps(marker))
    assert verified_checkpoint(tmp_path) == path


def test_verify_streams_big_files(tmp_path):
    """A file far larger than the hash block is hashed without being read whole."""
    import tracemalloc

    def write(tmp):
        with open(tmp / "big.bin", "wb") as f:
            for i in range(32):
                f.write(bytes([i]) * 2**20)

    path = save_checkpoint(tmp_path, 1, write=write, state={})
    tracemalloc.start()
    try:
        verify_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
    flip_byte(path / "big.bin", 17 * 2**20 + 3)  # in the middle, not the first block
    with pytest.raises(UserError, match="big.bin: checksum does not match"):
        verify_checkpoint(path)


def test_retention_keeps_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, write=learner_writer(step), state={}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000030", "step-000040"]
    # saving an older step (a resumed run re-saving) must not delete the one just written
    path = save_checkpoint(tmp_path, 15, write=learner_writer(0), state={}, keep_last=1)
    assert path.exists() and path in list_checkpoints(tmp_path)
    assert apply_retention(tmp_path, 2) == [path]  # the oldest goes when nothing protects it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000030", "step-000040"]


def test_retention_counts_only_the_line_resumed_from(tmp_path):
    # checkpoints 300/400/500, resumed from 300: the save at 350 prunes none of the line
    # 300 -> 350, and does not count (or delete) the later checkpoints it did not come from
    for step in (100, 200, 300, 400, 500):
        save_checkpoint(tmp_path, step, write=learner_writer(step), state={})
    save_checkpoint(tmp_path, 350, write=learner_writer(0), state={}, keep_last=3)
    steps = [int(p.name[5:]) for p in list_checkpoints(tmp_path)]
    assert steps == [200, 300, 350, 400, 500]  # 100 pruned: it is 4th newest on the line


def test_set_aside_newer_moves_the_abandoned_line(tmp_path):
    for step in (300, 400, 500):
        save_checkpoint(tmp_path, step, write=learner_writer(step), state={})
    (tmp_path / "checkpoints" / "step-000450").mkdir()  # an incomplete folder goes too
    assert set_aside_newer(tmp_path, 500) == []
    moved = set_aside_newer(tmp_path, 300, stamp="20261201-120000")
    folder = tmp_path / "abandoned" / "20261201-120000-from-step-000300"
    assert moved == [folder / "step-000400", folder / "step-000450", folder / "step-000500"]
    verify_checkpoint(folder / "step-000500")  # moved whole: still verifies
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000300"]
    assert latest_checkpoint(tmp_path).name == "step-000300"
    save_checkpoint(tmp_path, 350, write=learner_writer(0), state={}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000300", "step-000350"]
    # a second resume from the same step within the same second gets its own folder
    save_checkpoint(tmp_path, 400, write=learner_writer(0), state={})
    again = set_aside_newer(tmp_path, 300, stamp="20261201-120000")
    assert again[0].parent != folder and again[0].parent.name.startswith(folder.name)
    assert [p.name for p in again] == ["step-000350", "step-000400"]


def test_state_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON-able"):
        save_checkpoint(tmp_path, 1, write=lambda tmp: None, state={"t": torch.ones(2)})
    assert list_checkpoints(tmp_path) == []


def draw(np_gen, torch_gen):
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), np_gen.random(2).tolist(),
            torch.rand(2, generator=torch_gen).tolist())


def test_rng_round_trip_through_json(tmp_path):
    np_gen, torch_gen = np.random.default_rng(5), torch.Generator().manual_seed(9)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draw(np_gen, torch_gen)  # move every generator away from its seed
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()  # and in numpy's legacy state
    gens = {"sampler": np_gen, "dropout": torch_gen}
    saved = json.loads(json.dumps(capture_rng(gens)))  # exactly what state.json holds
    expected = draw(np_gen, torch_gen)

    random.seed(100), np.random.seed(100), torch.manual_seed(100)
    np_gen2, torch_gen2 = np.random.default_rng(0), torch.Generator().manual_seed(0)
    assert draw(np_gen2, torch_gen2) != expected
    restore_rng(saved, {"sampler": np_gen2, "dropout": torch_gen2})
    assert draw(np_gen2, torch_gen2) == expected


def test_rng_unknown_generator_is_an_error():
    with pytest.raises(KeyError, match="sampler"):
        restore_rng(capture_rng(), {"sampler": np.random.default_rng(0)})
    with pytest.raises(TypeError, match="expected numpy.random.Generator"):
        capture_rng({"x": random.Random(0)})


def test_checkpoints_are_readable_as_the_umask_allows(tmp_path):
    """A team on shared storage reads each other's checkpoints: the folder's mode follows
    the umask like any folder the user makes (mkdtemp alone would make it 0700)."""
    import os

    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path, 5, write=learner_writer(0), state={})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o750
    assert (path / "policy").stat().st_mode & 0o777 == 0o750


def test_a_full_disk_stops_the_save_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    import errno

    good = save_checkpoint(tmp_path, 1, write=learner_writer(1), state={})

    def fills_the_disk(tmp):
        learner_writer(2)(tmp)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as err:
        save_checkpoint(tmp_path, 2, write=fills_the_disk, state={})
    message = str(err.value)
    assert message.startswith(f"checkpoint step 2 did not fit on the disk of "
                              f"{tmp_path / 'checkpoints'} (No space left on device)")
    assert "step-000001, is untouched" in message and f"medrl resume {tmp_path}" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert verified_checkpoint(tmp_path) == good
    with pytest.raises(OSError, match="Permission"):  # any other error is not disguised
        save_checkpoint(tmp_path, 3, write=lambda t: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "Permission denied")), state={})
