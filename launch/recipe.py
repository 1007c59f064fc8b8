"""The recipe: one YAML file, one stage, validated before anything starts.

``load_recipe(path, overrides)`` reads the YAML (``yaml.safe_load`` plus YAML 1.2 exponent
floats, see :mod:`medrl.launch.recipe_yaml`), applies dotted
command-line overrides (``algorithm.kl.coef=0.01``), validates everything with pydantic
(unknown keys rejected) and raises one :class:`RecipeError` listing every problem with the
file, the dotted field path and what was expected. Sections mirror DESIGN.md; stage-specific
sections (``sft``, ``qat``, ``reward_model``, ``dpo``: :mod:`medrl.launch.recipe_dpo`) are
optional and checked against ``run.stage``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from medrl.launch import recipe_yaml
from medrl.launch.recipe_distill import DistillConfig
from medrl.launch.recipe_dpo import DPOConfig
from medrl.launch.recipe_eval import EvaluationConfig
from medrl.launch.recipe_training import (AlgorithmConfig, LearnerConfig, PathStr, Section,
                                          path_problem)
from medrl.launch.recipe_yaml import RecipeError, format_errors, read_yaml

__all__ = ["Recipe", "RecipeError", "apply_overrides", "load_recipe", "parse_override",
           "read_yaml"]

Stage = Literal["grpo", "sft", "reward_model", "dpo", "distill", "vision_pretrain", "qat",
                "eval"]
# The stages this version runs (launch/stages.py dispatches on these); the others of ``Stage``
# are planned and refused at validation.
RUNNABLE_STAGES: tuple[Stage, ...] = ("grpo", "sft", "qat", "reward_model", "dpo", "distill",
                                      "eval")
# Which stage reads which optional section: qat trains on the sft loss and data settings.
STAGE_SECTIONS = {"sft": ("sft", "qat"), "qat": ("qat",), "reward_model": ("reward_model",),
                  "dpo": ("dpo",), "distill": ("distill",), "evaluation": ("grpo", "sft", "eval")}


def stage_not_runnable(stage: str) -> str:
    return (f"run.stage: {stage!r} is not available in this version; the stages that run "
            f"are: {', '.join(RUNNABLE_STAGES)}.")


def qat_schedule_problem(total_steps: int, warmup_steps: int, steps_from: str) -> str | None:
    """Why a qat run of ``total_steps`` would train no quantised step, or None."""
    if total_steps > warmup_steps:
        return None
    return (f"{steps_from} gives {total_steps} step(s), but qat.warmup_steps is {warmup_steps}: "
            "quantisation starts after the warm-up, so this run would train no quantised step "
            "yet write quantisation scales (and any fake-quant export) as if it had. Train more "
            "steps than qat.warmup_steps (default 500), or lower qat.warmup_steps.")


class RunConfig(Section):
    name: str = "run"
    output_dir: PathStr = "runs"
    seed: int = 0
    stage: Stage = "grpo"
    max_steps: int = Field(10, ge=1, description="optimiser steps for the whole run")
    recipe_dir: str | None = Field(None, description="set by `medrl run`: the folder that "
                                   "relative paths in the recipe (reward kwargs too) refer to")

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str) -> str:
        # The run folder is output_dir / name, and `medrl run --force` replaces it: a name that
        # climbs out of output_dir ("..", "/abs", "a/b") would point --force at another folder.
        climbs = name.strip() in ("", ".", "..") or Path(name).is_absolute()
        if climbs or any(sep in name for sep in ("/", "\\", "\0")):
            raise ValueError(f"{name!r} is not a folder name: run.name names one folder inside "
                             "run.output_dir (no '/', '\\', '.' or '..'); put the parent folders "
                             "in run.output_dir instead")
        return name


class ModelConfig(Section):
    policy: PathStr = Field("tiny:qwen2", description="local HF folder, run folder, or "
                            "tiny:<arch>")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="learner and rollout engines alike; auto: bf16 on GPU, fp32 on CPU")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="the learner's and the HF engine's attention kernel (vLLM picks "
        "its own)")
    special_tokens: list[str] = Field([], description="added to the vocabulary, one id each")

    @field_validator("special_tokens")
    @classmethod
    def _one_id_each(cls, tokens: list[str]) -> list[str]:
        from medrl.align.special_tokens import checked_tokens  # no torch: light
        return checked_tokens(tokens)


class FieldMap(Section):
    """Which dataset column holds what; every other column passes through into Sample.row."""

    prompt: str | None = None  # a ready prompt (open question); takes precedence over question
    question: str = "question"
    options: str | None = "options"
    answer: str | None = "answer"
    images: str | None = None
    volume: str | None = None
    rubric: str | None = None
    id: str | None = None
    context: str | None = None  # a passage (text or list of texts) shown before the question
    messages: str = "messages"  # the chat template's column: a list of {role, content}


class VolumeConfig(Section):
    """How a 3D volume becomes a bounded set of 2D slices for a VLM."""

    num_slices: int = Field(8, ge=1, le=64)
    axis: Literal[0, 1, 2] = 0
    window_center: float | None = 40.0  # Hounsfield units (soft tissue); None: min-max scaling
    window_width: float | None = 400.0


class DataConfig(Section):
    path: PathStr = Field(..., description="JSON, JSONL, Parquet file or saved HF dataset "
                          "folder")
    format: Literal["auto", "json", "jsonl", "parquet", "hf_disk"] = "auto"
    split: str | None = None
    fields: FieldMap = FieldMap()
    template: Literal["mcq", "open", "chat"] = "mcq"
    system_prompt: str | None = None
    shuffle: bool = True
    max_samples: int | None = Field(None, ge=1)
    eval_path: PathStr | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    split_seed: int = Field(0, description="seeds which rows data.eval_fraction holds out; "
                            "independent of run.seed, so every stage on the same file holds "
                            "out the same rows")
    volume: VolumeConfig = VolumeConfig()


class RolloutConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"
    num_workers: int = Field(1, ge=1)
    prompts_per_step: int = Field(2, ge=1)
    group_size: int = Field(4, ge=1, description="completions per prompt (the GRPO group); "
                            "at least 2 for grpo")
    max_new_tokens: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt (tokens, chat "
                                   "template included); longer prompts are refused. The "
                                   "engines' context is this + max_new_tokens, capped by the "
                                   "model's max_position_embeddings")
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    stop: list[str] = []
    verify_sync_every: int = Field(0, ge=0, description="0: never; N: check engine == learner")
    kv_cache_memory_mb: int = Field(256, ge=16)
    num_threads: int | None = Field(None, ge=1)
    enforce_eager: bool = Field(False, description="vLLM: skip graph compilation (start-up in "
                                "seconds instead of ~30 s on CPU; slower generation)")
    lora_sync: Literal["auto", "adapter", "merged"] = Field(
        "auto", description="with learner.lora: adapter (vLLM serves the base model with LoRA "
        "and each push is the adapter alone), merged (each push is the full weights, adapters "
        "merged), auto (adapter with vLLM on GPU rollout workers and a text model, else merged)")

    @model_validator(mode="after")
    def _adapters_need_vllm(self) -> "RolloutConfig":
        if self.lora_sync == "adapter" and self.backend != "vllm":
            raise ValueError(f"rollout.lora_sync: adapter needs rollout.backend: vllm (the "
                             f"{self.backend} engine loads full weights only); set lora_sync: "
                             "merged or auto")
        return self


class RewardSpec(Section):
    name: str = Field(..., description="registered name, package.module:fn or path.py:fn")
    alias: str | None = None  # metric name when the same reward is used twice
    weight: float = 1.0
    kwargs: dict[str, Any] = {}
    actor: bool = False  # run in its own Ray actor (model-based rewards)
    num_cpus: float = 1.0
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved for the reward's actor")
    timeout_s: float | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _plugin_file_is_a_path(cls, name: str) -> str:
        file, sep, _ = name.rpartition(":")
        problem = path_problem(file) if sep and file.endswith(".py") else None
        if problem:
            raise ValueError(f"the plugin file is not a usable path: {problem}")
        return name

    @model_validator(mode="after")
    def _gpus_need_an_actor(self):
        if self.num_gpus > 0 and not self.actor:
            raise ValueError(f"reward {self.alias or self.name!r} asks for num_gpus "
                             f"{self.num_gpus:g} but runs in the driver (actor: false), where "
                             "nothing is reserved; set actor: true to give it its own GPUs.")
        return self


class VetoSpec(Section):
    # not "on": YAML 1.1 (yaml.safe_load) reads a bare `on:` key as the boolean True
    score: str = Field(..., min_length=1, description="<reward> or <reward>.<dim>: the score "
                       "the veto reads")
    threshold: float = Field(0.5, allow_inf_nan=False)
    when: Literal["below", "above"] = Field(
        "below", description="fire when the score is below the threshold, or above it (a "
        "violation score, where high is bad); a score of None never fires")


class RewardsConfig(Section):
    """``veto`` is a list of vetoes (any one firing vetoes the sample), or one string
    ``<reward>[.<dim>]`` that fires below ``veto_threshold`` (default 0.5); the string form is
    resolved into the list here, so the resolved recipe holds the list."""

    functions: list[RewardSpec] = []
    normalize: Literal["none", "group"] = "none"
    veto: list[VetoSpec] = Field([], description="a vetoed sample ranks below every sample "
                                 "of its group that is not vetoed")
    veto_threshold: float | None = Field(None, description="only with the one-string form "
                                         "of veto")
    floor: float = Field(0.0, allow_inf_nan=False, description="a vetoed sample's reward, or "
                         "lower when needed to rank it last in its group")
    veto_margin: float = Field(1.0, gt=0, allow_inf_nan=False, description="how far below "
                               "its group's lowest unvetoed reward a vetoed one goes, at least")
    on_error: Literal["raise", "skip_sample"] = "raise"

    @model_validator(mode="before")
    @classmethod
    def _one_veto_vocabulary(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        veto, threshold = data.get("veto"), data.get("veto_threshold")
        if isinstance(veto, str):
            if not veto.strip():
                raise ValueError("veto: an empty string names no reward; write <reward> or "
                                 "<reward>.<dim>, a list of {score, threshold, when}, or leave it "
                                 "out")
            entry = {"score": veto} if threshold is None else {"score": veto,
                                                                "threshold": threshold}
            return {**data, "veto": [entry], "veto_threshold": None}
        if not veto:  # resolved recipes of earlier versions carry veto: null
            return {**data, "veto": [], "veto_threshold": None}
        if not isinstance(veto, list):
            raise ValueError(f"veto: expected <reward>[.<dim>] or a list of {{score, threshold, "
                             f"when}}, not {veto!r}")
        if threshold is not None:
            raise ValueError("veto_threshold belongs to the one-string form `veto: <reward>`; "
                             "with a list of vetoes give each entry its own `threshold`")
        return data


class ClusterConfig(Section):
    address: str | None = None  # None: start an embedded local cluster
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False
    allow_remote: bool = Field(False, description="let dashboard_host be other than loopback: "
                               "the Ray Jobs API served there runs any code it is sent")
    num_cpus: int | None = Field(None, ge=1)
    colocate: bool = False
    rollout_cpus: float = 1.0
    learner_cpus: float = 1.0
    rollout_gpus: float = 0.0
    learner_gpus: float = 0.0
    # Custom Ray resources (as given to `ray start --resources`) each actor asks for: it lands
    # only on nodes that have them. One unit per node of a resource all ranks ask for puts
    # one rank on each node.
    learner_resources: dict[str, float] = Field({}, description="custom Ray resources each "
                                                "learner rank asks for, e.g. {learner_slot: 1}")
    rollout_resources: dict[str, float] = Field({}, description="custom Ray resources each "
                                                "rollout worker asks for")
    max_restarts: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _placement_and_exposure(self) -> "ClusterConfig":
        from medrl.launch.cluster import is_loopback

        if not self.allow_remote and not is_loopback(self.dashboard_host):
            raise ValueError(
                f"cluster.dashboard_host {self.dashboard_host!r} is not a loopback address: "
                "the dashboard serves the Ray Jobs API, which runs any code it is sent, to "
                "every machine that reaches that address. Keep 127.0.0.1 and reach it through "
                "an SSH tunnel, or set cluster.allow_remote: true to accept the exposure")
        for key in ("learner_resources", "rollout_resources"):
            for name, amount in getattr(self, key).items():
                if name in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise ValueError(f"cluster.{key}: {name} is not a custom resource; set it "
                                     "with cluster.learner_cpus / learner_gpus / rollout_cpus "
                                     "/ rollout_gpus")
                if amount <= 0:
                    raise ValueError(f"cluster.{key}.{name}: the amount must be > 0, got "
                                     f"{amount}")
        return self


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="0: only at the end")
    keep_last: int | None = Field(None, ge=1)


class LoggingConfig(Section):
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    log_completions: bool = False  # patient text in logs only when asked for
    every: int = Field(1, ge=1, description="one metrics.jsonl / TensorBoard row per N steps: "
                       "each metric's mean over them; checkpoint steps and the last step "
                       "always get a row")


class SFTConfig(Section):
    """Supervised fine-tuning (also the loss and data handling of the qat stage)."""

    epochs: int | None = Field(None, ge=1)  # None: run.max_steps decides
    batch_size: int = Field(8, ge=1, description="examples per optimiser step")
    max_length: int = Field(1024, ge=8, description="prompt + answer tokens; answers are cut")
    eval_every: int = Field(0, ge=0, description="eval/loss on the held-out split every N steps")
    weight_field: str | None = None  # per-sentence labels -> token weights
    abnormal_weight: float = Field(1.10, gt=0.0)
    response_field: str = "response"  # a string, a list of sentences, or a record (as JSON)
    prompt_template: str | None = Field(None, description="str.format template over the row's "
                                        "columns replacing the user text (code-style prompts)")


class RewardModelConfig(Section):
    """The reward_model stage: where preference pairs come from and the Bradley-Terry schedule
    (ProMedical's settings: batch 64, 2 epochs, max length 8192)."""

    pairs: Literal["explicit", "rubric"] = Field("explicit", description="explicit: one pair "
                                                 "per row; rubric: pairs from graded responses")
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    criterion_field: str | None = "criterion"  # absent or null in a row: an empty criterion
    tier_field: str | None = "tier"  # per-tier held-out accuracy
    responses_field: str = "responses"  # rubric: [{"text", "verdicts": [...]}]
    batch_size: int = Field(64, ge=1, description="pairs per optimiser step")
    epochs: int | None = Field(None, ge=1)  # None: run.max_steps decides
    max_length: int = Field(8192, ge=8, description="tokens per text; longer ones lose their "
                            "left end (the conversation's oldest turns)")
    eval_every: int = Field(0, ge=0, description="held-out metrics every N steps (and at the "
                            "last)")


class QATConfig(Section):
    format: Literal["hif8", "e4m3"] = "hif8"
    warmup_steps: int = Field(500, ge=0, description="full-precision steps before fake-quant")
    qat_lr: float = Field(1e-5, gt=0.0)
    amax_history: int = Field(64, ge=1)
    amax_reduction: Literal["max", "most_recent"] = "max"
    clip_warn_threshold: float = Field(0.01, ge=0.0, le=1.0)
    probe_path: PathStr | None = None  # knowledge probe (MCQ) for the forgetting metric
    probe_every: int = Field(0, ge=0)
    probe_max_samples: int = Field(64, ge=1)
    export_fake_quant: bool = False
    margin: int = Field(0, ge=0, le=20, description="scale maps amax to format_max / 2^margin")


class Recipe(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig | None = None  # every stage but eval reads one
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    cluster: ClusterConfig = ClusterConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sft: SFTConfig | None = None
    qat: QATConfig | None = None
    reward_model: RewardModelConfig | None = None
    dpo: DPOConfig | None = None
    distill: DistillConfig | None = None  # medrl.launch.recipe_distill
    evaluation: EvaluationConfig | None = None

    @model_validator(mode="after")
    def _stage_sections(self) -> "Recipe":
        stage = self.run.stage
        if stage not in RUNNABLE_STAGES:
            raise ValueError(stage_not_runnable(stage))
        for section, stages in STAGE_SECTIONS.items():
            if getattr(self, section) is not None and stage not in stages:
                raise ValueError(f"the {section}: section is read only by run.stage "
                                 f"{' or '.join(stages)}, and this recipe's stage is {stage}: "
                                 f"remove the {section}: section, or set run.stage")
        if self.data is None and stage != "eval":
            raise ValueError(f"run.stage {stage} trains on data: add a data: section with at "
                             "least data.path")
        if stage == "eval" and self.evaluation is None:
            raise ValueError("run.stage eval scores model.policy on the datasets of an "
                             "evaluation: section; add one (evaluation.datasets: [medqa, ...])")
        ev = self.evaluation
        if ev is not None and stage != "eval" and ev.every is None:
            raise ValueError(f"evaluation.every is needed in a {stage} run: evaluate every N "
                             "steps (and at the last step)")
        if ev is not None and ev.checkpoints is not None and stage != "eval":
            raise ValueError("evaluation.checkpoints compares a run folder's checkpoints in an "
                             f"eval stage; a {stage} run evaluates its own current weights")
        if stage == "grpo" and not self.rewards.functions:
            raise ValueError("a grpo recipe needs at least one reward in rewards.functions")
        if stage == "grpo" and self.rollout.group_size < 2:
            raise ValueError(f"rollout.group_size is {self.rollout.group_size}, but GRPO scores "
                             "each completion against the others of its prompt's group: with "
                             "one completion per prompt every advantage is 0 and nothing is "
                             "learned (with algorithm.filter_zero_variance every group is "
                             "dropped). Set rollout.group_size to 2 or more")
        qat_warmup = (self.qat or QATConfig()).warmup_steps
        if stage == "qat" and (self.sft is None or self.sft.epochs is None):
            # with sft.epochs the step count depends on the data: checked by check_recipe
            problem = qat_schedule_problem(self.run.max_steps, qat_warmup, "run.max_steps")
            if problem:
                raise ValueError(problem)
        if self.algorithm.kl.coef > 0 and self.learner.ref_model == "none":
            raise ValueError("algorithm.kl.coef > 0 needs a reference model; set "
                             "learner.ref_model to auto or cpu, or the coefficient to 0")
        if self.rollout.min_new_tokens > self.rollout.max_new_tokens:
            raise ValueError("rollout.min_new_tokens must not exceed rollout.max_new_tokens")
        self._check_old_logprobs()
        return self

    def _check_old_logprobs(self) -> None:
        """Refuse settings under which the engine's log-probs would be wrong in the loss."""
        alg, r = self.algorithm, self.rollout
        reshaped = [f for f, on in (("rollout.top_p < 1", r.top_p < 1),
                                    ("rollout.top_k", r.top_k != -1),
                                    ("rollout.min_new_tokens > 0", r.min_new_tokens > 0)) if on]
        correcting = alg.rollout_correction.mode != "none"
        if correcting and alg.old_logprobs != "recompute":
            raise ValueError("algorithm.rollout_correction re-weights by the learner's old "
                             "log-probs over the rollout's: it needs algorithm.old_logprobs: "
                             "recompute")
        # The engine's log-probs come from the truncated/masked distribution it sampled from,
        # not the policy's full softmax that the learner trains.
        uses_rollout = alg.old_logprobs == "rollout" or (alg.async_ and not correcting)
        if reshaped and uses_rollout:
            why = ("algorithm.old_logprobs is rollout" if alg.old_logprobs == "rollout" else
                   "algorithm.async without a rollout_correction takes the rollout's log-probs "
                   "as old log-probs for samples of the previous policy")
            raise ValueError(f"{why}, but {' and '.join(reshaped)} change(s) the distribution "
                             "the engine samples from, so its log-probs are not the policy's: "
                             "set algorithm.old_logprobs: recompute (and, with async, "
                             "algorithm.rollout_correction.mode: truncate), or sample from the "
                             "full distribution")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), typed by the Recipe schema (see
    :mod:`medrl.launch.recipe_yaml` for how the value is read)."""
    return recipe_yaml.parse_override(text, Recipe)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted override in the raw recipe mapping (before validation)."""
    return recipe_yaml.apply_overrides(data, overrides, Recipe)


def resolve_path(recipe_dir: Path, value: str) -> Path:
    """A path from the recipe: absolute, ``~``, or relative to the recipe's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (recipe_dir / p)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Raises :class:`RecipeError` naming every problem."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(str(path), err)) from None
    except (TypeError, ValueError) as exc:  # a value pydantic could not even inspect
        raise RecipeError(f"{path}: {exc}") from None
    problems = _check_files(recipe, path.parent)
    if problems:
        raise RecipeError(f"{path}: {len(problems)} problem(s) in the recipe:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return recipe


def _check_files(recipe: Recipe, recipe_dir: Path) -> list[str]:
    """Files named by the recipe must exist before a run starts."""
    problems = []
    data = recipe.data
    for field, value in (("data.path", data.path if data else None),
                         ("data.eval_path", data.eval_path if data else None),
                         ("qat.probe_path", recipe.qat.probe_path if recipe.qat else None)):
        if value and not resolve_path(recipe_dir, value).exists():
            problems.append(f"{field}: {value!r} does not exist (relative paths are read from "
                            f"the recipe's folder {recipe_dir})")
    policy = recipe.model.policy
    if not policy.startswith("tiny:") and not resolve_path(recipe_dir, policy).exists() \
            and not Path(policy).expanduser().exists():
        problems.append(f"model.policy: {policy!r} is not a local folder; no model hub is "
                        "reachable: use a local Hugging Face folder, a run folder, or tiny:qwen2")
    return problems


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what ``medrl resume`` reads back)."""
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)


def json_schema() -> dict:
    return Recipe.model_json_schema(by_alias=True)
