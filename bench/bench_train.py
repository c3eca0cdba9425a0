"""End-to-end training throughput: tokens/s and peak memory of LIFT, LoRA and full fine-tuning.

The LLaMA-shaped model of bench_memory.py (transformers LlamaConfig, random bf16 weights, hidden 2048,
16 layers: 0.94B parameters; nothing downloaded), sequence 1024, batch 4, no gradient checkpointing,
every method in one process and one run:
- LIFT: lift_kernels.LIFTAdamW over lift_kernels.lift_param_groups(model) (rank 128, lra_rank 64,
  sparse gradients); its selection runs in the first (warm-up) step, as once per 400 steps in training;
- LoRA: peft, r=128, every linear but lm_head; AdamW(fused) over the adapters;
- full: torch.optim.AdamW(fused) over every weight.
Reports, per method, tokens/s over the timed steps (after the warm-up), the first step's seconds
(LIFT: with its selection), torch.cuda.max_memory_allocated over the whole run and over the timed
steps, and LIFT's ratios to LoRA and full FT. ``--tiny`` runs a tiny model on the CPU in seconds
(a smoke run; its numbers mean nothing; no peak memory on the CPU).

    python bench/bench_train.py --out $OUT/train.json
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from bench_memory import build_model, setup
from bench_utils import environment, print_table, write_results

METHODS = ("lift", "lora", "full")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


def measure(method: str, tiny: bool, device: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """Train ``warmup + steps`` steps of ``method`` on random tokens; time the last ``steps``."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, opt = setup(method, build_model(tiny, device, seq=seq, checkpointing=False), tiny, update_interval=400)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=gen)

    def train_step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first_s = None
    for i in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        train_step()
        _sync(device)
        if i == 0:
            first_s = time.perf_counter() - t0
    peak_warmup = _peak_gb(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak_steady = _peak_gb(device)
    out = {"method": method, "tokens_per_s": batch * seq * steps / seconds, "step_ms": 1e3 * seconds / steps,
           "first_step_s": first_s, "final_loss": float(loss),
           "peak_gb": None if peak_steady is None else max(peak_warmup, peak_steady), "peak_steady_gb": peak_steady,
           "params": sum(p.numel() for p in model.parameters()),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if method == "lift":
        out["selected"] = sum(opt.state[p]["idx"].numel() for p in opt.lift_parameters())
    del model, opt, ids
    return out


def ratios(by: dict) -> dict:
    """LIFT's tokens/s and peak memory over LoRA's and full FT's (peak: None without a GPU)."""
    out = {}
    for other in ("lora", "full"):
        out[f"lift_tokens_per_s_vs_{other}"] = by["lift"]["tokens_per_s"] / by[other]["tokens_per_s"]
        peaks = by["lift"]["peak_gb"], by[other]["peak_gb"]
        out[f"lift_peak_vs_{other}"] = None if None in peaks else peaks[0] / peaks[1]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: a smoke run in seconds")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 10, --tiny 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (LIFT selects in the first)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4, --tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024, --tiny 32)")
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (LIFT's selection is not timed)")
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    batch = args.batch or (2 if args.tiny else 4)
    seq = args.seq or (32 if args.tiny else 1024)
    steps = args.steps or (2 if args.tiny else 10)
    rows = [measure(m, args.tiny, device, batch, seq, args.warmup, steps) for m in METHODS]
    by = {r["method"]: r for r in rows}
    result = {"benchmark": "train", "environment": environment(device), "tiny": args.tiny, "dtype": "bf16",
              "batch": batch, "seq": seq, "warmup": args.warmup, "steps": steps, "results": rows,
              "ratios": ratios(by)}
    nan = float("nan")
    print_table([[r["method"], r["tokens_per_s"], r["step_ms"], r["first_step_s"],
                  nan if r["peak_gb"] is None else r["peak_gb"], r["trainable"]] for r in rows],
                ["method", "tokens/s", "step ms", "first step s", "peak GB", "trainable"])
    for k, v in result["ratios"].items():
        print(f"{k}: {'n/a' if v is None else f'{v:.3f}'}")
    write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
