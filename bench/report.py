"""Render ``bench/results/*.json`` into the generated blocks of ``BENCHMARKS.md``.

Every figure in ``BENCHMARKS.md`` sits between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->`` and is rewritten from ``bench/results/NAME.json`` by this module
(``python -m bench.report``; ``python -m bench.run_all`` calls it at the end), so no number
there is typed by hand. A block whose result file is not on this machine keeps what it
holds (figures measured elsewhere are not wiped by a report on a fresh clone); a block never
measured says so.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from bench.common import REPO, RESULTS_DIR, machine_line, render_table

BENCHMARKS_MD = REPO / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)",
                   re.S)


def render(name: str, results_dir: Path = RESULTS_DIR) -> str:
    """The Markdown for one benchmark's result file (tables, notes, machine, command)."""
    path = results_dir / f"{name}.json"
    if not path.is_file():
        return (f"_Not measured yet: run `python -m bench.run_all` (writes "
                f"`bench/results/{name}.json`)._\n")
    result = json.loads(path.read_text())
    machine = result["machine"]
    cores = machine["cores"]
    lines = []
    flags = []
    if machine.get("loaded"):
        others = machine.get("other_cpu_share")
        flags.append("**measured on a shared, loaded machine** (1-minute load average "
                     f"{machine['load_avg_1min_at_start']} at the start on {cores} cores"
                     + (f"; other processes used {others:.0%} of the cores during the run"
                        if others is not None else "") + "): figures are noisy")
    if result.get("quick"):
        flags.append("**`--quick` settings**: a smoke run, too small for the comparison")
    for flag in flags:
        lines.append(f"> {flag}\n")
    lines.append(f"Command: `{result['command']}` ({result['repeat']} measured repetitions "
                 f"after {result['warmup']} warm-up, {result['threads']} threads; finished "
                 f"{result['finished']}, took {result['wall_s']} s)\n")
    lines.append(machine_line(machine).replace("machine:", "Machine:", 1) + "\n")
    for t in result["tables"]:
        lines.append(f"**{t['title']}**\n")
        lines.append(render_table(t["columns"], t["rows"]) + "\n")
        for note in t.get("notes", []):
            lines.append(f"- {note}")
        if t.get("notes"):
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def update_markdown(path: Path = BENCHMARKS_MD, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Rewrite every generated block of ``path``; returns the names of the blocks."""
    text = path.read_text()
    names = []

    def replace(match: re.Match) -> str:
        name = match.group("name")
        names.append(name)
        if not (results_dir / f"{name}.json").is_file() and match.group("body").strip():
            return match.group(0)  # measured elsewhere, or never: left as it is
        return match.group(1) + render(name, results_dir) + match.group(4)

    path.write_text(BLOCK.sub(replace, text))
    return names


def main() -> None:
    names = update_markdown()
    missing = [n for n in names if not (RESULTS_DIR / f"{n}.json").is_file()]
    print(f"updated {BENCHMARKS_MD.relative_to(REPO)}: {', '.join(names)}"
          + (f" (no results yet for {', '.join(missing)})" if missing else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
