"""The recipe's ``dpo:`` section: where preference pairs come from and the DPO settings.

Kept apart from :mod:`medrl.launch.recipe` (one module per job, and that one near its size
limit); these become the plain arguments of :func:`medrl.align.stages.dpo.dpo_loss` and of the
stage loop. The defaults of ``beta`` (0.1) and ``epochs`` (2) are MedCausalX's published
settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medrl.launch.recipe_training import Section


class DPOConfig(Section):
    """The dpo stage (docs/stages.md): DPO on preference pairs, MedCausalX's shared-prefix
    contrast as an option."""

    beta: float = Field(0.1, gt=0.0, allow_inf_nan=False,
                        description="strength of the implicit KL to the reference "
                        "(MedCausalX: 0.1)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="eps: the share of each "
                                   "pair's loss taken as if its labels were swapped")
    average_logprobs: bool = Field(False, description="score a response by the mean of its "
                                   "tokens' log-probs instead of their sum")
    contrast: Literal["full", "after_shared_prefix"] = Field(
        "full", description="after_shared_prefix: the longest common token prefix of the two "
        "responses moves into the context (MedCausalX); changes the loss only with "
        "average_logprobs: true")
    batch_size: int = Field(8, ge=1, description="pairs per optimiser step")
    epochs: int | None = Field(2, ge=1, description="passes over the training pairs "
                               "(MedCausalX: 2); null: run.max_steps decides")
    eval_every: int = Field(0, ge=0, description="held-out metrics every N steps (and at the "
                            "last)")
    max_length: int = Field(1024, ge=8, description="prompt + response tokens; responses are "
                            "cut")
    pairs: Literal["explicit", "mcq"] = Field(
        "explicit", description="explicit: chosen/rejected response columns; mcq: from an MCQ "
        "row, the correct option against a distractor picked by run.seed")
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
