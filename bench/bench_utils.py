"""What the lift_kernels benchmarks share: the weight set, timing, copy bandwidth, results files.

On a GPU the set is 4 layers of LLaMA-2-7B shapes (28 matrices, 0.81B entries) with a LIFT budget
of rank 128, k = (m + n) * 128, the entries chosen from the weights (largest |W|). On the CPU it is
SmolLM2-135M's 210 matrices (30 layers, 0.11B entries) at rank 16, the model of the README's main
job, timed at each thread count of ``--threads``. ``--small`` shrinks every shape by 64 (LLaMA) or 16
(SmolLM2) and uses rank 2 and one layer, so the scripts can be smoke-run on a CPU (Triton under
TRITON_INTERPRET=1); those numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
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
# (name, (m, n)) of one SmolLM2-135M decoder layer's linear weights (30 layers)
SMOLLM2_135M_LAYER = [("q_proj", (576, 576)), ("k_proj", (192, 576)), ("v_proj", (192, 576)),
                      ("o_proj", (576, 576)), ("gate_proj", (1536, 576)), ("up_proj", (1536, 576)),
                      ("down_proj", (576, 1536))]
MODELS = {"llama2-7b": (LLAMA2_7B_LAYER, 4, 128, 64), "smollm2-135m": (SMOLLM2_135M_LAYER, 30, 16, 16)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke run (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--model", choices=sorted(MODELS), default=None,
                    help="shapes of the set (default: llama2-7b on a GPU, smollm2-135m on the CPU)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default 4 for llama2-7b, 30 for smollm2-135m, --small 1)")
    ap.add_argument("--rank", type=int, default=None,
                    help="LIFT rank: k = (m+n)*rank (default 128 for llama2-7b, 16 for smollm2-135m, --small 2)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="weight dtypes, comma separated")
    ap.add_argument("--threads", default="1,2", help="CPU only: torch thread counts to time, comma separated "
                    "('default': torch's own count at start, torch.get_num_threads())")
    ap.add_argument("--repeats", type=int, default=7, help="CPU only: timed runs per measurement (median)")
    return ap


def settings(args) -> dict:
    small = args.small
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = args.model or ("llama2-7b" if device == "cuda" else "smollm2-135m")
    _, layers, rank, shrink = MODELS[model]
    cfg = {"model": model, "layers": args.layers or (1 if small else layers), "rank": args.rank or (2 if small else rank),
           "shrink": shrink if small else 1, "dtypes": args.dtypes.split(","), "device": device}
    if device == "cpu":
        default = torch.get_num_threads()
        cfg.update(threads=[default if t == "default" else int(t) for t in args.threads.split(",")],
                   default_threads=default, repeats=args.repeats)
    return cfg


def weight_shapes(cfg: dict) -> list[tuple[str, tuple[int, int]]]:
    s = cfg["shrink"]
    layer = MODELS[cfg.get("model", "llama2-7b")][0]
    return [(f"layers.{i}.{name}", (m // s, n // s)) for i in range(cfg["layers"]) for name, (m, n) in layer]


def selected_indices(W: torch.Tensor, rank: int) -> torch.Tensor:
    """Sorted int32 flat indices of the k = (m+n)*rank largest |W| (the selection from the weights)."""
    from lift_kernels.optim.selection import budget  # LIFTAdamW's own rule

    k = budget(tuple(W.shape), rank, None)
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


def time_ms(fn, device: str, repeats: int = 7) -> dict:
    """Median and 20th/80th percentile milliseconds of ``fn``: triton.testing.do_bench on a GPU
    (L2 flushed between runs); on the CPU the wall clock of ``repeats`` runs after one warm-up."""
    if device == "cuda":
        from triton.testing import do_bench
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(runs, n=5, method="inclusive") if len(runs) > 1 else runs * 4
    return {"median_ms": statistics.median(runs), "p20_ms": q[0], "p80_ms": q[3], "runs": len(runs)}


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform's), e.g. 'AMD EPYC'."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: str) -> str:
    """File-name form of the device's name, e.g. 'cpu-amd-epyc' or 'nvidia-h200' (results folders)."""
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu {cpu_name()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def copy_bandwidth_gbs(device: str, nbytes: int) -> float:
    """Device memory bandwidth of a plain copy (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def dense_fused_adamw_ms(params: list[torch.Tensor], grads: list[torch.Tensor], device: str,
                         repeats: int = 7, impl: str = "fused") -> dict:
    """One step of torch.optim.AdamW(fused=True) over the whole weights (the dense baseline);
    ``impl="foreach"`` times AdamW(foreach=True) instead."""
    dense = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(dense, grads):
        p.grad = g
    opt = torch.optim.AdamW(dense, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, **{impl: True})
    opt.step()  # creates the states outside the timing
    result = time_ms(opt.step, device, repeats)
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
    return {"device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
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
