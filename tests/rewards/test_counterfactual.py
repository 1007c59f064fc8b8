"""CCR: region masks, pixel masking and the counterfactual reward on a real tiny Qwen2-VL,
whose log-probs go through medrl's own collate and token_logprobs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medrl.align.records import Sample, UserError
from medrl.rewards.api import RewardContext
from medrl.rewards.counterfactual import (Counterfactual, background_box, box_pixels,
                                          masked_image, region_mask)

ULTRASOUND = Path(__file__).resolve().parents[3] / "shared" / "data" / "ultrasound_ddti"


def synthetic(size=(56, 56)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# ------------------------------------------------------------------------------- regions


def test_region_from_a_mask_image_resized_nearest(tmp_path):
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[2:6, 4:10] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    got = region_mask("m.png", (20, 10), data_dir=tmp_path, uid="s1")
    assert got.dtype == bool and got.shape == (10, 20) and np.array_equal(got, mask > 0)
    doubled = region_mask(str(tmp_path / "m.png"), (40, 20), uid="s1")  # absolute, resized
    assert doubled.shape == (20, 40) and np.array_equal(doubled[::2, ::2], mask > 0)


def test_region_from_pixel_and_normalised_boxes():
    got = region_mask([4, 2, 10, 6], (20, 10), uid="s1")
    want = np.zeros((10, 20), dtype=bool)
    want[2:6, 4:10] = True
    assert np.array_equal(got, want)
    assert np.array_equal(region_mask([0.2, 0.2, 0.5, 0.6], (20, 10), uid="s1"), want)
    assert box_pixels((0, 0, 20, 10), (20, 10), uid="s", field="f") == (0, 0, 20, 10)


@pytest.mark.parametrize("box", [[1, 2, 3], [5, 2, 4, 6], [0, 0, 21, 10], [-1, 0, 5, 5],
                                 [0, 0, float("nan"), 4], [True, 0, 4, 4], "3,4,5,6"])
def test_bad_box_names_the_sample_and_field(box):
    with pytest.raises(UserError, match=r"sample case-7.*'lesion'"):
        region_mask(box, (20, 10), uid="case-7", field="lesion")


def test_missing_mask_and_label_volume_name_the_sample_and_field(tmp_path):
    with pytest.raises(UserError, match=r"sample case-7.*'lesion'.*not found"):
        region_mask("gone.png", (20, 10), data_dir=tmp_path, uid="case-7", field="lesion")
    with pytest.raises(UserError, match=r"sample case-7.*'lesion'.*not supported yet"):
        region_mask("labels.nii.gz", (20, 10), data_dir=tmp_path, uid="case-7", field="lesion")


# ------------------------------------------------------------------------------- masking


def check_fills(image: Image.Image, mask: np.ndarray) -> None:
    before = np.asarray(image.convert("RGB"))
    mean = np.rint(before.reshape(-1, 3).astype(np.float64).mean(0)).astype(np.uint8)
    for fill in ("zero", "mean", "blur"):
        after = np.asarray(masked_image(image, mask, fill, blur_radius=4))
        assert after.shape == before.shape
        assert np.array_equal(after[~mask], before[~mask])  # outside: exactly the same
        if fill == "zero":
            assert (after[mask] == 0).all()
        elif fill == "mean":
            assert (after[mask] == mean).all()
        else:
            from PIL import ImageFilter

            blurred = np.asarray(image.convert("RGB").filter(ImageFilter.GaussianBlur(4)))
            assert np.array_equal(after[mask], blurred[mask])
            assert not np.array_equal(after[mask], before[mask])
    assert np.array_equal(np.asarray(masked_image(image, np.zeros_like(mask), "zero")), before)


def test_masked_image_fills_on_a_synthetic_image():
    mask = region_mask([10, 20, 30, 40], (56, 56), uid="syn")
    check_fills(synthetic(), mask)
    with pytest.raises(ValueError, match="does not match"):
        masked_image(synthetic(), mask[:10], "zero")


def test_masked_image_fills_on_a_real_ultrasound_with_its_mask():
    image_path = ULTRASOUND / "20436.png"
    if not image_path.is_file() or not (ULTRASOUND / "20436_mask.png").is_file():
        pytest.skip(f"the DDTI ultrasound image and mask are not at {ULTRASOUND}")
    image = Image.open(image_path)
    mask = region_mask("20436_mask.png", image.size, data_dir=ULTRASOUND, uid="20436")
    assert 0 < mask.mean() < 1
    check_fills(image, mask)


def test_background_box_is_equal_area_disjoint_and_deterministic():
    mask = region_mask([10, 10, 30, 20], (64, 48), uid="s")
    patch = background_box(mask, seed=3, uid="s")
    assert patch is not None and not (patch & mask).any()
    assert abs(int(patch.sum()) - int(mask.sum())) <= 0.1 * mask.sum()
    assert np.array_equal(patch, background_box(mask, seed=3, uid="s"))
    assert background_box(np.ones((8, 8), bool), seed=0, uid="s") is None  # no room left


# ------------------------------------------------------------ the reward on a tiny Qwen2-VL


@pytest.fixture(scope="module")
def vlm(tiny_qwen2_vl):
    from medrl.align.models import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(tiny_qwen2_vl, dtype=torch.float32).eval(), load_tokenizer(tiny_qwen2_vl)


def make_sample(proc, image, uid, completion, region=None, question="Lesion?"):
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = proc(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    row = {} if region is None else {"region": region}
    return Sample(uid=uid, group_id=uid, row=row, messages=messages, images=[image],
                  prompt_ids=prompt_ids, completion_ids=list(completion))


def medrl_hook(model, proc):
    """ctx.policy_logprobs as a run lends it: medrl's collate, then token_logprobs."""
    from medrl.align.batch import collate
    from medrl.align.logprobs import token_logprobs

    calls = []

    def hook(samples):
        calls.append(len(samples))
        batch = collate(samples, pad_token_id=proc.tokenizer.pad_token_id, processor=proc)
        with torch.no_grad():
            lp = token_logprobs(model, batch.input_ids, batch.attention_mask,
                                num_completion_tokens=batch.num_completion_tokens,
                                **batch.model_inputs())
        return [lp[i, :len(s.completion_ids)].tolist() for i, s in enumerate(samples)]

    hook.calls = calls
    return hook


def direct_logprobs(model, proc, image, sample) -> np.ndarray:
    """The completion's log-probs by a plain forward of one sample (no medrl batching)."""
    pixels = proc.image_processor(images=[image], return_tensors="pt")
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    image_token = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    mm = torch.zeros_like(ids, dtype=torch.int)
    mm[0, :len(sample.prompt_ids)] = (ids[0, :len(sample.prompt_ids)] == image_token).int()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                       pixel_values=pixels["pixel_values"],
                       image_grid_thw=pixels["image_grid_thw"]).logits[0].float()
    P, T = len(sample.prompt_ids), len(sample.completion_ids)
    logp = torch.log_softmax(logits[P - 1:P + T - 1], -1)
    return logp.gather(1, ids[0, P:, None])[:, 0].numpy().astype(np.float64)


def mean_masked(image: Image.Image, box) -> Image.Image:
    a = np.asarray(image.convert("RGB")).copy()
    mean = np.rint(a.reshape(-1, 3).mean(0)).astype(np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = mean
    return Image.fromarray(a)


def run(reward: Counterfactual, hook, samples, seed=0):
    reward.setup(RewardContext(policy_logprobs=hook, seed=seed))
    return reward(samples)


@pytest.mark.parametrize("original", ["policy", "rollout"])
def test_reward_is_the_mean_log_prob_drop_of_the_real_model(vlm, original):
    model, proc = vlm
    hook = medrl_hook(model, proc)
    image = synthetic()
    box = [14, 14, 42, 42]
    samples = [make_sample(proc, image, "a", [300, 301, 302, 303], region=box),
               make_sample(proc, synthetic((28, 42)), "b", [310, 311], region=[0, 0, 0.5, 0.5]),
               make_sample(proc, image, "none", [300, 301])]  # no region: not applicable
    if original == "rollout":  # the engine's log-probs under the same weights
        for s, lp in zip(samples, hook(samples)):
            s.rollout_logprobs = lp
        hook.calls.clear()
    results = run(Counterfactual(original=original), hook, samples)
    assert hook.calls == ([4] if original == "policy" else [2])  # one batched call
    want_a = np.mean(direct_logprobs(model, proc, image, samples[0])
                     - direct_logprobs(model, proc, mean_masked(image, box), samples[0]))
    b_image = samples[1].images[0]
    want_b = np.mean(direct_logprobs(model, proc, b_image, samples[1])
                     - direct_logprobs(model, proc, mean_masked(b_image, (0, 0, 14, 21)),
                                       samples[1]))
    assert abs(want_a) > 1e-6  # the masked pixels reach the model
    assert results[0].score == pytest.approx(want_a, abs=2e-5)
    assert results[1].score == pytest.approx(want_b, abs=2e-5)
    assert results[2].score is None
    assert results[0].info["region_area"] == 28 * 28 and results[1].info["region_area"] == 14 * 21
    reward_metrics = Counterfactual(original=original)
    run(reward_metrics, hook, samples)
    m = reward_metrics.batch_metrics()
    assert m["not_applicable"] == 1
    assert m["region_area_share"] == pytest.approx((0.25 + 0.25) / 2)
    assert m["raw_mean"] == pytest.approx((want_a + want_b) / 2, abs=2e-5)
    assert m["clipped_share"] == 0 and m["hook_seconds"] >= 0


def test_an_empty_region_gives_zero_and_no_images_is_not_applicable(vlm, tmp_path):
    model, proc = vlm
    Image.fromarray(np.zeros((56, 56), np.uint8)).save(tmp_path / "empty.png")
    s = make_sample(proc, synthetic(), "e", [300, 301, 302], region="empty.png")
    s.data_dir = str(tmp_path)
    text_only = Sample(uid="t", group_id="t", row={"region": [0, 0, 4, 4]},
                       prompt_ids=[200, 201], completion_ids=[300])
    results = run(Counterfactual(original="policy"), medrl_hook(model, proc), [s, text_only])
    # the same inputs twice in one batch: equal up to float rounding of batched kernels
    assert results[0].score == pytest.approx(0.0, abs=1e-5) and results[0].info["region_area"] == 0
    assert results[1].score is None


def test_clip_at_five_keeps_the_raw_value(vlm):
    model, proc = vlm
    real = medrl_hook(model, proc)
    up = make_sample(proc, synthetic(), "up", [300, 301], region=[0, 0, 28, 28])
    down = make_sample(proc, synthetic(), "down", [300, 301], region=[0, 0, 28, 28])
    up.rollout_logprobs = [v + 40.0 for v in real([up])[0]]
    down.rollout_logprobs = [v - 40.0 for v in real([down])[0]]
    reward = Counterfactual(original="rollout")
    results = run(reward, real, [up, down])
    assert [r.score for r in results] == [5.0, -5.0]
    assert results[0].info["raw"] == pytest.approx(40.0, abs=0.5)
    assert reward.batch_metrics()["clipped_share"] == 1.0


def test_rollout_original_without_logprobs_is_a_clear_error(vlm):
    model, proc = vlm
    s = make_sample(proc, synthetic(), "r", [300], region=[0, 0, 8, 8])
    with pytest.raises(UserError, match=r"sample r.*original: policy"):
        run(Counterfactual(), medrl_hook(model, proc), [s])


def test_segmenter_plugin_and_image_index(vlm, tmp_path):
    model, proc = vlm
    (tmp_path / "seg.py").write_text(
        "import numpy as np\n"
        "class Corner:\n"
        "    def segment(self, image, sample):\n"
        "        m = np.zeros((image.size[1], image.size[0]), bool)\n"
        "        m[:10, :10] = True\n"
        "        return m\n")
    s = make_sample(proc, synthetic(), "g", [300, 301])
    reward = Counterfactual(segmenter="seg.py:Corner", original="policy")
    reward.setup(RewardContext(policy_logprobs=medrl_hook(model, proc), base_dir=tmp_path))
    got = reward([s])[0]
    want = np.mean(direct_logprobs(model, proc, s.images[0], s)
                   - direct_logprobs(model, proc, mean_masked(s.images[0], (0, 0, 10, 10)), s))
    assert got.info["region_area"] == 100 and got.score == pytest.approx(want, abs=2e-5)
    with pytest.raises(UserError, match=r"sample g.*image_index 3"):
        run(Counterfactual(image_index=3, original="policy"), medrl_hook(model, proc),
            [make_sample(proc, synthetic(), "g", [300], region=[0, 0, 8, 8])])


# ------------------------------------------------ a trained model uses the lesion, not the rest

SQUARE = (28, 28, 42, 42)  # one 14 x 14 patch of a 56 x 56 image
SHADES = (40, 100)  # background grey levels of the training images


def square_image(present: bool, shade: int) -> Image.Image:
    a = np.full((56, 56, 3), shade, np.uint8)
    if present:
        x0, y0, x1, y1 = SQUARE
        a[y0:y1, x0:x1] = 255
    return Image.fromarray(a)


def test_masking_the_learned_lesion_costs_more_than_masking_background(vlm, tiny_qwen2_vl):
    from medrl.align.batch import collate
    from medrl.align.logprobs import token_logprobs
    from medrl.align.models import load_model

    _, proc = vlm
    torch.manual_seed(0)
    model = load_model(tiny_qwen2_vl, dtype=torch.float32)
    tok = proc.tokenizer
    letter = {True: tok.encode("B"), False: tok.encode("A")}
    data = [make_sample(proc, square_image(p, shade), f"{p}{shade}", letter[p])
            for p in (True, False) for shade in SHADES]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = collate(data, pad_token_id=tok.pad_token_id, processor=proc)
    start = time.perf_counter()
    model.train()
    for _ in range(40):
        lp = token_logprobs(model, batch.input_ids, batch.attention_mask,
                            num_completion_tokens=batch.num_completion_tokens,
                            **batch.model_inputs())
        loss = -(lp * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert time.perf_counter() - start < 90
    assert loss.item() < 0.1  # it tells the two apart, so it reads the square

    seen = [make_sample(proc, square_image(True, shade), f"s{shade}", letter[True],
                        region=list(SQUARE)) for shade in SHADES]
    reward = Counterfactual(original="policy", fill="mean", control=True)
    results = run(reward, medrl_hook(model, proc), seen, seed=1)
    for r in results:
        assert r.score > 1.0  # "B" loses much of its likelihood without the square
        assert r.info["raw"] - r.info["control_raw"] > 1.0  # far less without a same-size patch
    assert reward.batch_metrics()["control_gap"] > 1.0
    assert reward.batch_metrics()["control_unplaced"] == 0
