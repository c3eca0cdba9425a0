"""Figure 2a on SmolLM2-135M: perplexity after Gaussian noise on weights chosen by LIFT, magnitude, random.

For each selector and density, the same number of entries of every target matrix (all linears but
lm_head) gets N(0, 0.01^2) noise; perplexity is measured on held-out English text (standard-library
docstrings, see finetune_common.py). The paper (LLaMA-2-7B, WikiText) finds perplexity rising
sharply only for LIFT's selection. Results: JSON rows, a markdown table with 95% t-intervals over
noise seeds (and the paired LIFT - magnitude / LIFT - random differences), and a PNG.

Resumable: each (selector, density, seed) perplexity is one JSON under <out>/rows/; a rerun (or a
larger grid given by --densities/--seeds) computes only the missing ones.

    python bench/finetune_noise_perturbation.py --out bench/results/noise            # GPU, full
    python bench/finetune_noise_perturbation.py --out /tmp/noise --small             # CPU smoke
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from finetune_common import default_device, environment, heldout_text, pyplot, write_json
from lift_finetune import model as model_io
from study_runs import RunStore
from study_stats import t_interval
from lift_finetune.evaluate import perplexity
from lift_finetune.methods import target_matrices
from lift_kernels.optim.selection import select

SELECTORS = ("lift", "magnitude", "random")
DETERMINISTIC = ("lift", "magnitude")  # exact SVD / magnitudes: the same entries whatever the seed
FULL = {"densities": [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1], "seeds": 3, "docs": 200, "tokens": 256}
SMALL = {"densities": [0.01, 0.05], "seeds": 1, "docs": 16, "tokens": 128}


def selections(mats: dict, selector: str, density: float, lra_rank: int, seed: int) -> dict:
    """Flat indices per matrix: the ``density`` fraction of its entries chosen by ``selector``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in mats.items():
        k = max(1, round(density * w.numel()))
        out[name] = select(w.detach(), k, selector=selector, lra_rank=lra_rank, svd="exact",
                            largest=True, generator=gen).long()
    return out


@torch.no_grad()
def perturbed_perplexity(model, tokenizer, texts, mats, chosen, std, seed, device, tokens) -> float:
    gen = torch.Generator().manual_seed(10_000 + seed)
    saved = {name: w.detach().clone() for name, w in mats.items()}
    try:
        for name, w in mats.items():
            idx = chosen[name]
            w.view(-1)[idx.to(w.device)] += (std * torch.randn(idx.numel(), generator=gen)).to(w.device, w.dtype)
        return perplexity(model, tokenizer, texts, device, max_length=tokens)
    finally:
        for name, w in mats.items():
            w.copy_(saved[name])


def plot(rows: list[dict], base_ppl: float, path: str, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for selector in SELECTORS:
        dens = sorted({r["density"] for r in rows if r["selector"] == selector})
        vals = [[r["perplexity"] for r in rows if r["selector"] == selector and r["density"] == d] for d in dens]
        ci = [t_interval(v) for v in vals]
        ax.plot([100 * d for d in dens], [c[0] for c in ci], marker="o", label=selector)
        ax.fill_between([100 * d for d in dens], [c[1] for c in ci], [c[2] for c in ci], alpha=0.2)
    ax.axhline(base_ppl, color="gray", linestyle="--", label="no noise")
    ax.set_xscale("log")
    ax.set_xticks(sorted({100 * r["density"] for r in rows}))  # label the measured densities themselves
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("entries with noise (% of each matrix)")
    ax.set_ylabel("perplexity, held-out text (mean, 95% t over seeds)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], base_ppl: float) -> str:
    """Mean [95% t] perplexity per selector and density, and the paired differences of LIFT's selection."""
    dens = sorted({r["density"] for r in rows})
    by = {(r["selector"], r["density"], r["seed"]): r["perplexity"] for r in rows}
    lines = [f"No noise: perplexity {base_ppl:.3f}.", "",
             "| density | " + " | ".join(SELECTORS) + " | LIFT - magnitude | LIFT - random |",
             "|---|" + "---|" * (len(SELECTORS) + 2)]
    for d in dens:
        cells = []
        for sel in SELECTORS:
            m, lo, hi = t_interval([by[k] for k in sorted(by) if k[0] == sel and k[1] == d])
            cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
        for other in ("magnitude", "random"):  # paired by noise seed
            seeds = sorted(k[2] for k in by if k[0] == "lift" and k[1] == d and (other, d, k[2]) in by)
            m, lo, hi = t_interval([by[("lift", d, s)] - by[(other, d, s)] for s in seeds])
            cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {100 * d:g}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for rows/, noise_perturbation.json/.md/.png")
    p.add_argument("--small", action="store_true", help="CPU smoke run: 2 densities, 1 seed, 16 texts")
    p.add_argument("--std", type=float, default=0.01, help="noise standard deviation (the paper's 0.01)")
    p.add_argument("--lra-rank", type=int, default=32, help="LIFT's filter rank for the selection")
    p.add_argument("--model", default=None, help="as lift-finetune's --model (default: built-in SmolLM2-135M)")
    p.add_argument("--densities", type=lambda v: [float(x) for x in v.split(",")], default=None,
                   help="comma-separated fractions of each matrix (default %s)" % FULL["densities"])
    for name in ("seeds", "docs", "tokens"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {FULL[name]} (small {SMALL[name]})")
    args = p.parse_args()
    cfg = dict(SMALL if args.small else FULL)
    cfg.update({k: getattr(args, k) for k in ("densities", "seeds", "docs", "tokens") if getattr(args, k)})
    os.makedirs(args.out, exist_ok=True)
    device = default_device()
    model, tokenizer = model_io.load(model_io.resolve(args.model), device)
    mats = target_matrices(model, None)  # before freezing: it lists the trainable linears
    model.requires_grad_(False)
    texts = heldout_text(cfg["docs"])
    # Rows are keyed by everything that changes a perplexity, so a rerun at another scale never reuses them.
    scale = f"std{args.std:g}-lra{args.lra_rank}-docs{len(texts)}-tok{cfg['tokens']}"
    store = RunStore(os.path.join(args.out, "rows"))
    began = time.time()
    if not store.done(f"base-{scale}"):
        store.save(f"base-{scale}", {"perplexity": perplexity(model, tokenizer, texts, device,
                                                               max_length=cfg["tokens"])})
    base_ppl = store.load(f"base-{scale}")["perplexity"]
    print(f"no noise: perplexity {base_ppl:.3f} on {len(texts)} docstrings", flush=True)
    rows = []
    for selector in SELECTORS:
        for density in cfg["densities"]:
            cached = None  # a deterministic selector's entries, chosen once for all seeds
            for seed in range(cfg["seeds"]):
                key = f"{selector}-d{density:g}-seed{seed}-{scale}"
                if not store.done(key):
                    if cached is None or selector not in DETERMINISTIC:
                        cached = selections(mats, selector, density, args.lra_rank, seed)
                    ppl = perturbed_perplexity(model, tokenizer, texts, mats, cached, args.std, seed, device,
                                               cfg["tokens"])
                    store.save(key, {"selector": selector, "density": density, "seed": seed, "perplexity": ppl,
                                     "entries": sum(idx.numel() for idx in cached.values())})
                row = store.load(key)
                rows.append(row)
                print(f"{selector:9s} density {100 * density:5.2f}% seed {seed}: perplexity {row['perplexity']:.3f}",
                      flush=True)
    result = {"experiment": "Figure 2a: noise on selected weights", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
              "std": args.std, "lra_rank": args.lra_rank, "texts": len(texts), "tokens_per_text": cfg["tokens"],
              "seeds": cfg["seeds"], "base_perplexity": base_ppl, "rows": rows,
              "seconds_this_session": time.time() - began, "small": args.small, "environment": environment(device)}
    write_json(os.path.join(args.out, "noise_perturbation.json"), result)
    with open(os.path.join(args.out, "noise_perturbation.md"), "w") as f:
        f.write(table(rows, base_ppl))
    plot(rows, base_ppl, os.path.join(args.out, "noise_perturbation.png"),
         f"SmolLM2-135M, N(0, {args.std}^2) noise on selected weights")
    print(table(rows, base_ppl))


if __name__ == "__main__":
    main()
