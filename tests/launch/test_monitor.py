"""The monitor: metrics.jsonl, resume truncation, TensorBoard events, plots, phase timers."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from medrl.align.checkpoint import save_checkpoint
from medrl.align.records import UserError
from medrl.launch.monitor import Monitor, Timer, read_metrics, truncate_metrics, write_plots


def quiet_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()  # wide enough that no tmp path wraps
    return Console(file=buffer, width=300, force_terminal=False), buffer


def step_metrics(step: int) -> dict[str, float]:
    return {"reward/mean": 0.1 * step, "rewards/mcq_letter/mean": 0.2 * step,
            "rewards/format/mean": 1.0 - 0.1 * step, "kl": 0.01 * step,
            "completion/length_mean": 10.0 + step, "time/generate": 0.5, "time/learner": 1.5,
            "time/step": 2.1}


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_lines(tmp_path):
    console, _ = quiet_console()
    with Monitor(tmp_path, total_steps=3, tensorboard=False, plots=False, console=console) as mon:
        mon.log(1, {"reward/mean": np.float32(0.5), "kl": float("nan"), "loss": 2,
                    "reward/judge/mean": None})
        # written and flushed before close: a crash keeps every finished line
        assert lines(tmp_path)[0]["reward/mean"] == 0.5
        with mon.timed("generate"):
            pass
        mon.log(2, {"reward/mean": 0.75})
    rows = lines(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] is None  # NaN is not JSON; null marks it
    assert rows[0]["loss"] == 2.0 and rows[0]["reward/judge/mean"] is None
    with Monitor(tmp_path / "x", total_steps=1, tensorboard=False, progress=False) as other:
        with pytest.raises(TypeError, match="metric 'note'"):
            other.log(1, {"note": "text"})
        with pytest.raises(ValueError, match="reserved"):
            other.log(1, {"step": 1})
    assert all(isinstance(r["time"], float) and r["time/step"] >= 0 for r in rows)
    assert "time/generate" in rows[1] and "time/generate" not in rows[0]


def test_resume_truncates_later_steps(tmp_path):
    console, _ = quiet_console()
    with Monitor(tmp_path, total_steps=6, tensorboard=False, console=console) as mon:
        for step in range(1, 6):
            mon.log(step, step_metrics(step))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # torn by a crash
    # resumed from the checkpoint of step 3: steps 4, 5 and the torn line go
    with pytest.warns(UserWarning, match="partly written"):
        mon = Monitor(tmp_path, total_steps=6, start_step=3, tensorboard=False, console=console)
    assert mon.dropped_lines == 3
    for step in range(4, 7):
        mon.log(step, step_metrics(step))
    mon.close()
    assert [r["step"] for r in lines(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert truncate_metrics(tmp_path, 2) == 4
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_truncate_after_while_open(tmp_path):
    with Monitor(tmp_path, total_steps=9, tensorboard=False, progress=False) as mon:
        for step in range(1, 6):
            mon.log(step, {"reward/mean": step})
        assert mon.truncate_after(3) == 2
        mon.log(4, {"reward/mean": 40})  # goes to the rewritten file, not the replaced one
    rows = [(r["step"], r["reward/mean"]) for r in lines(tmp_path)]
    assert rows == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_damaged_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl, line 2: not a JSON object"):
        read_metrics(tmp_path)


def test_tensorboard_events_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    console, _ = quiet_console()
    with Monitor(tmp_path, total_steps=3, plots=False, console=console) as mon:
        for step in (1, 2, 3):
            mon.log(step, step_metrics(step))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"reward/mean", "rewards/mcq_letter/mean", "kl", "time/step"} <= set(scalars)
    events = acc.Scalars("reward/mean")
    assert [e.step for e in events] == [1, 2, 3]
    assert [round(e.value, 5) for e in events] == [0.1, 0.2, 0.3]


def test_tensorboard_hides_replayed_steps_after_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Monitor(tmp_path, total_steps=5, plots=False, progress=False) as mon:
        for step in range(1, 6):
            mon.log(step, {"reward/mean": step})
    with Monitor(tmp_path, total_steps=5, start_step=3, plots=False, progress=False) as mon:
        for step in (4, 5):
            mon.log(step, {"reward/mean": 10 * step})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == \
        [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]


def test_progress_bar_shows_live_values(tmp_path):
    console, buffer = quiet_console()
    with Monitor(tmp_path, total_steps=4, tensorboard=False, console=console) as mon:
        mon.log(1, {"reward/mean": 0.625, "time/step": 1.5})
    text = buffer.getvalue()
    assert "1/4" in text
    assert "reward 0.625" in text and "kl -" in text and "1.50s/step" in text


def plot_is_drawn(path):
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    # a blank canvas has one grey level; axes, text and lines give many
    assert len(np.unique(image)) > 20
    assert image.std() > 5
    return image


def test_plots_cover_the_whole_resumed_run(tmp_path):
    console, _ = quiet_console()
    with Monitor(tmp_path, total_steps=8, tensorboard=False, console=console) as mon:
        for step in range(1, 5):
            mon.log(step, step_metrics(step))
    with Monitor(tmp_path, total_steps=8, start_step=4, tensorboard=False, console=console) as mon:
        for step in range(5, 9):
            mon.log(step, step_metrics(step))
        written = mon.plot()
    names = sorted(p.name for p in written)
    assert names == ["completion_length.png", "kl.png", "reward.png", "step_time.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        plot_is_drawn(path)


def test_plot_lines_differ_with_the_data(tmp_path):
    rising, flat = tmp_path / "rising", tmp_path / "flat"
    for run, slope in ((rising, 1.0), (flat, 0.0)):
        run.mkdir()
        with open(run / "metrics.jsonl", "w") as f:
            for step in range(1, 11):
                f.write(json.dumps({"step": step, "time": 0.0, "reward/mean": slope * step}) + "\n")
        assert [p.name for p in write_plots(run)] == ["reward.png"]  # no data, no empty plots
    a = plot_is_drawn(rising / "plots" / "reward.png").astype(int)
    b = plot_is_drawn(flat / "plots" / "reward.png").astype(int)
    assert a.shape == b.shape and np.abs(a - b).sum() > 0


def test_timer_adds_up_phases():
    timer = Timer()
    for _ in range(2):
        with timer.timed("generate"):
            sum(range(10000))
    with pytest.raises(RuntimeError):
        with timer("learner"):  # calling the timer is the same as .timed
            raise RuntimeError("boom")
    assert set(timer.metrics()) == {"time/generate", "time/learner"}
    out = timer.pop()
    assert set(out) == {"time/generate", "time/learner"}
    assert all(v > 0 and math.isfinite(v) for v in out.values())
    assert timer.pop() == {}


def test_summary_names_checkpoint_resume_and_views(tmp_path):
    save_checkpoint(tmp_path, 2, write=lambda tmp: None, state={})
    console, buffer = quiet_console()
    mon = Monitor(tmp_path, total_steps=2, progress=False, console=console)
    mon.log(2, {"reward/mean": 1.0})
    with pytest.raises(TypeError, match="last_checkpoint"):
        mon.summary(tmp_path)
    mon.summary(["finished 2 steps"])
    mon.close()
    text = buffer.getvalue()
    assert "finished 2 steps" in text
    assert "step-000002" in text
    assert f"medrl resume {tmp_path}" in text
    assert "tensorboard --logdir" in text and "plots" in text


# -- logging.every: one row per N steps, the mean over them ----------------------------------
def log_steps(run_dir, steps, *, start_step=0, total=10, every=4, checkpoint_every=5,
              tensorboard=False):
    mon = Monitor(run_dir, total_steps=total, start_step=start_step, every=every,
                  checkpoint_every=checkpoint_every, tensorboard=tensorboard, plots=False,
                  progress=False)
    for step in steps:
        metrics = {"reward/mean": float(step), "time/step": 1.0}
        if step % 3 == 0:  # a metric some steps lack (an eval every third step)
            metrics["eval/loss"] = 10.0 * step
        mon.log(step, metrics)
    return mon


def test_every_n_steps_logs_the_mean_of_the_window(tmp_path):
    log_steps(tmp_path, range(1, 11), tensorboard=True).close()
    rows = lines(tmp_path)
    # windows close every 4 steps, at every checkpoint step (5, 10) and at the last step
    assert [r["step"] for r in rows] == [4, 5, 8, 10]
    assert [r["reward/mean"] for r in rows] == [2.5, 5.0, 7.0, 9.5]
    assert [r.get("eval/loss") for r in rows] == [30.0, None, 60.0, 90.0]
    assert all(r["time/step"] == 1.0 for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == \
        [(4, 2.5), (5, 5.0), (8, 7.0), (10, 9.5)]


def test_every_n_steps_resumes_to_the_same_rows(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    log_steps(whole, range(1, 11)).close()
    log_steps(broken, range(1, 8)).close()  # stops at step 7: its open window is written
    assert [r["step"] for r in lines(broken)] == [4, 5, 7]
    log_steps(broken, range(6, 11), start_step=5).close()  # resumed from the step-5 checkpoint
    keep = ("step", "reward/mean", "eval/loss", "time/step")
    assert [{k: r.get(k) for k in keep} for r in lines(broken)] == \
        [{k: r.get(k) for k in keep} for r in lines(whole)]


def test_every_one_logs_each_step_and_a_bad_value_fails_at_once(tmp_path):
    mon = log_steps(tmp_path, range(1, 4), every=1, checkpoint_every=0, total=3)
    with pytest.raises(TypeError, match="metric 'note'"):
        mon.log(4, {"note": "text"})
    mon.close()
    assert [r["step"] for r in lines(tmp_path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="every must be a whole number >= 1"):
        Monitor(tmp_path / "x", total_steps=1, every=0, tensorboard=False, progress=False)


# -- the summary names reward failures --------------------------------------------------------
def test_summary_counts_reward_failures_and_shows_the_first(tmp_path):
    from medrl.align.records import Sample
    from medrl.rewards import RewardContext, RewardRunner, load_rewards

    here = __import__("pathlib").Path(__file__).parents[1] / "rewards"
    rewards = RewardRunner(load_rewards([{"name": "plugins.py:ok_or_boom"}], base_dir=here),
                           on_error="skip_sample", ctx=RewardContext(run_dir=tmp_path))
    console, buffer = quiet_console()
    mon = Monitor(tmp_path, total_steps=2, progress=False, tensorboard=False, console=console)
    for step in (1, 2):
        samples = [Sample(uid=f"q{step}/{i}", group_id=f"q{step}", row={"boom": i > 0})
                   for i in range(5)]
        report = rewards.score(samples, step=step)
        assert report.metrics["rewards/skipped_samples"] == 4.0
        mon.log(step, report.metrics)
    mon.close()
    mon.summary()
    text = buffer.getvalue()
    assert "reward failures: 8 skipped" in text and "reward_failures.jsonl" in text
    assert "step 1  ok_or_boom  sample 'q1/1': raised ValueError: bad row" in text
    assert "q1/3" in text and "q1/4" not in text and "and 5 more" in text
    # resuming from step 1 drops the failures logged after it, as it drops metrics
    Monitor(tmp_path, total_steps=2, start_step=1, progress=False, tensorboard=False).close()
    logged = [json.loads(x) for x in (tmp_path / "reward_failures.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 1, 1, 1]


def test_summary_without_failures_says_nothing_of_them(tmp_path):
    console, buffer = quiet_console()
    with Monitor(tmp_path, total_steps=1, progress=False, tensorboard=False,
                 console=console) as mon:
        mon.log(1, {"reward/mean": 1.0})
    mon.summary()
    assert "reward failures" not in buffer.getvalue()
