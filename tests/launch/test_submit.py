"""Ray Jobs submission: token lookup, packing a recipe with its files, and (slow) a real
token-protected Ray cluster of our own that runs, reports, streams and stops jobs."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from medrl.align.records import UserError
from medrl.launch import preflight as pf
from medrl.launch import submit as sub
from medrl.launch.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


# ----------------------------------------------------------------------------- token lookup


@pytest.fixture
def no_token_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return tmp_path / "home"


def test_token_sources_in_ray_order(no_token_env, monkeypatch, tmp_path):
    assert sub.resolve_token(None) is None
    assert sub.auth_headers(None) == {}
    default = no_token_env / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("from-home\n")
    assert sub.resolve_token(None) == "from-home"
    custom = tmp_path / "tok"
    custom.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(custom))
    assert sub.resolve_token(None) == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sub.resolve_token(None) == "from-env"
    assert sub.resolve_token("given") == "given"
    assert sub.auth_headers(sub.resolve_token("given")) == {"Authorization": "Bearer given"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):
        sub.resolve_token(None)


# ----------------------------------------------------------------------------- packing


def make_recipe(tmp_path: Path, **extra) -> Path:
    """A recipe whose data file names an image beside it, with a reward plugin file."""
    project = tmp_path / "project"
    (project / "data" / "images").mkdir(parents=True)
    (project / "data" / "items.jsonl").write_text(
        '{"question": "Which?", "options": ["a", "b"], "answer": "A", "image": "images/x.png"}\n')
    (project / "data" / "images" / "x.png").write_bytes(b"\x89PNG fake")
    (project / "plugins").mkdir()
    (project / "plugins" / "my_reward.py").write_text("def score(sample):\n    return 1.0\n")
    recipe = {"run": {"name": "t", "output_dir": "runs"},
              "data": {"path": "data/items.jsonl", "fields": {"images": "image"}},
              "rewards": {"functions": [{"name": "plugins/my_reward.py:score"},
                                        {"name": "mcq_letter"}]}, **extra}
    path = project / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_pack_ships_local_files_and_rewrites_paths(tmp_path):
    model = tmp_path / "my-model"  # a local Hugging Face folder (its content is not read here)
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    recipe = make_recipe(tmp_path, model={"policy": str(model)})
    out = tmp_path / "packed"
    out.mkdir()
    packed = sub.pack_recipe(recipe, ["rollout.group_size=2", "data.path=data/items.jsonl",
                                      "rewards.functions=[{name: plugins/my_reward.py:score}, "
                                      "{name: mcq_letter}]"], out)

    assert packed.recipe_name == "recipe.yaml"
    assert packed.overrides == ["rollout.group_size=2"]  # path overrides are baked in
    shipped = yaml.safe_load((out / "recipe.yaml").read_text())
    assert shipped["data"]["path"] == "data/items.jsonl"
    assert (out / "data" / "images" / "x.png").read_bytes() == b"\x89PNG fake"  # media kept beside
    assert shipped["rewards"]["functions"][0]["name"] == "rewards/0_my_reward.py:score"
    assert (out / "rewards" / "0_my_reward.py").read_text().startswith("def score")
    assert shipped["rewards"]["functions"][1]["name"] == "mcq_letter"  # registered: untouched
    assert shipped["model"]["policy"] == "model"
    assert (out / "model" / "config.json").is_file()
    assert shipped["rollout"]["group_size"] == 2  # typed by the schema when folded in
    assert any("run.output_dir" in n for n in packed.notes)
    assert dict(packed.files)["data/images/x.png"] == len(b"\x89PNG fake")
    assert packed.size == sum(size for _, size in packed.files) > 0
    assert "recipe.yaml" not in dict(packed.files)
    summary = packed.summary(limit=2)
    assert summary.startswith(f"uploading {len(packed.files)} file(s)")
    assert "64 MiB limit" in summary
    assert f"and {len(packed.files) - 2} more" in summary
    # the shipped folder is a valid recipe on its own, wherever it lands
    moved = shutil.copytree(out, tmp_path / "elsewhere")
    assert load_recipe(moved / "recipe.yaml").rollout.group_size == 2


def test_pack_leaves_cluster_paths_and_rejects_missing_ones(tmp_path):
    recipe = make_recipe(tmp_path)
    out = tmp_path / "a"
    out.mkdir()
    packed = sub.pack_recipe(recipe, ["data.eval_path=/cluster/shared/eval.jsonl",
                                      "run.output_dir=/cluster/runs"], out)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["data"]["eval_path"] == \
        "/cluster/shared/eval.jsonl"
    assert any("/cluster/shared/eval.jsonl" in n and "cluster must see" in n for n in packed.notes)
    assert not any("run.output_dir" in n for n in packed.notes)

    out = tmp_path / "b"
    out.mkdir()
    with pytest.raises(UserError, match="data.path: 'nope.jsonl' does not exist"):
        sub.pack_recipe(recipe, ["data.path=nope.jsonl"], out)
    with pytest.raises(UserError, match="rollout.group_size"):
        sub.pack_recipe(recipe, ["rollout.group_size=zero"], out)
    (recipe.parent / "plugins" / "my_reward.py").unlink()
    with pytest.raises(UserError, match="rewards.functions.0.name: reward file"):
        sub.pack_recipe(recipe, [], out)


def packed_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_recipe(folder: Path, data: dict, **extra) -> Path:
    path = folder / "recipe.yaml"
    rewards = {"functions": [{"name": "mcq_letter"}]}
    path.write_text(yaml.safe_dump({"run": {"name": "t", "output_dir": "/cluster/runs"},
                                    "data": data, "rewards": rewards, **extra}))
    return path


def test_pack_ships_exactly_the_named_files_from_the_temp_folder(tmp_path):
    temp = Path(tempfile.gettempdir())
    name = f"medrl-pack-test-{os.getpid()}-{secrets.token_hex(4)}"
    data, image = temp / f"{name}.jsonl", temp / f"{name}.png"
    data.write_text(json.dumps({"question": "Q?", "options": ["a", "b"], "answer": "A",
                                "image": image.name}) + "\n")
    image.write_bytes(b"\x89PNG fake")
    out = Path(tempfile.mkdtemp(prefix="medrl-submit-"))  # where medrl submit packs
    try:
        recipe = write_recipe(tmp_path, {"path": str(data), "fields": {"images": "image"}})
        packed = sub.pack_recipe(recipe, [], out)
        assert packed_files(out) == sorted(["recipe.yaml", f"data/{data.name}",
                                            f"data/{image.name}"])
        shipped = yaml.safe_load((out / "recipe.yaml").read_text())
        assert shipped["data"]["path"] == f"data/{data.name}"
        assert (out / "data" / image.name).read_bytes() == b"\x89PNG fake"
        assert packed.notes == []
    finally:
        shutil.rmtree(out)
        data.unlink()
        image.unlink()


def test_pack_keeps_the_layout_of_media_beside_and_above_the_data_file(tmp_path):
    project = tmp_path / "project"
    (project / "data" / "split").mkdir(parents=True)
    (project / "scans").mkdir()
    (project / "scans" / "a.npy").write_bytes(b"volume")
    (project / "data" / "split" / "b.png").write_bytes(b"image")
    (project / "data" / "split" / "unnamed.png").write_bytes(b"not named by any row")
    rows = [{"question": "Q?", "options": ["a", "b"], "img": ["b.png", "/cluster/c.png"],
             "vol": "../../scans/a.npy"}]
    (project / "data" / "split" / "items.jsonl").write_text(json.dumps(rows[0]) + "\n")
    recipe = write_recipe(project, {"path": "data/split/items.jsonl",
                                    "fields": {"images": "img", "volume": "vol"}})
    out = tmp_path / "out"
    out.mkdir()
    packed = sub.pack_recipe(recipe, [], out)
    assert packed_files(out) == ["data/data/split/b.png", "data/data/split/items.jsonl",
                                 "data/scans/a.npy", "recipe.yaml"]
    shipped = yaml.safe_load((out / "recipe.yaml").read_text())
    assert shipped["data"]["path"] == "data/data/split/items.jsonl"
    assert any("1 image/volume path(s) in the rows are absolute" in n for n in packed.notes)
    # the shipped rows find their media from the shipped data file
    assert (out / "data/data/split" / rows[0]["vol"]).resolve().read_bytes() == b"volume"


def sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_pack_counts_the_files_symbolic_links_point_to(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "items.jsonl").write_text(
        '{"question": "Q?", "options": ["a", "b"], "image": "images/big.png"}\n')
    sparse(tmp_path / "elsewhere" / "big.png", 70 << 20)
    (project / "data" / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    recipe = write_recipe(project, {"path": "data/items.jsonl", "fields": {"images": "image"}})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=r"data.path: 'data/items.jsonl' is 70.0 MiB with the 1 "
                                        r"media file.*over the 64 MiB"):
        sub.pack_recipe(recipe, [], out)
    assert packed_files(out) == []  # refused before anything was copied
    # A model folder linked in: relative, refused; absolute, left for the cluster with a note.
    sparse(tmp_path / "weights" / "model.safetensors", 40 << 20)
    sparse(tmp_path / "weights" / "shard-2.safetensors", 40 << 20)
    (project / "model").symlink_to(tmp_path / "weights", target_is_directory=True)
    text_only = {"path": "data/items.jsonl"}
    with pytest.raises(UserError, match=r"model.policy: 'model' is 80.0 MiB"):
        sub.pack_recipe(write_recipe(project, text_only, model={"policy": "model"}), [], out)
    packed = sub.pack_recipe(write_recipe(project, text_only,
                                          model={"policy": str(project / "model")}), [], out)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"]["policy"] == \
        str(project / "model")
    assert any("model.policy" in n and "80.0 MiB" in n and "cluster must see" in n
               for n in packed.notes)
    assert packed_files(out) == ["data/items.jsonl", "recipe.yaml"]


def test_pack_refuses_broken_links_and_missing_media(tmp_path):
    project = tmp_path / "project"
    (project / "data" / "images").mkdir(parents=True)
    (project / "data" / "items.jsonl").write_text(
        '{"question": "Q?", "options": ["a", "b"], "image": "images/gone.png"}\n')
    (project / "data" / "images" / "gone.png").symlink_to(tmp_path / "deleted.png")
    with_images = {"path": "data/items.jsonl", "fields": {"images": "image"}}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=r"data.path: .*gone.png is a symbolic link to "
                                        r"'.*deleted.png', which does not exist"):
        sub.pack_recipe(write_recipe(project, with_images), [], out)
    (project / "data" / "images" / "gone.png").unlink()
    with pytest.raises(UserError, match=r"data.path: row 0: data.fields.images \(column "
                                        r"'image'\) names 'images/gone.png', which is not at"):
        sub.pack_recipe(write_recipe(project, with_images), [], out)
    (project / "model").mkdir()
    (project / "model" / "config.json").write_text("{}")
    (project / "model" / "tokenizer.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(UserError, match=r"model.policy: .*tokenizer.json is a symbolic link"):
        sub.pack_recipe(write_recipe(project, {"path": "data/items.jsonl"},
                                     model={"policy": "model"}), [], out)
    (project / "model" / "tokenizer.json").unlink()
    (project / "model" / "loop").symlink_to(project / "model", target_is_directory=True)
    with pytest.raises(UserError, match=r"model.policy: .*loop links back to"):
        sub.pack_recipe(write_recipe(project, {"path": "data/items.jsonl"},
                                     model={"policy": "model"}), [], out)
    assert packed_files(out) == []


# ----------------------------------------------------------------------------- preflight


def test_version_rule_same_major_minor_or_exact():
    assert pf.version_ok("0.1.0", "0.1.7") and not pf.version_ok("0.1.0", "0.2.0")
    assert not pf.version_ok("1.1.0", "0.1.0")
    assert pf.version_ok("0.1.0", "0.1.0", strict=True)
    assert not pf.version_ok("0.1.0", "0.1.7", strict=True)


GOOD = {"python": "3.11.7", "executable": "/opt/venv/bin/python", "ray": "2.60.0",
        "medrl": "0.1.3", "medrl_at": "/opt/venv/medrl/launch/cli.py",
        "resources": {"CPU": 8.0, "GPU": 1.0}}


def test_preflight_problems_say_what_is_missing_and_how_to_fix_it():
    asked = {"CPU": 2.0, "GPU": 1.0}
    assert pf.problems(GOOD, asked, "0.1.0") == []
    assert pf.problems(GOOD, asked, "0.1.0", strict=True)  # 0.1.3 is not 0.1.0
    missing = {k: v for k, v in GOOD.items() if k not in ("medrl", "medrl_at")}
    missing["medrl_error"] = "ModuleNotFoundError: No module named 'medrl.launch'"
    found = pf.problems(missing, asked, "0.1.0")
    text = str(pf.refusal(found, shipped=False))
    assert "was not submitted" in text and "/opt/venv/bin/python" in text
    assert "cannot import medrl" in text and "No module named 'medrl.launch'" in text
    assert "install medrl" in text and "--ship" in text and "--no-preflight" in text
    older = dict(GOOD, medrl="0.0.9")
    text = str(pf.refusal(pf.problems(older, asked, "0.1.0"), shipped=False))
    assert "medrl 0.0.9" in text and "medrl 0.1.0" in text and "major.minor" in text
    short = pf.problems(GOOD, {"CPU": 2.0, "GPU": 4.0}, "0.1.0")
    assert short == [pf.problems(GOOD, {"GPU": 4.0}, "0.1.0")[0]]
    assert "4 GPU (the cluster has 1)" in short[0] and "num_workers" in short[0]
    assert "--ship" not in str(pf.refusal(short, shipped=False))  # not a medrl problem
    no_ray = {k: v for k, v in GOOD.items() if k not in ("ray", "resources")}
    assert any("cannot import Ray" in p for p in pf.problems(no_ray, asked, "0.1.0"))
    # Ray imports but the check job cannot join the cluster: refused, not a skipped check
    unjoined = {k: v for k, v in GOOD.items() if k != "resources"}
    unjoined["ray_error"] = "ConnectionError: could not reach the GCS"
    found = pf.problems(unjoined, asked, "0.1.0")
    assert len(found) == 1 and "could not read the cluster's resources" in found[0]
    assert "could not reach the GCS" in found[0]
    report = pf.parse_report("setup\nMEDRL_PREFLIGHT_NO_PYTHON /usr/bin:/bin\n")
    assert "MEDRL_PYTHON" in pf.problems(report, asked, "0.1.0")[0]
    assert pf.parse_report("noise\n" + pf.MARKER + '{"python": "3.11"}\n') == {"python": "3.11"}
    assert pf.parse_report("no report") is None


def test_job_entrypoint_is_a_python_invocation():
    assert pf.job_entrypoint(["run", "my recipe.yaml", "a.b=1"], "/opt/venv/bin/python") == \
        "/opt/venv/bin/python -m medrl.launch.cli run 'my recipe.yaml' a.b=1"
    # without a preflight the shell finds the interpreter itself (here: MEDRL_PYTHON)
    command = pf.job_entrypoint(["--help"]).replace("medrl.launch.cli --help", "platform")
    env = {"PATH": "/usr/bin:/bin", "MEDRL_PYTHON": sys.executable}
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "Linux" in proc.stdout, proc.stderr


def test_resources_asked_counts_every_actor():
    recipe = load_recipe(QUICKSTART, ["rollout.num_workers=2", "learner.num_workers=2",
                                      "cluster.learner_gpus=1", "cluster.rollout_gpus=0.5",
                                      "cluster.learner_resources={slot: 1}"])
    asked = pf.resources_asked(recipe)
    assert asked["GPU"] == 3.0 and asked["slot"] == 2.0 and asked["CPU"] >= 4.0


def test_shipped_package_is_the_one_the_cluster_imports(tmp_path):
    """The staged folders, put on PYTHONPATH as Ray puts py_modules, win over an installed
    medrl, and report this machine's version."""
    dirs = pf.stage_package(tmp_path)
    assert [Path(d).name for d in dirs] == ["medrl", f"medrl-{pf.local_version()}.dist-info"]
    assert (tmp_path / "medrl" / "launch" / "cli.py").is_file()
    assert (tmp_path / "medrl" / "recipes" / "quickstart.yaml").is_file()
    assert not list(tmp_path.rglob("__pycache__"))
    probe = ("import importlib.util as u, importlib.metadata as m; "
             "print(u.find_spec('medrl.launch.cli').origin); print(m.version('medrl'))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=60)
    origin, version = proc.stdout.split()
    assert origin == str(tmp_path / "medrl" / "launch" / "cli.py") and \
        version == pf.local_version()


def test_run_progress_reads_the_run_folder(tmp_path):
    run = tmp_path / "quickstart"
    assert "cannot see" in sub.run_progress(str(run))
    assert "relative" in sub.run_progress(None)
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000004").mkdir()  # being written: no COMPLETE yet
    assert "no step logged yet; last complete checkpoint: none yet" in sub.run_progress(str(run))
    (run / "checkpoints" / "step-000002" / "COMPLETE").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 3}\n{"step": 4}\n')
    assert sub.run_progress(str(run)).endswith(
        "step 4; last complete checkpoint: step-000002 (step 2)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_says_what_to_do():
    with pytest.raises(UserError, match="cannot reach the Ray dashboard.*--address"):
        sub.status("raysubmit_x", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match="not the Ray client port"):
        sub.status("raysubmit_x", "ray://127.0.0.1:10001")


# ----------------------------------------------------------------------------- transport


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "127.0.0.1:8265", "localhost:8265",
                                     "http://[::1]:8265", "https://head.example.org:8443",
                                     "https://10.0.0.5:8265"])
def test_loopback_and_https_addresses_need_nothing(address):
    assert sub.check_transport(address) is None


@pytest.mark.parametrize("address", ["http://10.0.0.5:8265", "10.0.0.5:8265",
                                     "http://head.example.org:8265", "http://0.0.0.0:8265"])
def test_plain_http_to_another_machine_needs_allow_remote(address):
    with pytest.raises(UserError, match="plain HTTP to another machine") as refused:
        sub.check_transport(address)
    assert "--allow-remote" in str(refused.value) and "ssh -L" in str(refused.value)
    assert "allowed by --allow-remote" in sub.check_transport(address, allow_remote=True)


def test_submit_refuses_plain_http_before_packing_or_connecting(tmp_path, monkeypatch):
    packed = []
    monkeypatch.setattr(sub, "pack_recipe", lambda *a, **k: packed.append(a))
    with pytest.raises(UserError, match="--allow-remote"):
        sub.submit(make_recipe(tmp_path), "http://10.0.0.5:8265")
    with pytest.raises(UserError, match="--allow-remote"):
        sub.submit_entrypoint("http://10.0.0.5:8265", "echo hi")
    assert packed == []
    # allowed: a loud warning, then the usual path (here: the dashboard is unreachable)
    with pytest.warns(sub.RemoteExposureWarning, match="unencrypted"), \
            pytest.raises(UserError, match="cannot reach the Ray dashboard"):
        sub.submit_entrypoint("http://0.0.0.0:1", "echo hi", allow_remote=True)


def test_cli_submit_allow_remote_flag(tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    sub.register(app)
    missing = str(tmp_path / "missing.yaml")
    result = CliRunner().invoke(app, ["submit", missing, "--address", "http://10.0.0.5:8265"])
    assert result.exit_code == 2 and "--allow-remote" in result.output
    assert "recipe file not found" not in result.output  # refused before reading anything
    result = CliRunner().invoke(app, ["submit", missing, "--address", "http://10.0.0.5:8265",
                                      "--allow-remote"])
    assert result.exit_code == 2 and "warning:" in result.output
    assert "plain HTTP to another machine" in result.output
    assert "recipe file not found" in result.output  # then it went on to pack the recipe


# ----------------------------------------------------------------------------- a real cluster


def _own_processes(temp_dir: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in part for part in (proc.info["cmdline"] or [])):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A one-node Ray cluster of our own with token authentication on.

    It runs in its own session (process group) with its own ports and --temp-dir, so it never
    meets the in-process test cluster. `ray stop` is not used: it stops every Ray process on
    the machine. Instead `ray start --block` is terminated (it shuts its node down) and any
    process still naming our temp dir is killed by pid.
    """
    temp_dir = str(tmp_path_factory.mktemp("ray"))
    token = secrets.token_hex(16)
    ports = [free_port() for _ in range(7)]
    address = f"http://127.0.0.1:{ports[1]}"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(
        [str(Path(bin_dir) / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=3",
         f"--port={ports[0]}", f"--dashboard-port={ports[1]}",
         f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
         f"--metrics-export-port={ports[4]}", f"--ray-client-server-port={ports[5]}",
         f"--runtime-env-agent-port={ports[6]}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n"
                            + (Path(temp_dir) / "ray_start.log").read_text()[-3000:])
            try:
                sub.status("raysubmit_probe", address, token=token)
            except UserError as exc:
                if "no job" in str(exc):  # the Jobs API answers: the cluster is up
                    break
                if time.monotonic() > deadline:
                    raise
            time.sleep(1)
        yield address, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            proc.wait()
        for leftover in _own_processes(temp_dir):
            leftover.kill()
        log.close()


def wait_for(address, token, job_id, states, timeout=240):
    deadline = time.monotonic() + timeout
    while True:
        info = sub.status(job_id, address, token=token)
        if info["status"] in states:
            return info
        assert time.monotonic() < deadline, f"job {job_id} stuck in {info}"
        time.sleep(1)


@pytest.mark.slow
def test_submit_validate_job(token_cluster, tmp_path):
    address, token = token_cluster
    recipe = tmp_path / "recipes" / "quickstart.yaml"
    shutil.copytree(QUICKSTART.parent, recipe.parent, ignore=shutil.ignore_patterns("__*"))
    notes = []
    job_id = sub.submit(recipe, address, ["rollout.group_size=3"], command="validate",
                        token=token, on_note=notes.append)
    assert job_id.startswith("raysubmit_")
    info = wait_for(address, token, job_id, {"SUCCEEDED", "FAILED", "STOPPED"})
    text = "".join(sub.logs(job_id, address, token=token))
    assert info["status"] == "SUCCEEDED", text[-3000:]
    # the preflight found the interpreter the cluster's Ray runs (here this virtualenv's)
    assert info["entrypoint"] == \
        f"{sys.executable} -m medrl.launch.cli validate quickstart.yaml rollout.group_size=3"
    assert "group_size: 3" in text and "is valid" in text
    assert any("run.output_dir" in n for n in notes)
    # following a finished job replays its output and ends
    assert "is valid" in "".join(sub.logs(job_id, address, token=token, follow=True))


# The job's PATH as a cluster started with a virtualenv's `ray` binary, not activated, has it.
BARE_PATH = {"PATH": "/usr/bin:/bin"}


def medrl_jobs(address, token) -> list[str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers=sub.auth_headers(token))
    return [j.submission_id for j in client.list_jobs() if "medrl.launch.cli" in j.entrypoint]


@pytest.mark.slow
def test_submit_a_training_run(token_cluster, tmp_path, monkeypatch):
    """`medrl run` as a job on a cluster whose PATH has no medrl and no python, shipping medrl:
    the job's driver joins the job's cluster and trains there; status reads the run folder."""
    import typer
    from typer.testing import CliRunner

    address, token = token_cluster
    recipe = tmp_path / "recipes" / "quickstart.yaml"
    shutil.copytree(QUICKSTART.parent, recipe.parent, ignore=shutil.ignore_patterns("__*"))
    out = tmp_path / "runs"
    notes = []
    job_id = sub.submit(recipe, address, [
        f"run.output_dir={out}", "run.max_steps=2", "rollout.prompts_per_step=2",
        "rollout.group_size=2", "rollout.max_new_tokens=4", "logging.progress=false"],
        command="run", token=token, env_vars=BARE_PATH, ship=True, on_note=notes.append)
    assert any(n.startswith("uploading ") and "quickstart_mcq.jsonl" in n for n in notes)
    assert any("shipping this machine's medrl" in n for n in notes)
    info = wait_for(address, token, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}, timeout=300)
    text = "".join(sub.logs(job_id, address, token=token))
    assert info["status"] == "SUCCEEDED", text[-3000:]
    assert info["entrypoint"].startswith(f"{sys.executable} -m medrl.launch.cli run ")
    assert (out / "quickstart" / "checkpoints" / "step-000002" / "COMPLETE").exists()
    rows = (out / "quickstart" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    app = typer.Typer()
    sub.register(app)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    result = CliRunner().invoke(app, ["status", job_id, "--address", address])
    assert result.exit_code == 0, result.output
    assert "step 2; last complete checkpoint: step-000002 (step 2)" in result.output


@pytest.mark.slow
def test_preflight_refuses_and_submits_nothing(token_cluster, tmp_path, monkeypatch):
    """No medrl for the cluster's Python, another medrl version, too few GPUs: refused with
    one clear paragraph, and no medrl job on the cluster."""
    import typer
    from typer.testing import CliRunner

    address, token = token_cluster
    before = medrl_jobs(address, token)
    # A cluster Python without medrl: this one, with the editable install's import hooks
    # removed at start-up by a sitecustomize first on the path.
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
        "getattr(f, '__module__', '')]\n"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n")
    with pytest.raises(UserError, match="cannot import medrl") as refused:
        sub.submit(QUICKSTART, address, ["run.output_dir=/tmp/medrl-never"], token=token,
                   env_vars={**BARE_PATH, "PYTHONPATH": str(tmp_path / "hide")})
    assert "--ship" in str(refused.value) and "install medrl" in str(refused.value)
    assert sys.executable in str(refused.value)  # the interpreter it looked in
    # Another version's metadata first on the path: medrl 9.9.0 is not 0.1's major.minor.
    (tmp_path / "other" / "medrl-9.9.0.dist-info").mkdir(parents=True)
    (tmp_path / "other" / "medrl-9.9.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: medrl\nVersion: 9.9.0\n")
    with pytest.raises(UserError, match=r"has medrl 9\.9\.0 .*this machine's medrl "
                                        + pf.local_version().replace(".", r"\.")):
        sub.submit(QUICKSTART, address, ["run.output_dir=/tmp/medrl-never"], token=token,
                   env_vars={**BARE_PATH, "PYTHONPATH": str(tmp_path / "other")})
    # Through the CLI: a GPU the cluster does not have; exit 2 and no job id printed.
    app = typer.Typer()
    sub.register(app)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    result = CliRunner().invoke(app, ["submit", str(QUICKSTART), "cluster.learner_gpus=1",
                                      "run.output_dir=/tmp/medrl-never", "--address", address])
    assert result.exit_code == 2, result.output
    assert "preflight" in result.output and "1 GPU (the cluster has 0)" in result.output
    assert "raysubmit_" not in result.output
    assert medrl_jobs(address, token) == before


@pytest.mark.slow
def test_stop_a_running_job_and_stream_it(token_cluster):
    address, token = token_cluster
    job_id = sub.submit_entrypoint(address, "echo started; sleep 300", token=token)
    stream = sub.logs(job_id, address, token=token, follow=True)
    seen = ""
    while "started" not in seen:  # streamed while the job runs
        seen += next(stream)
    assert sub.status(job_id, address, token=token)["status"] == "RUNNING"
    assert sub.stop(job_id, address, token=token) is True
    final = wait_for(address, token, job_id, {"STOPPED", "FAILED", "SUCCEEDED"})
    assert final["status"] == "STOPPED"
    for _ in stream:  # the stream ends once the job has ended
        pass
    assert sub.stop(job_id, address, token=token) is False


@pytest.mark.slow
def test_auth_and_unknown_job_errors(token_cluster, no_token_env):
    address, token = token_cluster
    with pytest.raises(UserError, match="rejected the authentication token") as wrong:
        sub.status("raysubmit_x", address, token="not-the-token")
    assert "--token" in str(wrong.value)
    # without any token the cluster refuses; the message says how to pass one
    # (an in-process Ray may still offer its own token, which this cluster rejects)
    with pytest.raises(UserError, match="--token") as missing:
        sub.status("raysubmit_x", address)
    assert "RAY_AUTH_TOKEN" in str(missing.value)
    with pytest.raises(UserError, match="no job 'raysubmit_x'.*ray job list"):
        sub.status("raysubmit_x", address, token=token)
    with pytest.raises(UserError, match="no job"):
        "".join(sub.logs("raysubmit_x", address, token=token, follow=True))
    with pytest.raises(UserError, match="no job"):
        sub.stop("raysubmit_x", address, token=token)


@pytest.mark.slow
def test_cli_commands(token_cluster, monkeypatch):
    import typer
    from typer.testing import CliRunner

    address, token = token_cluster
    app = typer.Typer()
    sub.register(app)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    runner = CliRunner()
    result = runner.invoke(app, ["status", "raysubmit_nope", "--address", address])
    assert result.exit_code == 2 and "no job" in result.output
    job_id = sub.submit_entrypoint(address, "echo cli-check", token=token)
    wait_for(address, token, job_id, {"SUCCEEDED"})
    result = runner.invoke(app, ["status", job_id, "--address", address])
    assert result.exit_code == 0 and f"{job_id}: SUCCEEDED" in result.output
    result = runner.invoke(app, ["logs", job_id, "--address", address])
    assert result.exit_code == 0 and "cli-check" in result.output
    result = runner.invoke(app, ["stop", job_id, "--address", address])
    assert result.exit_code == 0 and "not running" in result.output


@pytest.mark.slow
def test_an_embedded_cluster_starts_beside_a_running_one(tmp_path):
    """`ray start` records its cluster under RAY_TMPDIR, where a bare ray.init() finds and
    joins it (and then refuses num_cpus); medrl's embedded cluster is a new one all the same."""
    ports = [free_port() for _ in range(7)]
    raytmp = Path(tempfile.mkdtemp(prefix="medrl-ray-"))  # short: Ray socket paths max 107 chars
    env = dict(os.environ, RAY_TMPDIR=str(raytmp), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", MEDRL_CACHE=str(tmp_path / "cache"),
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run(
            [ray, "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--include-dashboard=false", f"--port={ports[0]}", f"--dashboard-port={ports[1]}",
             f"--dashboard-agent-listen-port={ports[2]}",
             f"--dashboard-agent-grpc-port={ports[3]}", f"--metrics-export-port={ports[4]}",
             f"--ray-client-server-port={ports[5]}", f"--runtime-env-agent-port={ports[6]}",
             "--disable-usage-stats"], env=env, capture_output=True, check=True, timeout=180)
        assert list(raytmp.rglob("ray_current_cluster"))
        data = REPO / "recipes" / "data" / "quickstart_mcq.jsonl"
        proc = subprocess.run([sys.executable, "-m", "medrl.launch.cli", "eval", "tiny:qwen2",
                               "-d", str(data), "--max-samples", "2", "--out",
                               str(tmp_path / "ev")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((tmp_path / "ev" / "results.json").read_text())
        assert results["datasets"]["quickstart_mcq"]["n"] == 2
    finally:  # not `ray stop`: it stops every Ray process on the machine
        for leftover in _own_processes(str(raytmp)):
            leftover.kill()
        shutil.rmtree(raytmp, ignore_errors=True)
