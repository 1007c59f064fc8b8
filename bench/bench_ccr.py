"""CCR's cost per step against the raw limit: one learner forward over the same batch.

The ``counterfactual`` reward masks the region of every sample's image and scores the masked
copies through the policy log-prob hook: one extra forward over the batch (``original:
rollout``, the original term from the rollout's log-probs), or one over twice the batch
(``original: policy``, the originals scored in the same call). Its own work on top is the
masking, the prompt re-encoding of the edited copies and the collate. Contenders on the same
batch (P = 2 prompts x G = 4 completions of 32 tokens, one image each, a tiny Qwen2-VL-shaped
policy on this CPU, the learner in this process, as the hook's forward runs on a rank):

- **forward**: ``Learner.logprobs`` of the batch (what one extra forward costs);
- **ccr, original: rollout** / **ccr, original: policy**.

Images: the real DDTI thyroid ultrasound (``../shared/data/ultrasound_ddti/20436.png`` and its
mask, resized to 224 x 224) when present, else the bundled synthetic one. Reported: medians of
interleaved rounds and the paired ratio to the forward (target for ``original: rollout``:
<= 1.15x).

Run from the repository root: ``python -m bench.bench_ccr`` (``--quick`` to check it).
"""

from __future__ import annotations

import dataclasses

from bench.common import (REPO, base_parser, finish_args, interleave, paired_ratio,
                          save_result, start_clock, table)

MODULE = "bench.bench_ccr"
SHARED = REPO.parent / "shared" / "data" / "ultrasound_ddti"
BUNDLED = REPO / "recipes" / "data" / "ccr"
SIDE = 224


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per sample")
    return finish_args(parser.parse_args())


def image_and_mask(tmp) -> tuple[object, str, str]:
    """(RGB image, path of the mask, where they came from), resized to SIDE x SIDE."""
    from PIL import Image

    src = (SHARED / "20436.png", SHARED / "20436_mask.png", "DDTI 20436 (real)") \
        if (SHARED / "20436.png").is_file() else \
        (BUNDLED / "ccr_001.png", BUNDLED / "ccr_001_mask.png", "bundled synthetic")
    with Image.open(src[0]) as im:
        image = im.convert("RGB").resize((SIDE, SIDE))
    with Image.open(src[1]) as m:
        mask_path = f"{tmp}/mask.png"
        m.convert("L").resize((SIDE, SIDE), Image.NEAREST).save(mask_path)
    return image, mask_path, src[2]


def make_batch(learner, image, mask_path: str, tokens: int):
    """P 2 x G 4 samples as an engine returns them (prompt_source stamped)."""
    import torch

    from medrl.align.encode import encode_prompt
    from medrl.align.prompts import open_messages
    from medrl.align.records import Sample
    from medrl.rollouts.engine import finished_sample

    gen = torch.Generator().manual_seed(0)
    out = []
    for p in range(2):
        prompt = Sample(uid=f"p{p}", group_id=f"p{p}", row={"region": mask_path},
                        messages=open_messages("Is there a nodule? Answer A or B.",
                                               num_images=1), images=[image])
        ids = encode_prompt(learner.tokenizer, prompt).prompt_ids[0]
        for g in range(4):
            completion = torch.randint(100, 1000, (tokens,), generator=gen).tolist()
            out.append(finished_sample(prompt, g, prompt_ids=ids, completion_ids=completion,
                                       logprobs=[0.0] * tokens, finish_reason="length",
                                       tokenizer=learner.tokenizer.tokenizer, policy_version=0))
    lp = learner.logprobs(learner.collate(out))
    return [dataclasses.replace(s, rollout_logprobs=lp[i, :tokens].tolist())
            for i, s in enumerate(out)]


def main() -> None:
    import tempfile

    args = parse_args()
    started, machine = start_clock()
    import torch

    torch.set_num_threads(args.threads)
    from medrl.align.learner import Learner
    from medrl.align.models import resolve_policy
    from medrl.launch.reward_hooks import PromptEncoder, current_prompts
    from medrl.rewards.api import RewardContext
    from medrl.rewards.counterfactual import Counterfactual

    policy = resolve_policy("tiny:qwen2-vl")
    learner = Learner(str(policy), zero_stage=0, micro_batch_size=16, lr=1e-5,
                      temperature=1.0)
    encoder = PromptEncoder(policy)

    def hook(samples):
        current = current_prompts(samples, encoder)
        lp = learner.logprobs(learner.collate(current))
        return [lp[i, :len(s.completion_ids)].tolist() for i, s in enumerate(current)]

    with tempfile.TemporaryDirectory() as tmp:
        image, mask_path, source = image_and_mask(tmp)
        batch = make_batch(learner, image, mask_path, args.tokens)
        rewards = {}
        for name, kwargs in {"rollout": {}, "policy": {"original": "policy"}}.items():
            r = Counterfactual(**kwargs)
            r.setup(RewardContext(policy_logprobs=hook, seed=0))
            rewards[name] = r
        t = interleave({
            "forward": lambda: learner.logprobs(learner.collate(batch)),
            "rollout": lambda: rewards["rollout"](batch),
            "policy": lambda: rewards["policy"](batch),
        }, repeat=args.repeat, warmup=args.warmup)
    labels = {"forward": "learner forward (the raw limit)",
              "rollout": "ccr, original: rollout", "policy": "ccr, original: policy"}
    rows = [[labels[k], round(t[k].median, 4), round(paired_ratio(t[k], t["forward"]), 2)]
            for k in labels]
    tables = [table(
        f"CCR reward per step vs one learner forward ({len(batch)} samples x {args.tokens} "
        f"tokens, one {SIDE}x{SIDE} image each)",
        ["contender", "median s", "x forward"], rows,
        [f"image: {source}; tiny Qwen2-VL-shaped policy (random weights), fp32, the "
         "learner in this process (ZeRO 0); the hook checks what each masked copy changed "
         "(same-size images: the prompt is not encoded again) and collates them, as in a run; "
         "both contenders include the collate (the image processor)",
         "original: rollout scores N masked copies (the original term is the rollout's "
         "log-probs); policy scores 2N in one call",
         f"the region covers {rewards['rollout'].stats['region_area_share']:.0%} of the "
         "image (the DDTI mask is a large nodule: no equal-area background patch fits, so the "
         "control is not measured; it adds N copies to the same call)",
         f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up; x forward "
         "is the median of the paired per-round ratios"])]
    save_result("ccr", module=MODULE, args=args, machine=machine,
                settings={"tokens": args.tokens, "side": SIDE, "image": source},
                tables=tables, raw={k: v.to_json() for k, v in t.items()}, started=started)


if __name__ == "__main__":
    main()
