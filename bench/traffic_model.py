"""DRAM traffic of the fused sparse AdamW step, counted in 32-byte sectors (issue 13, item 4).

A PREDICTION, to be checked against a GPU measurement: the bytes the Triton kernel
(triton/sparse_adamw_step.py) must move between DRAM and L2 for given selections, and the step time
that gives at a device's copy bandwidth. Per selected entry of a weight the kernel reads idx (int32)
and, with the fp32 moments exp_avg and exp_avg_sq, the gradient: the dense one at idx, or the
length-k fp32 vector the sparse-grad hook gathered; it reads the weight at idx (or the contiguous fp32
master instead, where there is one), and writes the moments, the master and the weight at idx.

What is counted, exactly (no averages): a contiguous stream of B bytes starting 32-byte aligned is
ceil(B / 32) sectors (torch's CUDA allocator aligns every tensor to 512 bytes); a gather or scatter
at idx touches the distinct sectors idx * elem_size // 32 of its tensor. Assumptions, each stated in
the output: (1) a sector is moved once per step however many entries of it the kernel touches
(sorted idx: neighbours fall in the same or an adjacent program, well within L2's reach); (2) a
sector the kernel writes only in part, without having read it (the weight when a master supplies
its values), is first filled from DRAM by L2 (HBM with ECC keeps whole sectors), counted as
"fill" reads; (3) the kernel's pointer table is read once.

Dense baseline: torch.optim.AdamW(fused=True) reads weight, grad, exp_avg, exp_avg_sq and writes
weight, exp_avg, exp_avg_sq, all contiguous, its moments in the weight's dtype (torch keeps AdamW
state in the parameter's dtype; bf16 weights: bf16 moments).

    python bench/traffic_model.py --out bench/results/traffic_model.json
"""
from __future__ import annotations

import numpy as np

SECTOR = 32  # bytes per DRAM sector
FP32 = 4
INT32 = 4
TABLE_FIELD = 8  # int64 entries of the kernel's pointer table
QBLOCK = 256  # entries per scale of the 8-bit moments (lift_kernels/reference/moment_codes.py)


def contiguous_sectors(nbytes: int) -> int:
    """Sectors of a contiguous stream of ``nbytes`` that starts on a sector boundary."""
    return -(-nbytes // SECTOR)


def scattered_sectors(idx: np.ndarray, elem_size: int) -> tuple[int, int]:
    """(distinct sectors, fully covered sectors) of the entries ``idx`` (distinct flat indices) of a
    tensor with ``elem_size``-byte elements that starts on a sector boundary."""
    if idx.size == 0:
        return 0, 0
    sectors, counts = np.unique(idx.astype(np.int64) * elem_size // SECTOR, return_counts=True)
    return int(sectors.size), int(np.count_nonzero(counts == SECTOR // elem_size))


def sparse_weight_traffic(idx: np.ndarray, weight_size: int, grad: str, master: bool,
                          moments: str = "fp32") -> dict[str, int]:
    """Sectors one weight's part of the fused step moves: per stream reads and writes, and fills.

    ``weight_size``: bytes per weight element (the dense gradient has the weight's dtype);
    ``grad``: "dense" (read at idx) or "gathered" (a contiguous length-k fp32 vector);
    ``master``: whether an fp32 master of the selected entries supplies the weight's values;
    ``moments``: "fp32" (sparse_adamw_step) or "8bit" (sparse_adamw8bit_step: each moment a length-k
    uint8 code stream plus one fp32 scale per block of QBLOCK entries, counted as "*_scales").
    """
    if grad not in ("dense", "gathered"):
        raise ValueError(f"grad must be 'dense' or 'gathered', got {grad!r}")
    if moments not in ("fp32", "8bit"):
        raise ValueError(f"moments must be 'fp32' or '8bit', got {moments!r}")
    k = int(idx.size)
    vec = contiguous_sectors(k * FP32)  # one length-k fp32 stream
    moment = vec if moments == "fp32" else contiguous_sectors(k)
    weight, weight_full = scattered_sectors(idx, weight_size)
    t = {"read_idx": contiguous_sectors(k * INT32),
         "read_grad": vec if grad == "gathered" else scattered_sectors(idx, weight_size)[0],
         "read_exp_avg": moment, "write_exp_avg": moment, "read_exp_avg_sq": moment, "write_exp_avg_sq": moment,
         "read_master": vec if master else 0, "write_master": vec if master else 0,
         "read_weight": 0 if master else weight, "write_weight": weight,
         # written in part and never read by the kernel: L2 fetches the rest of the sector
         "fill_weight": weight - weight_full if master else 0}
    if moments == "8bit":
        scales = contiguous_sectors(-(-k // QBLOCK) * FP32)
        t.update(read_exp_avg_scales=scales, write_exp_avg_scales=scales, read_exp_avg_sq_scales=scales,
                 write_exp_avg_sq_scales=scales)
    return t


def table_sectors(ks: list[int], block: int, row: int) -> int:
    """The kernel's int64 pointer table: one entry per program (block of entries) and one row per weight."""
    blocks = sum(-(-k // block) for k in ks if k)
    return contiguous_sectors((blocks + row * sum(1 for k in ks if k)) * TABLE_FIELD)


def hook_gather_sectors(idx: np.ndarray, grad_size: int) -> int:
    """Sectors the sparse-grad hook moves in backward (not in the step): grad read at idx, k fp32 written."""
    return scattered_sectors(idx, grad_size)[0] + contiguous_sectors(idx.size * FP32)


def dense_adamw_sectors(numel: int, weight_size: int) -> dict[str, int]:
    """torch's fused dense AdamW on one weight: 4 contiguous reads, 3 writes, state in the weight's dtype."""
    s = contiguous_sectors(numel * weight_size)
    return {"read": 4 * s, "write": 3 * s}


def step_traffic(weights: list[tuple[np.ndarray, int]], weight_size: int, grad: str, master: bool,
                 block: int, row: int, moments: str = "fp32") -> dict:
    """Totals over a set of weights ((idx, numel) each): sparse step sectors by kind, dense AdamW's,
    the hook's gather, in sectors and bytes."""
    streams: dict[str, int] = {}
    dense = {"read": 0, "write": 0}
    hook = 0
    for idx, numel in weights:
        for key, sectors in sparse_weight_traffic(idx, weight_size, grad, master, moments).items():
            streams[key] = streams.get(key, 0) + sectors
        for key, sectors in dense_adamw_sectors(numel, weight_size).items():
            dense[key] += sectors
        if grad == "gathered":
            hook += hook_gather_sectors(idx, weight_size)
    streams["read_table"] = table_sectors([int(i.size) for i, _ in weights], block, row)
    read = sum(v for key, v in streams.items() if key.startswith("read_"))
    write = sum(v for key, v in streams.items() if key.startswith("write_"))
    fill = sum(v for key, v in streams.items() if key.startswith("fill_"))
    sparse_sectors = read + write + fill
    dense_sectors = dense["read"] + dense["write"]
    k = sum(int(i.size) for i, _ in weights)
    return {"k": k, "numel": sum(n for _, n in weights), "streams_sectors": streams,
            "read_sectors": read, "write_sectors": write, "fill_sectors": fill,
            "sparse_bytes": sparse_sectors * SECTOR, "bytes_per_selected": sparse_sectors * SECTOR / max(k, 1),
            "dense_read_sectors": dense["read"], "dense_write_sectors": dense["write"],
            "dense_bytes": dense_sectors * SECTOR, "ratio_to_dense": sparse_sectors / dense_sectors,
            "hook_gather_bytes": hook * SECTOR}


def predicted_ms(nbytes: int, bandwidth_gbs: float) -> float:
    """Time to move ``nbytes`` (reads + writes) at a copy bandwidth of ``bandwidth_gbs`` GB/s (read + write)."""
    return nbytes / (bandwidth_gbs * 1e9) * 1e3


# ------------------------------------------------------------------------------ the report
BANDWIDTHS_GBS = {"H200": 4300.0, "H100": 2930.0}  # copy bandwidth, read + write (H100: measured by this project on an H100 before this repository)
CONFIGS = [("fp32", 4, False), ("bf16+master", 2, True)]  # (weights, bytes per element, fp32 master)
GRADS = ["dense", "gathered"]


def sector_sharing(selection) -> float:
    """Distinct fp32 sectors of the selections over their expectation for uniformly random entries at
    the same density (1: no clustering; smaller: selected entries share sectors more than chance)."""
    touched = expected = 0.0
    for _, idx, numel in selection:
        density = idx.size / numel
        touched += scattered_sectors(idx, FP32)[0]
        expected += numel * FP32 / SECTOR * (1 - (1 - density) ** (SECTOR // FP32))
    return touched / expected


def kernel_constants() -> tuple[int, int]:
    """BLOCK (entries per program) and ROW (table fields per weight) of the Triton kernel itself."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from lift_kernels import _triton_loader

    kernel = _triton_loader.load_kernel_module("sparse_adamw_step")
    return kernel.BLOCK, kernel.ROW


def load_selection(name: str, cache):
    import traffic_selections

    if cache is not None and cache.exists():
        z = np.load(cache)
        return [(key, z[key], int(z[f"{key}/numel"])) for key in z.files if not key.endswith("/numel")]
    selection = traffic_selections.SETS[name]()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, **{n: i for n, i, _ in selection},
                            **{f"{n}/numel": np.array(numel) for n, _, numel in selection})
    return selection


def main() -> None:
    import argparse
    import json
    import platform
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(description="Predicted DRAM traffic of the fused sparse AdamW step")
    ap.add_argument("--sets", default="smollm2,llama_uniform,llama_lowrank")
    ap.add_argument("--cache-smollm2", type=Path, help="npz file to keep SmolLM2's selection in (slow to make)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    block, row = kernel_constants()
    rows, results = [], []
    for name in args.sets.split(","):
        selection = load_selection(name, args.cache_smollm2 if name == "smollm2" else None)
        weights = [(idx, numel) for _, idx, numel in selection]
        sharing = sector_sharing(selection)
        print(f"{name}: {len(weights)} weights, k = {sum(i.size for i, _ in weights):,}, "
              f"density {sum(i.size for i, _ in weights) / sum(n for _, n in weights):.4f}, "
              f"fp32 sector sharing vs uniform random {sharing:.3f}")
        for label, size, master in CONFIGS:
            for grad in GRADS:
                t = step_traffic(weights, size, grad, master, block, row)
                t.update(set=name, weights=label, grad=grad, sector_sharing=sharing,
                         predicted_ms={gpu: predicted_ms(t["sparse_bytes"], bw) for gpu, bw in BANDWIDTHS_GBS.items()},
                         dense_predicted_ms={gpu: predicted_ms(t["dense_bytes"], bw)
                                             for gpu, bw in BANDWIDTHS_GBS.items()})
                results.append(t)
                rows.append([name, label, grad, f"{t['k'] / 1e6:.2f}", f"{t['sparse_bytes'] / 1e6:.1f}",
                             f"{t['fill_sectors'] * SECTOR / 1e6:.1f}", f"{t['bytes_per_selected']:.1f}",
                             f"{t['dense_bytes'] / 1e6:.0f}", f"{t['ratio_to_dense']:.4f}",
                             f"{t['predicted_ms']['H200'] * 1e3:.0f}", f"{t['dense_predicted_ms']['H200'] * 1e3:.0f}",
                             f"{t['predicted_ms']['H100'] * 1e3:.0f}", f"{t['dense_predicted_ms']['H100'] * 1e3:.0f}"])
    header = ["set", "weights", "grad", "k (M)", "MB moved", "of it fill", "B/entry", "dense MB", "ratio",
              "H200 us", "dense H200 us", "H100 us", "dense H100 us"]
    print("PREDICTED (traffic model, not measured): fused sparse AdamW step vs torch fused dense AdamW")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for i, r in enumerate([header] + rows):
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"bandwidths (read + write): {BANDWIDTHS_GBS} GB/s; grad 'gathered' excludes the hook's gather "
          "in backward (hook_gather_bytes in the JSON)")
    if args.out:
        meta = {"predicted": True, "what": "DRAM sectors (32 B) of triton/sparse_adamw_step.py's fused step",
                "assumptions": ["each touched sector moves once per step (L2 reuse across neighbouring entries)",
                                "partially written sectors not read by the kernel are filled from DRAM first",
                                "tensors start 32-byte aligned; the pointer table is read once",
                                "dense baseline: torch.optim.AdamW(fused=True), state in the weight's dtype"],
                "kernel_block": block, "kernel_row": row, "bandwidths_gbs": BANDWIDTHS_GBS,
                "machine": platform.processor() or platform.machine(),
                "command": " ".join([Path(sys.executable).name, *sys.argv])}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
