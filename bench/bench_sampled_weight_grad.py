"""Benchmark of sampled_weight_grad (the SDDMM behind LIFT's sparse delta over a quantized base): the
weight gradient of one linear layer at its k selected entries only, against the dense alternative.

For each shape (SmolLM2-135M's gate_proj and LLaMA-2-7B's gate_proj by default, ``--shapes all``
adds both models' q_proj), LIFT's budgets k = (m + n) * rank for ``--ranks`` (16 and 128), sorted
random positions, and token counts ``--tokens`` (512 and 2048), in one process on the same inputs:
- CPU, at each thread count of ``--threads`` (1 and torch's default): the C++ kernel of
  lift_kernels._C (native), the pure-torch reference, and the dense way: grad_out.T @ x in fp32
  (one GEMM, m x n x T multiply-adds) then the k entries gathered;
- GPU: the Triton kernel, the reference and the dense way, timed with triton.testing.do_bench.
Medians of ``--repeats`` runs after one warm-up (the reference: ``--reference-repeats``, it is the
slowest). Inputs are fp32 (``--dtypes`` adds bf16: grad_out and x in bf16, the dense GEMM in bf16
too, as autograd would run it). Prints a table; ``--out`` writes JSON.

    python bench/bench_sampled_weight_grad.py --out bench/results/cpu-intel-xeon-processor/sampled_weight_grad.json
    python bench/bench_sampled_weight_grad.py --out bench/results/<gpu>/sampled_weight_grad.json   # GPU
    python bench/bench_sampled_weight_grad.py --small   # smoke run (CPU: Triton is not timed)
"""
from __future__ import annotations

import torch

from bench_utils import (DTYPES, LLAMA2_7B_LAYER, SMOLLM2_135M_LAYER, cpu_threads, environment, print_table,
                         time_ms, write_results)
from lift_kernels import _ext
from lift_kernels._triton_loader import load_kernel_module
from lift_kernels.ops import native
from lift_kernels.reference import sampled_weight_grad as reference

SHAPES = {"smollm2-135m": dict(SMOLLM2_135M_LAYER), "llama2-7b": dict(LLAMA2_7B_LAYER)}


def shapes(which: str, small: bool) -> list[tuple[str, tuple[int, int]]]:
    names = ("gate_proj",) if which == "mlp" else ("q_proj", "gate_proj")
    out = [(f"{model}.{name}", SHAPES[model][name]) for model in SHAPES for name in names]
    return [(label, (m // 16, n // 16)) for label, (m, n) in out] if small else out


def inputs(m: int, n: int, T: int, rank: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = min((m + n) * rank, m * n)
    grad_out = torch.randn(T, m, generator=g).to(dtype).to(device)
    x = torch.randn(T, n, generator=g).to(dtype).to(device)
    idx = torch.randperm(m * n, generator=g)[:k].sort().values.to(torch.int32).to(device)
    return grad_out, x, idx


def dense_then_gather(grad_out, x, idx):
    """What autograd forms for a dense weight, then the selected entries of it."""
    return (grad_out.T @ x).flatten()[idx.long()].float()


def bench_case(grad_out, x, idx, device: str, threads: list[int], repeats: int, reference_repeats: int) -> dict:
    m, n, T, k = grad_out.shape[1], x.shape[1], grad_out.shape[0], idx.numel()
    case = {"m": m, "n": n, "T": T, "k": k, "density": k / (m * n), "sampled_fma": k * T, "dense_fma": m * n * T}
    if device == "cuda":
        kernel = load_kernel_module("sampled_weight_grad").sampled_weight_grad
        case["triton"] = time_ms(lambda: kernel(grad_out, x, idx), device)
        case["reference"] = time_ms(lambda: reference(grad_out, x, idx), device)
        case["dense"] = time_ms(lambda: dense_then_gather(grad_out, x, idx), device)
        case["ratios"] = {"dense_over_triton": case["dense"]["median_ms"] / case["triton"]["median_ms"],
                          "reference_over_triton": case["reference"]["median_ms"] / case["triton"]["median_ms"]}
        return case
    cpp = native.kernel("sampled_weight_grad", "cpu")
    case["by_threads"] = {}
    for t in threads:
        with cpu_threads(t):
            r = {"native": time_ms(lambda: cpp(grad_out, x, idx), device, repeats),
                 "dense": time_ms(lambda: dense_then_gather(grad_out, x, idx), device, repeats),
                 "reference": time_ms(lambda: reference(grad_out, x, idx), device, reference_repeats)}
        r["ratios"] = {"dense_over_native": r["dense"]["median_ms"] / r["native"]["median_ms"],
                       "reference_over_native": r["reference"]["median_ms"] / r["native"]["median_ms"]}
        r["native_gfma_per_s"] = k * T / (r["native"]["median_ms"] * 1e6)
        case["by_threads"][str(t)] = r
    return case


def main() -> None:
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--small", action="store_true", help="shapes / 16, T / 16: a smoke run")
    ap.add_argument("--shapes", choices=("mlp", "all"), default="mlp",
                    help="gate_proj of each model (mlp) or also its q_proj (all)")
    ap.add_argument("--ranks", default="16,128", help="LIFT ranks: k = (m + n) * rank, comma separated")
    ap.add_argument("--tokens", default="512,2048", help="T, the rows of grad_out and x, comma separated")
    ap.add_argument("--dtypes", default="fp32", help="input dtypes, comma separated (fp32, bf16, fp16)")
    ap.add_argument("--threads", default="1,default", help="CPU: torch thread counts ('default': torch's own)")
    ap.add_argument("--repeats", type=int, default=3, help="CPU: timed runs of native and dense (median)")
    ap.add_argument("--reference-repeats", type=int, default=1, help="CPU: timed runs of the reference")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. how loaded the machine was)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    default_threads = torch.get_num_threads()
    threads = [default_threads if t == "default" else int(t) for t in args.threads.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    tokens = [int(t) // (16 if args.small else 1) for t in args.tokens.split(",")]
    results = {"benchmark": "sampled_weight_grad", **environment(device),
               "settings": {"shapes": args.shapes, "ranks": ranks, "tokens": tokens, "dtypes": args.dtypes,
                            "threads": threads if device == "cpu" else None, "default_threads": default_threads,
                            "repeats": args.repeats, "reference_repeats": args.reference_repeats,
                            "small": args.small},
               "note": args.note, "cases": []}
    if device == "cpu":
        native.kernel("sampled_weight_grad", "cpu")  # loads _C (a first-use build compiles it)
        if _ext.EXT is None or native.kernel("sampled_weight_grad", "cpu") is None:
            raise SystemExit(f"lift_kernels._C has no CPU sampled_weight_grad: {_ext.EXT_ERROR}")
        results["extension_openmp_version"] = _ext.EXT.openmp_version()
    rows = []
    for dtype_name in args.dtypes.split(","):
        for label, (m, n) in shapes(args.shapes, args.small):
            for rank in ranks:
                for T in tokens:
                    grad_out, x, idx = inputs(m, n, T, rank, DTYPES[dtype_name], device)
                    case = bench_case(grad_out, x, idx, device, threads, args.repeats, args.reference_repeats)
                    case.update(shape=label, rank=rank, dtype=dtype_name)
                    results["cases"].append(case)
                    del grad_out, x, idx
                    head = [dtype_name, label, rank, T, case["k"]]
                    if device == "cuda":
                        rows.append(head + [case["triton"]["median_ms"], case["reference"]["median_ms"],
                                            case["dense"]["median_ms"], case["ratios"]["dense_over_triton"],
                                            case["ratios"]["reference_over_triton"]])
                    else:
                        for t, r in case["by_threads"].items():
                            rows.append(head + [t, r["native"]["median_ms"], r["reference"]["median_ms"],
                                                r["dense"]["median_ms"], r["ratios"]["dense_over_native"],
                                                r["ratios"]["reference_over_native"]])
                    print(rows[-1], flush=True)
    print(f"{results['device']} ({results['cpu_capability']}), medians")
    if device == "cuda":
        print_table(rows, ["dtype", "shape", "rank", "T", "k", "triton ms", "reference ms", "dense ms",
                           "dense/triton", "reference/triton"])
    else:
        print_table(rows, ["dtype", "shape", "rank", "T", "k", "threads", "native ms", "reference ms", "dense ms",
                           "dense/native", "reference/native"])
    write_results(args.out, results)


if __name__ == "__main__":
    main()
