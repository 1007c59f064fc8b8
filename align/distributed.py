"""DeepSpeed plumbing for the learner: process group, engine config, schedule, safe loading.

Kept apart from :mod:`medrl.align.learner` so that the learner reads as its life cycle.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
from typing import Any, Sequence

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_accelerator(has_gpus: bool) -> None:
    """Choose this process's accelerator from the GPUs it was given (a Ray actor: whether
    ``ray.get_gpu_ids()`` is non-empty), before DeepSpeed is first imported here.

    DeepSpeed's CUDA accelerator with GPUs; otherwise its CPU accelerator, and CUDA hidden
    from torch, so that a CPU rank on a GPU node neither lands tensors on ``cuda:0`` nor
    picks NCCL. Deciding where the driver runs would be wrong for actors on other nodes (a
    head node without GPUs would send "cpu" to GPU learners).
    """
    os.environ["DS_ACCELERATOR"] = "cuda" if has_gpus else "cpu"
    if not has_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def process_group_backend() -> str:
    """"nccl" or "gloo": what the pinned accelerator (:func:`pin_accelerator`) says, else
    whether CUDA is visible (a learner in the launching process)."""
    pinned = os.environ.get("DS_ACCELERATOR")
    if pinned:
        return "nccl" if pinned == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                     *, local_rank: int | None = None) -> None:
    """Join the learners' process group (:func:`process_group_backend`).

    ``local_rank`` defaults to 0 when this process sees exactly one GPU (Ray gives each actor
    its own) and to ``rank`` otherwise.
    """
    import deepspeed

    if local_rank is None:
        local_rank = 0 if torch.cuda.is_available() and torch.cuda.device_count() == 1 else rank
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    backend = process_group_backend()
    dist.init_process_group(backend, store=rendezvous_store(rank, world_size, master_addr,
                                                             master_port),
                            rank=rank, world_size=world_size, timeout=RENDEZVOUS_TIMEOUT)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts it


RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=30)


def rendezvous_store(rank: int, world_size: int, master_addr: str, master_port: int):
    """The ranks' key-value store, served by rank 0 on ``master_addr`` only.

    torch's own ``env://`` rendezvous listens on every interface whatever ``MASTER_ADDR``
    says; rank 0 binds the listening socket itself (loopback for a one-node group, its node
    address otherwise) and hands it to the store.
    """
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                             timeout=RENDEZVOUS_TIMEOUT)
    family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((master_addr, master_port))
    listener.listen(max(128, world_size))
    # detach: the store owns the descriptor from here (Python must not close it under it)
    return dist.TCPStore(master_addr, master_port, world_size, is_master=True,
                         timeout=RENDEZVOUS_TIMEOUT, master_listen_fd=listener.detach(),
                         use_libuv=False)


def deepspeed_config(*, zero_stage: int, micro_batch_size: int, dtype: torch.dtype,
                     max_grad_norm: float, offload_optimizer: bool, optimizer: str, lr: float,
                     betas: Sequence[float], weight_decay: float,
                     zero3_param_persistence_threshold: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config. Gradient accumulation is 1: the learner sets the accumulation
    boundary itself, since the number of micro-batches changes from step to step.

    ``zero3_param_persistence_threshold``: ZeRO-3 keeps parameters with fewer elements than
    this whole on every rank (DeepSpeed's default, 1e5, when None); 0 partitions them all.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if zero3_param_persistence_threshold is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = int(
            zero3_param_persistence_threshold)
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = optimizer == "deepspeed_adam"
    if optimizer == "deepspeed_adam":  # DeepSpeed picks its CPU or fused Adam
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": lr, "betas": list(betas), "weight_decay": weight_decay}}
    return config


@contextlib.contextmanager
def partitioned_loading(ds_config: dict[str, Any], zero_stage: int):
    """Under ZeRO-3, make ``from_pretrained`` partition weights while it loads them.

    transformers reads a process-wide (weakly held) DeepSpeed config; it is set only for the
    duration of the block so that other models in the process load whole.
    """
    if zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(ds_config)  # registers itself while alive
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


class LRSchedule:
    """Learning-rate factor per optimiser step: linear warm-up, then cosine or constant.

    A class (not a closure) so that ``LambdaLR.state_dict`` stores its plain fields.
    """

    def __init__(self, warmup_steps: int, total_steps: int, kind: str, min_ratio: float):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.kind, self.min_ratio = kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with a ``load`` that never fully unpickles.

    DeepSpeed's own engine reads its files with ``torch.load(weights_only=False)``. The files
    hold tensors, containers and a few plain DeepSpeed types; ``weights_only=True`` with just
    those types allowed reads them all, and refuses anything else a tampered file might name.
    Everything but ``load`` is DeepSpeed's.
    """

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        # Seen in ZeRO-1/2/3 optimiser files; the dynamic scaler is what fp16 training saves.
        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
