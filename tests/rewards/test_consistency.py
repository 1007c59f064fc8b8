"""Med3D-R1 rewards: the logit bins at every edge, the strict format, letter / option-text
accuracy, the consistency reward on a tiny reward model (in process and in shared Ray judge
actors) against logits computed here, and the real CT-RATE MCQ rows through the data loader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from medrl.align.records import Sample, UserError
from medrl.rewards import RewardContext, RewardRunner, load_rewards
from medrl.rewards.consistency import (DEFAULT_EDGES, DEFAULT_VALUES, Med3DConsistency,
                                       bin_logit, check_bins, med3d_accuracy, med3d_format)
from medrl.rewards.rubric import JUDGE_REWARDS, RubricReward, judge_cpus
from medrl.rewards.rules import think_answer_format

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "grpo_med3d_r1.yaml"
CT_RATE = REPO.parent / "shared" / "data" / "ct_rate_mcq" / "sample_data.json"

# --- bins ---------------------------------------------------------------------------------------


def published_q(score: float) -> float:
    """Med3D-R1's quantisation operator, written out as the paper's code states it."""
    if score < 0.0:
        return 0.0
    if score < 0.2:
        return 0.2
    if score < 0.5:
        return 0.4
    if score < 1.0:
        return 0.6
    if score < 1.6:
        return 0.8
    return 1.0


@pytest.mark.parametrize("i", range(len(DEFAULT_EDGES)))
def test_each_edge_belongs_to_the_bin_above_it(i):
    edge = DEFAULT_EDGES[i]
    below = math.nextafter(edge, -math.inf)
    assert bin_logit(below, DEFAULT_EDGES, DEFAULT_VALUES) == DEFAULT_VALUES[i]
    assert bin_logit(edge, DEFAULT_EDGES, DEFAULT_VALUES) == DEFAULT_VALUES[i + 1]
    for x in (below, edge, edge + 1e-3):
        assert bin_logit(x, DEFAULT_EDGES, DEFAULT_VALUES) == published_q(x)


def test_far_logits_and_a_non_finite_one():
    assert bin_logit(-50.0, DEFAULT_EDGES, DEFAULT_VALUES) == 0.0
    assert bin_logit(50.0, DEFAULT_EDGES, DEFAULT_VALUES) == 1.0
    with pytest.raises(ValueError, match="finite"):
        bin_logit(float("nan"), DEFAULT_EDGES, DEFAULT_VALUES)


@pytest.mark.parametrize("edges, values, words", [
    ([0.0, 0.0, 1.0], [0, 1, 2, 3], "strictly increasing"),
    ([1.0, 0.5], [0, 1, 2], "strictly increasing"),
    ([], [0.0], "one or more"),
    ([0.0, float("inf")], [0, 1, 2], "finite numbers"),
    ([0.0, 1.0], [0, 1], "has 2 entries for 2 edges"),
    ([0.0, 1.0], [0, 1, 2, 3], "has 4 entries for 2 edges"),
])
def test_bad_bins_are_refused_naming_the_kwarg(edges, values, words):
    with pytest.raises(UserError, match=words):
        check_bins(edges, values)
    with pytest.raises(UserError, match="med3d_consistency: kwargs"):
        Med3DConsistency("rm", edges=edges, values=values)


def test_bins_from_recipe_kwargs_are_coerced_and_used():
    [loaded] = load_rewards([{"name": "med3d_consistency", "kwargs": {
        "model": "rm", "edges": [-1, "1"], "values": [0, 0.5, 1]}}])
    reward = loaded.target(**loaded.kwargs)
    assert (reward.edges, reward.values) == ((-1.0, 1.0), (0.0, 0.5, 1.0))
    with pytest.raises(UserError, match="must hold {answer}"):
        Med3DConsistency("rm", answer_turn="The answer is")


# --- format -------------------------------------------------------------------------------------

WELL_FORMED = ("<think>The axial slices show emphysematous changes in both upper lobes with "
               "bullae; no effusion or collapse.</think>\n<answer>D</answer>")


def sample(text, row=None, uid="s/0"):
    return Sample(uid=uid, group_id=uid.split("/")[0], row=row or {}, completion_text=text)


@pytest.mark.parametrize("text, want", [
    (WELL_FORMED, 1.0),
    ("  \n" + WELL_FORMED + "\n", 1.0),  # whitespace around the two blocks
    ("<think>Upper lobes look hyperlucent.</think><think>So emphysema.</think>"
     "<answer>D</answer>", 0.0),  # two think blocks
    ("<think>Upper lobes look hyperlucent, so emphysema.</think>", 0.0),  # no answer
    ("<answer>D</answer><think>Upper lobes look hyperlucent.</think>", 0.0),  # answer first
    ("<think>Bullae.</think><answer>D</answer> The answer is D.", 0.0),  # text outside
    ("<think> </think><answer>D</answer>", 0.0),  # empty reasoning
    ("<think>Bullae.</think><answer></answer>", 0.0),  # empty answer
    ("<think>Bullae in <b>both</b> lobes.</think><answer>D</answer>", 0.0),  # another tag
    ("<THINK>Bullae.</THINK><answer>D</answer>", 0.0),  # tags are case-sensitive
    ("<think>Bullae, size < 2 cm > 1 cm.</think><answer>D</answer>", 1.0),  # not tags
])
def test_format_on_med3d_style_answers(text, want):
    assert med3d_format(sample(text)) == want
    # the stricter rule never accepts what the general one refuses
    assert med3d_format(sample(text)) <= think_answer_format(sample(text))


# --- accuracy -----------------------------------------------------------------------------------

ROW = {"question": "What unusual finding is present?", "answer": "D",
       "options": {"A": "Hiatal hernia", "B": "Atelectasis", "C": "Pleural effusion",
                   "D": "Emphysema"}}


def tagged(answer: str) -> str:
    return f"<think>Hyperlucent upper lobes with bullae.</think><answer>{answer}</answer>"


@pytest.mark.parametrize("answer, want", [
    ("D", 1.0), (" d ", 1.0), ("Emphysema", 1.0), ("emphysema.", 1.0),
    ("D)", 0.5), ("D:", 0.5), ("D.", 0.5), ("(D)", 0.5), ("D) Emphysema", 0.5),
    ("D: emphysema", 0.5), ("D)Emphysema", 0.5),
    ("A", 0.0), ("B)", 0.0), ("Atelectasis", 0.0), ("Emphysema and effusion", 0.0),
    ("D) Atelectasis", 0.0),  # the text names another option: no credit for the letter
    ("E", 0.0), ("The answer is D", 0.0), ("**D**", 0.0),
])
def test_accuracy_reads_the_letter_and_the_option_text(answer, want):
    assert med3d_accuracy(sample(tagged(answer), ROW)) == want


def test_accuracy_without_an_answer_tag_or_without_a_gold_answer():
    assert med3d_accuracy(sample("D", ROW)) == 0.0  # the answer tag is required
    assert med3d_accuracy(sample("<answer>D</answer><answer>A</answer>", ROW)) == 1.0  # first
    assert med3d_accuracy(sample(tagged("D)"), ROW), partial=0.25) == 0.25
    assert med3d_accuracy(sample(tagged("D"), {**ROW, "answer": None})) is None
    # a MedQA-style row: the letter in answer_idx, the text in answer
    medqa = {**ROW, "answer": "Emphysema", "answer_idx": "D"}
    assert med3d_accuracy(sample(tagged("D"), medqa)) == 1.0


# --- the consistency reward on a tiny reward model ----------------------------------------------

QUESTIONS = [("Which abnormality can be seen on this chest CT?",
              {"A": "Pericardial effusion", "B": "Pulmonary nodule", "C": "Pneumothorax"}, "B"),
             ("What does the pleural space show?",
              {"A": "A large effusion", "B": "No effusion"}, "B")]
ANSWERS = ["<think>A small round opacity in the right lung.</think><answer>B</answer>",
           "<answer>A</answer>", "B) Pulmonary nodule", "I cannot tell from the slices.",
           "<think>Air around the lung.</think><answer>C</answer>", "No.",
           "<think>The pleural space is clear on every slice.</think><answer>B</answer>",
           "<answer>A large effusion</answer>"]


def batch() -> list[Sample]:
    """Four completions per question, with an image part in the prompt (as a 3D VLM's
    prompt has), and one row without an answer."""
    out = []
    for q, (question, options, answer) in enumerate(QUESTIONS):
        row = {"question": question, "options": options, "answer": answer}
        messages = [{"role": "system", "content": "Think, then answer with a letter."},
                    {"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        for k in range(4):
            out.append(Sample(uid=f"q{q}/{k}", group_id=f"q{q}", row=row, messages=messages,
                              completion_text=ANSWERS[4 * q + k]))
    out.append(Sample(uid="open/0", group_id="open", row={"question": "Describe it."},
                      messages=[{"role": "user", "content": "Describe it."}],
                      completion_text="A nodule."))
    return out


def conversation(s: Sample) -> list[dict[str, str]]:
    """The published conversation: the prompt's text, the response, the answer turn."""
    def text(content):
        return content if isinstance(content, str) else \
            " ".join(p["text"] for p in content if p["type"] == "text")

    gold = s.row["options"][s.row["answer"]]
    return [{"role": m["role"], "content": text(m["content"])} for m in s.messages] + [
        {"role": "assistant", "content": s.completion_text},
        {"role": "user", "content": f"The correct answer is {gold}"}]


def own_logits(folder: Path, samples: list[Sample]) -> list[float]:
    """Each sample's logit, one unpadded forward pass at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for s in samples:
        text = tok.apply_chat_template(conversation(s), tokenize=False)
        with torch.no_grad():
            out.append(model(**tok(text, return_tensors="pt",
                                   add_special_tokens=False)).logits[0, 0].item())
    return out


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    """A random 1-layer Qwen2ForSequenceClassification (bundled tokenizer, its chat
    template) whose head is centred on these conversations, so that their logits spread
    over several bins instead of sharing the offset of the common last token."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from medrl.align.models import TOKENIZER_DIR

    folder = tmp_path_factory.mktemp("med3d") / "rm"
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config).eval()
    hidden = []
    for s in batch()[:-1]:
        ids = tok(tok.apply_chat_template(conversation(s), tokenize=False),
                  return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden.append(model.model(**ids).last_hidden_state[0, -1])
    h = torch.stack(hidden)
    centred = h - h.mean(0)
    w = torch.linalg.lstsq(centred, torch.linspace(-1.0, 2.5, len(h))[:, None]).solution[:, 0]
    w -= (w @ h.mean(0)) / (h.mean(0) @ h.mean(0)) * h.mean(0)  # no common offset
    with torch.no_grad():
        model.score.weight.copy_(w[None])
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def check_scores(results, samples, logits):
    """Every answered sample: the published bin of its own logit; the open row: None."""
    scores = [r.score for r in results]
    assert scores[-1] is None and results[-1].info is None
    assert scores[:-1] == [published_q(x) for x in logits]
    assert [r.info["logit"] for r in results[:-1]] == pytest.approx(logits, abs=1e-4)
    assert len(set(scores[:-1])) >= 4  # the head spreads them: several bins are checked


def test_consistency_bins_the_reward_models_own_logit(rm_dir, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # in this process
    samples = batch()
    logits = own_logits(rm_dir, samples[:-1])
    reward = Med3DConsistency(rm_dir.name, batch_size=3)
    reward.setup(RewardContext(base_dir=rm_dir.parent))
    assert reward.judge.host is not None and reward.judge.spec.output == "logit"
    check_scores(reward(samples), samples, logits)
    assert reward.batch_metrics()["judge_pairs"] == 8.0
    # other bins, read off the same logits: the midpoints between them put one in each bin
    ordered = sorted(logits)
    edges = [(a + b) / 2 for a, b in zip(ordered, ordered[1:])]
    values = [float(i) for i in range(len(ordered))]
    custom = Med3DConsistency(str(rm_dir), edges=edges, values=values)
    custom.setup(RewardContext())
    got = [r.score for r in custom(samples)[:-1]]
    assert got == [float(ordered.index(x)) for x in logits]


def test_the_criterion_rendering_reads_the_rubric_models_text(rm_dir, monkeypatch):
    import torch
    import ray
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from medrl.rewards.rubric_scorers import instruction_text, rm_input

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    samples = batch()[:4]
    reward = Med3DConsistency(str(rm_dir), rendering="criterion", edges=[0.0], values=[-1, 1])
    reward.setup(RewardContext())
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    want = []
    for s in samples:
        text = rm_input(instruction_text(s.messages), "The correct answer is Pulmonary nodule",
                        s.completion_text)
        with torch.no_grad():
            want.append(model(**tok(text, return_tensors="pt")).logits[0, 0].item())
    results = reward(samples)
    assert [r.info["logit"] for r in results] == pytest.approx(want, abs=1e-4)
    assert [r.score for r in results] == [1.0 if x >= 0 else -1.0 for x in want]


def test_a_reward_model_without_a_chat_template_is_refused_for_chat(rm_dir, tmp_path,
                                                                    monkeypatch):
    import json
    import shutil

    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    bare = tmp_path / "bare"
    shutil.copytree(rm_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = bare / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    with pytest.raises(UserError, match="has no chat template"):
        Med3DConsistency(str(bare)).setup(RewardContext())


def test_it_counts_as_a_judge_reward_for_the_cluster_reservation():
    assert "med3d_consistency" in JUDGE_REWARDS
    assert judge_cpus([{"name": "med3d_consistency",
                        "kwargs": {"model": "rm", "replicas": 2, "judge_num_cpus": 0.5}}]) == 1.0
    # one model folder read as logits here and as probabilities by the rubric: two judges
    assert judge_cpus([{"name": "med3d_consistency", "kwargs": {"model": "rm"}},
                       {"name": "rubric", "kwargs": {"model": "rm"}}]) == 2.0


@pytest.mark.slow
def test_consistency_in_judge_actors_kept_apart_from_probability_users(ray_local, rm_dir):
    from medrl.rewards.rubric_scorers import CriterionPair

    samples = batch()
    logits = own_logits(rm_dir, samples[:-1])
    base = rm_dir.parent
    runner = RewardRunner(load_rewards([
        {"name": "med3d_consistency", "kwargs": {"model": rm_dir.name, "judge_num_cpus": 0.5}},
        {"name": "med3d_accuracy"}], base_dir=base), ctx=RewardContext(base_dir=base))
    rubric = RubricReward(model=str(rm_dir), judge_num_cpus=0.5)
    try:
        runner.start()
        consistency = runner._workers["med3d_consistency"].instance
        assert consistency.judge.host is None and len(consistency.judge.actors) == 1
        runner.score(samples)
        got = [s.rewards["med3d_consistency"] for s in samples]
        assert got[:-1] == [published_q(x) for x in logits] and got[-1] is None
        assert [s.rewards["med3d_accuracy"] for s in samples[:4]] == [1.0, 0.0, 0.0, 0.0]
        # a rubric reward on the same folder reads probabilities: its own judge, not ours
        rubric.setup(RewardContext())
        assert rubric.judge.spec.key() != consistency.judge.spec.key()
        assert rubric.judge.actors[0]._actor_id != consistency.judge.actors[0]._actor_id
        verdicts = rubric.judge.score([CriterionPair(s, "Names the finding.") for s in
                                       samples[:4]])
        assert all(0.0 < v < 1.0 for v in verdicts)
    finally:
        runner.close()


# --- the real CT-RATE MCQ rows ------------------------------------------------------------------


def test_real_ct_rate_rows_load_and_score_a_correct_letter():
    if not CT_RATE.is_file():
        pytest.skip(f"the CT-RATE MCQ sample is not at {CT_RATE} (it lives beside the "
                    "checkout, not in it)")
    from medrl.launch.data import load_samples
    from medrl.launch.recipe import load_recipe

    recipe = load_recipe(RECIPE, [f"data.path={CT_RATE}", "data.fields.volume=VolumeName",
                                  "data.fields.id=null", "data.template=open"])
    samples = load_samples(recipe.data, base_dir=RECIPE.parent)
    assert len(samples) == 10
    for s in samples:
        gold = s.row["answer"]
        assert s.volume.endswith(".nii.gz") and gold in s.row["options"]
        assert med3d_accuracy(sample(tagged(gold), s.row)) == 1.0
        assert med3d_accuracy(sample(tagged(s.row["options"][gold]), s.row)) == 1.0
        assert med3d_accuracy(sample(tagged(f"{gold})"), s.row)) == 0.5
        wrong = next(k for k in s.row["options"] if k != gold)
        assert med3d_accuracy(sample(tagged(wrong), s.row)) == 0.0
        assert med3d_format(sample(tagged(gold))) == 1.0


def test_the_documented_med3d_rewards_section_validates_and_builds():
    import re

    import yaml

    from medrl.launch.recipe import RewardsConfig

    doc = (REPO / "docs" / "rewards.md").read_text()
    snippet = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)
                   if "med3d_consistency" in b)
    rewards = RewardsConfig.model_validate(yaml.safe_load(snippet)["rewards"])
    loaded = load_rewards([f.model_dump() for f in rewards.functions])
    assert [(r.name, r.weight) for r in loaded] == [
        ("med3d_format", 1.0), ("med3d_accuracy", 1.0), ("med3d_consistency", 1.0)]
    built = loaded[2].target(**loaded[2].kwargs)
    assert (built.edges, built.values, built.judge_num_gpus) == (DEFAULT_EDGES,
                                                                 DEFAULT_VALUES, 1.0)
