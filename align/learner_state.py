"""The learner's weights leaving and re-entering it: streaming for the engines, checkpoints.

Functions of a :class:`~medrl.align.learner.Learner`, kept apart from its training step:

- :func:`state_dict_for_sync` streams the full weights in Hugging Face naming, bucket by
  bucket (gathered under ZeRO-3, LoRA deltas merged), for the rollout engines and ``save``;
- :func:`save` writes ``policy/`` (loads with ``from_pretrained``), ``learner/`` (DeepSpeed
  optimiser and schedule state, RNG per rank) and ``adapter/`` with LoRA;
- :func:`load` restores them, reading DeepSpeed's files with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from medrl.align.distributed import WeightsOnlyCheckpointEngine
from medrl.align.records import UserError

if TYPE_CHECKING:
    from medrl.align.learner import Learner

TAG = "state"  # the DeepSpeed checkpoint tag inside learner/
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def gathered(learner: Learner, params: list[torch.nn.Parameter]):
    """Under ZeRO-3, the full values of ``params`` inside the block (collective)."""
    if learner.zero_stage != 3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(params, modifier_rank=None)

def sync_entries(learner: Learner) -> list[tuple[str, torch.nn.Parameter, torch.nn.Module | None]]:
    """(HF name, parameter, LoRA layer whose delta is added or None), in model order.

    With LoRA the adapter parameters are left out and the base weights are renamed from
    ``base_model.model.<name>.base_layer.weight`` to ``<name>.weight``; a module PEFT trains
    in full (``modules_to_save``: a reward model's head) is its trained copy, renamed from
    ``<name>.modules_to_save.default.*`` (its frozen ``original_module`` is left out).
    """
    if not learner.lora:
        return [(name, p, None) for name, p in learner.model.named_parameters()]
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in learner.model.named_modules() if isinstance(m, LoraLayer)}
    out = []
    for name, p in learner.model.named_parameters():
        if ".lora_" in name or "lora_embedding" in name or ".original_module." in name:
            continue
        owner, _, leaf = name.rpartition(".")
        layer = None
        if owner.endswith(".base_layer") and leaf == "weight":
            layer = layers.get(owner[: -len(".base_layer")])
        hf_name = (name.removeprefix("base_model.model.").replace(".base_layer.", ".")
                   .replace(".modules_to_save.default.", "."))
        out.append((hf_name, p, layer))
    return out

def state_dict_for_sync(learner: Learner, bucket_mb: float = 256
                        ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The policy's full weights in Hugging Face naming, bucket by bucket (CPU tensors).

    Collective under ZeRO-3: every rank iterates to the end, and only the weights of one
    bucket are gathered at a time. LoRA deltas are merged into their base weights. Tied
    weights appear once (under the name ``named_parameters`` gives them).
    """
    limit = bucket_mb * 2**20
    bucket: list[tuple[str, torch.nn.Parameter, Any]] = []
    size = 0

    def flush():
        params = [p for _, p, _ in bucket]
        for _, _, layer in bucket:
            if layer is not None:
                params += [p for n, p in layer.named_parameters() if "lora_" in n]
        with gathered(learner, params), torch.no_grad():
            out = []
            for name, p, layer in bucket:
                value = p.detach()
                if layer is not None:
                    for adapter in layer.active_adapters:
                        value = value + layer.get_delta_weight(adapter).to(value.dtype)
                out.append((name, value.to("cpu", copy=True)))
        return out

    for entry in sync_entries(learner):
        p = entry[1]
        size += getattr(p, "ds_numel", p.numel()) * p.element_size()
        bucket.append(entry)
        if size >= limit:
            yield flush()
            bucket, size = [], 0
    if bucket:
        yield flush()

# ------------------------------------------------------------------- checkpoints
def save(learner: Learner, out_dir: str | Path) -> None:
    """Write ``policy/``, ``learner/`` and (LoRA) ``adapter/`` under ``out_dir``. Collective.

    ``policy/`` holds merged weights: ``from_pretrained`` loads it as it is.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    full: dict[str, torch.Tensor] = {}
    for bucket in state_dict_for_sync(learner):
        if learner.rank == 0:
            full.update(bucket)
    if learner.rank == 0:
        write_policy(learner, out_dir / "policy", full)
    del full
    if learner.lora:
        write_adapter(learner, out_dir / "adapter")
    learner_dir = out_dir / "learner"
    learner.engine.save_checkpoint(str(learner_dir), tag=TAG, save_latest=False)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(learner_dir / f"rng-rank{learner.rank}.safetensors"))
    if learner.rank == 0:
        (learner_dir / "learner.json").write_text(json.dumps({
            "world_size": learner.world_size, "zero_stage": learner.zero_stage,
            "lora": learner.lora, "global_steps": learner.engine.global_steps}, indent=1))
    dist.barrier()

def hf_model(learner: Learner) -> torch.nn.Module:
    """The Hugging Face model inside the (PEFT-wrapped) policy."""
    return learner.model.get_base_model() if learner.lora else learner.model

def write_policy(learner: Learner, policy_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """save_pretrained with the gathered weights, plus the tokenizer/processor files."""
    policy_dir.mkdir(parents=True, exist_ok=True)
    hf_model(learner).save_pretrained(policy_dir, state_dict=state, safe_serialization=True)
    for src in learner.model_dir.iterdir():
        if (src.is_file() and not src.name.endswith(WEIGHT_FILES)
                and not (policy_dir / src.name).exists()):
            shutil.copy2(src, policy_dir / src.name)

def write_adapter(learner: Learner, adapter_dir: Path) -> None:
    with gathered(learner, [p for n, p in learner.model.named_parameters() if "lora_" in n]):
        if learner.rank == 0:
            learner.model.save_pretrained(adapter_dir, safe_serialization=True)

def load(learner: Learner, out_dir: str | Path) -> None:
    """Restore the optimiser, schedule, weights and RNG saved by :meth:`save`. Collective.

    Build the learner with the same settings and number of ranks first.
    """
    from safetensors.torch import load_file

    learner_dir = Path(out_dir) / "learner"
    meta_path = learner_dir / "learner.json"
    if not meta_path.is_file():
        raise UserError(f"{learner_dir}: no learner.json; this is not a learner checkpoint "
                        "written by medrl (or it was not finished).")
    meta = json.loads(meta_path.read_text())
    lora = json.loads(json.dumps(learner.lora))  # as saved (tuples become lists)
    for key, mine in (("world_size", learner.world_size), ("zero_stage", learner.zero_stage),
                      ("lora", lora)):
        if meta.get(key) != mine:
            raise UserError(f"{learner_dir}: saved with {key}={meta.get(key)!r}, but this "
                            f"learner has {key}={mine!r}; resume with the same learner "
                            "settings and number of learner workers.")
    if not isinstance(learner.engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        learner.engine.checkpoint_engine = WeightsOnlyCheckpointEngine(
            learner.engine.checkpoint_engine)
    path, _ = learner.engine.load_checkpoint(str(learner_dir), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{learner_dir}: DeepSpeed found no checkpoint tagged {TAG!r}.")
    rng = load_file(str(learner_dir / f"rng-rank{learner.rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def adapter_for_sync(learner: Learner) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA adapter alone, for engines that serve the base model with adapters.

    Returns ``(tensors, config)``, the contents of a PEFT adapter folder: ``tensors`` as
    PEFT writes ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``
    ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``; CPU copies in the adapters' own dtype),
    ``config`` as ``adapter_config.json`` (plain JSON values). The base model (the
    learner's ``model_dir``) with this adapter is the policy. Collective under ZeRO-3: the
    adapters' parameters are gathered; every rank returns the whole adapter.
    """
    from peft.utils import get_peft_model_state_dict

    if not learner.lora:
        raise UserError("adapter-only weight sync needs LoRA adapters (learner.lora), and "
                        "this learner has none; set rollout.lora_sync: auto or merged.")
    params = [p for name, p in learner.model.named_parameters() if "lora_" in name]
    with gathered(learner, params), torch.no_grad():
        state = get_peft_model_state_dict(learner.model)
        tensors = {name: t.detach().to("cpu", copy=True) for name, t in state.items()}
    config = learner.model.peft_config[learner.model.active_adapter].to_dict()
    config["inference_mode"] = True  # as PEFT's save_pretrained writes it
    # Sets (target_modules) become sorted lists, enums their values: what PEFT writes.
    config = json.loads(json.dumps(
        config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))
    return tensors, config
