"""Section 7.1 on SmolLM2-135M: learning (target accuracy) vs forgetting (source perplexity).

Fine-tunes on the built-in arithmetic word problems with LIFT, full fine-tuning and LoRA (LoRA at
the same trainable count as LIFT), each over the learning rates the paper searched, through
lift-finetune itself. Target: held-out exact-match accuracy before and after. Source: perplexity on
held-out English text (standard-library docstrings) of the base model and of base + each run's delta.
The paper (LLaMA-3.2-3B / LLaMA-3-8B, MATH-10K, commonsense as source) finds LIFT best on both.

    python bench/finetune_learning_forgetting.py --out bench/results/forgetting      # GPU, full
    python bench/finetune_learning_forgetting.py --out /tmp/forgetting --small       # CPU smoke
"""
from __future__ import annotations

import argparse
import os

import lift_kernels as lk
from finetune_common import default_device, environment, heldout_text, load_builtin, pyplot, run_finetune, write_json
from lift_kernels.finetune.evaluate import perplexity

# The paper's learning-rate search (Appendix F): Full FT {1e-5..1e-4}, the others {5e-5..5e-4}.
FULL_LRS = {"lift": [5e-5, 1e-4, 2e-4, 5e-4], "lora": [5e-5, 1e-4, 2e-4, 5e-4], "full": [1e-5, 2e-5, 5e-5, 1e-4]}
SMALL_LRS = {"lift": [2e-4], "lora": [2e-4], "full": [2e-5]}
SMALL_FLAGS = ["--max-steps", "2", "--max-eval", "4", "--max-new-tokens", "16", "--batch-size", "4"]


def table(rows: list[dict]) -> str:
    lines = ["| method | lr | trainable | target acc. before -> after | source ppl before -> after | best lr |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['acc_before']:.3f} -> "
                     f"{r['acc_after']:.3f} | {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} "
                     f"({100 * (r['ppl_after'] / r['ppl_before'] - 1):+.1f}%) | {'*' if r['best'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("lift", "o"), ("full", "s"), ("lora", "^")):
        mine = [r for r in rows if r["method"] == method]
        ax.scatter([100 * (r["ppl_after"] / r["ppl_before"] - 1) for r in mine], [r["acc_after"] for r in mine],
                   marker=marker, label=method)
        for r in mine:
            ax.annotate(f"{r['lr']:g}", (100 * (r["ppl_after"] / r["ppl_before"] - 1), r["acc_after"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("source perplexity change (%), forgetting")
    ax.set_ylabel("target accuracy after fine-tuning, learning")
    ax.legend()
    ax.set_title("SmolLM2-135M: learning vs forgetting")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the runs, forgetting.json/.md/.png")
    p.add_argument("--small", action="store_true", help="CPU smoke run: one lr per method, 2 steps, 4 problems")
    p.add_argument("--rank", type=int, default=16, help="LIFT budget and LoRA rank (same trainable count)")
    p.add_argument("--texts", type=int, default=None, help="held-out docstrings (default 200, small 16)")
    args, extra = p.parse_known_args()  # anything else goes to lift-finetune (e.g. --epochs 1)
    lrs = SMALL_LRS if args.small else FULL_LRS
    flags = (SMALL_FLAGS if args.small else []) + ["--rank", str(args.rank), *extra]
    os.makedirs(args.out, exist_ok=True)
    device = default_device()
    texts = heldout_text(args.texts or (16 if args.small else 200))

    runs = []
    for method, method_lrs in lrs.items():
        for lr in method_lrs:
            folder = os.path.join(args.out, f"{method}-lr{lr:g}")
            runs.append((method, lr, folder, run_finetune(folder, "--method", method, "--lr", str(lr), *flags)))

    model, tokenizer = load_builtin(device)
    model.requires_grad_(False)
    ppl_before = perplexity(model, tokenizer, texts, device)
    rows = []
    for method, lr, folder, summary in runs:
        delta = os.path.join(folder, "delta.safetensors")
        lk.apply_delta(model, delta)
        ppl_after = perplexity(model, tokenizer, texts, device)
        lk.remove_delta(model, delta)  # exact: the next run starts from the same base
        rows.append({"method": method, "lr": lr, "trainable": summary["trainable_entries"],
                     "acc_before": summary["accuracy_base"], "acc_after": summary["accuracy_finetuned"],
                     "ppl_before": ppl_before, "ppl_after": ppl_after, "run": folder})
    for method in lrs:  # the paper reports each method at its best learning rate
        best = max((r for r in rows if r["method"] == method), key=lambda r: r["acc_after"])
        for r in rows:
            if r["method"] == method:
                r["best"] = r is best
    result = {"experiment": "Section 7.1: learning vs forgetting", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
              "rank": args.rank, "flags": flags, "texts": len(texts), "rows": rows, "small": args.small,
              "environment": environment(device)}
    write_json(os.path.join(args.out, "forgetting.json"), result)
    with open(os.path.join(args.out, "forgetting.md"), "w") as f:
        f.write(table(rows))
    plot(rows, os.path.join(args.out, "forgetting.png"))
    print(table(rows))


if __name__ == "__main__":
    main()
