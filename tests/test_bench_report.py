"""bench.report rewrites the generated blocks of BENCHMARKS.md from bench/results/: a block
whose result file is not on this machine keeps its figures (a report run on a fresh clone
once replaced every measured block with a placeholder)."""

from __future__ import annotations

import json

from bench.report import update_markdown


def test_a_block_without_its_result_file_keeps_its_figures(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "fresh.json").write_text(json.dumps({
        "command": "python -m bench.bench_fresh", "repeat": 5, "warmup": 1, "threads": 2,
        "finished": "2026-12-03 12:00:00", "wall_s": 1.0, "quick": False,
        "machine": {"cores": 2, "cpu": "test CPU", "memory_gib": 1.0, "loaded": False,
                    "load_avg_1min_at_start": 0.1,
                    **{k: "1.0" for k in ("torch", "transformers", "vllm", "trl", "ray",
                                          "deepspeed")}},
        "tables": [{"title": "T", "columns": ["a", "b"], "rows": [[1, 2]], "notes": ["n"]}]}))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("<!-- results:old -->\n| measured | 1.5 |\n<!-- /results:old -->\n"
                  "<!-- results:never -->\n<!-- /results:never -->\n"
                  "<!-- results:fresh -->\nstale\n<!-- /results:fresh -->\n")
    assert update_markdown(md, results) == ["old", "never", "fresh"]
    text = md.read_text()
    assert "<!-- results:old -->\n| measured | 1.5 |\n<!-- /results:old -->" in text
    assert "_Not measured yet: run `python -m bench.run_all` (writes " \
           "`bench/results/never.json`)._" in text
    assert "stale" not in text and "**T**" in text and "python -m bench.bench_fresh" in text
