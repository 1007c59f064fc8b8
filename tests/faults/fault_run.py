"""``python fault_run.py POINT STEP -- medrl ARGS...``: the ``medrl`` command line in this
process, SIGKILLed (the whole process group, as an out-of-memory killer or a lost machine
would) at ``POINT`` of step ``STEP``. The points wrap the real functions, so the run is the
real run up to the kill:

- ``after_generate``, ``after_learn``, ``after_sync``: a phase of the grpo step returned;
- ``checkpoint_write``: the checkpoint's files are being written (its weights saved, no
  ``COMPLETE`` yet);
- ``after_complete``: ``COMPLETE`` is on disk, nothing after it has run;
- ``plotting``: inside the plots drawn after the checkpoint;
- ``disk_full``: no kill; the checkpoint's writer fails with ``ENOSPC``, as on a full disk.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys


def kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def after(owner, name: str, when) -> None:
    """``owner.name`` runs, then the process group dies when ``when(args, kwargs)``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        if when(args, kwargs):
            kill()
        return out

    setattr(owner, name, wrapped)


def inject(point: str, step: int) -> None:
    import medrl.align.checkpoint as checkpoint
    import medrl.launch.driver as driver
    import medrl.launch.monitor as monitor
    from medrl.launch.learner_group import LearnerGroup

    current = {"step": 0}
    original_generate = driver.generate_and_score

    def generate(recipe, c, k, *args, **kwargs):
        current["step"] = k
        out = original_generate(recipe, c, k, *args, **kwargs)
        if point == "after_generate" and k == step:
            kill()
        return out

    driver.generate_and_score = generate
    at_step = lambda args, kwargs: current["step"] == step  # noqa: E731
    if point == "after_learn":
        after(LearnerGroup, "train_step", at_step)
    elif point == "after_sync":
        after(driver, "push_weights", lambda a, kw: kw.get("version") == step)
    elif point == "checkpoint_write":
        after(LearnerGroup, "save", at_step)
    elif point == "after_complete":
        after(checkpoint, "save_checkpoint", lambda a, kw: a[1] == step)
    elif point == "plotting":
        after(monitor, "write_plots", at_step)
    elif point == "disk_full":  # not a kill: the checkpoint's writer runs out of space
        def full(self, out_dir):
            if current["step"] == step:
                raise OSError(errno.ENOSPC, "No space left on device")
            return save(self, out_dir)

        save = LearnerGroup.save
        LearnerGroup.save = full
    elif point != "after_generate":
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    point, step, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: fault_run.py POINT STEP -- medrl ARGS..."
    inject(point, int(step))
    from medrl.launch.cli import main

    sys.argv = ["medrl", *args]
    main()
