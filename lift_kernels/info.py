"""``lk.info()``: what is built, which backend each op uses on each device, and why."""
from __future__ import annotations

import json

import torch

from . import __version__, _ext, _triton_loader, backend


def info() -> dict:
    triton_ok, triton_why = _triton_loader.triton_usable()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = {}
    for op in backend.OPS:
        ops[op] = {}
        for dev in devices:
            try:
                name, why = backend.choose(op, dev)
            except (backend.BackendUnavailableError, ValueError) as exc:
                name, why = "error", str(exc)
            ops[op][dev] = {"backend": name, "why": why}
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "extension": {
            "loaded": _ext.EXT is not None,
            "error": _ext.EXT_ERROR,
            "kernels": _ext.EXT.kernels() if _ext.EXT is not None else [],
        },
        "triton": {"usable": triton_ok, "why": triton_why, "interpret": _triton_loader.interpreting()},
        "forced_backend": backend.forced_backend(),
        "ops": ops,
    }


if __name__ == "__main__":
    print(json.dumps(info(), indent=2))
