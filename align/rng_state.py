"""The random states a checkpoint keeps, as JSON: Python's ``random``, NumPy's global and
``Generator`` states, torch's CPU (and CUDA) generators, and any named generators a stage
passes (:func:`capture_rng` / :func:`restore_rng`). Arrays and tensors travel as base64."""

from __future__ import annotations

import base64
import random
import warnings
from typing import Any, Mapping


def _encode_array(array) -> dict[str, Any]:
    return {"__ndarray__": base64.b64encode(array.tobytes()).decode("ascii"),
            "dtype": str(array.dtype), "shape": list(array.shape)}


def _to_jsonable(obj: Any) -> Any:
    """Numpy arrays inside a bit-generator state -> base64 dicts; other values unchanged."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _from_jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            raw = base64.b64decode(obj["__ndarray__"])
            return np.frombuffer(raw, dtype=obj["dtype"]).reshape(obj["shape"]).copy()
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def _tensor_b64(t) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_tensor(text: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng(generators: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every random state that affects a run, as JSON-able data.

    Captures Python ``random``, numpy's legacy global state, torch's CPU generator and, when
    CUDA is available, every CUDA device's generator. ``generators`` names extra
    ``numpy.random.Generator`` / ``torch.Generator`` objects (e.g. the data sampler's) whose
    states are captured under ``"generators"``; pass the same names to :func:`restore_rng`.
    """
    import numpy as np
    import torch

    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": _to_jsonable(list(np.random.get_state())),
        "torch": _tensor_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["torch_cuda"] = [_tensor_b64(s) for s in torch.cuda.get_rng_state_all()]
    named = {}
    for name, gen in (generators or {}).items():
        if isinstance(gen, np.random.Generator):
            named[name] = {"kind": "numpy", "state": _to_jsonable(gen.bit_generator.state)}
        elif isinstance(gen, torch.Generator):
            named[name] = {"kind": "torch", "state": _tensor_b64(gen.get_state())}
        else:
            raise TypeError(f"capture_rng: generator {name!r} is a {type(gen).__name__}; expected "
                            "numpy.random.Generator or torch.Generator")
    if named:
        out["generators"] = named
    return out


def restore_rng(states: Mapping[str, Any], generators: Mapping[str, Any] | None = None) -> None:
    """Put back the states from :func:`capture_rng` (and into the named ``generators``)."""
    import numpy as np
    import torch

    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np.random.set_state(tuple(_from_jsonable(states["numpy"])))
    torch.set_rng_state(_b64_tensor(states["torch"]))
    cuda = states.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n != len(cuda):
            warnings.warn(f"restore_rng: the checkpoint saved {len(cuda)} CUDA generator states "
                          f"but {n} devices are visible; restoring the first {min(n, len(cuda))}: "
                          "random numbers on the other devices will differ from the original run")
        for i, text in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(_b64_tensor(text), device=i)
    saved = states.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"restore_rng: no saved state for generator {name!r} "
                           f"(saved: {sorted(saved)})")
        entry = saved[name]
        if entry["kind"] == "numpy":
            gen.bit_generator.state = _from_jsonable(entry["state"])
        else:
            gen.set_state(_b64_tensor(entry["state"]))


def stage_state(stage: str, step: int, *, cursor: Mapping[str, Any], policy_source: str,
                metrics_row: Mapping[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """The ``state.json`` of a non-GRPO stage's checkpoint at ``step``: what an exact resume
    reads back (the data cursor, every RNG's state, the step's metrics row) and where the
    policy came from. ``extra``: the stage's own entries (QAT's scaler state)."""
    return {"stage": stage, "policy_version": step, "data_cursor": dict(cursor),
            "rng": capture_rng(), "policy_source": policy_source,
            "metrics_row": None if metrics_row is None else dict(metrics_row), **extra}
