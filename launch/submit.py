"""Send a recipe to a Ray cluster as a Ray Job, and follow, inspect or stop it.

``medrl submit recipe.yaml --address http://HEAD:8265 key=value ...`` packs a working
folder — the recipe plus the local files it names (:mod:`medrl.launch.pack`) — uploads it
through the Ray Jobs API (``runtime_env={"working_dir": ...}``) and starts ``medrl run
recipe.yaml key=value ...`` on the cluster as ``PYTHON -m medrl.launch.cli run ...``: never
through a ``medrl`` looked up on the cluster's ``PATH`` (:mod:`medrl.launch.preflight` says which
Python). A small preflight job first checks that Python, medrl's version there and the
cluster's resources; ``ship`` (``--ship``) uploads this machine's medrl with the job.

Authentication: Ray 2.60 clusters started with ``ray start`` check a token on every
dashboard request (``RAY_AUTH_MODE=token``). The client sends ``Authorization: Bearer
<token>``; the token comes from ``--token``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (the places Ray itself reads).

Transport: the Jobs API runs whatever it is sent. A plain ``http://`` address on another
machine would carry the token, the recipe and its data unencrypted, open to reading and
tampering on the way, so ``submit`` refuses one unless ``allow_remote`` (``--allow-remote``)
says so, and then warns. ``https://`` and loopback addresses (an SSH tunnel) need nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence

from medrl.align.records import UserError
from medrl.launch.cluster import is_loopback
from medrl.launch.pack import pack_recipe

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_ADDRESS_HELP = ("pass --address http://HEAD_NODE:8265 (or set RAY_ADDRESS), and check that the "
                 "cluster is up (`ray status` on the head node) and its dashboard port is "
                 "reachable")
_TOKEN_HELP = ("pass --token TOKEN, set RAY_AUTH_TOKEN, or copy the head node's ~/.ray/auth_token "
               "to this machine (`ray get-auth-token` on the head node prints it)")


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


# ----------------------------------------------------------------------------- the client


def resolve_token(token: str | None = None) -> str | None:
    """The cluster token, from the first source that has one.

    Order: ``token``, ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``.
    """
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file "
                            f"({exc.strerror}); fix the path or unset it.") from None
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.is_file() else None


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers that carry the token the way Ray's dashboard checks it."""
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextmanager
def _explicit_address():
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given;
    here the address the user passed wins, so hide them while the client is built."""
    names = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _normalise(address: str) -> str:
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise UserError(f"--address {address}: Ray Jobs talk to the dashboard, not the Ray "
                        "client port; use http://HEAD_NODE:8265.")
    return address if "://" in address else f"http://{address}"


class RemoteExposureWarning(UserWarning):
    """A job goes over plain HTTP to another machine (allowed with ``allow_remote``)."""


def check_transport(address: str, allow_remote: bool = False) -> str | None:
    """Refuse plain HTTP to another machine unless ``allow_remote``.

    Returns None for ``https://`` and loopback addresses, the warning to show when a plain
    HTTP remote address is allowed; raises :class:`UserError` when it is not.
    """
    from urllib.parse import urlsplit

    url = _normalise(address)
    parts = urlsplit(url)
    if parts.scheme == "https" or is_loopback(parts.hostname or ""):
        return None
    risk = (f"--address {url} is plain HTTP to another machine: the Ray Jobs API runs any code "
            "it is sent, and the cluster token, the recipe and its data would cross the "
            "network unencrypted, open to reading and tampering on the way")
    if not allow_remote:
        raise UserError(f"{risk}. Use an https:// address (a TLS proxy in front of the "
                        "dashboard), or an SSH tunnel (ssh -L 8265:127.0.0.1:8265 HEAD_NODE, "
                        "then --address http://127.0.0.1:8265), or pass --allow-remote to "
                        "accept the risk.")
    return f"{risk} (allowed by --allow-remote)."


def _client(address: str, token: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = _normalise(address)
    try:
        with _explicit_address():
            return JobSubmissionClient(address, headers=auth_headers(resolve_token(token)))
    except AuthenticationError as exc:
        raise _auth_error(address, exc, token) from None
    except (ConnectionError, OSError) as exc:
        raise UserError(f"cannot reach the Ray dashboard at {address} ({exc}); "
                        f"{_ADDRESS_HELP}.") from None


def _auth_error(address: str, exc: Exception, token: str | None) -> UserError:
    if "Forbidden" in str(exc) or "Authentication failed" in str(exc):
        return UserError(f"the Ray cluster at {address} rejected the authentication token "
                         f"(is it this cluster's?); {_TOKEN_HELP}.")
    return UserError(f"the Ray cluster at {address} requires an authentication token and none "
                     f"was found; {_TOKEN_HELP}.")


@contextmanager
def _job_errors(address: str, job_id: str):
    """Ray reports an unknown job as RuntimeError('... 404 ...'): say what to do instead."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise _auth_error(address, exc, None) from None
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise UserError(f"no job {job_id!r} on the Ray cluster at {address}; list the jobs "
                            f"with `ray job list --address {address}`.") from None
        raise
    except (ConnectionError, OSError) as exc:
        raise UserError(f"lost the connection to the Ray dashboard at {address} ({exc}); "
                        f"{_ADDRESS_HELP}.") from None


# ----------------------------------------------------------------------------- job API


def submit_entrypoint(address: str, entrypoint: str, *, working_dir: str | Path | None = None,
                      token: str | None = None, env_vars: dict[str, str] | None = None,
                      metadata: dict[str, str] | None = None,
                      allow_remote: bool = False, py_modules: list[str] | None = None) -> str:
    """Start ``entrypoint`` (a shell command) as a Ray Job; return its submission id.

    ``allow_remote``: accept a plain ``http://`` address on another machine (see
    :func:`check_transport`); a :class:`RemoteExposureWarning` is issued then.
    """
    from ray.exceptions import AuthenticationError

    risk = check_transport(address, allow_remote)
    if risk:
        warnings.warn(risk, RemoteExposureWarning, stacklevel=2)
    client = _client(address, token)
    try:
        return client.submit_job(entrypoint=entrypoint, metadata=metadata,
                                 runtime_env=_runtime_env(working_dir, env_vars, py_modules))
    except AuthenticationError as exc:
        raise _auth_error(address, exc, token) from None
    except RuntimeError as exc:
        raise UserError(f"the Ray cluster at {address} refused the job: {exc}") from None


def _runtime_env(working_dir, env_vars, py_modules) -> dict[str, Any] | None:
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if py_modules:
        runtime_env["py_modules"] = list(py_modules)
    return runtime_env or None


def submit(recipe_path: str | Path, address: str, overrides: Sequence[str] = (), *,
           command: str = "run", extra_files: Iterable[str | Path] = (),
           token: str | None = None, env_vars: dict[str, str] | None = None,
           on_note: Callable[[str], None] | None = None, allow_remote: bool = False,
           ship: bool = False, preflight: bool = True, strict: bool = False) -> str:
    """Pack ``recipe_path`` with its local files and start ``python -m medrl.launch.cli
    <command> <recipe> <overrides>`` on the cluster at ``address``; return the job's id.

    ``on_note`` receives one line per packing decision the user should know about (the files
    uploaded and their size, a path left for the cluster to resolve, a relative output folder).
    ``preflight``: first run a check job (:mod:`medrl.launch.preflight`) with the same runtime
    environment and refuse (:class:`UserError`, nothing submitted) when the cluster's Python
    lacks Ray or medrl, its medrl is another major.minor version (``strict``: another
    version), or the cluster lacks the CPUs/GPUs the recipe asks for. ``ship``: upload this
    machine's medrl with the job (``py_modules``). ``allow_remote``: see
    :func:`submit_entrypoint`.
    """
    from medrl.launch import preflight as pf

    note = on_note or (lambda _text: None)
    check_transport(address, allow_remote)  # before anything is packed
    with tempfile.TemporaryDirectory(prefix="medrl-submit-") as tmp:
        work, package = Path(tmp) / "job", Path(tmp) / "package"
        work.mkdir()
        packed = pack_recipe(recipe_path, overrides, work, extra_files)
        note(packed.summary())
        for text in packed.notes:
            note(text)
        py_modules = None
        if ship:
            package.mkdir()
            py_modules = pf.stage_package(package)
            note(f"shipping this machine's medrl {pf.local_version()} with the job")
        python = None
        if preflight:
            with _job_errors(_normalise(address), "preflight"):
                report = pf.run_probe(_client(address, token),
                                      _runtime_env(work, env_vars, py_modules))
            found = pf.problems(report, pf.resources_asked(packed.recipe), pf.local_version(),
                                strict=strict)
            if found:
                raise pf.refusal(found, shipped=ship)
            for text in filter(None, [pf.same_ray_minor(report)]):
                note(text)
            python = report["executable"]
        entrypoint = pf.job_entrypoint([command, packed.recipe_name, *packed.overrides], python)
        metadata = {"medrl_recipe": Path(recipe_path).name}
        run_dir = _run_dir(packed.recipe)
        if run_dir:
            metadata["medrl_run_dir"] = run_dir
        # submit_job uploads the folders before it returns, so the temporary folder may go.
        return submit_entrypoint(address, entrypoint, working_dir=work, token=token,
                                 env_vars=env_vars, allow_remote=allow_remote,
                                 metadata=metadata, py_modules=py_modules)


def _run_dir(recipe) -> str | None:
    """The run folder's absolute path when ``run.output_dir`` is absolute (a relative one lies
    in the job's temporary folder on the cluster)."""
    out = Path(str(recipe.run.output_dir)).expanduser()
    return str(out / recipe.run.name) if out.is_absolute() else None


def run_progress(run_dir: str | None) -> str:
    """One line: the step a run reached and its last complete checkpoint, read from its run
    folder; or why the folder cannot be read from this machine."""
    from medrl.align.checkpoint import checkpoint_step, list_checkpoints

    if not run_dir:
        return ("run folder: not visible from here (run.output_dir is relative, so it lies in "
                "the job's working folder on the cluster)")
    folder = Path(run_dir)
    if not folder.is_dir():
        return f"run folder: cannot see {folder} from this machine (not on shared storage?)"
    step = None
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        step = json.loads(lines[-1]).get("step") if lines else None
    except (OSError, ValueError):
        pass
    done = list_checkpoints(folder)
    last = f"{done[-1].name} (step {checkpoint_step(done[-1])})" if done else "none yet"
    reached = f"step {step}" if step is not None else "no step logged yet"
    return f"run folder {folder}: {reached}; last complete checkpoint: {last}"


def status(job_id: str, address: str, *, token: str | None = None) -> dict[str, Any]:
    """``{"job_id", "status", "message", "entrypoint", "start_time", "end_time"}`` of a job."""
    client = _client(address, token)
    with _job_errors(_normalise(address), job_id):
        info = client.get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value")
                                            else info.status),
            "message": info.message, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time,
            "metadata": dict(info.metadata or {})}


def logs(job_id: str, address: str, *, follow: bool = False,
         token: str | None = None) -> Iterator[str]:
    """The job's output as chunks of text: everything so far, or (``follow``) until it ends."""
    client = _client(address, token)
    url = _normalise(address)
    with _job_errors(url, job_id):
        if not follow:
            yield client.get_job_logs(job_id)
            return
        client.get_job_info(job_id)  # an unknown id fails here with a clear message
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                with _job_errors(url, job_id):
                    chunk = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop(job_id: str, address: str, *, token: str | None = None) -> bool:
    """Ask the job to stop; True when it was still running."""
    client = _client(address, token)
    with _job_errors(_normalise(address), job_id):
        return bool(client.stop_job(job_id))


# ----------------------------------------------------------------------------- CLI commands


def register(app) -> None:
    """Add ``submit``, ``logs``, ``status`` and ``stop`` to the ``medrl`` typer app."""
    import typer
    from rich.console import Console

    err = Console(stderr=True)
    out = Console()
    address_opt = typer.Option(DEFAULT_ADDRESS, "--address", envvar="RAY_ADDRESS",
                               help="Ray dashboard URL of the cluster")
    token_opt = typer.Option(None, "--token", help="cluster auth token (default: RAY_AUTH_TOKEN "
                             "or ~/.ray/auth_token); prefer the environment over the command line")

    def fail(exc: UserError) -> typer.Exit:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return typer.Exit(code=2)

    @app.command("submit")
    def submit_cmd(recipe: Path = typer.Argument(..., help="recipe YAML"),
                   overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value ..."),
                   address: str = address_opt, token: Optional[str] = token_opt,
                   allow_remote: bool = typer.Option(
                       False, "--allow-remote", help="accept a plain http:// address on another "
                       "machine (token, recipe and data travel unencrypted)"),
                   ship: bool = typer.Option(False, "--ship", help="upload this machine's medrl "
                                             "with the job (its dependencies must be on the "
                                             "cluster)"),
                   no_preflight: bool = typer.Option(False, "--no-preflight", help="skip the "
                                                     "check job (Python, medrl, resources)"),
                   strict: bool = typer.Option(False, "--strict", help="the cluster's medrl "
                                               "must be exactly this version")):
        """Run a recipe on a Ray cluster as a Ray Job (prints the job id)."""
        try:
            risk = check_transport(address, allow_remote)
            if risk:
                err.print(f"[bold red]warning:[/bold red] {risk}", highlight=False,
                          soft_wrap=True)
            with warnings.catch_warnings():  # printed above
                warnings.simplefilter("ignore", RemoteExposureWarning)
                job_id = submit(recipe, address, overrides or [], token=token,
                                allow_remote=allow_remote, ship=ship,
                                preflight=not no_preflight, strict=strict,
                                on_note=lambda note: err.print(f"[yellow]note:[/yellow] {note}",
                                                               highlight=False, soft_wrap=True))
        except UserError as exc:
            raise fail(exc) from None
        out.print(job_id, highlight=False)
        err.print(f"follow it: medrl logs {job_id} --address {address} --follow", highlight=False)

    @app.command("logs")
    def logs_cmd(job: str = typer.Argument(..., help="job id printed by `medrl submit`"),
                 address: str = address_opt, token: Optional[str] = token_opt,
                 follow: bool = typer.Option(False, "--follow", "-f",
                                             help="stream until the job ends")):
        """Print a submitted job's output."""
        try:
            for chunk in logs(job, address, follow=follow, token=token):
                out.print(chunk, end="", highlight=False, markup=False, soft_wrap=True)
        except UserError as exc:
            raise fail(exc) from None

    @app.command("status")
    def status_cmd(job: str = typer.Argument(..., help="job id printed by `medrl submit`"),
                   address: str = address_opt, token: Optional[str] = token_opt):
        """Show a submitted job's status."""
        try:
            info = status(job, address, token=token)
        except UserError as exc:
            raise fail(exc) from None
        out.print(f"{info['job_id']}: {info['status']}", highlight=False)
        if info["message"]:
            out.print(info["message"], highlight=False, markup=False)
        if "medrl_recipe" in info["metadata"]:
            out.print(run_progress(info["metadata"].get("medrl_run_dir")), highlight=False,
                      markup=False, soft_wrap=True)

    @app.command("stop")
    def stop_cmd(job: str = typer.Argument(..., help="job id printed by `medrl submit`"),
                 address: str = address_opt, token: Optional[str] = token_opt):
        """Stop a submitted job."""
        try:
            stopped = stop(job, address, token=token)
        except UserError as exc:
            raise fail(exc) from None
        out.print(f"{job}: stop requested" if stopped else f"{job}: not running", highlight=False)
