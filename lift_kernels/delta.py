"""Sparse delta adapters: the entries fine-tuning changed, stored as (flat index, difference) pairs.

A LIFT run changes only the union of its selections, a few percent of each matrix, so the difference
to the base model is small when stored sparsely. The file is safetensors: for every changed weight
``NAME`` it holds ``NAME.indices`` (int32 flat indices, sorted) and ``NAME.values`` (the difference
at those entries); the metadata records each weight's shape so a model of other shapes is refused.

Round trips are exact: ``apply_delta`` on the base gives the fine-tuned weights bit for bit and
``remove_delta`` gives the base back. A difference is stored in the weight's dtype where both
directions are exact for that entry (most entries: close floats subtract exactly); the few others,
typically weights that crossed zero, go to ``NAME.indices.float64`` / ``NAME.values.float64``.
``save_delta`` checks both directions of every entry before it writes. A weight whose entries
mostly changed (full fine-tuning, a merged LoRA) is stored as a plain ``NAME.dense`` difference
instead, zero where unchanged, as that is smaller than index/value pairs.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ._atomic import atomic_path

_FORMAT = "lift_kernels.delta/2"
# Dtypes a difference may be stored in, narrowest first; each entry goes to the first that is exact.
_TIERS = {torch.bfloat16: [torch.bfloat16, torch.float32, torch.float64],
          torch.float16: [torch.float16, torch.float32, torch.float64],
          torch.float32: [torch.float32, torch.float64],
          torch.float64: [torch.float64]}
_SUFFIXES = ("", ".float32", ".float64")  # key suffix of the first tier, then of the wider ones


@dataclass(frozen=True)
class DeltaStats:
    """What a delta holds, against the model it was taken from."""
    tensors: int          # weights with at least one changed entry
    entries: int          # changed entries over all weights
    file_bytes: int       # size of the delta file
    model_bytes: int      # size of the model's (unique) weights in their dtypes

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.model_bytes if self.model_bytes else 0.0


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state tensors with tied aliases dropped (lm_head tied to the embedding counts once)."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


def _split_exact(new: Tensor, old: Tensor, name: str) -> list[tuple[str, Tensor, Tensor]]:
    """(key suffix, positions, difference) per storage dtype, with old + d == new and new - d == old exactly."""
    tiers = _TIERS.get(new.dtype, [new.dtype])
    remaining = torch.arange(new.numel())
    out = []
    for i, dtype in enumerate(tiers):
        a, b = old[remaining].to(dtype), new[remaining].to(dtype)
        d = b - a
        exact = ((a + d).to(new.dtype) == new[remaining]) & ((b - d).to(new.dtype) == old[remaining])
        if exact.any():
            out.append(("" if i == 0 else f".{str(dtype).removeprefix('torch.')}", remaining[exact], d[exact]))
        remaining = remaining[~exact]
        if remaining.numel() == 0:
            return out
    raise ValueError(f"{name}: {remaining.numel()} changed entries have no exact difference "
                     "(non-finite weights?)")


def save_delta(model: nn.Module, base_state_dict: Mapping[str, Tensor], path: str | os.PathLike) -> DeltaStats:
    """Write the entries of ``model`` that differ from ``base_state_dict`` to ``path`` (safetensors).

    ``base_state_dict`` maps state-dict names to the base tensors (any device); names it lacks are
    taken as unchanged. The file appears only when complete.
    """
    state = _unique_state(model)
    tensors: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    entries = 0
    for name, new in state.items():
        if name not in base_state_dict or not new.is_floating_point():
            continue
        old = base_state_dict[name]
        if tuple(old.shape) != tuple(new.shape):
            raise ValueError(f"{name}: the base tensor has shape {tuple(old.shape)}, the model's is "
                             f"{tuple(new.shape)}; pass the state dict of the model's own base")
        if new.numel() >= 2**31:
            raise ValueError(f"{name} has {new.numel()} entries; int32 flat indices allow < 2**31")
        new_flat = new.reshape(-1).cpu()
        old_flat = old.detach().reshape(-1).to("cpu", new.dtype)
        idx = torch.nonzero(new_flat != old_flat).flatten()
        if idx.numel() == 0:
            continue
        for suffix, where, values in _split_exact(new_flat[idx], old_flat[idx], name):
            if suffix == "" and where.numel() * (4 + values.element_size()) > new.numel() * values.element_size():
                # Mostly changed (full fine-tuning, merged LoRA): the plain difference is smaller than
                # (index, value) pairs. Unchanged entries hold 0, which apply/remove skip.
                dense = torch.zeros(new.numel(), dtype=values.dtype)
                dense[idx[where]] = values
                tensors[f"{name}.dense"] = dense
                continue
            tensors[f"{name}.indices{suffix}"] = idx[where].to(torch.int32).contiguous()
            tensors[f"{name}.values{suffix}"] = values.contiguous()
        shapes[name] = list(new.shape)
        entries += idx.numel()
    metadata = {"format": _FORMAT, "shapes": json.dumps(shapes)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return DeltaStats(len(shapes), entries, os.path.getsize(path), model_bytes)


def _read_delta(model: nn.Module, path: str | os.PathLike) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(weight, indices, values) for each part of the delta, all checked against ``model`` first."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"delta file not found: {path}")
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a lift_kernels delta (metadata format {meta.get('format')!r})")
        shapes = json.loads(meta["shapes"])
        state = model.state_dict(keep_vars=True)
        keys = set(f.keys())
        out = []
        for name, shape in shapes.items():
            if name not in state:
                raise ValueError(f"{path}: the delta changes {name}, which this model does not have")
            w = state[name]
            if list(w.shape) != shape:
                raise ValueError(f"{path}: {name} has shape {tuple(shape)} in the delta but "
                                 f"{tuple(w.shape)} in this model; apply it to the model it was made from")
            if f"{name}.dense" in keys:
                dense = f.get_tensor(f"{name}.dense")
                if dense.numel() != w.numel():
                    raise ValueError(f"{path}: {name} has a dense difference of {dense.numel()} entries, "
                                     f"the weight has {w.numel()}")
                idx = torch.nonzero(dense).flatten()  # a changed entry never has a zero difference
                out.append((w.detach(), idx.to(w.device), dense[idx].to(w.device)))
            for suffix in _SUFFIXES:
                if f"{name}.indices{suffix}" not in keys:
                    continue
                idx, values = f.get_tensor(f"{name}.indices{suffix}"), f.get_tensor(f"{name}.values{suffix}")
                if idx.numel() != values.numel() or (idx.numel() and int(idx.max()) >= w.numel()):
                    raise ValueError(f"{path}: {name} has indices and values that do not fit its shape")
                out.append((w.detach(), idx.to(w.device, torch.int64), values.to(w.device)))
    return out


def _add(model: nn.Module, path: str | os.PathLike, sign: int) -> None:
    # Everything is read and checked before the first weight changes, so an error leaves the model as it was.
    for w, idx, values in _read_delta(model, path):
        flat = w.view(-1)
        flat[idx] = (flat[idx].to(values.dtype) + sign * values).to(w.dtype)


@torch.no_grad()
def apply_delta(model: nn.Module, path: str | os.PathLike) -> None:
    """Add the delta at ``path`` to ``model``'s weights in place (base -> fine-tuned)."""
    _add(model, path, +1)


@torch.no_grad()
def remove_delta(model: nn.Module, path: str | os.PathLike) -> None:
    """Subtract the delta at ``path`` from ``model``'s weights in place (fine-tuned -> base)."""
    _add(model, path, -1)
