"""The recipe's training sections: ``algorithm`` (the GRPO family's loss and advantages) and
``learner`` (DeepSpeed, LoRA, the log-prob pass), and the ``Section`` base of every section.

Kept apart from :mod:`medrl.launch.recipe` so each module stays one job: these are the
settings that become the plain arguments of :func:`medrl.align.grpo.policy_loss` and
:class:`medrl.align.learner.Learner`.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from medrl.align.grpo import LOSSES, loss_clip_defaults
from medrl.align.process import ProcessMode


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


NAME_MAX, PATH_MAX = 255, 1024  # bytes: a file name, and a path as a recipe may write it


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot name a file on this machine, or None: a name longer than a file
    system allows, a path too long to join onto a folder, a NUL byte, or ``~user`` of no user.
    Checked at validation, so that no file-system call meets it later."""
    if "\0" in value:
        return "it holds a NUL character, which no file name may"
    if len(value.encode()) > PATH_MAX:
        return f"it is {len(value.encode())} bytes long; a recipe's paths stay under {PATH_MAX}"
    longest = max(value.split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > NAME_MAX:
        return (f"one of its names is {len(longest.encode())} bytes long; a file name may be "
                f"{NAME_MAX}")
    if value.startswith("~") and os.path.expanduser(value) == value:
        return f"{value.split('/')[0]} names no user of this machine: write the path in full"
    return None


def _checked_path(value: str) -> str:
    problem = path_problem(value)
    if problem:
        raise ValueError(f"not a usable path: {problem}")
    return value


# A recipe field that names a local file or folder.
PathStr = Annotated[str, AfterValidator(_checked_path)]


class KLConfig(Section):
    coef: float = Field(0.0, ge=0.0)
    estimator: Literal["k1", "k2", "k3"] = "k3"
    where: Literal["loss", "reward"] = "loss"


class RolloutCorrectionConfig(Section):
    """Importance weights pi_old / pi_rollout for tokens the engine sampled (engine/learner
    mismatch, and the older policy of async mode); needs old_logprobs: recompute."""

    mode: Literal["none", "truncate", "mask"] = "none"  # truncate: min(rho, C); mask: drop
    level: Literal["token", "sequence"] = "token"
    threshold: float = Field(2.0, gt=1.0, description="C: truncate above C; mask outside "
                             "[1/C, C]")


class ProcessConfig(Section):
    """How rewards' ``token_marks`` (where an answer went wrong) become per-token advantages
    (:mod:`medrl.align.process`); without marks nothing changes."""

    mode: ProcessMode = Field(
        "weight", description="weight: A_t = A(1 + alpha m_t) on negative-advantage samples; "
        "marked_only: A_t = A m_t")
    alpha: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="extra share of the "
                         "negative signal on marked tokens (weight mode); 0: plain GRPO")
    failed_group_advantage: float = Field(
        1.0, ge=0.0, allow_inf_nan=False, description="zero-variance groups (every answer "
        "failed): A_t = -value * m_t on marked tokens; 0 leaves them at 0")


class AlgorithmConfig(Section):
    """``loss`` picks the surrogate (:func:`medrl.align.grpo.surrogate`); unset clip ranges
    take that loss's defaults (:func:`medrl.align.grpo.loss_clip_defaults`), written into
    the resolved recipe."""

    name: Literal["grpo"] = "grpo"
    loss: Literal[LOSSES] = Field("grpo", description="grpo | gspo | gspo_token | cispo")
    advantage_scale: Literal["group", "batch", "none"] = "group"
    advantage_eps: float = Field(1e-6, gt=0.0)
    filter_zero_variance: bool = False
    clip_low: float | None = Field(None, ge=0.0, le=1.0, description="default: the loss's")
    clip_high: float | None = Field(None, ge=0.0, description="default: the loss's")
    loss_agg: Literal["token_mean", "seq_mean", "seq_sum_norm"] = "token_mean"
    entropy_coef: float = Field(0.0, ge=0.0, description="entropy bonus per token")
    mask_truncated: bool = Field(False, description="leave completions cut at "
                                 "rollout.max_new_tokens out of the loss (DAPO)")
    kl: KLConfig = KLConfig()
    ppo_epochs: int = Field(1, ge=1)
    old_logprobs: Literal["rollout", "recompute"] = "recompute"
    rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig()
    process: ProcessConfig = ProcessConfig()
    async_: bool = Field(False, alias="async", description="one-step off-policy overlap")
    max_staleness: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _loss_settings(self):
        low, high = loss_clip_defaults(self.loss)
        if self.clip_low is None:
            self.clip_low = low
        if self.clip_high is None:
            self.clip_high = high
        if self.clip_low == 1 and self.loss != "cispo":
            raise ValueError(f"clip_low 1 leaves the {self.loss} ratio no floor (1 - clip_low "
                             "= 0); use a value below 1, or loss: cispo")
        if self.mask_truncated and self.loss_agg != "token_mean":
            raise ValueError(f"mask_truncated needs loss_agg: token_mean (under {self.loss_agg} "
                             "a masked-out completion would still count in the normaliser)")
        return self


class LoRAConfig(Section):
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LearnerConfig(Section):
    num_workers: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    micro_batch_size: int = Field(4, ge=1)
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="micro-batches by a token budget (rows x longest prompt + "
        "completion) instead of micro_batch_size samples")
    optimizer: Literal["adamw", "deepspeed_adam"] = "adamw"
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = Field(1024, ge=1, description="tokens per log-softmax chunk")
    share_prompt: bool = Field(True, description="run each distinct prompt of a micro-batch "
                               "once and the G completions on its cached keys and values")
    # auto: a frozen copy only when algorithm.kl.coef > 0; cpu: always a CPU copy (KL logged)
    ref_model: Literal["auto", "cpu", "none"] = "auto"
    lora: LoRAConfig | None = None


