"""Appendix G.8 on SmolLM2-135M: LIFT's accuracy over LRA rank x selected rank, with seeds.

Each cell (selected rank r = ``--rank``, the trainable budget, LoRA's count at rank r; LRA rank q =
``--lra-rank``, the rank of the low-rank filter) is a LIFT run through lift-finetune on the built-in
arithmetic problems, at the 7.1 study's settings (bench/finetune_learning_forgetting.py: lr 5e-4,
24 steps, batch 8), scored by greedy exact match on the same held-out test problems (60-359; the
validation problems 0-59 are not needed, no learning rate is searched). The paper (LLaMA, MATH-10K)
finds a larger LRA rank no better and LIFT best with the LRA rank near the selected rank. The column
"full" is the LRA rank's limit, plain magnitude selection (``--method magnitude``).

Cells already run by the 7.1 study (LIFT at LRA rank 32 and magnitude, rank 16) are reused from
``--reuse`` if and only if the flags parse to the same lift-finetune settings and the scoring is
the same (steps, batch, test problems, generation length); otherwise they are run here.
Intervals: 95% t over seeds per cell, and paired bootstrap intervals (seeds per cell, problems
shared; bench/study_stats.py) of the contrasts the paper's claims need.

Resumable: each run's result is <out>/runs/<key>.json; a rerun skips finished runs and
``--workers`` processes share the list (bench/study_runs.py). Seeds go round the cells, so a study
cut short has its cells at equal numbers of seeds.

    python bench/finetune_lra_rank_grid.py --out bench/results/study/lra_grid --workers 2   # CPU study
    python bench/finetune_lra_rank_grid.py --out /tmp/lra_grid --small                      # CPU smoke
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import shutil
import statistics
import time

from finetune_common import default_device, environment, pyplot, run_finetune, write_json
from finetune_learning_forgetting import _flag, spawn_workers, summary_history
from study_runs import RunStore
from study_report import paired_row
from study_stats import bootstrap, t_interval

FULL_LRA = 0  # the "full" column: LRA rank -> full rank, i.e. plain magnitude selection
# Rows (selected rank) and their LRA ranks, in priority order: row 16 is the 7.1 study's budget.
FULL = {"cells": [(16, 4), (16, 16), (16, 64), (16, 32), (16, FULL_LRA), (64, 16), (64, 64), (64, FULL_LRA)],
        "seeds": 3, "lr": 5e-4, "steps": 24, "batch": 8, "test_from": 60, "test": 300, "new_tokens": 20,
        "check": True}
# The smoke run's cells and seeds are what tests/test_bench_studies.py expects.
SMALL = {"cells": [(4, 8), (8, 8)], "seeds": 1, "lr": 5e-4, "steps": 2, "batch": 4, "test_from": 4, "test": 4,
         "new_tokens": 8, "check": False}
REUSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "study", "forgetting", "runs")

# (name, a, b, the paper's sign of a - b); a, b are (rank, lra rank) cells.
CLAIMS = [
    ("rank 16: a larger LRA rank is not better (LRA 16 vs 64)", (16, 16), (16, 64), +1),
    ("rank 16: LRA rank near the selected rank beats a smaller one (LRA 16 vs 4)", (16, 16), (16, 4), +1),
    ("rank 16: LRA 16 vs LRA 32, the 7.1 study's setting (not a claim: both near 16)", (16, 16), (16, 32), 0),
    ("rank 16: LIFT at LRA = selected rank beats magnitude (LRA -> full)", (16, 16), (16, FULL_LRA), +1),
    ("rank 64: LRA rank near the selected rank beats a smaller one (LRA 64 vs 16)", (64, 64), (64, 16), +1),
    ("rank 64: LIFT at LRA = selected rank beats magnitude (LRA -> full)", (64, 64), (64, FULL_LRA), +1),
]


def lra_name(lra: int) -> int | str:
    return "full" if lra == FULL_LRA else lra


def run_key(rank: int, lra: int, seed: int, cfg: dict) -> str:
    method = "magnitude" if lra == FULL_LRA else f"lift-lra{lra}"
    return f"{method}-lr{cfg['lr']:g}-seed{seed}-steps{cfg['steps']}-batch{cfg['batch']}-rank{rank}"


def flags_for(rank: int, lra: int, seed: int, cfg: dict, extra: list[str]) -> list[str]:
    method = ["--method", "magnitude"] if lra == FULL_LRA else ["--method", "lift", "--lra-rank", str(lra)]
    return [*method, "--lr", str(cfg["lr"]), "--seed", str(seed), "--rank", str(rank),
            "--max-steps", str(cfg["steps"]), "--batch-size", str(cfg["batch"]), "--save-every", "0",
            # lift-finetune's own evaluation is skipped in effect (one problem, one token): the study
            # scores every run itself on the test problems.
            "--max-eval", "1", "--max-new-tokens", "1", *extra]


def plan(cfg: dict) -> list[tuple]:
    """(key, rank, lra, seed) in priority order: seed-major within each row, row 16 first."""
    jobs = []
    for row in dict.fromkeys(r for r, _ in cfg["cells"]):
        lras = [q for r, q in cfg["cells"] if r == row]
        jobs += [(run_key(row, q, s, cfg), row, q, s) for s in range(cfg["seeds"]) for q in lras]
    return jobs


def settings(flags: list[str]) -> dict:
    """lift-finetune's parsed settings for ``flags`` (defaults filled in), to compare two runs' flags."""
    from lift_finetune import cli

    parsed = vars(cli.parse([*flags, "--output-dir", "-"]))
    if parsed["method"] != "lift":
        parsed.pop("lra_rank")  # unused by the other methods
    return parsed


def reusable(path: str, flags: list[str], cfg: dict) -> dict | None:
    """The 7.1 study's run at ``path`` as this study's result, if it is the same run scored the same way."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        run = json.load(f)
    # 7.1 scored problems 0-59 as validation and 60-359 as test, with the same generation length.
    with open(os.path.join(os.path.dirname(os.path.dirname(path)), "forgetting.json")) as f:
        study = json.load(f)
    scale = study["scale"]
    if study["environment"]["device"] != environment(default_device())["device"]:
        return None  # runs from another device (bf16, randomized SVD on an accelerator) are not pooled
    same_scoring = (scale["val"] == cfg["test_from"] and scale["test"] == cfg["test"]
                    and scale["new_tokens"] == cfg["new_tokens"] and len(run["test_correct"]) == cfg["test"])
    if not same_scoring or settings(run["flags"]) != settings(flags):
        return None
    return run


def train_and_score(scorer, key: str, rank: int, lra: int, seed: int, cfg: dict, runs_dir: str,
                    extra: list[str]) -> dict:
    folder = os.path.join(runs_dir, key)
    flags = flags_for(rank, lra, seed, cfg, extra)
    if not os.path.exists(os.path.join(folder, "summary.json")) or not os.path.exists(
            os.path.join(folder, "delta.safetensors")):
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted run restarts (no mid-run checkpoints)
    began = time.time()
    summary = run_finetune(folder, *flags)
    scores = scorer.score(os.path.join(folder, "delta.safetensors"))
    for path in glob.glob(os.path.join(folder, "checkpoint-*.pt")):  # optimizer state: not needed
        os.remove(path)
    history = summary_history(folder)
    correct = scores["correct"]
    return {"key": key, "method": "magnitude" if lra == FULL_LRA else "lift", "rank": rank, "lra_rank": lra_name(lra),
            "seed": seed, "lr": cfg["lr"], "steps": cfg["steps"], "batch": cfg["batch"],
            "trainable": summary["trainable_entries"], "flags": flags, "run": folder,
            "test_problems": [cfg["test_from"], cfg["test_from"] + cfg["test"]],
            "test_accuracy": statistics.fmean(correct), "test_correct": correct, "test_generated": scores["generated"],
            "loss": [h["loss"] for h in history], "final_loss": statistics.fmean(h["loss"] for h in history[-8:]),
            "train_seconds": summary["phase_seconds"].get("train"), "wall_seconds": round(time.time() - began, 1)}


def jobs_with_check(cfg: dict) -> list[tuple]:
    """The plan, plus (full study) a rerun of one reused 7.1 run on the current code: does it reproduce?"""
    jobs = [(key, rank, lra, seed, False) for key, rank, lra, seed in plan(cfg)]
    if cfg["check"] and (16, 32) in cfg["cells"]:
        key = run_key(16, 32, 0, cfg) + "-rerun"
        after = max(i for i, job in enumerate(jobs) if job[1] == 16)
        jobs.insert(after + 1, (key, 16, 32, 0, True))  # after row 16's runs, before row 64
    return jobs


def work(args, cfg: dict) -> None:
    """Work through the plan until every run is done or claimed by another live worker."""
    from study_eval import Scorer

    store = RunStore(os.path.join(args.out, "runs"))
    scorer = None
    for key, rank, lra, seed, check in jobs_with_check(cfg):
        if store.done(key) or not store.claim(key):
            continue
        try:
            flags = flags_for(rank, lra, seed, cfg, args.extra)
            reused = None if check or args.reuse == "none" else reusable(
                os.path.join(args.reuse, _reuse_key(rank, lra, seed, cfg) + ".json"), flags, cfg)
            if reused is not None:
                print(f"study: {key} reused from {args.reuse}", flush=True)
                store.save(key, {"key": key, "method": reused["method"], "rank": rank, "lra_rank": lra_name(lra),
                                 "seed": seed, "lr": cfg["lr"], "steps": cfg["steps"], "batch": cfg["batch"],
                                 "trainable": reused["trainable"], "flags": reused["flags"],
                                 "reused_from": os.path.relpath(os.path.join(args.reuse, reused["key"] + ".json")),
                                 "run": None, "test_problems": [cfg["test_from"], cfg["test_from"] + cfg["test"]],
                                 "test_accuracy": statistics.fmean(reused["test_correct"]),
                                 "test_correct": reused["test_correct"], "test_generated": reused["test_generated"],
                                 "loss": reused["loss"], "final_loss": reused["final_loss"],
                                 "train_seconds": reused["train_seconds"], "wall_seconds": reused["wall_seconds"]})
                continue
            if scorer is None:
                scorer = Scorer(default_device(), cfg["test_from"] + cfg["test"], 1,
                                max_new_tokens=cfg["new_tokens"], model=_flag(args.extra, "--model"))
                scorer.problems = scorer.problems[cfg["test_from"]:]  # test problems only
                scorer.texts = []  # no docstring perplexity: forgetting is not a G.8 question
            print(f"study: {key}", flush=True)
            result = train_and_score(scorer, key, rank, lra, seed, cfg, args.runs, args.extra)
            if check:
                result["check_of"] = run_key(16, 32, 0, cfg)
            store.save(key, result)
        finally:
            store.release(key)


def _reuse_key(rank: int, lra: int, seed: int, cfg: dict) -> str:
    """The 7.1 study's name for this cell's run (its LIFT runs are at the default LRA rank 32)."""
    method = "magnitude" if lra == FULL_LRA else "lift"
    return f"{method}-lr{cfg['lr']:g}-seed{seed}-steps{cfg['steps']}-batch{cfg['batch']}-rank{rank}"


# ---------------------------------------------------------------- report


def load_runs(out: str, cfg: dict) -> dict:
    """{(rank, lra): [runs by seed]} of the finished runs at this study's scale."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        with open(path) as f:
            run = json.load(f)
        if run.get("check_of") or run["steps"] != cfg["steps"] or run["batch"] != cfg["batch"] \
                or len(run["test_correct"]) != cfg["test"]:
            continue
        lra = FULL_LRA if run["lra_rank"] == "full" else int(run["lra_rank"])
        if (run["rank"], lra) in cfg["cells"]:
            runs.setdefault((run["rank"], lra), []).append(run)
    return {cell: sorted(rs, key=lambda r: r["seed"]) for cell, rs in runs.items()}


def verdict(low: float, high: float, sign: int) -> str:
    if sign == 0:
        return "(descriptive)"
    if low * sign > 0:
        return "reproduced"
    if high * sign < 0:
        return "not reproduced"
    return "not resolved at this scale"


def summarize(out: str, cfg: dict) -> dict:
    runs = load_runs(out, cfg)
    cells = []
    for rank, lra in cfg["cells"]:
        rs = runs.get((rank, lra), [])
        if not rs:
            cells.append({"rank": rank, "lra_rank": lra_name(lra), "seeds": []})
            continue
        acc = [r["test_accuracy"] for r in rs]
        boot = bootstrap({"c": [r["test_correct"] for r in rs]}, lambda m: m["c"])
        cells.append({"rank": rank, "lra_rank": lra_name(lra), "seeds": [r["seed"] for r in rs],
                      "trainable": rs[0]["trainable"], "test_accuracy": acc, "acc_t": list(t_interval(acc)),
                      "acc_boot": list(boot), "final_loss": [r["final_loss"] for r in rs],
                      "reused_from": [r.get("reused_from") for r in rs],
                      "wall_seconds": [r["wall_seconds"] for r in rs],
                      # smoke-test compatibility: seed 0's run folder (None for a reused run)
                      "run": rs[0]["run"], "seed": rs[0]["seed"], "accuracy": acc[0]})
    claims = []
    extra = []  # per row: LIFT at its best LRA rank by mean (chosen after the fact, favours LIFT) vs magnitude
    for row in dict.fromkeys(r for r, _ in cfg["cells"]):
        lifts = [(row, q) for r, q in cfg["cells"] if r == row and q != FULL_LRA and (r, q) in runs]
        if lifts and (row, FULL_LRA) in cfg["cells"]:
            top = max(lifts, key=lambda c: statistics.fmean(r["test_accuracy"] for r in runs[c]))
            extra.append((f"rank {row}: LIFT at its best LRA rank ({top[1]}, chosen after the fact) beats magnitude",
                          top, (row, FULL_LRA), +1))
    for name, a, b, sign in CLAIMS + extra:
        if a not in cfg["cells"] or b not in cfg["cells"]:
            continue
        if a not in runs or b not in runs:
            claims.append({"claim": name, "a": a, "b": b, "verdict": "not run"})
            continue
        groups = {"a": [r["test_correct"] for r in runs[a]], "b": [r["test_correct"] for r in runs[b]]}
        low, high = bootstrap(groups, lambda m: m["a"] - m["b"])
        diff = statistics.fmean(r["test_accuracy"] for r in runs[a]) - statistics.fmean(
            r["test_accuracy"] for r in runs[b])
        paired = sorted(set(r["seed"] for r in runs[a]) & set(r["seed"] for r in runs[b]))
        by_seed = {s: next(r for r in runs[a] if r["seed"] == s)["test_accuracy"]
                   - next(r for r in runs[b] if r["seed"] == s)["test_accuracy"] for s in paired}
        claims.append({"claim": name, "a": [a[0], lra_name(a[1])], "b": [b[0], lra_name(b[1])], "sign": sign,
                       "difference": diff, "boot": [low, high], "seeds": [len(runs[a]), len(runs[b])],
                       "difference_by_seed": by_seed,
                       # same seed = same data order in both cells: a t-interval of the per-seed differences
                       "paired_t": list(t_interval(list(by_seed.values()))) if len(by_seed) > 1 else None,
                       "verdict": verdict(low, high, sign)})
    best = {}
    for row in dict.fromkeys(r for r, _ in cfg["cells"]):
        cells_run = sorted((q for r, q in cfg["cells"] if r == row and (r, q) in runs),
                           key=lambda q: math.inf if q == FULL_LRA else q)
        if len(cells_run) > 1:
            shares = best_in_row({lra_name(q): [r["test_correct"] for r in runs[(row, q)]] for q in cells_run})
            best[str(row)] = shares
    check = None
    check_path = os.path.join(out, "runs", run_key(16, 32, 0, cfg) + "-rerun.json")
    if os.path.exists(check_path):
        with open(check_path) as f:
            rerun = json.load(f)
        orig = next((r for r in runs.get((16, 32), []) if r["seed"] == 0), None)
        if orig is not None:
            check = {"rerun": rerun["key"], "original": orig.get("reused_from") or orig["key"],
                     "test_accuracy": [orig["test_accuracy"], rerun["test_accuracy"]],
                     "same_problems_correct": sum(x == y for x, y in zip(orig["test_correct"], rerun["test_correct"])),
                     "max_loss_difference": max(abs(x - y) for x, y in zip(orig["loss"], rerun["loss"])),
                     "identical": orig["test_correct"] == rerun["test_correct"] and orig["loss"] == rerun["loss"]}
    return {"cells": cells, "claims": claims, "best_in_row": best, "check": check}


def best_in_row(groups: dict, replicates: int = 2000, seed: int = 0) -> dict:
    """Share of bootstrap replicates in which each cell of a row has the highest mean (ties split).

    The same two-level design as study_stats.bootstrap: seeds drawn per cell, problems drawn once
    per replicate for every cell (paired).
    """
    rng = random.Random(seed)
    n_items = len(next(iter(groups.values()))[0])
    wins = dict.fromkeys(groups, 0.0)
    for _ in range(replicates):
        counts = [0] * n_items
        for i in (rng.randrange(n_items) for _ in range(n_items)):
            counts[i] += 1
        means = {}
        for name, per_seed in groups.items():
            seeds = [rng.randrange(len(per_seed)) for _ in range(len(per_seed))]
            means[name] = sum(sum(c * x for c, x in zip(counts, per_seed[s])) for s in seeds) / len(seeds)
        top = max(means.values())
        winners = [k for k, v in means.items() if v == top]
        for k in winners:
            wins[k] += 1 / len(winners)
    return {k: v / replicates for k, v in wins.items()}


def fmt_cell(c: dict) -> str:
    if not c["seeds"]:
        return "not run"
    m, lo, hi = c["acc_t"]
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}] (n={len(c['seeds'])})"


def table(summary: dict, cfg: dict) -> str:
    rows = list(dict.fromkeys(r for r, _ in cfg["cells"]))
    cols = sorted(set(q for _, q in cfg["cells"]), key=lambda q: math.inf if q == FULL_LRA else q)
    by = {(c["rank"], c["lra_rank"]): c for c in summary["cells"]}
    lines = ["Test exact match (held-out problems %d-%d), mean [95%% t over seeds] (seeds):\n"
             % (cfg["test_from"], cfg["test_from"] + cfg["test"] - 1),
             "| selected rank \\ LRA rank | " + " | ".join(
                 "full (magnitude)" if q == FULL_LRA else str(q) for q in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(fmt_cell(by[(r, lra_name(q))]) if (r, lra_name(q)) in by else ""
                                              for q in cols) + " |")
    lines += ["", "| selected rank | LRA rank | trainable | seeds | test exact match per seed | mean [95% t] | "
                  "[95% bootstrap] | final train loss | source |", "|---|---|---|---|---|---|---|---|---|"]
    order = lambda c: (c["rank"], math.inf if c["lra_rank"] == "full" else c["lra_rank"])  # noqa: E731
    for c in sorted(summary["cells"], key=order):
        if not c["seeds"]:
            lines.append(f"| {c['rank']} | {c['lra_rank']} | | 0 | not run | | | | |")
            continue
        m, lo, hi = c["acc_t"]
        reused = [sd for sd, r in zip(c["seeds"], c["reused_from"]) if r]
        src = ("7.1 study (reused)" if len(reused) == len(c["seeds"]) else "this study" if not reused else
               "seeds " + ",".join(map(str, reused)) + ": 7.1 study (reused); others: this study")
        lines.append(f"| {c['rank']} | {c['lra_rank']} | {c['trainable']:,} | {len(c['seeds'])} | "
                     + ", ".join(f"{a:.3f}" for a in c["test_accuracy"])
                     + f" | {m:.3f} [{lo:.3f}, {hi:.3f}] | [{c['acc_boot'][0]:.3f}, {c['acc_boot'][1]:.3f}] | "
                     + f"{statistics.fmean(c['final_loss']):.4f} | {src} |")
    lines += ["", "| claim (paper) | difference (a - b) | 95% paired bootstrap | per seed (same data order) | "
                  "95% t of the per-seed differences | seeds | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in summary["claims"]:
        if c["verdict"] == "not run":
            lines.append(f"| {c['claim']} | | | | | | not run |")
            continue
        lines.append(paired_row(c, c["boot"]))
    if summary["best_in_row"]:
        lines += ["", "Share of bootstrap replicates in which each LRA rank has the row's best mean (paired, "
                      "seeds and problems resampled):", ""]
        for row, shares in summary["best_in_row"].items():
            lines.append(f"- selected rank {row}: " + ", ".join(f"LRA {k} {v:.0%}" for k, v in shares.items()))
    if summary["check"]:
        k = summary["check"]
        lines += ["", f"Rerun check: {k['rerun']} (current code) vs {k['original']}: test exact match "
                      f"{k['test_accuracy'][1]:.3f} vs {k['test_accuracy'][0]:.3f}, same result on "
                      f"{k['same_problems_correct']}/{cfg['test']} problems, largest training-loss difference "
                      f"{k['max_loss_difference']:.2e} ({'identical' if k['identical'] else 'not identical'})."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, cfg: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = list(dict.fromkeys(r for r, _ in cfg["cells"]))
    finite = [q for _, q in cfg["cells"] if q != FULL_LRA]
    full_x = max(finite) * 4  # where the "full" column (magnitude) is drawn
    for i, row in enumerate(rows):
        cs = [c for c in summary["cells"] if c["rank"] == row and c["seeds"]]
        cs.sort(key=lambda c: math.inf if c["lra_rank"] == "full" else int(c["lra_rank"]))
        xs = [full_x if c["lra_rank"] == "full" else int(c["lra_rank"]) for c in cs]
        shift = 1 + 0.06 * (i - (len(rows) - 1) / 2)  # rows side by side on the log axis
        means = [c["acc_t"][0] for c in cs]
        err = [[c["acc_t"][0] - c["acc_t"][1] for c in cs], [c["acc_t"][2] - c["acc_t"][0] for c in cs]]
        line = ax.errorbar([x * shift for x in xs], means, yerr=err, marker="o", capsize=4,
                           label=f"selected rank {row}")
        for x, c in zip(xs, cs):
            ax.scatter([x * shift] * len(c["test_accuracy"]), c["test_accuracy"], s=10, alpha=0.5,
                       color=line[0].get_color())
        ax.axvline(row, color=line[0].get_color(), ls=":", lw=1)
    ticks = sorted(set(finite)) + [full_x]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + ["full\n(magnitude)"])
    ax.minorticks_off()
    ax.set_xlabel("LRA rank (dotted: the selected rank)")
    ax.set_ylabel("test exact match (%d problems)" % cfg["test"])
    ax.set_title("LIFT, SmolLM2-135M, %d steps: mean, 95%% t over seeds, seeds as dots" % cfg["steps"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: str, cfg: dict, env: dict) -> str:
    summary = summarize(out, cfg)
    text = table(summary, cfg)
    result = {"experiment": "Appendix G.8: LRA rank x selected rank", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
              "scale": {k: v for k, v in cfg.items() if k != "cells"},
              "grid": [[r, lra_name(q)] for r, q in cfg["cells"]], **summary, "environment": env}
    write_json(os.path.join(out, "lra_grid.json"), result)
    with open(os.path.join(out, "lra_grid.md"), "w") as f:
        f.write("# Appendix G.8: LRA rank x selected rank (SmolLM2-135M, reduced scale)\n\n" + text)
    plot(summary, cfg, os.path.join(out, "lra_grid.png"))
    print(text)
    return text


def main() -> None:
    # No abbreviations: lift-finetune's --rank / --lra-rank must not be taken for --ranks / --lra-ranks.
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="results folder: runs/*.json, lra_grid.json/.md/.png")
    p.add_argument("--runs", default=None, help="lift-finetune output folders (default <out>/train, not for git)")
    p.add_argument("--small", action="store_true", help="CPU smoke run: 2 cells, 2 steps, 4 problems")
    p.add_argument("--seeds", type=int, default=None, help="runs per cell, seeds 0.. (default 3, small 1)")
    p.add_argument("--rows", default=None, help="comma-separated selected ranks to run (default: every row)")
    p.add_argument("--ranks", default=None, help="with --lra-ranks: a full grid instead of the default cells")
    p.add_argument("--lra-ranks", default=None, help="comma-separated LRA ranks of the grid ('full': magnitude)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 24, small 2)")
    p.add_argument("--test", type=int, default=None, help="test problems after the first 60 (default 300)")
    p.add_argument("--reuse", default=REUSE, help="the 7.1 study's runs folder ('none': run every cell here)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (0: work in this process only)")
    p.add_argument("--report-only", action="store_true", help="tables and plot from the finished runs")
    args, args.extra = p.parse_known_args()  # anything else goes to lift-finetune
    cfg = dict(SMALL if args.small else FULL)
    if args.small:
        args.reuse = "none"
    if args.seeds:
        cfg["seeds"] = args.seeds
    cfg.update({k: getattr(args, k) for k in ("steps", "test") if getattr(args, k)})
    if args.ranks or args.lra_ranks:
        if not (args.ranks and args.lra_ranks):
            p.error("--ranks and --lra-ranks go together")
        lras = [FULL_LRA if q == "full" else int(q) for q in args.lra_ranks.split(",")]
        cfg["cells"] = [(int(r), q) for r in args.ranks.split(",") for q in lras]
        cfg["check"] = False
    if args.rows:
        rows = {int(x) for x in args.rows.split(",")}
        cfg["cells"] = [c for c in cfg["cells"] if c[0] in rows]
    args.runs = args.runs or os.path.join(args.out, "train")
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        if args.workers > 1:
            spawn_workers(args.workers)
        else:
            work(args, cfg)
    if args.workers != 0:  # workers leave the report to the command that started them
        report(args.out, cfg, environment(default_device()))


if __name__ == "__main__":
    main()
