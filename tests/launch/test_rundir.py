"""The run folder: names that stay inside run.output_dir, --force only on run folders, one
writer at a time (the lock), checkpoints set aside on resume, logs that survive a torn line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medrl.align.checkpoint import list_checkpoints, save_checkpoint
from medrl.align.records import UserError
from medrl.launch.recipe import Recipe, load_recipe
from medrl.launch.rundir import (
    LOCK_FILE,
    PromptLog,
    RunLock,
    check_run_logs,
    create_run_dir,
    new_run,
    read_lock,
    set_aside_after,
)


QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def recipe_for(output_dir: Path, name: str = "exp") -> Recipe:
    return load_recipe(QUICKSTART, [f"run.output_dir={output_dir}", f"run.name={name}"])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("name", ["''", ".", "..", "a/b", "/tmp/x", "..\\up", " .. "])
def test_run_name_must_be_one_folder_name(name):
    with pytest.raises(UserError, match="run.name: .* is not a folder name: run.name names one"):
        recipe_for(Path("runs"), name)


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path):
    target = tmp_path / "runs" / "exp"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a medrl run folder .*Nothing was deleted"):
        create_run_dir(recipe_for(tmp_path / "runs"), force=True)
    assert (target / "notes.txt").read_text() == "mine"


def test_force_replaces_a_run_folder_but_not_what_its_links_point_to(tmp_path):
    keep = tmp_path / "elsewhere"
    keep.mkdir()
    (keep / "data.jsonl").write_text("{}\n")
    run_dir = create_run_dir(recipe_for(tmp_path))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "data").symlink_to(keep)
    with pytest.raises(UserError, match="already exists and is not empty"):
        create_run_dir(recipe_for(tmp_path))
    notes = []
    with new_run(recipe_for(tmp_path), force=True, say=notes.append) as again:
        assert again == run_dir and (run_dir / LOCK_FILE).exists()
        assert sorted(p.name for p in run_dir.iterdir()) == ["recipe.yaml", LOCK_FILE]
    assert (keep / "data.jsonl").exists() and "deleted the previous contents" in notes[0]
    assert not (run_dir / LOCK_FILE).exists()  # released at the end of the block


def test_force_refuses_a_run_that_is_being_written(tmp_path):
    run_dir = create_run_dir(recipe_for(tmp_path))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with RunLock(run_dir):
        with pytest.raises(UserError, match=f"in use by process {os.getpid()} on "):
            create_run_dir(recipe_for(tmp_path), force=True)
    assert (run_dir / "metrics.jsonl").exists()


def test_lock_records_its_owner_and_refuses_a_second_writer(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\nfrom medrl.launch.rundir import RunLock\n"
         "with RunLock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)\n",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = read_lock(tmp_path / LOCK_FILE)
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        assert owner["started"]
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on "
                                            f"{socket.gethostname()} \\(started "):
            RunLock(tmp_path).acquire()
        assert read_lock(tmp_path / LOCK_FILE)["pid"] == holder.pid  # left as it was
    finally:
        holder.kill()
        holder.wait()
    notes = []
    with RunLock(tmp_path, say=notes.append):  # the killed holder's lock is stale now
        assert read_lock(tmp_path / LOCK_FILE)["pid"] == os.getpid()
    assert f"taking over the lock of process {holder.pid}" in notes[0]


def test_lock_is_released_on_errors_and_ctrl_c(tmp_path):
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with RunLock(tmp_path):
                raise exc
        assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):  # and can be taken again
        pass


def test_stale_and_foreign_locks(tmp_path):
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    notes = []
    with RunLock(tmp_path, say=notes.append):
        assert read_lock(tmp_path / LOCK_FILE)["pid"] == os.getpid()
    assert notes and "no longer running" in notes[0]
    foreign = {"pid": os.getpid(), "host": "other-node-7", "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(foreign))
    with pytest.raises(UserError, match="locked by process .* on other-node-7 .*delete "):
        RunLock(tmp_path).acquire()
    assert read_lock(tmp_path / LOCK_FILE) == foreign  # not taken over, not removed


def write_ckpt(tmp):
    (tmp / "policy").mkdir()
    (tmp / "policy" / "w.bin").write_bytes(b"\0" * 64)


def test_resume_from_an_earlier_step_sets_the_later_checkpoints_aside(tmp_path):
    for step in (300, 400, 500):
        save_checkpoint(tmp_path, step, write=write_ckpt, state={})
    rows = [{"step": s, "uids": [f"p{s}"]} for s in (100, 300, 400, 500)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                                    for s in (300, 400, 500)))
    notes = []
    folder = set_aside_after(tmp_path, tmp_path / "checkpoints" / "step-000300",
                             say=notes.append)
    assert folder.parent == tmp_path / "abandoned" and folder.name.endswith("-from-step-000300")
    assert sorted(p.name for p in folder.iterdir()) == [
        "metrics.jsonl", "prompts.jsonl", "step-000400", "step-000500"]
    assert "steps 400, 500" in notes[0] and str(folder) in notes[0]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000300"]
    save_checkpoint(tmp_path, 350, write=write_ckpt, state={}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000300", "step-000350"]
    PromptLog(tmp_path, resume_step=300)  # the logs still drop the rows after the step
    assert [r["step"] for r in PromptLog(tmp_path).read()] == [100, 300]
    assert len((folder / "prompts.jsonl").read_text().splitlines()) == 4  # the old line kept
    assert set_aside_after(tmp_path, tmp_path / "checkpoints" / "step-000350") is None


def prompt_rows(path: Path, steps) -> None:
    path.write_text("".join(json.dumps({"step": s, "uids": [f"u{s}"]}) + "\n" for s in steps))


def test_prompt_log_drops_a_torn_last_line_on_resume(tmp_path):
    path = tmp_path / "prompts.jsonl"
    prompt_rows(path, [1, 2, 3])
    with path.open("a") as f:
        f.write('{"step": 4, "uids": ["u')  # the run died while appending
    inode = path.stat().st_ino
    with pytest.warns(UserWarning, match="prompts.jsonl:4: dropped a partly written last line"):
        PromptLog(tmp_path, resume_step=2)
    assert [r["step"] for r in PromptLog(tmp_path).read()] == [1, 2]
    # rewritten beside it and renamed over it (a crash leaves the old or the new file)
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_a_torn_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    prompt_rows(path, [1])
    with path.open("a") as f:
        f.write('{"step": 2, "uids": ["secret patient text\n' + json.dumps({"step": 3}) + "\n")
    for check in (lambda: PromptLog(tmp_path, resume_step=2), lambda: check_run_logs(tmp_path)):
        with pytest.raises(UserError, match=r"prompts.jsonl, line 2: not a JSON object") as err:
            check()
        assert "secret" not in str(err.value)
    assert len(path.read_text().splitlines()) == 3  # left as it was


def test_metrics_log_is_checked_the_same_way(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2: not a JSON object"):
        check_run_logs(tmp_path)
