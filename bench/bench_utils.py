"""What the lift_kernels benchmarks share: the weight set, timing, copy bandwidth, results files.

The set is 4 layers of LLaMA-2-7B shapes (28 matrices, 0.81B entries) with a LIFT budget of
rank 128, k = (m + n) * 128, the entries chosen from the weights (largest |W|). ``--small`` shrinks
every shape by 64 and uses rank 2 and one layer, so the scripts can be smoke-run on a CPU under
TRITON_INTERPRET=1; those numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:  # an installed lift_kernels, else this source checkout's
    import lift_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (name, (m, n)) of one LLaMA-2-7B decoder layer's linear weights
LLAMA2_7B_LAYER = [("q_proj", (4096, 4096)), ("k_proj", (4096, 4096)), ("v_proj", (4096, 4096)),
                   ("o_proj", (4096, 4096)), ("gate_proj", (11008, 4096)), ("up_proj", (11008, 4096)),
                   ("down_proj", (4096, 11008))]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke run (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, --small 1)")
    ap.add_argument("--rank", type=int, default=None, help="LIFT rank: k = (m+n)*rank (default 128, --small 2)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="weight dtypes, comma separated")
    return ap


def settings(args) -> dict:
    small = args.small
    return {"layers": args.layers or (1 if small else 4), "rank": args.rank or (2 if small else 128),
            "shrink": 64 if small else 1, "dtypes": args.dtypes.split(","),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def weight_shapes(cfg: dict) -> list[tuple[str, tuple[int, int]]]:
    s = cfg["shrink"]
    return [(f"layers.{i}.{name}", (m // s, n // s)) for i in range(cfg["layers"])
            for name, (m, n) in LLAMA2_7B_LAYER]


def selected_indices(W: torch.Tensor, rank: int) -> torch.Tensor:
    """Sorted int32 flat indices of the k = (m+n)*rank largest |W| (the selection from the weights)."""
    m, n = W.shape
    k = min((m + n) * rank, m * n)
    return W.view(-1).abs().float().topk(k, sorted=False).indices.sort().values.to(torch.int32)


def weight_set(cfg: dict, dtype: torch.dtype, generator_seed: int = 0):
    """Weights, dense grads and selected indices of the set, on the benchmark device."""
    g = torch.Generator(device=cfg["device"]).manual_seed(generator_seed)
    params, grads, idxs = [], [], []
    for _, shape in weight_shapes(cfg):
        W = torch.randn(shape, generator=g, device=cfg["device"]).to(dtype)
        params.append(W)
        grads.append((1e-3 * torch.randn(shape, generator=g, device=cfg["device"])).to(dtype))
        idxs.append(selected_indices(W, cfg["rank"]))
    return params, grads, idxs


def time_ms(fn, device: str) -> dict:
    """Median and 20th/80th percentile milliseconds of ``fn``: triton.testing.do_bench on a GPU
    (L2 flushed between runs), a wall-clock median on the CPU (smoke runs only)."""
    if device == "cuda":
        from triton.testing import do_bench
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    fn()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(runs), "p20_ms": min(runs), "p80_ms": max(runs)}


def copy_bandwidth_gbs(device: str, nbytes: int) -> float:
    """Device memory bandwidth of a plain copy (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def dense_fused_adamw_ms(params: list[torch.Tensor], grads: list[torch.Tensor], device: str) -> dict:
    """One step of torch.optim.AdamW(fused=True) over the whole weights (the dense baseline)."""
    dense = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(dense, grads):
        p.grad = g
    opt = torch.optim.AdamW(dense, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    opt.step()  # creates the states outside the timing
    result = time_ms(opt.step, device)
    del opt, dense
    return result


def peak_extra_bytes(fn, device: str) -> int | None:
    """Peak memory allocated while ``fn`` runs, beyond what was allocated before and what it returns."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak - kept


def environment(device: str) -> dict:
    import triton
    return {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch_version": torch.__version__, "triton_version": triton.__version__,
            "cuda_version": torch.version.cuda,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def write_results(path: Path | None, results: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(rows: list[list], header: list[str]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
