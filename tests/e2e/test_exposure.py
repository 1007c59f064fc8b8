"""What a local run exposes to the network: every listening TCP socket of a real `medrl run`
(the driver, its descendants and the Ray processes of its session) is on loopback, and a
dashboard beyond loopback needs `cluster.allow_remote`."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MEDRL = [sys.executable, "-m", "medrl.launch.cli"]
SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")
TINY = ["run.max_steps=3", "rollout.prompts_per_step=2", "rollout.group_size=2",
        "rollout.max_new_tokens=4", "learner.micro_batch_size=4", "checkpoint.every=0",
        "learner.num_workers=2", "learner.zero_stage=2",
        "logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


# ----------------------------------------------------------------------------- the recipe


def test_a_dashboard_beyond_loopback_needs_allow_remote():
    from medrl.launch.cluster import dashboard_exposure
    from medrl.launch.recipe import RecipeError, load_recipe

    quickstart = REPO / "recipes" / "quickstart.yaml"
    for host in ("0.0.0.0", "192.0.2.7", "head.example.org"):
        with pytest.raises(RecipeError, match="cluster.dashboard_host") as refused:
            load_recipe(quickstart, [f"cluster.dashboard_host={host}"])
        assert "cluster.allow_remote: true" in str(refused.value)
    for host in ("127.0.0.1", "localhost", "::1"):
        assert load_recipe(quickstart, [f"cluster.dashboard_host={host}"])
    recipe = load_recipe(quickstart, ["cluster.dashboard_host=0.0.0.0", "cluster.allow_remote=true",
                                      "cluster.include_dashboard=true"])
    warning = dashboard_exposure(recipe.cluster.include_dashboard, recipe.cluster.dashboard_host)
    assert "0.0.0.0" in warning and "Jobs API" in warning
    assert dashboard_exposure(True, "127.0.0.1") is None
    assert dashboard_exposure(False, "0.0.0.0") is None  # no dashboard: nothing listens there


# ----------------------------------------------------------------------------- a real run


def is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or ip).is_loopback


def command_of(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""  # ended between the listing and the look


def run_processes(root):
    """The driver, its descendants, and every process of the Ray session(s) they belong to."""
    import psutil

    found = {root.pid: root}
    try:
        found.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        return {}
    sessions = set()
    for proc in list(found.values()):
        sessions.update(SESSION.findall(command_of(proc)))
    for proc in psutil.process_iter():
        if sessions and any(s in command_of(proc) for s in sessions):
            found[proc.pid] = proc
            try:
                found.update({p.pid: p for p in proc.children(recursive=True)})
            except psutil.Error:
                pass
    return found


def listening(processes) -> dict[tuple[str, int], str]:
    """(address, port) -> the command line of the process listening there."""
    import psutil

    sockets = {}
    for proc in processes.values():
        try:
            command = command_of(proc)[:160]
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    sockets[(conn.laddr.ip, conn.laddr.port)] = command
        except psutil.Error:
            pass  # ended between the listing and the look
    return sockets


@pytest.mark.slow
def test_a_local_run_listens_on_loopback_only(tmp_path):
    import psutil

    env = dict(os.environ, MEDRL_CACHE=str(tmp_path / "cache"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)  # an embedded cluster of its own, not the test session's
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [*MEDRL, "run", str(REPO / "recipes" / "quickstart.yaml"), "run.name=exposure",
         f"run.output_dir={tmp_path / 'runs'}", *TINY],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], str] = {}
    with_actors = 0  # snapshots taken while both kinds of actor were up
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            processes = run_processes(root)
            commands = " ".join(command_of(p) for p in processes.values())
            sockets = listening(processes)
            seen.update(sockets)
            if "LearnerWorker" in commands and "RolloutWorker" in commands:
                with_actors += 1
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-4000:]}"
    assert with_actors >= 2, "never saw the learner and rollout actors running"
    # the collection itself works: Ray's core servers and the driver's own were seen
    commands = " ".join(seen.values())
    assert "raylet" in commands and "gcs_server" in commands and "medrl.launch.cli" in commands
    # the learners' rendezvous store is among them: rank 0 serves it on loopback
    assert any("LearnerWorker" in c for c in seen.values())
    exposed = {f"{ip}:{port}": command for (ip, port), command in seen.items()
               if not is_loopback(ip)}
    assert not exposed, f"listening beyond loopback: {exposed}"
