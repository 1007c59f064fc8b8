"""``medrl eval`` vs lm-evaluation-harness (HF backend): the same MedQA items, the same model,
accuracy and per-option log-likelihoods compared, items per second of each.

One model (``bench.models.build_model``), the first ``--items`` MedQA test questions through
``medrl.launch.eval_data`` (the ``medqa`` preset). lm-evaluation-harness scores them through a
local task written into a temporary folder: a jsonl of exactly those items in the schema of
lm-eval's ``medqa_4options`` dataset (``sent1``, ``ending0..3``, ``label``) and a YAML that
repeats that task's definition, its ``doc_to_text`` / ``doc_to_target`` imported from
lm-eval's own ``tasks/medqa/preprocess_medqa.py``. Contenders, in interleaved rounds:

- medrl: ``medrl.launch.evaluate.evaluate_dataset`` in loglik mode on an in-process HF engine
  (the engine a ``medrl eval`` worker holds), one unpadded forward per option;
- lm-eval ``simple_evaluate`` on an ``HFLM`` (CPU, float32) at batch size 1, at batch size 1
  with its logits cache off (one forward per option, as medrl does), and at the fastest of the
  ``--batch-sizes`` candidates (timed before the rounds, in 3 interleaved rounds of their own).

lm-evaluation-harness is not a dependency of the project: it lives in a folder of its own
(``--lmeval-path``, default ``$LMEVAL_PATH``) that a child process appends to ``sys.path``
*after* this environment's site-packages, so torch and transformers stay this environment's.
The child loads the model once and answers JSON requests on stdin; model loading is measured
apart, not in the passes. Checks: the contexts and continuations of both are byte-identical,
their token ids match, and acc / acc_norm and every option's log-likelihood agree.
Run from the repository root: ``LMEVAL_PATH=DIR python -m bench.bench_lmeval``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (REPO, SHARED_DATA, base_parser, finish_args, interleave,
                          paired_ratio, save_result, start_run, table)
from bench.models import count_parameters

MODULE = "bench.bench_lmeval"
TASK = "medqa_4options_local"
LETTERS = ["A", "B", "C", "D"]
MARK = "@@lmeval "  # prefixes the child's answer lines on stdout (lm-eval may print too)
# What lm-eval 0.4.13 imports on this path and this environment lacks (the hint's list).
EXTRA_DEPS = "sacrebleu portalocker tabulate colorama lxml more_itertools sqlitedict word2number"
TASK_YAML = """\
# lm-eval's medqa_4options (lm_eval/tasks/medqa/medqa.yaml), its dataset swapped for a local
# jsonl of the first MedQA test items as medrl's loader reads them
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: !function preprocess_medqa.doc_to_text
doc_to_target: !function preprocess_medqa.doc_to_target
doc_to_choice: ['A', 'B', 'C', 'D']
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
PREPROCESS = ("# lm-eval's own medqa_4options functions, unchanged\n"
              "from lm_eval.tasks.medqa.preprocess_medqa import doc_to_target, doc_to_text\n"
              "\n__all__ = ['doc_to_target', 'doc_to_text']\n")


def parse_args():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=None, help="MedQA items (50; quick 8)")
    parser.add_argument("--lmeval-path", default=os.environ.get("LMEVAL_PATH"),
                        help="folder holding lm_eval and its missing dependencies "
                             "(default $LMEVAL_PATH)")
    parser.add_argument("--batch-sizes", default="2,4,8,16,32,64",
                        help="lm-eval batch sizes above 1 tried for its fastest setting")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    args.items = args.items or (8 if args.quick else 50)
    # batch 1 is measured anyway; the candidates are for the fastest other size
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip() and int(b) > 1]
    if not args.batch_sizes:
        raise SystemExit("--batch-sizes needs at least one size above 1 (batch 1 is always run)")
    return finish_args(args)


def install_hint(path: str | None, why: str) -> str:
    """The error for an lm-eval that cannot be imported: why, and the isolated install."""
    target = path or str(REPO.parent / "lmeval_pkgs")
    return (f"lm-evaluation-harness is not importable: {why}. Install it into a folder of its "
            "own, not into this environment, and without letting pip resolve its dependencies "
            "(that would pull another torch): "
            f"`python -m pip install --target {target} --no-deps lm-eval==0.4.13 {EXTRA_DEPS}`"
            " (those are the ones this environment lacks; add any other the next error "
            f"names, never torch, transformers or numpy); then `LMEVAL_PATH={target} python "
            f"-m {MODULE}`.")


def probe_lmeval(path: str | None) -> str:
    """lm-eval's version from ``path``, or SystemExit with the isolated install's commands."""
    if not path or not Path(path).is_dir():
        raise SystemExit(install_hint(path, f"{path} is not a folder" if path else
                                      "no --lmeval-path given and $LMEVAL_PATH unset"))
    code = ("import sys; sys.path.append(sys.argv[1]); import lm_eval, lm_eval.models."
            "huggingface, torch; print(lm_eval.__version__, torch.__file__)")
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["import failed"])[-1]
        raise SystemExit(install_hint(path, f"importing it from {path}: {last}"))
    version, torch_file = done.stdout.split()
    if Path(torch_file).is_relative_to(Path(path).resolve()):
        raise SystemExit(f"{path} holds its own torch ({torch_file}); remove it from there: "
                         "the benchmark must run this environment's torch.")
    return version


# --------------------------------------------------------------------------- the local task


def write_task(ds, folder: Path) -> Path:
    """The local lm-eval task of ``ds``'s items (module docstring); returns its folder."""
    rows = []
    for item in ds.items:
        options = item.row["options"]
        if list(options) != LETTERS:
            raise SystemExit(f"MedQA item {item.uid} has options {list(options)}, not A-D")
        rows.append({"uid": item.uid, "sent1": item.row["question"],
                     **{f"ending{i}": options[k] for i, k in enumerate(LETTERS)},
                     "label": LETTERS.index(item.row["gold"])})
    data = folder / "medqa_test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "medqa_local.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    (folder / "preprocess_medqa.py").write_text(PREPROCESS)
    return folder


# ------------------------------------------------------------- lm-eval, in its own process


def serve(config_path: str) -> None:
    """The child: load lm-eval and the model once, then answer one JSON request a line."""
    config = json.loads(Path(config_path).read_text())
    sys.path.append(config["lmeval_path"])  # after site-packages: this env's torch wins
    import logging

    import torch

    torch.set_num_threads(config["threads"])
    logging.basicConfig(level=logging.WARNING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    def answer(payload):
        print(MARK + json.dumps(payload), flush=True)

    started = time.perf_counter()
    base = HFLM(pretrained=config["model_dir"], device="cpu", dtype="float32", batch_size=1)
    load_s = time.perf_counter() - started
    manager = TaskManager(include_path=config["task_dir"], include_defaults=False)
    models = {(1, True): base}
    answer({"version": lm_eval.__version__, "load_s": load_s, "torch": torch.__file__,
            "lm_eval": lm_eval.__file__})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            return
        if req["op"] == "encode":  # lm-eval's own split of each (context, continuation)
            answer({"ids": [base._encode_pair(c, k) for c, k in req["pairs"]]})
            continue
        if req["op"] == "load_tasks":
            t0 = time.perf_counter()
            manager.load([TASK])
            answer({"seconds": time.perf_counter() - t0})
            continue
        key = (req["batch_size"], req["logits_cache"])
        if key not in models:
            models[key] = HFLM(pretrained=base.model, tokenizer=base.tokenizer,
                               batch_size=key[0], logits_cache=key[1])
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=models[key], tasks=[TASK], task_manager=manager,
                                      bootstrap_iters=0, log_samples=req["log_samples"])
        seconds = time.perf_counter() - t0
        metrics = out["results"][TASK]
        reply = {"seconds": seconds, "acc": metrics["acc,none"],
                 "acc_norm": metrics["acc_norm,none"]}
        if req["log_samples"]:
            reply["samples"] = [
                {"doc_id": s["doc_id"], "uid": s["doc"]["uid"],
                 "args": [list(a) for a in s["arguments"]],
                 "lls": [float(r[0]) for r in s["filtered_resps"]]}
                for s in sorted(out["samples"][TASK], key=lambda s: s["doc_id"])]
        answer(reply)


class LmEvalChild:
    """The child process of :func:`serve`, asked one request at a time."""

    def __init__(self, config: dict, folder: Path):
        config_path = folder / "child.json"
        config_path.write_text(json.dumps(config))
        self.log = folder / "child.log"
        env = dict(os.environ, TQDM_DISABLE="1",
                   HF_DATASETS_CACHE=str(folder / "hf_datasets"), HF_DATASETS_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--serve", str(config_path)], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        tail = self.log.read_text()[-3000:]
        raise RuntimeError(f"the lm-eval process ended (exit code {self.proc.wait()}):\n{tail}")

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, batch_size: int, logits_cache: bool = True, log_samples: bool = False):
        return self.ask(op="run", batch_size=batch_size, logits_cache=logits_cache,
                        log_samples=log_samples)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------ agreement


def agreement(items, preds, samples, tokenizer, lm_ids) -> dict:
    """How one lm-eval run's samples compare with medrl's predictions of the same items:
    contexts / continuations that differ, token ids that differ (``lm_ids``: lm-eval's
    encoding of each (context, continuation), in item-then-option order), items whose acc
    choice differs, and the largest absolute difference of an option's log-likelihood."""
    from medrl.launch.evaluate import continuations, encode_continuation, loglik_context

    text_diff = ids_diff = choice_diff = norm_diff = 0
    max_diff, at = 0.0, 0
    for item, pred, sample in zip(items, preds, samples, strict=True):
        if sample["uid"] != item.uid:
            raise RuntimeError(f"lm-eval doc {sample['doc_id']} is {sample['uid']}, "
                               f"medrl's item is {item.uid}")
        context = loglik_context(item.row, "letters")
        pairs = [[context, c] for c in continuations(item.row, "letters")]
        text_diff += pairs != sample["args"]
        for ctx, cont in pairs:
            ids_diff += list(encode_continuation(tokenizer, ctx, cont)) != [
                list(x) for x in lm_ids[at]]
            at += 1
        lls = sample["lls"]
        choice_diff += pred.choice != LETTERS[argmax(lls)]
        # lm-eval's acc_norm divides by the choice's length in characters ("A": 1)
        norm_diff += pred.choice_norm != LETTERS[argmax([x / len(k) for x, k in
                                                         zip(lls, LETTERS)])]
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(pred.logprobs, lls)))
    return {"contexts_differ": text_diff, "token_ids_differ": ids_diff,
            "choices_differ": choice_diff, "norm_choices_differ": norm_diff,
            "max_abs_ll_diff": max_diff}


def argmax(values) -> int:
    """The first index of the largest value, as numpy's argmax picks."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    if args.serve:
        return serve(args.serve)
    from medrl.align.encode import text_tokenizer
    from medrl.align.models import load_tokenizer
    from medrl.launch.eval_data import load_eval_dataset
    from medrl.launch.eval_scoring import metrics_of
    from medrl.launch.evaluate import (EvalOptions, continuations, evaluate_dataset,
                                       loglik_context)
    from medrl.rollouts.hf_engine import HFEngine

    if not (SHARED_DATA / "medqa" / "test.jsonl").is_file():
        raise SystemExit(f"MedQA is not at {SHARED_DATA / 'medqa'}; this benchmark reads it.")
    version = probe_lmeval(args.lmeval_path)
    started, machine, model_dir = start_run(args)
    params = count_parameters(model_dir)
    ds = load_eval_dataset("medqa", root=SHARED_DATA, max_samples=args.items)
    tokenizer = text_tokenizer(load_tokenizer(model_dir))
    t0 = time.perf_counter()
    engine = HFEngine(model_dir, seed=0, num_threads=args.threads, dtype="float32")
    medrl_load_s = time.perf_counter() - t0
    opts = EvalOptions(mode="loglik")
    last: dict[str, dict] = {}

    def medrl_pass():
        preds, too_long = evaluate_dataset(engine, tokenizer, ds, opts, 4096)
        last["medrl"] = {"preds": preds, "metrics": metrics_of(preds, "loglik"),
                         "too_long": too_long}

    folder = Path(tempfile.mkdtemp(prefix="bench_lmeval."))
    child = LmEvalChild({"lmeval_path": args.lmeval_path, "model_dir": str(model_dir),
                         "task_dir": str(write_task(ds, folder)), "threads": args.threads},
                        folder)
    try:
        print(f"lm-eval {child.hello['version']} from {child.hello['lm_eval']}, "
              f"torch from {child.hello['torch']}", flush=True)
        pairs = [[loglik_context(i.row, "letters"), c]
                 for i in ds.items for c in continuations(i.row, "letters")]
        lm_ids = child.ask(op="encode", pairs=pairs)["ids"]
        # The best batch size: the candidates in interleaved rounds of their own (so that a
        # burst of background load does not pick the size), the lowest median kept.
        sweep = {bs: t.median for bs, t in interleave(
            {bs: lambda bs=bs: child.run(bs) for bs in args.batch_sizes}, repeat=3).items()}
        best = min(sweep, key=sweep.get)
        settings = {"lmeval_bs1": (1, True), "lmeval_bs1_nocache": (1, False),
                    f"lmeval_bs{best}": (best, True)}

        def lmeval_pass(name, bs, cache):
            def call():
                last[name] = child.run(bs, cache)
            return call

        contenders = {"medrl": medrl_pass,
                      **{n: lmeval_pass(n, *s) for n, s in settings.items()}}
        timing = interleave(contenders, repeat=args.repeat, warmup=args.warmup)
        checks = {}
        for name, (bs, cache) in settings.items():  # one logged pass each, untimed
            logged = child.run(bs, cache, log_samples=True)
            checks[name] = agreement(ds.items, last["medrl"]["preds"], logged["samples"],
                                     tokenizer, lm_ids)
            last[name] = logged
        load_tasks_s = statistics.median(child.ask(op="load_tasks")["seconds"]
                                         for _ in range(3))
        lm_load_s = child.hello["load_s"]
    finally:
        child.close()
        shutil.rmtree(folder, ignore_errors=True)

    medrl_m = last["medrl"]["metrics"]
    labels = {"medrl": "medrl eval loglik, HF engine (1 forward per option)",
              "lmeval_bs1": "lm-eval HF, batch 1 (logits cache on: 1 forward per item)",
              "lmeval_bs1_nocache": "lm-eval HF, batch 1, logits cache off",
              f"lmeval_bs{best}": f"lm-eval HF, batch {best} (fastest of "
                                  f"{', '.join(map(str, args.batch_sizes))})"}
    same = all((last[n]["acc"], last[n]["acc_norm"]) == (medrl_m["acc"]["value"],
                                                          medrl_m["acc_norm"]["value"])
               for n in settings)
    if not same:
        print("warning: lm-eval's and medrl's accuracies differ (see the agreement table)")
    rows = []
    for name, label in labels.items():
        acc, acc_norm = ((medrl_m["acc"]["value"], medrl_m["acc_norm"]["value"])
                         if name == "medrl" else (last[name]["acc"], last[name]["acc_norm"]))
        rows.append([label, timing[name].median, args.items / timing[name].median,
                     paired_ratio(timing[name], timing["medrl"]), acc, acc_norm])
    speed = table(
        f"medrl eval vs lm-evaluation-harness {version} (HF backend) on {args.items} MedQA "
        f"items, {params / 1e6:.1f}M parameters, CPU float32, {args.threads} threads",
        ["contender", "median s/pass", "items/s", "time x medrl", "acc", "acc_norm"], rows,
        ["acc and acc_norm of every lm-eval setting " + ("equal medrl's" if same else
                                                        "DIFFER from medrl's"),
         (f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up; model "
          f"loading excluded (measured apart: medrl HF engine {medrl_load_s:.2f} s, lm-eval "
          f"HFLM {lm_load_s:.2f} s)"),
         (f"an lm-eval pass is one simple_evaluate call on a loaded HFLM: task building "
          f"(median {load_tasks_s * 1000:.0f} ms), requests, scoring, metrics; a medrl pass "
          "is evaluate_dataset + metrics_of on the loaded engine and dataset"),
         "batch sizes (median of 3 interleaved passes each): "
         + ", ".join(f"{b}: {s:.2f} s" for b, s in sweep.items()),
         ("lm-eval's logits cache groups requests by context + continuation[:-1]: every "
          "option here is one token (' A'), so an item's 4 options share one forward pass")])
    checks_table = table(
        f"Agreement with medrl, per item and option ({args.items} items x 4 options)",
        ["lm-eval setting", "contexts differ", "token ids differ", "acc choices differ",
         "acc_norm choices differ", "max abs log-lik diff"],
        [[labels[n], c["contexts_differ"], c["token_ids_differ"], c["choices_differ"],
          c["norm_choices_differ"], c["max_abs_ll_diff"]] for n, c in checks.items()],
        [("contexts: lm-eval's (context, continuation) strings vs medrl's loglik_context and "
          "continuations, byte for byte; token ids: lm-eval's _encode_pair vs medrl's "
          "encode_continuation; log-lik: each option's summed continuation log-prob, "
          "lm-eval's logged samples vs medrl's predictions; acc_norm: lm-eval divides by "
          "the choice's length ('A': 1 character), medrl by the continuation's (' A': 2), "
          "equal for every option here")])
    save_result("lmeval", module=MODULE, args=args, machine=machine,
                settings={"size": args.size, "params": params, "items": args.items,
                          "lm_eval": version, "best_batch_size": best,
                          "batch_sizes": args.batch_sizes},
                tables=[speed, checks_table],
                raw={"timing": {k: v.to_json() for k, v in timing.items()}, "sweep_s": sweep,
                     "checks": checks, "load_s": {"medrl": medrl_load_s, "lmeval": lm_load_s},
                     "load_tasks_s": load_tasks_s,
                     "medrl_metrics": medrl_m,
                     "lmeval_metrics": {n: {"acc": last[n]["acc"],
                                            "acc_norm": last[n]["acc_norm"]}
                                        for n in settings},
                     "per_item": [{"uid": p.uid, "medrl": p.logprobs,
                                   "lmeval_bs1": s["lls"]} for p, s in
                                  zip(last["medrl"]["preds"], last["lmeval_bs1"]["samples"])]},
                started=started)


if __name__ == "__main__":
    main()
