"""Turn the recipe's reward entries into loaded rewards, checked before the run starts.

A recipe names a reward in one of four ways (tried in this order):

- ``mcq_letter``: a name registered with ``@reward`` (built-ins, or a plugin already imported);
- ``my_pkg.rewards:safety``: ``module:attribute`` on the Python path;
- ``plugins/my_reward.py:safety``: a file, relative to the recipe's folder;
- a name some installed package declares in the entry-point group ``medrl.rewards``
  (``[project.entry-points."medrl.rewards"] safety = "my_pkg.rewards:safety"``).

Loading imports code but never loads a model: class rewards are only checked here, and are
built and ``setup`` later by the runner. Recipe ``kwargs`` are bound to the function's (or
the class ``__init__``'s) signature and coerced to its annotations now (pydantic lax mode, as
the recipe schema does), so a misspelt argument fails in ``medrl validate`` and not hundreds
of steps into a run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from medrl.align.records import Sample, UserError
from medrl.rewards.api import _REGISTRY, finite, is_class_reward

ENTRY_POINT_GROUP = "medrl.rewards"
VETO_WHEN = ("below", "above")
# What a veto is given as: None; "<reward>[.<dim>]" (threshold: veto_threshold, when: below);
# or a list of {"score": "<reward>[.<dim>]", "threshold": 0.5, "when": "below" | "above"}.
VetoInput = str | Sequence[Mapping[str, Any]] | None


@dataclass
class LoadedReward:
    """One recipe reward entry, resolved and with its arguments bound.

    name: the metric and ``sample.rewards`` key (the alias, else the registered or
        attribute name).
    target: the function or class. kind: "function" or "class".
    source: where the code came from (module name, file path or entry point).
    """

    name: str
    spec: str
    target: Any
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # coerced to the annotations
    weight: float = 1.0
    actor: bool = False
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    timeout_s: float | None = None
    source: str = ""
    version: str | None = None
    base_dir: Path | None = None
    file_module: str | None = None  # set for path.py:fn rewards (sent to Ray by value)
    recipe_kwargs: dict[str, Any] | None = None  # as the recipe wrote them (JSON values)
    code_sha256: str | None = None  # of the code that was imported, hashed when it was

    def identity(self) -> dict[str, Any]:
        """Provenance for checkpoints: name, spec, source, version or content hash, kwargs,
        and for model rewards whatever their ``identity_extra`` adds (a model-folder hash)."""
        kwargs = self.kwargs if self.recipe_kwargs is None else self.recipe_kwargs
        out: dict[str, Any] = {"name": self.name, "spec": self.spec, "kind": self.kind,
                               "source": self.source, "kwargs": kwargs,
                               "weight": self.weight}
        if self.version:
            out["version"] = self.version
        if self.code_sha256:
            out["code_sha256"] = self.code_sha256
        extra = getattr(self.target, "identity_extra", None)
        if callable(extra):
            out.update(extra(dict(self.kwargs), self.base_dir))
        return out


def _source_file(obj: Any) -> Path | None:
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:  # builtins and C extensions have no source file
        return None
    return Path(path) if path and Path(path).is_file() else None


# sha256 of the bytes each reward file was executed from, by module name: a file is imported
# once per process, so later edits on disk are not the code that runs.
_LOADED_CODE: dict[str, str] = {}


def _code_sha256(target: Any) -> str | None:
    """The hash of the code ``target`` runs: the bytes its reward file was executed from, or,
    for an imported module, its source file's bytes now (when the reward is loaded)."""
    module = getattr(inspect.getmodule(target), "__name__", None)
    if module in _LOADED_CODE:
        return _LOADED_CODE[module]
    code_file = _source_file(target)
    return hashlib.sha256(code_file.read_bytes()).hexdigest() if code_file else None


def hash_folder(folder: str | Path) -> str:
    """sha256 over every file (relative path and bytes) of a folder, in sorted order.

    Used to pin a reward model's exact weights in checkpoints. Reads every byte the first
    time; later calls reuse the digest while no file's size or mtime has changed.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    key = (str(folder.resolve()),
           tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _FOLDER_HASHES:
        _FOLDER_HASHES[key] = _hash_files(folder, files)
    return _FOLDER_HASHES[key]


_FOLDER_HASHES: dict[tuple, str] = {}


def _hash_files(folder: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_file_module(path: Path, where: str):
    """Import ``path`` as a module with a stable unique name (so it can be pickled)."""
    if not path.is_file():
        raise UserError(f"{where}: reward file {path} does not exist (relative paths are read "
                        "from the recipe's folder).")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    mod_name = f"medrl_reward_file_{path.stem}_{digest}"
    module = sys.modules.get(mod_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        source = path.read_bytes()  # compiled from these very bytes, which are what is hashed
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the plugin
    except (Exception, SystemExit) as exc:  # sys.exit() in a plugin must not end the run
        del sys.modules[mod_name]
        raise UserError(f"{where}: importing reward file {path} failed: "
                        f"{type(exc).__name__}: {exc}") from exc
    _LOADED_CODE[mod_name] = hashlib.sha256(source).hexdigest()
    return module


def resolve(ref: str, *, base_dir: str | Path | None = None, where: str = "reward"):
    """Find the object a recipe reference names. Returns (target, source, version, file_module)."""
    if ":" in ref:
        left, attr = ref.rsplit(":", 1)
        file_module = None
        if left.endswith(".py"):
            path = Path(left).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            module = _load_file_module(path, where)
            source, file_module = str(path), module.__name__
        else:
            try:
                module = importlib.import_module(left)
            except ImportError as exc:
                raise UserError(f"{where}: cannot import module {left!r} for reward {ref!r} "
                                f"({exc}). Install the package, or use path/to/file.py:{attr} "
                                "for a file next to the recipe.") from exc
            except (Exception, SystemExit) as exc:  # the module itself fails as it runs
                raise UserError(f"{where}: importing module {left!r} for reward {ref!r} "
                                f"failed: {type(exc).__name__}: {exc}") from exc
            source = left
        if not hasattr(module, attr):
            public = sorted(n for n in vars(module) if not n.startswith("_"))[:20]
            raise UserError(f"{where}: {left} has no attribute {attr!r} (reward {ref!r}); "
                            f"it defines: {', '.join(public) or 'nothing public'}.")
        return getattr(module, attr), source, _module_version(module.__name__), file_module

    if ref in _REGISTRY:
        target = _REGISTRY[ref]
        return target, target.__module__, _module_version(target.__module__), None
    eps = _entry_points()
    if ref in eps:
        ep = eps[ref]
        try:
            target = ep.load()
        except (Exception, SystemExit) as exc:
            raise UserError(f"{where}: the entry point {ref!r} = {ep.value!r} (group "
                            f"{ENTRY_POINT_GROUP}) failed to load: {type(exc).__name__}: "
                            f"{exc}") from exc
        version = ep.dist.version if ep.dist is not None else None
        return target, f"entry point {ep.value}", version, None
    known = sorted(set(_REGISTRY) | set(eps))
    raise UserError(f"{where}: unknown reward {ref!r}. Known rewards: {', '.join(known)}. "
                    "Or name one as package.module:function or path/to/file.py:function.")


def _module_version(module_name: str) -> str | None:
    top = module_name.split(".")[0]
    try:
        return importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        return None


def bind_kwargs(target: Any, kwargs: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Check recipe ``kwargs`` against the signature (names, required ones, annotated types)
    and return them coerced to the annotations as the recipe schema coerces its own fields
    (pydantic lax mode): a YAML list becomes a ``tuple[str, ...]``, a string a ``Path``,
    ``"1e-3"`` a ``float``. Unannotated arguments, and types pydantic cannot build a check for
    (arbitrary classes), pass through as the recipe wrote them."""
    is_class = is_class_reward(target)
    try:
        sig = inspect.signature(target, eval_str=True)
    except (NameError, TypeError, AttributeError, SyntaxError, ValueError):
        # annotations are then resolved one argument at a time below; a builtin without a
        # signature at all (max) is a UserError here
        sig = _signature(target, where)
    params = list(sig.parameters.values())
    if not is_class:
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                                params[0].POSITIONAL_OR_KEYWORD):
            raise UserError(f"{where}: a function reward takes the sample as its first "
                            f"positional argument: fn(sample, **kwargs); got {sig}.")
        params = params[1:]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = [k for k in kwargs if k not in named and not accepts_any]
    missing = [n for n, p in named.items() if p.default is p.empty and n not in kwargs]
    problems = []
    if unknown:
        problems.append(f"unknown argument(s) {', '.join(map(repr, unknown))}")
    if missing:
        problems.append(f"missing required argument(s) {', '.join(map(repr, missing))}")
    bound = dict(kwargs)
    for key, value in kwargs.items():
        param = named.get(key)
        if param is None or param.annotation is param.empty:
            continue
        try:
            bound[key] = _coerce(param.annotation, value, target)
        except _Unresolvable as exc:
            problems.append(f"argument {key!r}: its annotation {exc.annotation!r} cannot be "
                            f"resolved ({exc.cause}); import that type at the top of the "
                            "reward's module, or drop the annotation")
        except _Mismatch as exc:
            problems.append(f"argument {key!r}: {exc} (got {value!r})")
    if problems:
        accepted = ", ".join(f"{n}" + ("" if p.default is p.empty else f"={p.default!r}")
                             for n, p in named.items()) or "none"
        raise UserError(f"{where}: {'; '.join(problems)}. Accepted arguments: {accepted}.")
    return bound


def _signature(target: Any, where: str) -> inspect.Signature:
    try:
        return inspect.signature(target)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: the signature of {target!r} cannot be read ({exc}); name a "
                        "function fn(sample, **kwargs) or a class, e.g. a small function "
                        "that calls it.") from None


class _Unresolvable(Exception):
    def __init__(self, annotation: Any, cause: str):
        super().__init__(cause)
        self.annotation, self.cause = annotation, cause


class _Mismatch(Exception):
    pass


def _coerce(annotation: Any, value: Any, target: Any) -> Any:
    """``value`` validated against ``annotation`` in pydantic's lax mode, coerced.

    A string annotation (``from __future__ import annotations`` that the signature could not
    evaluate as a whole) is evaluated in the reward's module. Raises _Unresolvable or
    _Mismatch."""
    from pydantic import PydanticUserError, TypeAdapter, ValidationError
    from pydantic.errors import PydanticSchemaGenerationError

    if isinstance(annotation, str):
        func = target.__init__ if inspect.isclass(target) else target
        namespace = getattr(inspect.unwrap(func), "__globals__", {})
        try:
            annotation = eval(annotation, dict(namespace))  # what inspect's eval_str does
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot be resolved
            raise _Unresolvable(annotation, f"{type(exc).__name__}: {exc}") from None
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as exc:
        raise _Mismatch(exc.errors()[0]["msg"]) from None
    except (PydanticSchemaGenerationError, TypeError):  # a type pydantic cannot check
        return value
    except PydanticUserError as exc:  # e.g. a forward reference inside list["Foo"]
        raise _Unresolvable(str(annotation), f"a type it names is not defined: {exc.code}") \
            from None


def load_reward(spec: Mapping[str, Any], *, base_dir: str | Path | None = None,
                index: int = 0) -> LoadedReward:
    """Resolve one ``rewards.functions[index]`` entry (a RewardSpec as a dict)."""
    ref = spec.get("name")
    where = f"rewards.functions[{index}] ({ref})"
    if not isinstance(ref, str) or not ref:
        raise UserError(f"rewards.functions[{index}]: 'name' must name a reward.")
    target, source, version, file_module = resolve(ref, base_dir=base_dir, where=where)
    if is_class_reward(target):
        if not callable(getattr(target, "setup", None)):
            raise UserError(f"{where}: {target.__qualname__} is a class but has no setup(ctx) "
                            "method; a class reward defines setup(ctx) and __call__(samples).")
        kind = "class"
    elif callable(target):
        kind = "function"
    else:
        raise UserError(f"{where}: {ref!r} is a {type(target).__name__}, not a function or a "
                        "class.")
    recipe_kwargs = dict(spec.get("kwargs") or {})
    kwargs = bind_kwargs(target, recipe_kwargs, where=where)
    name = (spec.get("alias") or getattr(target, "__medrl_reward_name__", None)
            or getattr(target, "__name__", ref))
    return LoadedReward(
        name=name, spec=ref, target=target, kind=kind, kwargs=kwargs,
        weight=float(spec.get("weight", 1.0)), actor=bool(spec.get("actor", False)),
        num_cpus=float(spec.get("num_cpus", 1.0)), num_gpus=float(spec.get("num_gpus", 0.0)),
        timeout_s=spec.get("timeout_s"), source=source, version=version,
        base_dir=Path(base_dir) if base_dir is not None else None, file_module=file_module,
        recipe_kwargs=recipe_kwargs, code_sha256=_code_sha256(target))


def load_rewards(specs: list[Mapping[str, Any]], *, base_dir: str | Path | None = None,
                 veto: VetoInput = None, veto_threshold: float = 0.5) -> list[LoadedReward]:
    """Resolve and check every reward entry; raise one UserError listing every problem.

    ``veto`` (the rewards-level ``veto``, in any form :func:`resolve_vetoes` takes) must name
    loaded rewards.
    """
    loaded, problems = [], []
    for i, spec in enumerate(specs):
        try:
            loaded.append(load_reward(spec, base_dir=base_dir, index=i))
        except UserError as exc:
            problems.append(str(exc))
    names = [r.name for r in loaded]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"rewards.functions: the name {dup!r} is used more than once; give "
                        "each use its own 'alias' (the metric name).")
    if veto and loaded and not problems:
        problems += _veto_problems(veto, names, veto_threshold)[1]
    if problems:
        raise UserError(f"{len(problems)} problem(s) with the rewards:\n"
                        + "\n".join(f"  - {p}" for p in problems))
    return loaded


def split_veto(score: str, names: list[str]) -> tuple[str, str | None]:
    """``"safety"`` -> ("safety", None); ``"rubric.safety"`` -> ("rubric", "safety").

    A reward name may itself contain dots (an alias), so the whole string is tried first.
    """
    if score in names or "." not in score:
        return score, None
    name, dim = score.rsplit(".", 1)
    return name, dim


@dataclass(frozen=True)
class Veto:
    """One veto, resolved against the loaded rewards.

    score: what it reads, as the recipe writes it (``"rubric.safety"``); also its metric name
        ``rewards/vetoed/<score>``. reward, dim: the same split (dim None: the reward's score).
    threshold, when: it fires when that score is below (``"below"``) or above the threshold.
    """

    score: str
    reward: str
    dim: str | None
    threshold: float
    when: str = "below"

    def read(self, sample: Sample) -> float | None:
        """The score this veto reads from a scored sample (None, which never vetoes, when
        the reward does not apply)."""
        score = sample.rewards[self.reward]
        if self.dim is None or score is None:
            return score
        return sample.reward_dims[self.reward][self.dim]


def resolve_vetoes(veto: VetoInput, names: list[str], *,
                   veto_threshold: float = 0.5) -> list[Veto]:
    """Every veto of ``veto`` (see ``VetoInput``), checked against the loaded reward ``names``.

    Raises one UserError listing every problem: an entry that names no loaded reward, a
    ``when`` other than below/above, a threshold that is not a finite number, the same score
    vetoed on twice.
    """
    vetoes, problems = _veto_problems(veto, names, veto_threshold)
    if problems:
        raise UserError(f"{len(problems)} problem(s) with the rewards:\n"
                        + "\n".join(f"  - {p}" for p in problems))
    return vetoes


def _veto_problems(veto: VetoInput, names: list[str],
                   veto_threshold: float) -> tuple[list[Veto], list[str]]:
    if not veto:
        return [], []
    if isinstance(veto, str):
        entries, wheres = [{"score": veto, "threshold": veto_threshold}], ["rewards.veto"]
    else:
        entries = [dict(e) if isinstance(e, Mapping) else e for e in veto]
        wheres = [f"rewards.veto[{i}]" for i in range(len(entries))]
    vetoes, problems = [], []
    for entry, where in zip(entries, wheres):
        if not isinstance(entry, dict) or not isinstance(entry.get("score"), str) \
                or not entry["score"]:
            problems.append(f"{where}: expected {{score: <reward>[.<dim>], threshold: 0.5, "
                            "when: below | above}, with 'score' naming a loaded reward.")
            continue
        score, when = entry["score"], entry.get("when", "below")
        threshold = entry.get("threshold", 0.5)
        reward_name, dim = split_veto(score, names)
        if reward_name not in names:
            problems.append(f"{where}: {score!r} names no loaded reward; write <reward> or "
                            f"<reward>.<dim> with one of: {', '.join(names)}.")
        if when not in VETO_WHEN:
            problems.append(f"{where}.when: {when!r} is not one of {', '.join(VETO_WHEN)}.")
        if isinstance(threshold, bool) or not finite(threshold):
            problems.append(f"{where}.threshold: {threshold!r} is not a finite number.")
        if any(v.score == score for v in vetoes):
            problems.append(f"rewards.veto: {score!r} is vetoed on twice; keep one entry per "
                            "score.")
        vetoes.append(Veto(score, reward_name, dim, float(threshold) if finite(threshold) else 0.0,
                           when))
    return vetoes, problems
