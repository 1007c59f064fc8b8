"""The reports of ``medrl eval``: results.json, predictions, summary.md and the plots, and the
comparison of models or of a run's checkpoints (compare.json, compare.md, plots/compare.png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medrl.launch.monitor import save_figure

if TYPE_CHECKING:
    from medrl.launch.evaluate import EvalOptions, Prediction


def write_report(out_dir: Path, *, model: str, opts: EvalOptions,
                 results: dict[str, dict[str, Any]],
                 predictions: dict[str, list[Prediction]]) -> str:
    """Write results.json, predictions, summary.md and the accuracy plot; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"model": model, "mode": opts.mode, "samples": opts.samples, "seed": opts.seed,
           "temperature": None if opts.samples == 1 else opts.temperature,
           "datasets": results}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1))
    for name, preds in predictions.items():
        (out_dir / name).mkdir(exist_ok=True)
        with open(out_dir / name / "predictions.jsonl", "w") as f:
            for p in preds:
                f.write(json.dumps(p.record(opts.log_text)) + "\n")
    summary = summary_markdown(model, opts, results)
    (out_dir / "summary.md").write_text(summary)
    plot_accuracy(out_dir / "plots" / "accuracy.png", results)
    calibrated = {name: preds for name, preds in predictions.items()
                  if "ece" in results[name]["metrics"] and preds}
    if calibrated:
        plot_calibration(out_dir / "plots" / "calibration.png", calibrated)
    return summary


def summary_markdown(model: str, opts: EvalOptions, results: dict[str, dict[str, Any]]) -> str:
    lines = [f"# medrl eval: {model}", "", f"mode {opts.mode}, samples {opts.samples}, "
             f"seed {opts.seed}; 95% intervals (Wilson for shares, bootstrap for mean "
             "scores)", "",
             "| dataset | metric | value | 95% CI | n | skipped |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        skipped = ", ".join(f"{k} {v}" for k, v in r["skipped"].items() if v) or "0"
        for metric, m in r["metrics"].items():
            lines.append(f"| {name} | {metric} | {m['value']:.3f} | "
                         f"[{m['low']:.3f}, {m['high']:.3f}] | {m['n']} | {skipped} |")
        for cat, ms in r.get("by_category", {}).items():
            metric = headline(ms)
            m = ms[metric]
            lines.append(f"| {name} / {cat} | {metric} | {m['value']:.3f} | "
                         f"[{m['low']:.3f}, {m['high']:.3f}] | {m['n']} | |")
    return "\n".join(lines) + "\n"


def headline(metrics: dict[str, Any]) -> str:
    """The metric a dataset is summed up by: accuracy, a rubric dataset's mean score, or the
    F1 of fact checking and extraction."""
    return next((m for m in ("acc", "score", "f1") if m in metrics), next(iter(metrics)))


def plot_accuracy(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Accuracy (rubric datasets: mean score) per dataset and category with its interval."""
    from matplotlib.figure import Figure

    bars = []
    for name, r in results.items():
        bars.append((name, r["metrics"][headline(r["metrics"])]))
        bars += [(f"{name}/{cat}", ms[headline(ms)])
                 for cat, ms in r.get("by_category", {}).items()]
    fig = Figure(figsize=(max(4.0, 0.9 * len(bars) + 1.5), 3.5))
    ax = fig.subplots()
    values = [m["value"] for _, m in bars]
    errors = [[v - m["low"] for v, (_, m) in zip(values, bars)],
              [m["high"] - v for v, (_, m) in zip(values, bars)]]
    ax.bar(range(len(bars)), values, yerr=errors, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(bars)), [b for b, _ in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy / score (95% CI)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)


def entry_label(entry: dict[str, Any], models: int) -> str:
    """A comparison column's name: ``step N`` (one run's checkpoints), the model, or both."""
    if entry["step"] is None:
        return entry["model"]
    return f"step {entry['step']}" if models == 1 else f"{entry['model']} step {entry['step']}"


def plot_calibration(path: Path, predictions: dict[str, list[Prediction]]) -> None:
    """A reliability diagram per log-likelihood dataset: accuracy against the probability the
    model gave its chosen option, in 10 bins (the diagonal is perfect calibration)."""
    from matplotlib.figure import Figure

    from medrl.launch.eval_metrics import calibration_bins, option_confidence

    fig = Figure(figsize=(4.5, 4.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for name, preds in predictions.items():
        bins = calibration_bins([option_confidence(p.logprobs) for p in preds],
                                [p.choice == p.gold for p in preds])
        shown = [(conf, acc, n) for conf, acc, n in bins if n]
        ax.plot([b[0] for b in shown], [b[1] for b in shown], marker="o",
                label=f"{name} (n={len(preds)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence in the chosen option")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)


def write_comparison(out_dir: Path, entries: list[dict[str, Any]]) -> str:
    """One table (and plots/compare.png) of every dataset's metrics across models and
    checkpoints. ``entries``: ``{"model": name, "step": int | None, "results": results}`` in
    column order. Writes compare.json and compare.md; returns the Markdown. The plot puts
    checkpoints on a step axis (a line per model and dataset), models side by side."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    models = sorted({e["model"] for e in entries})
    labels = [entry_label(e, len(models)) for e in entries]
    (out_dir / "compare.json").write_text(json.dumps(
        {"entries": [{"label": label, **e} for label, e in zip(labels, entries)]}, indent=1))
    names = sorted({d for e in entries for d in e["results"]})
    title = "checkpoints" if len(models) == 1 and entries[0]["step"] is not None else "models"
    lines = [f"# medrl eval across {title}", "",
             "| dataset | metric | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(entries)]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    stepped = all(e["step"] is not None for e in entries)
    for name in names:
        metrics = sorted({m for e in entries if name in e["results"]
                          for m in e["results"][name]["metrics"]})
        for metric in metrics:
            cells = [e["results"].get(name, {}).get("metrics", {}).get(metric) for e in entries]
            lines.append(f"| {name} | {metric} | " + " | ".join(
                "" if c is None else f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
                for c in cells) + " |")
        main = headline({m: 0 for m in metrics})
        for model in (models if stepped else [None]):
            points = [(e["step"] if stepped else i, e["results"][name]["metrics"][main])
                      for i, e in enumerate(entries)
                      if name in e["results"] and (model is None or e["model"] == model)]
            ax.errorbar([x for x, _ in points], [m["value"] for _, m in points],
                        yerr=[[max(0.0, m["value"] - m["low"]) for _, m in points],
                              [max(0.0, m["high"] - m["value"]) for _, m in points]],
                        marker="o", capsize=3, linestyle="-" if stepped else "none",
                        label=f"{name} {main}" + (f" ({model})" if len(models) > 1
                                                  and model else ""))
    if stepped:
        ax.set_xlabel("step")
    else:
        ax.set_xticks(range(len(entries)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy / score (95% CI)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    (out_dir / "plots").mkdir(exist_ok=True)
    save_figure(fig, out_dir / "plots" / "compare.png", dpi=110)
    text = "\n".join(lines) + "\n"
    (out_dir / "compare.md").write_text(text)
    return text
