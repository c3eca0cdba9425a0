"""Section 7.1 on SmolLM2-135M: learning (target accuracy) vs forgetting (source perplexity), with seeds.

Methods: LIFT, full fine-tuning, LoRA (same trainable count as LIFT) and the ablations magnitude and
random (LIFT's optimizer, same count, other selection), all trained through lift-finetune itself on
the built-in arithmetic word problems; and over a 4-bit NF4 base (lift-finetune --load-in-4bit):
LIFT's sparse delta over the frozen quantized weights (lift-4bit) and QLoRA (qlora). Protocol:

1. Learning-rate search: every learning rate of a method's grid on seed 0; the best by exact match
   on a validation split of the held-out problems (the first ``--val`` of them).
2. Seeds 1 .. ``--seeds``-1 at each method's chosen learning rate (seed 0 is the search run).
3. Scoring per run: greedy exact match on the test split (the next ``--test`` held-out problems,
   disjoint from validation and training) and the perplexity change on held-out standard-library
   docstrings from the base model (forgetting). Intervals: 95% t over seeds, and a bootstrap over
   seeds and problems / texts (bench/study_stats.py), which also gives the paired differences.
4. 4-bit runs (lift-4bit, qlora) are scored on the merged float model the run writes (model/:
   dequant(base) + delta, or QLoRA merged into the dequantized base), against the same fp32 base as
   every other run, so quantization's own effect counts as forgetting. The untrained 4-bit base
   (dequantized NF4, key base-4bit) is scored once as a reference row that separates the two.

Resumable: each run's result is bench/results/.../runs/<method>-lr<lr>-seed<seed>-....json; a rerun skips
finished runs, and ``--workers`` processes share the list. LIFT, full FT and LoRA go first, then the
ablations, so a study cut short still answers the main question.

    python bench/finetune_learning_forgetting.py --out bench/results/study/forgetting --workers 2   # CPU study
    python bench/finetune_learning_forgetting.py --out /tmp/forgetting --small                    # CPU smoke
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from finetune_common import default_device, environment, run_finetune
from study_runs import RunStore

MAIN, ABLATIONS, QUANTIZED = ("lift", "full", "lora"), ("magnitude", "random"), ("lift-4bit", "qlora")
# Two learning rates per method: the top of the paper's grids (Appendix F: full FT 1e-5..1e-4, the
# others 5e-5..5e-4), since a run of tens of steps needs the larger steps of those grids.
# The ablations run at LIFT's chosen rate (AS_LIFT): they share LIFT's optimizer and budget, so
# holding every hyperparameter fixed isolates the one thing they change, the selection.
# The 4-bit methods take their float counterpart's chosen rate (no search of their own): the question
# is what quantizing the base changes at an otherwise identical run, not each method's best rate.
AS_LIFT, AS_LORA = "as-lift", "as-lora"
FULL_LRS = {"lift": [2e-4, 5e-4], "full": [5e-5, 1e-4], "lora": [2e-4, 5e-4],
            "magnitude": AS_LIFT, "random": AS_LIFT, "lift-4bit": AS_LIFT, "qlora": AS_LORA}
SMALL_LRS = {"lift": [2e-4, 5e-4], "lora": [5e-4], "random": AS_LIFT, "lift-4bit": AS_LIFT, "qlora": AS_LORA}
# Study method -> lift-finetune --method and the extra flags of its runs. --save-model is explicit for
# the 4-bit runs because they are scored from that folder (study_eval.Scorer.score_folder).
QUANT_FLAGS = ["--load-in-4bit", "--save-model"]
CLI = {"lift-4bit": ("lift", QUANT_FLAGS), "qlora": ("lora", QUANT_FLAGS)}
BASE_4BIT = "base-4bit"  # run key of the untrained 4-bit base, dequantized (a reference, not a method)
# Sized for a shared 2-core CPU (bench/results/study/README.md): ~8 min per run, two runs at a time.
FULL = {"steps": 24, "batch": 8, "seeds": 3, "val": 60, "test": 300, "texts": 32, "new_tokens": 20}
SMALL = {"steps": 2, "batch": 4, "seeds": 2, "val": 4, "test": 4, "texts": 4, "new_tokens": 8}


def run_key(method: str, lr: float, seed: int, cfg: dict, rank: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}-steps{cfg['steps']}-batch{cfg['batch']}-rank{rank}"


def borrowed(lr_spec) -> str | None:
    """The method whose chosen learning rate ``lr_spec`` ("as-<method>") takes; None for a grid."""
    return lr_spec[3:] if isinstance(lr_spec, str) and lr_spec.startswith("as-") else None


def plan(lrs: dict, cfg: dict, rank: int, only: set | None = None) -> list[tuple]:
    """(key, method, lr, seed, phase) in priority order; seed runs of a method wait for its search.

    Seeds go round the methods (seed 1 of each, then seed 2 of each), so a study cut short has
    its methods at equal numbers of seeds. ``only``: the methods to run (None: all of ``lrs``).
    """
    jobs = []
    for group in (MAIN, ABLATIONS, QUANTIZED):
        methods = [m for m in group if m in lrs and (only is None or m in only)]
        jobs += [(run_key(m, lr, 0, cfg, rank), m, lr, 0, "search") for m in methods if not borrowed(lrs[m])
                 for lr in lrs[m]]
        first = {m: 0 if borrowed(lrs[m]) else 1 for m in methods}
        jobs += [(None, m, None, s, "seed") for s in range(cfg["seeds"]) for m in methods if s >= first[m]]
    return jobs


def chosen_lr(store: RunStore, method: str, lrs: dict, cfg: dict, rank: int) -> float | None:
    """Best validation accuracy on seed 0 (ties: lower final training loss); None until all are done."""
    if borrowed(lrs[method]):
        return chosen_lr(store, borrowed(lrs[method]), lrs, cfg, rank)
    keys = [run_key(method, lr, 0, cfg, rank) for lr in lrs[method]]
    if not all(store.done(k) for k in keys):
        return None
    results = [store.load(k) for k in keys]
    best = max(results, key=lambda r: (r["val_accuracy"], -r["final_loss"]))
    return best["lr"]


def train_and_score(scorer, key: str, method: str, lr: float, seed: int, cfg: dict, rank: int, runs_dir: str,
                    extra: list[str]) -> dict:
    folder = os.path.join(runs_dir, key)
    cli_method, method_flags = CLI.get(method, (method, []))
    flags = ["--method", cli_method, *method_flags, "--lr", str(lr), "--seed", str(seed), "--rank", str(rank),
             "--max-steps", str(cfg["steps"]), "--batch-size", str(cfg["batch"]), "--save-every", "0",
             # lift-finetune's own evaluation is skipped in effect (one problem, one token): the study
             # scores every run itself on the validation and test splits below.
             "--max-eval", "1", "--max-new-tokens", "1", *extra]
    if not os.path.exists(os.path.join(folder, "summary.json")):
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted run restarts (no mid-run checkpoints)
    began = time.time()
    summary = run_finetune(folder, *flags)
    quantized = method in CLI
    if quantized:
        # The merged float model the run wrote, not base + delta: a 4-bit run's delta is relative to the
        # dequantized base, and the fp32 base it would be added to here is another model.
        scores = scorer.score_folder(os.path.join(folder, "model"))
        scores["folder_check"] = scorer.check_folder(os.path.join(folder, "model"),
                                                     os.path.join(folder, "delta.safetensors"),
                                                     low_rank=cli_method == "lora")
    else:
        scores = scorer.score(os.path.join(folder, "delta.safetensors"))
    for path in glob.glob(os.path.join(folder, "checkpoint-*.pt")):  # optimizer state: GBs, not needed
        os.remove(path)
    history = summary_history(folder)
    n_val = cfg["val"]
    correct = scores["correct"]
    return {"key": key, "method": method, "lr": lr, "seed": seed, "steps": cfg["steps"], "batch": cfg["batch"],
            "rank": rank, "trainable": summary["trainable_entries"], "flags": flags,
            "val_accuracy": statistics.fmean(correct[:n_val]), "test_accuracy": statistics.fmean(correct[n_val:]),
            "val_correct": correct[:n_val], "test_correct": correct[n_val:],
            "test_generated": scores["generated"][n_val:],
            "text_nll": scores["text_nll"], "text_tokens": scores["text_tokens"],
            "loss": [h["loss"] for h in history], "final_loss": statistics.fmean(h["loss"] for h in history[-8:]),
            "train_seconds": summary["phase_seconds"].get("train"), "wall_seconds": round(time.time() - began, 1),
            **({"scored": "model folder (merged fp32)", "quantized_base": summary.get("quantized_base"),
                "folder_check": scores["folder_check"], "ignored_tensors": scores["ignored_tensors"]}
               if quantized else {})}


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``name`` in the flags passed on to lift-finetune (``--name v`` or ``--name=v``)."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def summary_history(folder: str) -> list[dict]:

    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["event"] == "train"]


def work(args, lrs: dict, cfg: dict) -> None:
    """Work through the plan until every run is done or claimed by another live worker."""
    from study_eval import Scorer

    store = RunStore(os.path.join(args.out, "runs"))
    scorer = None
    only = set(args.methods.split(",")) if args.methods else None
    for method in only or ():
        if method not in lrs:
            raise SystemExit(f"--methods: unknown method {method!r}; this study has {', '.join(lrs)}")
        parent = borrowed(lrs[method])
        if parent and parent not in only and chosen_lr(store, parent, lrs, cfg, args.rank) is None:
            # its seed runs would wait for a search no worker runs
            raise SystemExit(f"--methods: {method} takes {parent}'s chosen learning rate; list {parent} too "
                             f"(its search is not finished in {args.out})")
    while True:
        progressed, waiting = False, False
        jobs = plan(lrs, cfg, args.rank, only)
        if any(m in CLI for _, m, _, _, _ in jobs):  # the 4-bit reference first: a few minutes, no training
            jobs.insert(0, (BASE_4BIT, BASE_4BIT, None, None, "reference"))
        for key, method, lr, seed, phase in jobs:
            if phase == "seed":
                lr = chosen_lr(store, method, lrs, cfg, args.rank)
                if lr is None:
                    waiting = True
                    continue
                key = run_key(method, lr, seed, cfg, args.rank)
            if not store.claim(key):
                waiting = waiting or not store.done(key)
                continue
            try:
                if scorer is None:
                    scorer = Scorer(default_device(), cfg["val"] + cfg["test"], cfg["texts"],
                                    max_new_tokens=cfg["new_tokens"], model=_flag(args.extra, "--model"))
                    if store.claim("base"):  # the base model's scores, once for all workers
                        try:
                            store.save("base", {"key": "base", **scorer.score(None)})
                        finally:
                            store.release("base")
                print(f"study: {key}", flush=True)
                if phase == "reference":
                    began = time.time()
                    scores = scorer.score_quantized_base(QUANT_FLAGS)
                    store.save(key, {"key": key, **scores, "wall_seconds": round(time.time() - began, 1)})
                else:
                    store.save(key, train_and_score(scorer, key, method, lr, seed, cfg, args.rank, args.runs,
                                                    args.extra))
            finally:
                store.release(key)
            progressed = True
            break  # re-plan: a finished search may have unblocked seed runs of higher priority
        if not progressed:
            if not waiting:
                return
            time.sleep(15)  # another worker holds the runs this one waits for


def spawn_workers(n: int) -> None:
    """``n`` copies of this command as workers, one thread each (they share the cores with others)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "OMP_WAIT_POLICY": "PASSIVE"}
    argv, skip = [], False
    for a in sys.argv[1:]:  # drop this command's --workers N / --workers=N
        if skip or a.startswith("--workers"):
            skip = a == "--workers" and not skip
            continue
        argv.append(a)
    procs = [subprocess.Popen([sys.executable, sys.argv[0], *argv, "--workers", "0"], env=env) for _ in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results folder: runs/*.json, forgetting.json/.md/.png")
    p.add_argument("--runs", default=None, help="lift-finetune output folders (large; default <out>/train, "
                                                "not meant for git)")
    p.add_argument("--small", action="store_true", help="CPU smoke run: LIFT and LoRA, 2 steps, 8 problems")
    p.add_argument("--rank", type=int, default=16, help="LIFT budget and LoRA rank (same trainable count)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (0: work in this process only)")
    p.add_argument("--methods", default=None, help="comma-separated methods to run (default: all; a method that "
                                                   "borrows a learning rate needs that method's search done or listed)")
    for name in ("steps", "seeds", "val", "test", "texts"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {FULL[name]} (small {SMALL[name]})")
    p.add_argument("--report-only", action="store_true", help="tables and plots from the finished runs")
    args, args.extra = p.parse_known_args()  # anything else goes to lift-finetune
    cfg = dict(SMALL if args.small else FULL)
    cfg.update({k: getattr(args, k) for k in ("steps", "seeds", "val", "test", "texts") if getattr(args, k)})
    lrs = SMALL_LRS if args.small else FULL_LRS
    args.runs = args.runs or os.path.join(args.out, "train")
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        if args.workers > 1:
            spawn_workers(args.workers)
        else:
            work(args, lrs, cfg)
    if args.workers != 0:  # workers leave the report to the command that started them
        from study_report import report

        report(args.out, lrs, cfg, args.rank, environment(default_device()), seeds_wanted=cfg["seeds"])


if __name__ == "__main__":
    main()
