"""Shared fixtures: tiny models (built once per session, no download), the real medical data
in ../shared/data (skipped with a reason when absent), and one local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

# DeepSpeed must pick its CPU accelerator before it is first imported; HF must stay offline.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One cache folder for tiny models per test session (MEDRL_CACHE points here too)."""
    path = tmp_path_factory.mktemp("medrl-cache")
    os.environ["MEDRL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2(model_cache) -> Path:
    from medrl.align.models import resolve_policy

    return resolve_policy("tiny:qwen2", cache_dir=model_cache)


@pytest.fixture(scope="session")
def tiny_qwen2_vl(model_cache) -> Path:
    from medrl.align.models import resolve_policy

    return resolve_policy("tiny:qwen2-vl", cache_dir=model_cache)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real medical evaluation data not found at {SHARED_DATA} "
                    "(it lives beside the project checkout, not in it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray cluster for the whole session (loopback only, no dashboard)."""
    ray = pytest.importorskip("ray")
    from medrl.launch.cluster import keep_loopback_node_ip

    if not ray.is_initialized():
        with keep_loopback_node_ip():  # the tests' cluster listens on loopback only, too
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
                                               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
    yield ray
    ray.shutdown()
