"""The distill stage from a recipe: the teacher, its view of each row, and the learner group.

The student sees each row as the data loader renders it (``data.template``, ``data.fields``);
the teacher sees the same row with privileged inputs (``distill.privileged_field`` appended to
the user text, or ``distill.teacher_prompt_template``, and ``distill.teacher_images_field``
in place of the images): :func:`medrl.align.stages.distill.teacher_sample`. Every row is
checked before anything starts: a row without its privileged input is named by its position
in the data file.

The teacher (``distill.teacher``): null is the starting policy, frozen; with ``learner.lora``
that is the policy with its adapters off (no second copy), without LoRA a frozen copy of the
starting folder on every learner rank. A named model (a local folder or a run folder) is a
frozen copy on every rank as well; it must share the policy's tokenizer (both branches score
the same token ids). A copy costs one set of weights in the learner's dtype per rank (no
gradients or optimiser state): about 2 bytes x parameters in bf16.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from medrl.align.records import Sample, UserError
from medrl.launch.recipe import Recipe


def _config(recipe: Recipe):
    if recipe.distill is None:  # the schema's own default refuses a teacher that sees nothing
        raise UserError("the distill stage needs a distill: section naming the teacher's "
                        "privileged input (distill.privileged_field, teacher_prompt_template "
                        "or teacher_images_field) or another model (distill.teacher).")
    return recipe.distill


def learner_problem(recipe: Recipe) -> str | None:
    """Why the recipe's learner settings cannot train the distill stage, or None."""
    if recipe.learner.max_tokens_per_micro_batch is not None:
        return ("learner.max_tokens_per_micro_batch is not used by the distill stage (a "
                "micro-batch holds whole rows, each a teacher and a student view); set "
                "learner.micro_batch_size (rows per micro-batch) instead.")
    return None


def teacher_folder(recipe: Recipe, policy_dir: Path, base_dir: Path | str) -> str | None:
    """The teacher's model folder for :class:`DistillForward` (None: the policy with its
    adapters off). Raises :class:`UserError` naming ``distill.teacher`` when it is not a
    usable local model or its tokenizer differs from the policy's."""
    from medrl.align.models import load_tokenizer, resolve_policy

    d = _config(recipe)
    if d.teacher is None:
        return None if recipe.learner.lora else str(policy_dir)
    try:
        folder = resolve_policy(d.teacher, seed=recipe.run.seed, base_dir=base_dir)
    except UserError as exc:
        raise UserError(f"distill.teacher: {d.teacher!r} is not a usable model "
                        f"({str(exc).replace('model.policy: ', '')})") from None

    def vocab(folder):
        tok = load_tokenizer(folder)
        return getattr(tok, "tokenizer", tok).get_vocab()

    if vocab(folder) != vocab(policy_dir):
        raise UserError(f"distill.teacher: {d.teacher!r} has another tokenizer than the policy "
                        f"({recipe.model.policy}); both branches score the same token ids, "
                        "so the teacher must share the policy's vocabulary.")
    return str(folder)


def check_rows(rows: list[Sample], recipe: Recipe) -> None:
    """Every row has the teacher's privileged input; raises :class:`UserError` naming the row
    (its position in the data file) and the field otherwise."""
    d = _config(recipe)
    for index, s in enumerate(rows):
        for field, key in ((d.privileged_field, "privileged_field"),
                           (d.teacher_images_field, "teacher_images_field"),
                           (d.response_field, "response_field")):
            value = s.row.get(field) if field else ""
            if field and (value is None or value == "" or value == []):
                raise UserError(f"{recipe.data.path}: row {index} (sample {s.uid}) has no "
                                f"value in column {field!r} (distill.{key}); every row needs "
                                "one. Fix the row, or set the field to the column that holds "
                                "it.")


def teacher_view(sample: Sample, recipe: Recipe) -> Sample:
    """The teacher's view of a loaded sample (its privileged text, and images loaded from
    ``distill.teacher_images_field``, paths relative to the data file)."""
    from medrl.align.stages.distill import TeacherSpec, teacher_sample
    from medrl.rollouts.multimodal import load_image

    d = _config(recipe)
    spec = TeacherSpec(privileged_field=d.privileged_field,
                       prompt_template=d.teacher_prompt_template, prefix=d.privileged_prefix)
    images = None
    if d.teacher_images_field:
        cell = sample.row.get(d.teacher_images_field)
        items = cell if isinstance(cell, (list, tuple)) else [cell]
        base = Path(sample.data_dir or ".")
        images = [load_image(str(base / i) if isinstance(i, str) and not Path(i).is_absolute()
                             else i, uid=sample.uid) for i in items if i is not None]
    return teacher_sample(sample, spec, images)


def _spec(recipe: Recipe):
    from medrl.align.stages.sft import ExampleSpec

    d = _config(recipe)
    return ExampleSpec(response_field=d.response_field, max_length=d.max_length,
                       prompt_template=d.prompt_template)


def check_distill(recipe: Recipe, recipe_dir: Path | str | None) -> str:
    """What ``medrl validate`` reports for a distill recipe: the rows carry the teacher's
    inputs, the teacher resolves, and the step count."""
    from medrl.align.models import resolve_policy
    from medrl.align.stages.sft import total_steps
    from medrl.launch.data import load_dataset_rows, load_train_eval

    problem = learner_problem(recipe)
    if problem:
        raise UserError(problem)
    d = _config(recipe)
    check_rows(load_dataset_rows(recipe.data, recipe_dir), recipe)
    if d.teacher is not None:
        policy = resolve_policy(recipe.model.policy, seed=recipe.run.seed, base_dir=recipe_dir)
        teacher_folder(recipe, policy, recipe_dir or ".")
    train, held = load_train_eval(recipe.data, base_dir=recipe_dir)
    steps = total_steps(max_steps=recipe.run.max_steps, epochs=d.epochs, num_train=len(train),
                        batch_size=d.batch_size)
    return f"distill: {len(train)} training and {len(held)} held-out rows, {steps} steps"


def run_distill(recipe: Recipe, run_dir: Path, *, resume_from: Path | None = None):
    """The distill stage: a learner group of ``learner.num_workers`` ranks (Ray actors, on the
    embedded or the given cluster), each with the frozen teacher, trains the student."""
    from medrl.align.models import load_tokenizer
    from medrl.align.stages.distill import DistillForward, DistillIO, run_stage
    from medrl.launch.data import load_dataset_rows, load_media
    from medrl.launch.driver import learner_kwargs, monitor_for, policy_folder
    from medrl.launch.stages import StageLearner
    from medrl.launch.stream import PromptStream

    d, ln = _config(recipe), recipe.learner
    problem = learner_problem(recipe)
    if problem:
        raise UserError(problem)
    recipe_dir = Path(recipe.run.recipe_dir or ".")
    check_rows(load_dataset_rows(recipe.data, recipe_dir), recipe)
    stream = PromptStream.from_recipe(recipe.data, seed=recipe.run.seed, recipe_dir=recipe_dir)
    stream.check_take(d.batch_size, field="distill.batch_size")
    policy_dir = policy_folder(recipe, run_dir)
    forward = DistillForward(beta=d.beta, temperature=d.temperature,
                             teacher_dir=teacher_folder(recipe, policy_dir, recipe_dir),
                             chunk_size=ln.logprob_chunk_size,
                             attn_implementation=recipe.model.attn_implementation)
    # A micro-batch of learner.micro_batch_size rows is twice as many samples (two views each).
    kwargs = dict(learner_kwargs(recipe), reference="none", kl_coef=0.0,
                  micro_batch_size=2 * ln.micro_batch_size, temperature=1.0)
    make_learner = StageLearner(recipe, policy_dir, kwargs)

    io = DistillIO(
        stream=stream,
        eval_samples=[load_media(s, recipe.data.volume) for s in stream.eval_samples],
        teacher_of=partial(teacher_view, recipe=recipe), make_learner=make_learner,
        tokenizer=load_tokenizer(policy_dir), monitor_factory=partial(monitor_for, recipe,
                                                                      run_dir),
        policy_source=str(policy_dir), forward=forward, spec=_spec(recipe),
        batch_size=d.batch_size, max_steps=recipe.run.max_steps, epochs=d.epochs,
        eval_every=d.eval_every, checkpoint_every=recipe.checkpoint.every,
        keep_last=recipe.checkpoint.keep_last, num_workers=ln.num_workers)
    try:
        return run_stage(io, run_dir, resume_from=resume_from)
    finally:
        make_learner.close()
