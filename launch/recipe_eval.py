"""The recipe's ``evaluation`` section: benchmarks inside a grpo or sft run, or what an eval
stage scores (docs/eval.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medrl.launch.recipe_training import PathStr, Section


class EvalDatasetSpec(Section):
    """A data file of an ``evaluation`` section with its own field mapping."""

    path: PathStr = Field(..., description="data file, relative to the recipe")
    fields: dict[str, str] = {}  # NAME -> COLUMN, over evaluation.fields


class EvaluationConfig(Section):
    """Benchmarks scored as ``medrl eval`` scores them (docs/eval.md): on the current weights
    during a grpo run (through the rollout engines) or an sft run (through the learner's own
    model), logged as eval/<dataset>/<metric>; or, in an eval stage, on ``model.policy`` (each
    of ``checkpoints`` when it is a run folder), written as a report into the run folder."""

    every: int | None = Field(None, ge=1, description="grpo/sft: evaluate every N steps and at "
                              "the last step")
    datasets: list[PathStr | EvalDatasetSpec] = Field(..., min_length=1, description="presets, "
                                                  "data files, or {path, fields}")
    max_samples: int | None = Field(None, ge=1, description="first N items of each dataset")
    data_root: PathStr | None = Field(None, description="folder of the preset files (default "
                                  "$MEDRL_DATA_DIR); relative to the recipe")
    fields: dict[str, str] = {}  # NAME -> COLUMN for data files, as data.fields
    mode: Literal["loglik", "generate"] = "loglik"
    max_new_tokens: int = Field(256, ge=1, description="generate mode and rubric datasets")
    judge: str | None = None  # rubric datasets: the criterion scorer's model
    judge_scorer: Literal["reward_model", "judge"] = "reward_model"
    samples: int = Field(1, ge=1, description="generate: completions per item (1 = greedy)")
    temperature: float = Field(1.0, ge=0.0, description="generate with samples > 1")
    log_text: bool = Field(False, description="keep completion texts in predictions.jsonl")
    checkpoints: str | None = Field(None, description="eval stage on a run folder: all, or "
                                    "steps like 100,200, compared in one table")
    system_prompt: str | None = None  # every prompt's system message (sft: data.system_prompt)
    prompt_template: str | None = Field(None, description="extraction sets: the user message, "
                                        "str.format of the row (sft: sft.prompt_template)")
