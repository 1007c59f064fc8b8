"""The learner's frozen reference policy: where it lives, decided in one place, and loading it.

The recipe speaks of ``learner.ref_model``: ``auto`` (a reference only when the run has a KL
coefficient, in the loss or in the reward), ``cpu`` (always one, on the CPU, so the KL is
logged even when it is not penalised) or ``none``. :func:`reference_placement` turns that and
the run's KL coefficient into a :class:`Reference`, the only vocabulary the learner knows.
"""

from __future__ import annotations

import contextlib
import enum
from pathlib import Path
from typing import Literal

import torch

from medrl.align.records import UserError

RefModel = Literal["auto", "cpu", "none"]  # the recipe's learner.ref_model


class Reference(str, enum.Enum):
    """Where the learner keeps its reference policy."""

    NONE = "none"  # no reference: the KL is neither penalised nor logged
    BESIDE = "beside"  # a frozen copy on the policy's device (a forward-only engine on ZeRO-3)
    CPU = "cpu"  # a whole frozen copy on the CPU
    ADAPTERS = "adapters"  # LoRA: the policy itself with its adapters switched off


def reference_placement(ref_model: RefModel, *, kl_coef: float, lora: bool) -> Reference:
    """The :class:`Reference` for the recipe's ``learner.ref_model``.

    kl_coef: the run's KL coefficient, wherever the KL is applied (loss or reward). With LoRA
    every reference is the policy with its adapters off (no second copy of the weights).
    """
    if ref_model not in ("auto", "cpu", "none"):
        raise UserError(f"learner.ref_model must be auto, cpu or none, got {ref_model!r}.")
    if kl_coef > 0 and ref_model == "none":
        raise UserError("algorithm.kl.coef > 0 needs a reference model, but learner.ref_model "
                        "is none; set ref_model: auto (or cpu), or the KL coefficient to 0.")
    if ref_model == "none" or (ref_model == "auto" and kl_coef == 0):
        return Reference.NONE
    if lora:
        return Reference.ADAPTERS
    return Reference.CPU if ref_model == "cpu" else Reference.BESIDE


def load_reference(model_dir: Path, placement: Reference, *, dtype: torch.dtype,
                   device: torch.device, zero_stage: int, ds_config: dict, scorer_kwargs: dict,
                   attn_implementation: str = "sdpa") -> torch.nn.Module | None:
    """A frozen copy of the starting policy for ``placement`` CPU or BESIDE (None otherwise).

    On the CPU it loads whole; beside the policy it is a forward-only ZeRO-3 engine under
    ZeRO-3 (its weights partitioned like the policy's), else a plain module on ``device``.
    """
    import deepspeed

    from medrl.align.distributed import partitioned_loading
    from medrl.align.logprobs import Scorer
    from medrl.align.models import load_model

    if placement not in (Reference.CPU, Reference.BESIDE):
        return None
    on_cpu = placement is Reference.CPU
    loading = contextlib.nullcontext() if on_cpu else partitioned_loading(ds_config, zero_stage)
    with loading:
        ref = Scorer(load_model(model_dir, dtype=dtype, attn_implementation=attn_implementation),
                     **scorer_kwargs)
    ref.eval()
    ref.requires_grad_(False)
    if on_cpu:
        return ref
    if zero_stage != 3:
        return ref.to(device)
    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "gradient_clipping")}
    engine, *_ = deepspeed.initialize(model=ref, config=config)
    engine.eval()
    return engine
