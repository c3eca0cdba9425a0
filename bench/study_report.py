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

AS_LIFT = "as-lift"  # an ablation's learning rate: LIFT's chosen one (finetune_learning_forgetting.py)

# (name, metric, a, b, the paper's sign of a - b); metric acc: test accuracy, ppl: perplexity change.
CLAIMS = [
    ("LIFT >= full FT on the target", "acc", "lift", "full", +1),
    ("LIFT >= LoRA on the target", "acc", "lift", "lora", +1),
    ("LIFT forgets less than full FT", "ppl", "lift", "full", -1),
    ("LIFT forgets less than LoRA", "ppl", "lift", "lora", -1),
    ("LIFT's selection beats magnitude (target)", "acc", "lift", "magnitude", +1),
    ("LIFT's selection beats random (target)", "acc", "lift", "random", +1),
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
    return base, [r for r in runs if r["key"] != "base"]


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
    for method in lrs:  # LIFT before the ablations, which take its learning rate
        if lrs[method] == AS_LIFT:
            if "lift" not in methods:
                continue
            lr = methods["lift"]["lr"]
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
                           "loss": [r["loss"] for r in mine], "runs": [r["key"] for r in mine]}
    claims = []
    for name, metric, a, b, sign in CLAIMS:
        if a not in methods or b not in methods:
            claims.append({"claim": name, "verdict": "not run"})
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
        if (low > 0 and sign > 0) or (high < 0 and sign < 0):
            verdict = "reproduced"
        elif (high < 0 and sign > 0) or (low > 0 and sign < 0):
            verdict = "not reproduced"
        else:
            verdict = "not resolved at this scale"
        claims.append({"claim": name, "metric": metric, "a": a, "b": b, "difference": diff, "ci95": [low, high],
                       "seeds": [len(mine[a]), len(mine[b])], "verdict": verdict})
    base_ppl = math.exp(sum(base["text_nll"]) / sum(base["text_tokens"]))
    return {"base_test_accuracy": base_test, "base_perplexity": base_ppl, "search": search, "methods": methods,
            "claims": claims}


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
    lines += ["", "Ablations (magnitude, random) run at LIFT's chosen learning rate: same optimizer and budget, "
                  "only the selection differs."]
    lines += ["", f"Learning-rate search (seed 0; chosen by validation exact match on {cfg['val']} problems, "
                  f"ties by final training loss):", "",
              "| method | lr | validation | test | ppl change % | final train loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} | "
              f"{r['ppl_change']:+.2f} | {r['final_loss']:.4f} |" for r in s["search"]]
    lines += ["", "| claim | difference (a - b) | 95% bootstrap | seeds (a, b) | verdict |", "|---|---|---|---|---|"]
    for c in s["claims"]:
        if c["verdict"] == "not run":
            lines.append(f"| {c['claim']} | | | | not run |")
            continue
        unit = "points" if c["metric"] == "acc" else "% ppl"
        scale = 100 if c["metric"] == "acc" else 1
        lines.append(f"| {c['claim']} | {scale * c['difference']:+.2f} {unit} | [{scale * c['ci95'][0]:+.2f}, "
                     f"{scale * c['ci95'][1]:+.2f}] | {c['seeds'][0]}, {c['seeds'][1]} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def plots(s: dict, out: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, r in s["methods"].items():
        a, p = r["acc_t"], r["ppl_t"]
        ax.errorbar([p[0]], [a[0]], xerr=[[p[0] - p[1]], [p[2] - p[0]]], yerr=[[a[0] - a[1]], [a[2] - a[0]]],
                    marker="o", capsize=3, label=f"{m} (lr {r['lr']:g}, {len(r['seeds'])} seeds)")
        ax.scatter(r["ppl_change"], r["test_accuracy"], s=10, alpha=0.4)
    ax.axhline(s["base_test_accuracy"], color="gray", linestyle="--", label="base model")
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
