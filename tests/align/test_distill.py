"""The distill stage's pieces: JSD_beta against hand computations, its limits and temperature,
the chunked computation against the naive one (gradients included), masking, the teacher's
view of a row, the recipe checks, and training on a real tiny learner (a frozen teacher copy,
and LoRA with the adapters off as the teacher)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from medrl.align.records import Sample, UserError
from medrl.align.stages.distill import (DistillForward, DistillLoss, TeacherSpec, chunked_jsd,
                                        encode_example, jsd_beta, student_tokens,
                                        teacher_sample)
from medrl.align.stages.sft import ExampleSpec

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "distill_imt.yaml"

P = [0.7, 0.2, 0.1]  # the teacher's next-token distribution over a 3-token vocabulary
S = [0.2, 0.5, 0.3]  # the student's


def logits(probs):
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float64)


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------- the loss


def test_jsd_equals_a_hand_computation():
    # beta 0.5: M = [0.45, 0.35, 0.20]
    # KL(P||M) = 0.7 ln(0.7/0.45) + 0.2 ln(0.2/0.35) + 0.1 ln(0.1/0.2) = 0.1328...
    # KL(S||M) = 0.2 ln(0.2/0.45) + 0.5 ln(0.5/0.35) + 0.3 ln(0.3/0.2) = 0.1330...
    by_hand = 0.5 * kl(P, [0.45, 0.35, 0.20]) + 0.5 * kl(S, [0.45, 0.35, 0.20])
    assert by_hand == pytest.approx(0.132918006, abs=1e-8)
    got = jsd_beta(logits(P), logits(S), beta=0.5)
    assert float(got) == pytest.approx(by_hand, rel=1e-6)
    # beta 0.25: M = 0.25 P + 0.75 S = [0.325, 0.425, 0.25]
    by_hand = 0.25 * kl(P, [0.325, 0.425, 0.25]) + 0.75 * kl(S, [0.325, 0.425, 0.25])
    assert by_hand == pytest.approx(0.102814570, abs=1e-8)
    assert float(jsd_beta(logits(P), logits(S), beta=0.25)) == pytest.approx(by_hand, rel=1e-6)
    # symmetric at 0.5, not at 0.25; zero for equal distributions; shift-invariant logits
    assert float(jsd_beta(logits(S), logits(P), beta=0.5)) == pytest.approx(0.132918006,
                                                                             abs=1e-6)
    assert float(jsd_beta(logits(S), logits(P), beta=0.25)) != pytest.approx(0.102814570,
                                                                              abs=1e-4)
    assert float(jsd_beta(logits(P) + 3.0, logits(P), beta=0.5)) == pytest.approx(0.0, abs=1e-7)


def test_the_limits_are_the_forward_and_reverse_kl():
    assert kl(P, S) == pytest.approx(0.583814703, abs=1e-8)
    assert kl(S, P) == pytest.approx(0.537176459, abs=1e-8)
    assert float(jsd_beta(logits(P), logits(S), beta=0.0)) == pytest.approx(kl(P, S), rel=1e-6)
    assert float(jsd_beta(logits(P), logits(S), beta=1.0)) == pytest.approx(kl(S, P), rel=1e-6)
    # the mixture form itself vanishes towards both ends: the limits are defined, not reached
    assert float(jsd_beta(logits(P), logits(S), beta=1e-6)) < 1e-5
    assert float(jsd_beta(logits(P), logits(S), beta=1 - 1e-6)) < 1e-5
    with pytest.raises(ValueError, match="beta"):
        jsd_beta(logits(P), logits(S), beta=1.5)


def test_temperature_divides_the_logits_before_the_softmax():
    zt, zs = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.0, 1.0, 0.3])
    at_two = float(jsd_beta(zt, zs, beta=0.5, temperature=2.0))
    pt = torch.softmax(zt / 2, -1).tolist()
    ps = torch.softmax(zs / 2, -1).tolist()
    m = [0.5 * a + 0.5 * b for a, b in zip(pt, ps)]
    assert at_two == pytest.approx(0.5 * kl(pt, m) + 0.5 * kl(ps, m), rel=1e-5)
    # a higher temperature flattens both distributions: they are closer
    assert at_two < float(jsd_beta(zt, zs, beta=0.5, temperature=1.0))


def test_chunked_equals_naive_with_gradients():
    torch.manual_seed(0)
    N, H, V = 11, 8, 13
    student_head, teacher_head = torch.nn.Linear(H, V), torch.nn.Linear(H, V)
    sh = torch.randn(N, H, requires_grad=True)
    th = torch.randn(N, H)
    weights = torch.rand(N)  # a weighted sum, so every position's gradient is checked

    naive = jsd_beta(teacher_head(th), student_head(sh), beta=0.3, temperature=1.5)
    (naive * weights).sum().backward()
    want = (sh.grad.clone(), student_head.weight.grad.clone(), student_head.bias.grad.clone())
    sh.grad = None
    student_head.zero_grad()
    teacher_head.zero_grad()

    jsd, agree = chunked_jsd(sh, th, student_head, teacher_head, beta=0.3, temperature=1.5,
                             chunk_size=4)
    assert jsd.shape == agree.shape == (N,)
    assert torch.allclose(jsd, naive.detach(), atol=1e-6)
    (jsd * weights).sum().backward()
    for got, ref in zip((sh.grad, student_head.weight.grad, student_head.bias.grad), want):
        assert torch.allclose(got, ref, atol=1e-6)
    assert teacher_head.weight.grad is None  # the teacher is never trained
    same = teacher_head(th).argmax(-1) == student_head(sh).argmax(-1)
    assert agree.tolist() == same.float().tolist()


# -------------------------------------------------------------------- on a tiny model


@pytest.fixture(scope="module")
def tok(tiny_qwen2):
    from medrl.align.models import load_tokenizer

    return load_tokenizer(tiny_qwen2)


def row_sample(i: int, answer: str, rationale: str) -> Sample:
    from medrl.align.prompts import open_messages

    row = {"question": f"Case {i}: which option?", "rationale": rationale, "response": answer}
    return Sample(uid=f"r{i}", group_id=f"r{i}", row=row,
                  messages=open_messages(row["question"]))


SPEC = TeacherSpec(privileged_field="rationale")


def pairs(tok, samples, max_length=256):
    ex = ExampleSpec(response_field="response", max_length=max_length)
    return [x for s in samples for x in encode_example(tok, s, teacher_sample(s, SPEC), ex)]


def test_the_teacher_sees_the_privileged_text_and_the_same_completion(tok):
    s = row_sample(0, "Answer: B", "The right coronary artery supplies it, so B.")
    teacher, student = pairs(tok, [s])
    assert "The right coronary artery" in tok.decode(teacher.prompt_ids)
    assert "The right coronary artery" not in tok.decode(student.prompt_ids)
    assert teacher.completion_ids == student.completion_ids
    assert len(teacher.prompt_ids) > len(student.prompt_ids)
    # both fit max_length: the completion is cut to the teacher's room
    short = pairs(tok, [s], max_length=len(teacher.prompt_ids) + 2)
    assert len(short[0].completion_ids) == len(short[1].completion_ids) == 2
    with pytest.raises(UserError, match="rationale"):
        teacher_sample(row_sample(1, "Answer: A", ""), SPEC)
    with pytest.raises(UserError, match="teacher_prompt_template"):
        teacher_sample(s, TeacherSpec(prompt_template="{prompt} {no_such_column}"))
    templated = teacher_sample(s, TeacherSpec(prompt_template="Hint: {rationale}\n{prompt}"))
    assert templated.messages[-1]["content"].startswith("Hint: The right coronary")


def test_padding_and_prompt_tokens_contribute_nothing(tiny_qwen2, tok):
    """The loss of a batch whose rows differ in prompt and answer lengths is the token-weighted
    mean of each row's loss alone: padding (prompt or completion) adds nothing."""
    from medrl.align.batch import collate
    from medrl.align.models import load_model

    model = load_model(tiny_qwen2, dtype=torch.float32)
    forward = DistillForward(beta=0.5, teacher_dir=str(tiny_qwen2), chunk_size=3)
    loss_fn = DistillLoss(model_forward=forward)
    samples = [row_sample(0, "Answer: B, the right coronary artery.", "B is right."),
               row_sample(1, "A", "The answer is A because the long rationale says so.")]
    both = pairs(tok, samples)
    pad = tok.pad_token_id

    def loss_of(items):
        mb = collate(items, pad_token_id=pad)
        out = forward(model, mb.input_ids, mb.attention_mask, mb.num_completion_tokens)
        return loss_fn(out, mb)

    whole, m = loss_of(both)
    alone = [loss_of(both[i:i + 2]) for i in (0, 2)]
    n = [len(both[1].completion_ids), len(both[3].completion_ids)]
    assert n[0] != n[1] and m["tokens"] == sum(n)
    expected = sum(float(a[0].detach()) * k for a, k in zip(alone, n)) / sum(n)
    assert float(whole.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(whole.detach()) > 0  # the rationale changes the teacher's distribution
    assert student_tokens(collate(both, pad_token_id=pad)) == sum(n)
    # the same view on both sides: nothing to learn
    same = [x for s in samples for x in encode_example(
        tok, s, s, ExampleSpec(response_field="response"))]
    assert float(loss_of(same)[0]) == pytest.approx(0.0, abs=1e-6)


def training_rows():
    # the privileged rationale names the answer; the student sees only the question
    letters = "ABCDABCD"
    return [row_sample(i, f"Answer: {c}", f"The findings point to option {c}.")
            for i, c in enumerate(letters)]


def train(learner, tok, forward, steps):
    loss_fn = DistillLoss(model_forward=forward)
    batch = learner.collate(pairs(tok, training_rows()))
    return [learner.train_step_with(loss_fn, batch, size_fn=student_tokens)
            for _ in range(steps)]


def test_on_the_tiny_model_training_lowers_the_jsd(make_learner, tiny_qwen2, tok):
    learner = make_learner(lr=1e-4, micro_batch_size=4)  # 2 rows per micro-batch
    forward = DistillForward(beta=0.5, teacher_dir=str(tiny_qwen2), chunk_size=5)
    history = train(learner, tok, forward, 8)
    first, last = history[0], history[-1]
    assert first["jsd"] > 0 and first["loss"] == pytest.approx(first["jsd"], rel=1e-6)
    assert last["jsd"] < 0.3 * first["jsd"]
    assert first["tokens"] == sum(len(s.completion_ids) for s in pairs(tok, training_rows())[1::2])
    assert 0.0 <= last["agreement"] <= 1.0 and math.isfinite(first["grad_norm"])


def test_lora_uses_the_adapters_off_as_the_teacher(make_learner, tok):
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    learner = make_learner(lr=1e-3, micro_batch_size=4, lora=lora)
    forward = DistillForward(beta=0.5, teacher_dir=None, chunk_size=1024)
    history = train(learner, tok, forward, 6)
    assert history[0]["jsd"] > 0
    assert history[-1]["jsd"] < history[0]["jsd"]
    # the teacher (adapters off) stayed the starting model: the same view scores 0 with the
    # adapters off, but the trained student (adapters on) no longer matches it
    policy = learner.engine.module.policy
    samples = training_rows()[:2]
    same = learner.collate([x for s in samples for x in encode_example(
        tok, s, s, ExampleSpec(response_field="response"))])
    with torch.no_grad():
        jsd, _ = forward(policy, same.input_ids, same.attention_mask, same.num_completion_tokens)
    assert float(jsd.max()) > 1e-6


# -------------------------------------------------------------------------- the recipe


def write(tmp_path: Path, **distill) -> Path:
    data = yaml.safe_load(RECIPE.read_text())
    data["data"]["path"] = str(REPO / "recipes" / data["data"]["path"])
    data["distill"].update(distill)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_recipe_validates(tmp_path):
    from medrl.launch.recipe import load_recipe
    from medrl.launch.stages import check_recipe

    recipe = load_recipe(RECIPE)
    assert (recipe.distill.beta, recipe.distill.temperature, recipe.distill.epochs) == (0.5, 1.0, 3)
    assert (recipe.learner.lr, recipe.learner.weight_decay) == (1e-4, 0.01)
    assert any(c.startswith("distill: 6 training") for c in check_recipe(recipe, RECIPE.parent))


def test_bad_distill_configs_are_refused_naming_the_field(tmp_path):
    from medrl.launch.recipe import RecipeError, load_recipe
    from medrl.launch.stages import check_recipe

    with pytest.raises(RecipeError, match="sees no privileged input"):
        load_recipe(write(tmp_path, privileged_field=None))
    with pytest.raises(RecipeError, match="distill"):  # the section belongs to its stage
        load_recipe(write(tmp_path), ["run.stage=sft"])
    recipe = load_recipe(write(tmp_path, teacher=str(tmp_path / "no_such_teacher")))
    with pytest.raises(UserError, match="distill.teacher"):
        check_recipe(recipe, tmp_path)
    # a row without its privileged input: named by its position in the file
    rows = (REPO / "recipes" / "data" / "imt_sample.jsonl").read_text().splitlines()
    bad = tmp_path / "rows.jsonl"
    broken = yaml.safe_load(rows[3])
    del broken["rationale"]
    import json

    bad.write_text("\n".join(rows[:3] + [json.dumps(broken)] + rows[4:]) + "\n")
    recipe = load_recipe(write(tmp_path), [f"data.path={bad}"])
    with pytest.raises(UserError, match=r"row 3 .*'rationale' \(distill.privileged_field\)"):
        check_recipe(recipe, tmp_path)


def test_a_vlm_teacher_sees_its_own_image(tiny_qwen2_vl):
    """Images split between the two views by row: the same image on both sides scores 0, the
    teacher's own image (a mask overlay, say) does not."""
    from PIL import Image

    from medrl.align.batch import collate
    from medrl.align.models import load_model, load_tokenizer
    from medrl.align.prompts import open_messages

    processor = load_tokenizer(tiny_qwen2_vl)
    model = load_model(tiny_qwen2_vl, dtype=torch.float32)
    plain = Image.new("RGB", (56, 56), (120, 30, 30))
    overlay = Image.new("RGB", (56, 84), (10, 200, 90))  # another size: other patch counts
    rows = [Sample(uid=f"v{i}", group_id=f"v{i}", row={"response": "A lesion."},
                   messages=open_messages("Describe the image.", num_images=1), images=[plain])
            for i in range(2)]
    ex = ExampleSpec(response_field="response")
    forward = DistillForward(beta=0.5, teacher_dir=str(tiny_qwen2_vl), chunk_size=2)

    def jsd_of(teacher_images):
        items = [x for s in rows for x in encode_example(
            processor, s, teacher_sample(s, TeacherSpec(), teacher_images), ex)]
        mb = collate(items, pad_token_id=processor.tokenizer.pad_token_id, processor=processor)
        with torch.no_grad():
            jsd, _ = forward(model, mb.input_ids, mb.attention_mask, mb.num_completion_tokens,
                             **mb.model_inputs())
        return jsd * mb.completion_mask[1::2]

    assert float(jsd_of([plain]).abs().max()) < 1e-6
    assert float(jsd_of([overlay]).min(dim=1).values.min()) >= 0
    assert float(jsd_of([overlay]).sum()) > 1e-6
