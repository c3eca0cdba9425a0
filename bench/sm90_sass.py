"""SASS facts of every GPU kernel compiled for sm_90 (H100/H200), no GPU needed: registers, spills,
global/shared access widths and resident warps per SM, as JSON and a table for the README.

    python bench/sm90_sass.py                      # merges into bench/results/sm90_sass.json
    python bench/sm90_sass.py --out other.json

The JSON holds one entry per Triton version (run it once in each environment); the CUDA kernels
are compiled by the nvcc on PATH. tests/test_sm90_sass.py asserts the same facts.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from sm90_compile import CUDA_SOURCES, TRITON_KERNELS, cuda_facts, triton_facts  # noqa: E402

KEEP = ("registers", "spill_ops", "stack_bytes", "shared_bytes", "threads", "ctas_per_sm", "warps_per_sm",
        "limited_by", "memory_ops")


def collect() -> dict:
    import triton

    kernels = {}
    for op in TRITON_KERNELS:
        for variant, facts in triton_facts(op).items():
            kernels[f"triton/{op}.py[{variant}]"] = {"block": facts["block"], **{k: facts[k] for k in KEEP}}
    nvcc = shutil.which("nvcc")
    if nvcc:
        version = re.search(r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                                  text=True).stdout)
        for source in CUDA_SOURCES:
            for name, facts in cuda_facts(source).items():
                kernels[f"csrc/cuda/{source.name}[{name}]"] = {k: facts[k] for k in KEEP}
    return {"triton": triton.__version__, "nvcc": version[1] if nvcc and version else None, "arch": "sm_90",
            "kernels": kernels}


def table(result: dict) -> str:
    rows = ["| kernel | regs | spills | warps/SM (limit) | 128-bit LDG / STG / LDS | scalar LDG / STG |",
            "|---|---|---|---|---|---|"]
    for name, f in result["kernels"].items():
        ops = f["memory_ops"]
        wide = "/".join(str(ops.get(kind, {}).get("128", 0)) for kind in ("LDG", "STG", "LDS"))
        narrow = "/".join(str(sum(n for w, n in ops.get(kind, {}).items() if int(w) <= 32)) for kind in ("LDG", "STG"))
        rows.append(f"| {name} | {f['registers']} | {f['spill_ops']} | {f['warps_per_sm']} ({f['limited_by']}) "
                    f"| {wide} | {narrow} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sm90_sass.json")
    args = ap.parse_args()
    result = collect()
    merged = json.loads(args.out.read_text()) if args.out.exists() else {}
    merged[f"triton {result['triton']}"] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    print(f"Triton {result['triton']}, nvcc {result['nvcc']}, sm_90 -> {args.out}")
    print(table(result))


if __name__ == "__main__":
    main()
