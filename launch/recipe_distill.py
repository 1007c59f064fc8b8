"""The recipe's ``distill:`` section: the teacher, its privileged inputs and the JSD settings.

Kept apart from :mod:`medrl.launch.recipe` (one module per job, and that one at its size
limit); these become the plain arguments of :class:`medrl.align.stages.distill.DistillForward`
and of the stage loop. Defaults from MedSynapse-V's intrinsic memory transition (Stage III):
JSD_beta with beta 0.5, temperature 1.0, 3 epochs (its learning rate 1e-4 and weight decay
0.01 are learner settings: ``learner.lr`` / ``learner.weight_decay``).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from medrl.launch.recipe_training import PathStr, Section


class DistillConfig(Section):
    """The distill stage (docs/stages.md): the student (the policy on the plain input) learns
    the next-token distributions of a teacher that sees privileged inputs."""

    beta: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False,
                        description="JSD_beta mixture weight (MedSynapse-V: 0.5); 0: forward "
                        "KL(teacher || student), 1: reverse KL(student || teacher)")
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False,
                               description="divides both branches' logits (MedSynapse-V: 1.0)")
    teacher: PathStr | None = Field(None, description="the teacher's model (a local folder or "
                                    "a run folder); null: the starting policy, frozen")
    privileged_field: str | None = Field(None, description="row column appended to the "
                                         "teacher's user text (e.g. the gold rationale)")
    privileged_prefix: str = Field("\n\nReference: ", description="written before the "
                                   "privileged text")
    teacher_prompt_template: str | None = Field(
        None, description="str.format template over the row ({prompt}: the student's user "
        "text) that replaces the teacher's user text instead")
    teacher_images_field: str | None = Field(None, description="row column of the teacher's "
                                             "images (e.g. the mask overlay), in place of the "
                                             "student's")
    response_field: str = Field("response", description="the completion both branches score")
    prompt_template: str | None = Field(None, description="the student's user text as a "
                                        "str.format template over the row (as sft's)")
    batch_size: int = Field(8, ge=1, description="rows per optimiser step")
    epochs: int | None = Field(3, ge=1, description="passes over the training rows "
                               "(MedSynapse-V: 3); null: run.max_steps decides")
    max_length: int = Field(1024, ge=8, description="prompt + answer tokens in either "
                            "branch; answers are cut")
    eval_every: int = Field(0, ge=0, description="held-out answer NLL every N steps (and at "
                            "the last)")

    @model_validator(mode="after")
    def _teacher_sees_something(self) -> "DistillConfig":
        if self.privileged_field and self.teacher_prompt_template:
            raise ValueError("distill.privileged_field and distill.teacher_prompt_template both "
                             "build the teacher's text; set one (name the column in the "
                             "template as {column})")
        privileged = (self.privileged_field or self.teacher_prompt_template
                      or self.teacher_images_field)
        if not privileged and self.teacher is None:
            raise ValueError("the distill stage's teacher is the starting policy and sees no "
                             "privileged input, so both branches are the same and the loss is "
                             "0: set distill.privileged_field, teacher_prompt_template or "
                             "teacher_images_field, or name another model in distill.teacher")
        return self
