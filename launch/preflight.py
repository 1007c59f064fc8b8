"""Before a recipe is submitted: which Python the cluster runs jobs with, whether medrl is
importable there (and its version), and whether the cluster has the resources the recipe asks
for; and ``--ship``: medrl itself uploaded with the job.

The interpreter. Ray runs a job's entrypoint through ``/bin/sh`` on the head node, with the
``PATH`` of whoever started the cluster: a cluster started with a virtualenv's ``ray`` binary,
the environment not activated, finds neither ``medrl`` nor a ``python`` that has Ray on it. So
the entrypoint never names a program looked up on ``PATH``. The shell resolves the Python Ray
itself runs its workers with (the ``--python_worker_command`` of the raylet, the parent of the
job's supervisor process), unless ``MEDRL_PYTHON`` names one; the preflight job reports that
interpreter's absolute path and the real job runs ``/that/python -m medrl.launch.cli ...``.
Assumptions: Linux nodes (``/proc``), and the job's entrypoint on the head node (Ray's default
when no entrypoint resources are asked for), where the preflight ran.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from medrl.align.records import UserError

MARKER = "MEDRL_PREFLIGHT "
NO_PYTHON = "MEDRL_PREFLIGHT_NO_PYTHON "

# POSIX shell (dash): set PY to the interpreter of the cluster's Ray workers.
FIND_PYTHON = (
    'PY="${MEDRL_PYTHON:-}"; if [ -z "$PY" ]; then '
    "gp=$(sed 's/.*) //' /proc/$PPID/stat 2>/dev/null | cut -d' ' -f2); "
    "PY=$(tr '\\0' '\\n' < /proc/$gp/cmdline 2>/dev/null "
    "| sed -n 's/^--python_worker_command=\\([^ ]*\\).*/\\1/p'); fi; "
    '[ -n "$PY" ] || PY=$(command -v python3 || command -v python)'
)

# Run by the cluster's interpreter; prints one MARKER line of JSON. Cheap: medrl is located,
# not imported (its import pulls in torch); Ray is joined only to read the cluster's resources.
# Its excepts report, they do not hide: each error goes into the JSON, and :func:`problems`
# turns it into a refusal naming it.
PROBE = """
import importlib.util, json, platform, sys
r = {"python": platform.python_version(), "executable": sys.executable}
try:
    spec = importlib.util.find_spec("medrl.launch.cli")
    if spec is None:
        raise ImportError("no module named medrl.launch.cli")
    r["medrl_at"] = str(spec.origin)
    from importlib import metadata
    r["medrl"] = metadata.version("medrl")
except Exception as e:
    r["medrl_error"] = type(e).__name__ + ": " + str(e)[:200]
try:
    import ray
    r["ray"] = ray.__version__
    ray.init(logging_level="ERROR", log_to_driver=False)
    r["resources"] = {k: v for k, v in ray.cluster_resources().items()
                      if not k.startswith("node:") and k != "object_store_memory"}
    ray.shutdown()
except Exception as e:
    r["ray_error"] = type(e).__name__ + ": " + str(e)[:200]
print("MEDRL_PREFLIGHT " + json.dumps(r), flush=True)
"""

FIX = ("Either install medrl (the same major.minor version) in the cluster's Python "
       "environment, on every node's image, or ship it with the job: `medrl submit --ship ...`")


def probe_entrypoint() -> str:
    """The preflight job's shell command: find the interpreter, then run :data:`PROBE`."""
    return (f'{FIND_PYTHON}; if [ -z "$PY" ]; then echo "{NO_PYTHON}$PATH"; '
            f'else "$PY" -c {shlex.quote(PROBE)}; fi')


def job_entrypoint(args: list[str], python: str | None = None) -> str:
    """``python -m medrl.launch.cli ARGS``: with ``python`` (an absolute path on the head
    node, from the preflight) as it is, else the interpreter found by :data:`FIND_PYTHON`."""
    if python:
        return shlex.join([python, "-m", "medrl.launch.cli", *args])
    return f'{FIND_PYTHON}; exec "$PY" -m medrl.launch.cli {shlex.join(args)}'


def local_version() -> str:
    return metadata.version("medrl")


def version_ok(mine: str, theirs: str, strict: bool = False) -> bool:
    """The same ``major.minor`` (``strict``: the exact version string)."""
    if strict:
        return mine == theirs
    return mine.split(".")[:2] == theirs.split(".")[:2]


def resources_asked(recipe) -> dict[str, float]:
    """Logical CPUs, GPUs and custom resources the recipe's actors reserve in all."""
    from medrl.launch.cluster import cpus_needed, resources_needed

    c = recipe.cluster
    gpus = recipe.rollout.num_workers * c.rollout_gpus + recipe.learner.num_workers * c.learner_gpus
    asked = {"CPU": cpus_needed(recipe), **resources_needed(recipe)}
    if gpus:
        asked["GPU"] = gpus
    return asked


def parse_report(text: str) -> dict[str, Any] | None:
    """The probe's JSON report from the preflight job's output (None when it printed none)."""
    for line in reversed(text.splitlines()):
        if line.startswith(NO_PYTHON):
            return {"no_python": line[len(NO_PYTHON):]}
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return None


def problems(report: dict[str, Any], asked: dict[str, float], mine: str, *,
             strict: bool = False) -> list[str]:
    """What stops the recipe from running on the cluster the report describes ([] if nothing)."""
    if "no_python" in report:
        return [f"the cluster's job shell finds no Python (PATH={report['no_python']}); set "
                "MEDRL_PYTHON=/path/to/python in the environment the cluster is started with"]
    where = f"the cluster's Python ({report.get('executable')}, Python {report.get('python')})"
    found: list[str] = []
    if "ray" not in report:
        found.append(f"{where} cannot import Ray ({report.get('ray_error')})")
    elif "resources" not in report:  # Ray imports but the check job could not join it
        found.append(f"{where} imports Ray {report['ray']} but could not read the cluster's "
                     f"resources ({report.get('ray_error')})")
    if "medrl" not in report:
        found.append(f"{where} cannot import medrl ({report.get('medrl_error')})")
    elif not version_ok(mine, report["medrl"], strict):
        rule = "exactly" if strict else "the same major.minor as"
        found.append(f"{where} has medrl {report['medrl']} ({report.get('medrl_at')}), and "
                     f"this machine's medrl {mine} needs {rule} it")
    have = report.get("resources") or {}
    short = [f"{amount:g} {name} (the cluster has {have.get(name, 0):g})"
             for name, amount in sorted(asked.items()) if amount > have.get(name, 0) + 1e-9]
    if "resources" in report and short:
        found.append("the recipe's actors ask for " + ", ".join(short) + "; lower "
                     "rollout/learner num_workers or the cluster.*_cpus / *_gpus, or add nodes")
    return found


def refusal(found: list[str], shipped: bool) -> UserError:
    about_medrl = any("medrl" in p or "Python" in p for p in found)
    fix = "" if shipped or not about_medrl else f" {FIX}."
    return UserError("preflight: the job was not submitted: " + "; ".join(found) + "." + fix
                     + " (--no-preflight skips this check.)")


def run_probe(client, runtime_env: dict[str, Any] | None, timeout: float = 180) -> dict:
    """Run the probe as a small Ray job with the real job's ``runtime_env``; return its report.

    The probe job is deleted afterwards, so it does not crowd the job list.
    """
    job_id = client.submit_job(entrypoint=probe_entrypoint(), runtime_env=runtime_env,
                               metadata={"medrl_preflight": "1"})
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = str(client.get_job_status(job_id))
            if status.rsplit(".", 1)[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise UserError(f"preflight: the check job {job_id} did not finish within "
                                f"{timeout:g} s (is the cluster busy or setting up the "
                                "runtime environment?); look at `medrl logs {job_id}`, or "
                                "pass --no-preflight.")
            time.sleep(0.5)
        text = client.get_job_logs(job_id)
        report = parse_report(text)
        if report is None:
            info = client.get_job_info(job_id)
            tail = "\n".join(text.splitlines()[-5:])
            raise UserError(f"preflight: the check job {job_id} ended {status} without a report "
                            f"({info.message or 'no message'}; last output: {tail!r}); "
                            "pass --no-preflight to submit anyway.")
        client.delete_job(job_id)
        return report
    except RuntimeError as exc:
        raise UserError(f"preflight: the cluster refused the check job: {exc}") from None


# ----------------------------------------------------------------------------- --ship

_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


def stage_package(folder: Path) -> list[str]:
    """Copy this machine's medrl into ``folder`` as ``medrl/`` plus a minimal
    ``medrl-VERSION.dist-info`` (so the cluster reads its version); return the two folders
    for ``runtime_env["py_modules"]``.

    The subpackages are copied from where they are imported here (``medrl.align`` from
    ``align/`` in a source checkout), so editable and wheel installs ship the same layout.
    Only medrl travels: its dependencies (torch, Ray, ...) must be on the cluster.
    """
    import importlib.util

    version = local_version()
    root = folder / "medrl"
    for name in ("align", "rollouts", "rewards", "launch", "recipes"):
        spec = importlib.util.find_spec(f"medrl.{name}")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"--ship: medrl.{name} is not importable on this machine; "
                            "reinstall medrl (pip install -e .).")
        shutil.copytree(list(spec.submodule_search_locations)[0], root / name, ignore=_SKIP)
    info = folder / f"medrl-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: medrl\nVersion: {version}\n")
    return [str(root), str(info)]


def same_ray_minor(report: dict[str, Any]) -> str | None:
    """A note when the cluster's Ray differs from this machine's by more than the patch level."""
    import ray

    theirs = report.get("ray")
    if theirs and re.split(r"\.", theirs)[:2] != ray.__version__.split(".")[:2]:
        return (f"the cluster runs Ray {theirs}, this machine Ray {ray.__version__}; the Jobs "
                "API may not match")
    return None
