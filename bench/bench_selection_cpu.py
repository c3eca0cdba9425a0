"""The main job's first LIFT selection on the CPU (issue 13): SmolLM2-135M's 210 matrices, the
lift-finetune defaults (rank 16, lra_rank 32, fp32 weights), through LIFTAdamW's own selection.

For svd="exact" and svd="fast", at each torch thread count of --threads, alone and beside a busy
neighbour (a process spinning on one core, as another job on a shared machine does), it times the
selection of --layers layers and reports the fast path's agreement with the exact one. Numbers for
fewer layers than 30 are also given scaled to the whole model. Prints a table; --out writes JSON.

    python bench/bench_selection_cpu.py --out bench/results/cpu-amd-epyc/selection_cpu.json
    python bench/bench_selection_cpu.py --small      # smoke run: 1 layer, one thread count
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_utils import cpu_threads, environment, print_table, write_results

import lift_kernels as lk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import smollm2  # noqa: E402  (tests/smollm2.py: the SmolLM2 loader shared with the accuracy test)

RANK, LRA_RANK = 16, 32  # lift-finetune's defaults
TARGET_S = 10.0  # <= 10% of the main job's training time (32 steps of ~3 s)


def first_selection_s(weights: list[torch.Tensor], svd: str) -> tuple[float, list[torch.Tensor]]:
    """Seconds of LIFTAdamW's first selection of ``weights`` (fresh copies), and its indices."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = lk.LIFTAdamW(params, rank=RANK, lra_rank=LRA_RANK, svd=svd)
    group = opt.param_groups[0]
    t0 = time.perf_counter()
    opt._select_due(group, params)
    seconds = time.perf_counter() - t0
    return seconds, [opt.state[p]["idx"] for p in params]


class BusyNeighbour:
    """A process spinning on the CPU for the duration of the block (killed after it)."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let it get scheduled
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--small", action="store_true", help="smoke run: 1 layer, one thread")
    ap.add_argument("--layers", type=int, default=None, help="layers selected per measurement (default 30)")
    ap.add_argument("--threads", default=None, help="torch thread counts, comma separated (default 1,2)")
    ap.add_argument("--no-neighbour", action="store_true", help="skip the runs beside a busy process")
    args = ap.parse_args()
    reason = smollm2.missing_reason()
    if reason is not None:
        sys.exit(f"bench_selection_cpu: {reason}")
    layers = args.layers or (1 if args.small else smollm2.LAYERS)
    threads = [int(t) for t in (args.threads or ("1" if args.small else "1,2")).split(",")]
    P = smollm2.projections()
    weights = [P[(i, proj)] for i in range(layers) for proj in smollm2.SHAPES]
    scale = smollm2.LAYERS / layers

    results = {"benchmark": "selection_cpu", **environment("cpu"), "rank": RANK, "lra_rank": LRA_RANK,
               "layers": layers, "matrices": len(weights), "runs": []}
    exact_idx = None
    rows = []
    for neighbour in [False] + ([] if args.no_neighbour or args.small else [True]):
        for n in threads:
            for svd in ("exact", "fast"):
                with cpu_threads(n):
                    if neighbour:
                        with BusyNeighbour():
                            seconds, idx = first_selection_s(weights, svd)
                    else:
                        seconds, idx = first_selection_s(weights, svd)
                if svd == "exact" and exact_idx is None:
                    exact_idx = idx
                agreement = min(torch.isin(a, b).float().mean().item() for a, b in zip(idx, exact_idx))
                run = {"svd": svd, "threads": n, "busy_neighbour": neighbour, "seconds": seconds,
                       "whole_model_seconds": seconds * scale, "worst_agreement_with_exact": agreement}
                results["runs"].append(run)
                rows.append([svd, n, "yes" if neighbour else "no", seconds, seconds * scale, agreement])
                print(rows[-1], flush=True)
    print(f"{results['device']}: first selection of {len(weights)} SmolLM2-135M matrices, rank {RANK}, "
          f"lra_rank {LRA_RANK} (whole model = x{scale:g})")
    print_table(rows, ["svd", "threads", "busy neighbour", "s", "whole model s", "worst agreement"])
    write_results(args.out, results)


if __name__ == "__main__":
    main()
