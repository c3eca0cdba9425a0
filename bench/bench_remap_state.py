"""Benchmark of the refresh state remap on 4 layers of LLaMA-2-7B shapes (issue 3).

A refresh re-selects every weight and carries exp_avg / exp_avg_sq of the entries selected before
and after. The old selection is the largest |W|; the new one the largest |W + noise|, noise sized
so that most entries stay (the overlap is reported). Times the Triton remap and the plain-torch
reference for the whole set against one dense torch.optim.AdamW(fused=True) step (the target:
faster than that), and reports the remap's peak memory beyond its outputs (the target: no m x n
temporaries). Prints a table; ``--out`` writes JSON.

On the CPU (issue 13) the set is SmolLM2-135M's 210 matrices at rank 16 and the remap timed is the
C++ kernel of lift_kernels._C, at each thread count of --threads, against the same baselines.

    python bench/bench_remap_state.py --out bench/results/remap_state.json
    python bench/bench_remap_state.py --out bench/results/cpu-amd-epyc/remap_state.json   # CPU
    python bench/bench_remap_state.py --small   # CPU smoke run
"""
from __future__ import annotations

import torch

from bench_utils import (DTYPES, cpu_threads, dense_fused_adamw_ms, environment, parser, peak_extra_bytes,
                         print_table, selected_indices, settings, time_ms, weight_set, write_results)
from lift_kernels.ops import native
from lift_kernels._triton_loader import load_kernel_module
from lift_kernels.reference import remap_state as plain_torch_remap

DRIFT = 0.05  # noise added to W before re-selecting, relative to W's scale


def remap_all(remap, olds, news, states):
    return [remap(old, new, s) for old, new, s in zip(olds, news, states)]


def main_cpu(args, cfg, params, grads, olds, news, states, kept, entries, name) -> None:
    """The C++ remap and the reference against one dense fused AdamW step, per thread count."""
    results = {"benchmark": "remap_state", **environment("cpu"), "settings": cfg, "dense_baseline_dtype": name,
               "weights": len(params), "entries": entries, "kept_fraction": kept / entries, "by_threads": {}}
    rows = []
    for n in cfg["threads"]:
        with cpu_threads(n):
            r = {"cpp_remap": time_ms(lambda: remap_all(native.kernel("remap_state", "cpu"), olds, news, states), "cpu",
                                      cfg["repeats"]),
                 "plain_torch_remap": time_ms(lambda: remap_all(plain_torch_remap, olds, news, states), "cpu",
                                              cfg["repeats"]),
                 "dense_fused_adamw": dense_fused_adamw_ms(params, grads, "cpu", cfg["repeats"])}
        r["targets_met"] = {"faster_than_dense_fused_adamw_step":
                            r["cpp_remap"]["median_ms"] < r["dense_fused_adamw"]["median_ms"]}
        results["by_threads"][str(n)] = r
        rows += [[n, "C++ (lift_kernels._C)", r["cpp_remap"]["median_ms"]],
                 [n, "plain torch (reference)", r["plain_torch_remap"]["median_ms"]],
                 [n, f"dense fused AdamW ({name})", r["dense_fused_adamw"]["median_ms"]]]
    print(f"{results['device']}: {cfg['model']}, {len(params)} weights, {entries} entries, {kept / entries:.1%} kept")
    print_table(rows, ["threads", "remap of the whole set", "ms"])
    write_results(args.out, results)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cfg = settings(args)
    device = cfg["device"]
    # the remap moves fp32 moments only: the weights' dtype changes nothing but the dense baseline
    name = cfg["dtypes"][0]
    params, grads, olds = weight_set(cfg, DTYPES[name])
    g = torch.Generator(device=device).manual_seed(1)
    news = [selected_indices(p.float() + DRIFT * torch.randn(p.shape, generator=g, device=device), cfg["rank"])
            for p in params]
    states = [[torch.randn(i.numel(), device=device), torch.rand(i.numel(), device=device)] for i in olds]
    kept = sum(torch.isin(new, old).sum().item() for old, new in zip(olds, news))
    entries = sum(i.numel() for i in news)
    if device == "cpu":
        main_cpu(args, cfg, params, grads, olds, news, states, kept, entries, name)
        return
    triton_remap = load_kernel_module("remap_state").remap_state

    output_bytes = sum(8 * i.numel() for i in news)
    results = {
        "benchmark": "remap_state", **environment(device), "settings": cfg, "dense_baseline_dtype": name,
        "weights": len(params), "entries": entries, "kept_fraction": kept / entries,
        "largest_weight_entries": max(p.numel() for p in params), "output_bytes": output_bytes,
        "triton_remap": time_ms(lambda: remap_all(triton_remap, olds, news, states), device),
        "plain_torch_remap": time_ms(lambda: remap_all(plain_torch_remap, olds, news, states), device),
        "triton_peak_extra_bytes": peak_extra_bytes(lambda: remap_all(triton_remap, olds, news, states), device),
        "plain_torch_peak_extra_bytes": peak_extra_bytes(
            lambda: remap_all(plain_torch_remap, olds, news, states), device),
    }
    results["dense_fused_adamw"] = dense_fused_adamw_ms(params, grads, device)
    extra = results["triton_peak_extra_bytes"]
    smallest_mxn_fp32 = 4 * min(p.numel() for p in params)
    results["targets_met"] = {
        "faster_than_dense_fused_adamw_step":
            results["triton_remap"]["median_ms"] < results["dense_fused_adamw"]["median_ms"],
        # anything as large as one m x n fp32 matrix beyond the outputs would be a dense temporary
        "no_mxn_temporaries": None if extra is None else extra < smallest_mxn_fp32,
    }
    print(f"{results['device']}: {len(params)} weights, {entries} entries, {kept / entries:.1%} kept")
    mib = (lambda b: "n/a" if b is None else f"{b / 2**20:.1f}")
    print_table([["triton", results["triton_remap"]["median_ms"], mib(results["triton_peak_extra_bytes"])],
                 ["plain torch", results["plain_torch_remap"]["median_ms"], mib(results["plain_torch_peak_extra_bytes"])],
                 [f"dense fused AdamW ({name})", results["dense_fused_adamw"]["median_ms"], "-"]],
                ["remap of the whole set", "ms", "peak extra MiB"])
    print("targets met:", results["targets_met"])
    write_results(args.out, results)


if __name__ == "__main__":
    main()
