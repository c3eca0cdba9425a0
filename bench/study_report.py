"""Tables, verdicts and plots of the learning-vs-forgetting study, from its finished run JSONs.

Each method is reported at its chosen learning rate (best validation accuracy on seed 0), over
every seed finished at that rate; a method whose search is unfinished is left out. A claim is
"reproduced" when the 95% bootstrap interval of the difference lies on the paper's side of zero,
"not reproduced" when it lies on the other side, and "not resolved at this scale" when it holds zero.
"""
from __future__ import annotations

import glob
import json
import math
import os
import statistics

from finetune_common import pyplot, write_json
from study_stats import bootstrap, ratio_bootstrap, t_interval

BASE_4BIT = "base-4bit"  # the untrained 4-bit base, dequantized: a reference row (finetune_learning_forgetting.py)


def _borrowed(lr_spec) -> str | None:
    """"as-<method>": that method's chosen learning rate (ablations: LIFT's; 4-bit methods: their float one's)."""
    return lr_spec[3:] if isinstance(lr_spec, str) and lr_spec.startswith("as-") else None


# (name, metric, a, b, the paper's sign of a - b); metric acc: test accuracy, ppl: perplexity change.
CLAIMS = [
    ("LIFT >= full FT on the target", "acc", "lift", "full", +1),
    ("LIFT >= LoRA on the target", "acc", "lift", "lora", +1),
    ("LIFT forgets less than full FT", "ppl", "lift", "full", -1),
    ("LIFT forgets less than LoRA", "ppl", "lift", "lora", -1),
    ("LIFT's selection beats magnitude (target)", "acc", "lift", "magnitude", +1),
    ("LIFT's selection beats random (target)", "acc", "lift", "random", +1),
]
# Issue 20 item 5, "does it still learn?" over a 4-bit base: comparisons without a paper's side (sign 0),
# so the verdict says which way the interval lies, or that it holds zero.
QUANT_COMPARISONS = [
    ("4-bit LIFT vs QLoRA (target)", "acc", "lift-4bit", "qlora", 0),
    ("4-bit LIFT vs QLoRA (forgetting)", "ppl", "lift-4bit", "qlora", 0),
    ("4-bit LIFT vs fp32 LIFT (target)", "acc", "lift-4bit", "lift", 0),
    ("4-bit LIFT vs fp32 LIFT (forgetting)", "ppl", "lift-4bit", "lift", 0),
    ("QLoRA vs fp32 LoRA (target)", "acc", "qlora", "lora", 0),
    ("QLoRA vs fp32 LoRA (forgetting)", "ppl", "qlora", "lora", 0),
]


def _ppl_change(run: dict, base: dict) -> float:
    count = sum(base["text_tokens"])
    return 100 * (math.exp((sum(run["text_nll"]) - sum(base["text_nll"])) / count) - 1)


def _load(out: str) -> tuple[dict, list[dict]]:
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    base = next(r for r in runs if r["key"] == "base")
    return base, [r for r in runs if not r["key"].startswith("base")]


def _verdict(low: float, high: float, sign: int) -> str:
    if sign == 0:  # no claimed side: say where the interval lies
        return "a > b" if low > 0 else "a < b" if high < 0 else "not resolved at this scale"
    if (low > 0 and sign > 0) or (high < 0 and sign < 0):
        return "reproduced"
    if (high < 0 and sign > 0) or (low > 0 and sign < 0):
        return "not reproduced"
    return "not resolved at this scale"


def _reference(out: str, base: dict, n_val: int) -> dict | None:
    """The untrained 4-bit base against the fp32 base: test accuracy and perplexity change, with
    bootstraps over problems / texts (one model, no seeds), and the paired accuracy difference."""
    path = os.path.join(out, "runs", BASE_4BIT + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        ref = json.load(f)
    test, base_test = ref["correct"][n_val:], base["correct"][n_val:]
    if len(test) != len(base_test) or len(ref["text_nll"]) != len(base["text_nll"]):
        return None  # scored on another split: not this study's reference
    nlls = (base["text_nll"], base["text_tokens"])
    return {"test_accuracy": statistics.fmean(test), "acc_boot": bootstrap({"q": [test]}, lambda m: m["q"]),
            "acc_vs_base": statistics.fmean(test) - statistics.fmean(base_test),
            "acc_vs_base_boot": bootstrap({"q": [test], "b": [base_test]}, lambda m: m["q"] - m["b"]),
            "ppl_change": _ppl_change(ref, base),
            "ppl_boot": ratio_bootstrap({"q": [(ref["text_nll"], ref["text_tokens"])]}, nlls, lambda m: m["q"]),
            "quantized_base": ref.get("quantized_base")}


def _matches(run: dict, cfg: dict, rank: int) -> bool:
    """A run of this study's scale, scored on the same problems and texts (other --val/--test/--texts
    need their own --out: run keys name the training, not the scoring)."""
    return (run["steps"] == cfg["steps"] and run["batch"] == cfg["batch"] and run["rank"] == rank
            and len(run["val_correct"]) == cfg["val"] and len(run["test_correct"]) == cfg["test"]
            and len(run["text_nll"]) == cfg["texts"])


def summarize(out: str, lrs: dict, cfg: dict, rank: int) -> dict:
    base, runs = _load(out)
    runs = [r for r in runs if _matches(r, cfg, rank)]
    n_val = cfg["val"]
    base_test = statistics.fmean(base["correct"][n_val:])
    methods, search = {}, []
    for method in lrs:  # LIFT and LoRA before the methods that take their learning rate
        if _borrowed(lrs[method]):
            if _borrowed(lrs[method]) not in methods:
                continue
            lr = methods[_borrowed(lrs[method])]["lr"]
        else:
            seed0 = [r for r in runs if r["method"] == method and r["seed"] == 0]
            search += [{"method": r["method"], "lr": r["lr"], "val_accuracy": r["val_accuracy"],
                        "test_accuracy": r["test_accuracy"], "ppl_change": _ppl_change(r, base),
                        "final_loss": r["final_loss"]} for r in sorted(seed0, key=lambda r: r["lr"])]
            if len(seed0) < len(lrs[method]):
                continue  # search unfinished: no chosen learning rate yet
            lr = max(seed0, key=lambda r: (r["val_accuracy"], -r["final_loss"]))["lr"]
        mine = sorted((r for r in runs if r["method"] == method and r["lr"] == lr), key=lambda r: r["seed"])
        if not mine:
            continue
        acc = [r["test_accuracy"] for r in mine]
        ppl = [_ppl_change(r, base) for r in mine]
        methods[method] = {"lr": lr, "seeds": [r["seed"] for r in mine], "trainable": mine[0]["trainable"],
                           "test_accuracy": acc, "ppl_change": ppl,
                           "acc_t": t_interval(acc), "ppl_t": t_interval(ppl),
                           "acc_boot": bootstrap({method: [r["test_correct"] for r in mine]}, lambda m: m[method]),
                           "ppl_boot": ratio_bootstrap({method: [(r["text_nll"], r["text_tokens"]) for r in mine]},
                                                       (base["text_nll"], base["text_tokens"]), lambda m: m[method]),
                           "loss": [r["loss"] for r in mine], "runs": [r["key"] for r in mine],
                           "final_loss": [r["final_loss"] for r in mine],
                           "wall_seconds": [r["wall_seconds"] for r in mine]}
    claims = []
    for name, metric, a, b, sign in CLAIMS + [c for c in QUANT_COMPARISONS if c[2] in lrs and c[3] in lrs]:
        if a not in methods or b not in methods:
            claims.append({"claim": name, "sign": sign, "verdict": "not run"})
            continue
        mine = {m: [r for r in runs if r["method"] == m and r["lr"] == methods[m]["lr"]] for m in (a, b)}
        if metric == "acc":
            diff = statistics.fmean(methods[a]["test_accuracy"]) - statistics.fmean(methods[b]["test_accuracy"])
            low, high = bootstrap({m: [r["test_correct"] for r in mine[m]] for m in (a, b)},
                                  lambda x: x[a] - x[b])
        else:
            diff = statistics.fmean(methods[a]["ppl_change"]) - statistics.fmean(methods[b]["ppl_change"])
            low, high = ratio_bootstrap({m: [(r["text_nll"], r["text_tokens"]) for r in mine[m]] for m in (a, b)},
                                        (base["text_nll"], base["text_tokens"]), lambda x: x[a] - x[b])
        # same seed = same data order for both methods: the per-seed differences, for a paired t-interval
        key = "test_accuracy" if metric == "acc" else "ppl_change"
        by_seed = {s: methods[a][key][methods[a]["seeds"].index(s)] - methods[b][key][methods[b]["seeds"].index(s)]
                   for s in methods[a]["seeds"] if s in methods[b]["seeds"]}
        claims.append({"claim": name, "metric": metric, "a": a, "b": b, "sign": sign, "difference": diff,
                       "ci95": [low, high], "seeds": [len(mine[a]), len(mine[b])],
                       "difference_by_seed": by_seed,
                       "paired_t": list(t_interval(list(by_seed.values()))) if len(by_seed) > 1 else None,
                       "verdict": _verdict(low, high, sign)})
    base_ppl = math.exp(sum(base["text_nll"]) / sum(base["text_tokens"]))
    return {"base_test_accuracy": base_test, "base_perplexity": base_ppl, "search": search, "methods": methods,
            "claims": claims, "reference_4bit": _reference(out, base, n_val)}


def tables(s: dict, cfg: dict) -> str:
    lines = [f"Base model: test exact match {s['base_test_accuracy']:.3f}, docstring perplexity "
             f"{s['base_perplexity']:.3f}.", "",
             "| method | lr | seeds | trainable | test exact match, mean [95% t over seeds] [95% bootstrap] | "
             "source ppl change %, mean [95% t] [95% bootstrap] |", "|---|---|---|---|---|---|"]
    for m, r in s["methods"].items():
        a, p = r["acc_t"], r["ppl_t"]
        lines.append(f"| {m} | {r['lr']:g} | {len(r['seeds'])} | {r['trainable']:,} | {a[0]:.3f} [{a[1]:.3f}, "
                     f"{a[2]:.3f}] [{r['acc_boot'][0]:.3f}, {r['acc_boot'][1]:.3f}] | {p[0]:+.2f} [{p[1]:+.2f}, "
                     f"{p[2]:+.2f}] [{r['ppl_boot'][0]:+.2f}, {r['ppl_boot'][1]:+.2f}] |")
    q = s.get("reference_4bit")
    if q is not None:
        lines.append(f"| 4-bit base, untrained (reference) | | | 0 | {q['test_accuracy']:.3f} [{q['acc_boot'][0]:.3f}, "
                     f"{q['acc_boot'][1]:.3f}] (bootstrap over problems) | {q['ppl_change']:+.2f} "
                     f"[{q['ppl_boot'][0]:+.2f}, {q['ppl_boot'][1]:+.2f}] (bootstrap over texts) |")
    lines += ["", "Ablations (magnitude, random) run at LIFT's chosen learning rate: same optimizer and budget, "
                  "only the selection differs."]
    if any(m in s["methods"] for m in ("lift-4bit", "qlora")):
        lines += ["4-bit methods (lift-finetune --load-in-4bit, NF4 base) run at their float counterpart's chosen "
                  "rate (lift-4bit: LIFT's, qlora: LoRA's; no search of their own), scored on the merged float "
                  "model the run saves; perplexity change against the same fp32 base as every row."]
    if q is not None:
        lines.append(f"4-bit base vs fp32 base, test exact match: {100 * q['acc_vs_base']:+.2f} points "
                     f"[{100 * q['acc_vs_base_boot'][0]:+.2f}, {100 * q['acc_vs_base_boot'][1]:+.2f}] (paired "
                     f"bootstrap over problems).")
    lines += ["", f"Learning-rate search (seed 0; chosen by validation exact match on {cfg['val']} problems, "
                  f"ties by final training loss):", "",
              "| method | lr | validation | test | ppl change % | final train loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} | "
              f"{r['ppl_change']:+.2f} | {r['final_loss']:.4f} |" for r in s["search"]]
    lines += ["", "| claim | difference (a - b) | 95% bootstrap | seeds (a, b) | verdict |", "|---|---|---|---|---|"]
    for c in s["claims"]:
        if c.get("sign") == 0:
            continue  # the 4-bit comparisons: their own table below
        if c["verdict"] == "not run":
            lines.append(f"| {c['claim']} | | | | not run |")
            continue
        unit = "points" if c["metric"] == "acc" else "% ppl"
        scale = 100 if c["metric"] == "acc" else 1
        lines.append(f"| {c['claim']} | {scale * c['difference']:+.2f} {unit} | [{scale * c['ci95'][0]:+.2f}, "
                     f"{scale * c['ci95'][1]:+.2f}] | {c['seeds'][0]}, {c['seeds'][1]} | {c['verdict']} |")
    quant = [c for c in s["claims"] if c.get("sign") == 0]
    if quant:
        lines += ["", "4-bit comparisons (no side claimed: the verdict says where the interval lies):", "",
                  "| comparison (a vs b) | difference (a - b) | 95% bootstrap | per seed (same data order) | "
                  "95% t of the per-seed differences | seeds (a, b) | verdict |", "|---|---|---|---|---|---|---|"]
        for c in quant:
            if c["verdict"] == "not run":
                lines.append(f"| {c['claim']} | | | | | | not run |")
                continue
            unit, scale = ("points", 100) if c["metric"] == "acc" else ("% ppl", 1)
            lines.append(paired_row(c, c["ci95"], scale, unit))
    return "\n".join(lines) + "\n"


def paired_row(c: dict, interval, scale: float = 100, unit: str = "points") -> str:
    """A table row of a comparison of two methods scored on the same items and seeds: difference, its
    bootstrap ``interval``, the per-seed differences and their t-interval, seed counts and verdict."""
    per_seed = ", ".join(f"{scale * d:+.1f}" for d in c["difference_by_seed"].values())
    pt = c["paired_t"]
    paired = f"[{scale * pt[1]:+.2f}, {scale * pt[2]:+.2f}]" if pt else ""
    return (f"| {c['claim']} | {scale * c['difference']:+.2f} {unit} | [{scale * interval[0]:+.2f}, "
            f"{scale * interval[1]:+.2f}] | {per_seed} | {paired} | {c['seeds'][0]}, {c['seeds'][1]} | "
            f"{c['verdict']} |")


def plots(s: dict, out: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, r in s["methods"].items():
        a, p = r["acc_t"], r["ppl_t"]
        ax.errorbar([p[0]], [a[0]], xerr=[[p[0] - p[1]], [p[2] - p[0]]], yerr=[[a[0] - a[1]], [a[2] - a[0]]],
                    marker="o", capsize=3, label=f"{m} (lr {r['lr']:g}, {len(r['seeds'])} seeds)")
        ax.scatter(r["ppl_change"], r["test_accuracy"], s=10, alpha=0.4)
    ax.axhline(s["base_test_accuracy"], color="gray", linestyle="--", label="base model")
    q = s.get("reference_4bit")
    if q is not None:
        ax.errorbar([q["ppl_change"]], [q["test_accuracy"]], marker="x", color="black", capsize=3, linestyle="none",
                    xerr=[[q["ppl_change"] - q["ppl_boot"][0]], [q["ppl_boot"][1] - q["ppl_change"]]],
                    label="4-bit base, untrained (bootstrap over items)")
    ax.set_xlabel("source perplexity change (%), forgetting  (mean, 95% t over seeds)")
    ax.set_ylabel("held-out exact match, learning")
    ax.set_title("SmolLM2-135M: learning vs forgetting")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "forgetting.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    span = 5  # trailing mean: the per-step loss of 8 examples is noisy
    for m, r in s["methods"].items():
        steps = min(len(x) for x in r["loss"])
        mean = [statistics.fmean(x[i] for x in r["loss"]) for i in range(steps)]
        smooth = [statistics.fmean(mean[max(0, i - span + 1):i + 1]) for i in range(steps)]
        ax.plot(range(1, steps + 1), smooth, label=f"{m} ({len(r['loss'])} seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (mean over seeds, trailing mean of {span})")
    ax.set_yscale("log")
    ax.set_title("Learning curves (same data order per seed for every method)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "learning_curves.png"), dpi=120)
    plt.close(fig)


def report(out: str, lrs: dict, cfg: dict, rank: int, env: dict, seeds_wanted: int) -> dict:
    s = summarize(out, lrs, cfg, rank)
    result = {"experiment": "Section 7.1: learning vs forgetting", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
              "scale": {**cfg, "rank": rank, "seeds_wanted": seeds_wanted, "learning_rates": lrs},
              **s, "environment": env}
    write_json(os.path.join(out, "forgetting.json"), result)
    text = tables(s, cfg)
    with open(os.path.join(out, "forgetting.md"), "w") as f:
        f.write(text)
    if s["methods"]:
        plots(s, out)
    print(text)
    return result
