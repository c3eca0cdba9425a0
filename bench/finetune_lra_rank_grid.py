"""Appendix G.8 on SmolLM2-135M: LIFT accuracy over a grid of LRA rank x selected rank.

Each cell is one lift-finetune run on the built-in arithmetic problems with ``--lra-rank`` (rank of
the low-rank filter) and ``--rank`` (trainable budget, LoRA's count at that rank). The paper
(LLaMA models, MATH-10K) finds a larger LRA rank no better, and the best cells near LRA rank ~
selected rank. Results: JSON, a markdown table (mean [95% t over seeds] per cell) and a heat map.
Resumable: a cell's finished run (its summary.json) is reused, an interrupted one resumed.

    python bench/finetune_lra_rank_grid.py --out bench/results/lra_grid               # GPU, full
    python bench/finetune_lra_rank_grid.py --out /tmp/lra_grid --small                # CPU smoke
"""
from __future__ import annotations

import argparse
import os

from finetune_common import default_device, environment, pyplot, run_finetune, write_json
from study_stats import t_interval

# SmolLM2's smallest target matrix (k_proj, 192 x 576) fits ranks up to 143 and LRA ranks up to 192.
FULL = {"ranks": [8, 16, 32, 64, 128], "lra_ranks": [8, 16, 32, 64, 128], "seeds": 1, "flags": []}
SMALL = {"ranks": [4, 8], "lra_ranks": [8], "seeds": 1, "flags": ["--max-steps", "2", "--max-eval", "4",
                                                                  "--max-new-tokens", "16", "--batch-size", "4"]}


def table(ranks, lra_ranks, acc) -> str:
    """Mean held-out accuracy per cell over its seeds, with the 95% t-interval when there are several."""
    lines = ["| rank \\ LRA rank | " + " | ".join(str(q) for q in lra_ranks) + " |",
             "|---|" + "---|" * len(lra_ranks)]
    for r in ranks:
        cells = []
        for q in lra_ranks:
            m, lo, hi = t_interval(acc[(r, q)])
            cells.append(f"{m:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if len(acc[(r, q)]) > 1 else ""))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(ranks, lra_ranks, acc, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(lra_ranks) + 2, 1.0 * len(ranks) + 1.5))
    grid = [[sum(acc[(r, q)]) / len(acc[(r, q)]) for q in lra_ranks] for r in ranks]  # mean over seeds
    im = ax.imshow(grid, cmap="viridis", origin="lower")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(lra_ranks)), [str(q) for q in lra_ranks])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("LRA rank (low-rank filter)")
    ax.set_ylabel("selected rank (trainable budget)")
    ax.set_title("LIFT held-out accuracy, SmolLM2-135M")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the runs and lra_grid.json/.md/.png")
    p.add_argument("--small", action="store_true", help="CPU smoke run: 2 cells, 2 steps, 4 problems")
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    p.add_argument("--ranks", type=ints, default=None, help="comma-separated selected ranks (default %s)" % FULL["ranks"])
    p.add_argument("--lra-ranks", type=ints, default=None, help="comma-separated LRA ranks (default %s)" % FULL["lra_ranks"])
    p.add_argument("--seeds", type=int, default=None, help="runs per cell, seeds 0.. (default 1)")
    p.add_argument("--runs", default=None, help="lift-finetune output folders (default: --out)")
    args, extra = p.parse_known_args()  # anything else goes to lift-finetune (e.g. --epochs 1)
    cfg = dict(SMALL if args.small else FULL)
    cfg.update({k: getattr(args, k) for k in ("ranks", "lra_ranks", "seeds") if getattr(args, k)})
    os.makedirs(args.out, exist_ok=True)
    acc, cells = {}, []
    for seed in range(cfg["seeds"]):  # seed-major: a study cut short still has every cell once
        for rank in cfg["ranks"]:
            for lra in cfg["lra_ranks"]:
                # Named by everything it was run with, so a rerun with other flags never reuses it.
                name = "-".join([f"rank{rank}-lra{lra}-seed{seed}", *(x.lstrip("-") for x in cfg["flags"] + extra)])
                folder = os.path.join(args.runs or args.out, name.replace("/", "_"))
                summary = run_finetune(folder, "--method", "lift", "--rank", str(rank), "--lra-rank", str(lra),
                                       "--seed", str(seed), *cfg["flags"], *extra)
                acc.setdefault((rank, lra), []).append(summary["accuracy_finetuned"])
                cells.append({"rank": rank, "lra_rank": lra, "seed": seed, "accuracy": summary["accuracy_finetuned"],
                              "accuracy_base": summary["accuracy_base"], "held_out": summary["held_out_examples"],
                              "wall_seconds": summary["wall_seconds"], "run": folder})
    result = {"experiment": "Appendix G.8: LRA rank x selected rank", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
              "flags": cfg["flags"] + extra, "cells": cells, "small": args.small,
              "environment": environment(default_device())}
    write_json(os.path.join(args.out, "lra_grid.json"), result)
    with open(os.path.join(args.out, "lra_grid.md"), "w") as f:
        f.write(table(cfg["ranks"], cfg["lra_ranks"], acc))
    heatmap(cfg["ranks"], cfg["lra_ranks"], acc, os.path.join(args.out, "lra_grid.png"))
    print(table(cfg["ranks"], cfg["lra_ranks"], acc))


if __name__ == "__main__":
    main()
