"""A LIFT fine-tune as a PEFT SHiRA adapter: ``PeftModel.from_pretrained(base, folder)`` loads it.

SHiRA stores, per adapted linear layer, ``shira_indices`` ((2, k) int32 row, column) and
``shira_weight`` ((k,) fp32), and adds the sparse difference to the dense base weight (dense +=
sparse, one rounding per entry) in its forward and in ``merge_and_unload()``. peft requires
k = r*(m+n) for one ``r`` shared by every layer, so ``r`` is the smallest that holds the most changed
layer, and layers with fewer changed entries are padded with entries that change nothing (-0.0 at
unchanged positions: base + -0.0 is the base, bit for bit, -0.0 included). Only changed layers are
targeted (every targeted layer must be in the file, or peft's forward fails).

Exactness: each stored difference d is chosen so that base (+) d, rounded as peft rounds it, is the
fine-tuned value: fl(new - old), or a neighbouring float where that one does not round back. An
entry whose new value is tiny beside the base value (a weight that crossed zero) may have no such d;
those are counted (``inexact_entries``), get the closest d, and are checked to be off by at most one
unit in the last place of max(|base|, |fine-tuned|) in the weight's dtype (``max_error_ulps``).

Load it on the base in the dtype it was fine-tuned in, without ``low_cpu_mem_usage=True`` for bf16
bases (peft then rounds the fp32 differences to bf16). peft is not needed to write the files.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .._atomic import atomic_dir
from .._names import canonical
from ..delta import _match_base, _unique_state

__all__ = ["save_shira_adapter", "AdapterStats", "AdapterError"]

_MANTISSA = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11, torch.float64: 53}
_NEIGHBOURS = 4  # floats tried on each side of fl(new - old)


class AdapterError(ValueError):
    """A fine-tune that SHiRA cannot hold (a changed weight outside nn.Linear, too many changed entries)."""


@dataclass(frozen=True)
class AdapterStats:
    layers: int               # adapted linear layers (those with a changed entry)
    r: int                    # SHiRA's r: every layer stores r*(m+n) entries
    stored_entries: int       # entries in the file over all layers
    changed_entries: int      # of those, entries the fine-tune changed
    padding_entries: int      # of those, entries that change nothing (-0.0)
    inexact_entries: int      # changed entries peft's merge does not reproduce bit for bit
    max_abs_error: float      # the largest |merged - fine-tuned| over those
    max_error_ulps: float     # ... in units in the last place of max(|base|, |fine-tuned|); <= 1 (checked)
    file_bytes: int           # adapter_model.safetensors + adapter_config.json

    def as_dict(self) -> dict:
        return asdict(self)


def _ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of ``dtype`` floats at |x| (fp64 result)."""
    x = x.double().abs()
    _, e = torch.frexp(torch.where(x == 0, torch.full_like(x, 2.0 ** -126), x))
    return torch.ldexp(torch.ones_like(x), (e - _MANTISSA[dtype]).to(torch.int32))


def _merge(old: Tensor, d: Tensor) -> Tensor:
    """old + d rounded as peft's dense += sparse rounds it (elementwise, 1-D)."""
    out = old.clone()
    out += torch.sparse_coo_tensor(torch.arange(old.numel()).unsqueeze(0), d, (old.numel(),), check_invariants=False)
    return out


def _differences(old: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """(fp32 d, exact mask) with _merge(old, d) == new wherever exact; else the closest d tried."""
    d = new.float() - old.float()
    got = _merge(old, d)
    exact = got == new
    if bool(exact.all()):
        return d, exact
    bad = (~exact).nonzero().flatten()
    o, n = old[bad], new[bad]
    best, best_err = d[bad].clone(), (got[bad].double() - n.double()).abs()
    for direction in (math.inf, -math.inf):
        cand = d[bad].clone()
        for _ in range(_NEIGHBOURS):
            cand = torch.nextafter(cand, torch.full_like(cand, direction))
            err = (_merge(o, cand).double() - n.double()).abs()
            better = err < best_err
            best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    d[bad] = best
    exact[bad] = best_err == 0
    return d, exact


def save_shira_adapter(model: nn.Module, base_state_dict, directory: str | os.PathLike, *,
                       base_model_name_or_path: str | None = None,
                       task_type: str | None = "CAUSAL_LM") -> AdapterStats:
    """Write ``model``'s difference to ``base_state_dict`` as a SHiRA adapter folder.

    ``base_state_dict`` is the state dict of the model before fine-tuning (or of the weights it may
    have changed), as for :func:`lift_kernels.save_delta`; every weight that changed must be the
    weight of an ``nn.Linear``. The folder holds ``adapter_config.json`` and
    ``adapter_model.safetensors`` and appears only when complete. Returns what it holds, including
    the count and bound of entries the format cannot reproduce exactly (see the module doc).
    """
    state, alias = _unique_state(model)
    base = _match_base(model, base_state_dict, alias)
    shared = {kept for kept in alias.values() if list(alias.values()).count(kept) > 1}
    modules = dict(model.named_modules())
    layers, refused = [], []
    for name, new in state.items():
        if name not in base or not new.is_floating_point():
            continue
        old = base[name].detach().to("cpu", new.dtype)
        new = new.detach().cpu()
        if tuple(old.shape) != tuple(new.shape):
            raise AdapterError(f"{name}: the base tensor has shape {tuple(old.shape)}, the model's is {tuple(new.shape)}")
        changed = (new.reshape(-1) != old.reshape(-1)).nonzero().flatten()
        if changed.numel() == 0:
            continue
        owner = modules.get(name.rpartition(".")[0])
        if not (name.endswith(".weight") and isinstance(owner, nn.Linear) and name not in shared):
            refused.append(name)
            continue
        layers.append((name, old, new, changed))
    if refused:
        raise AdapterError(f"SHiRA adapts nn.Linear weights only, but {len(refused)} other weights changed "
                           f"(e.g. {refused[:3]}; tied weights count as other); use the delta or the model folder")
    if not layers:
        raise AdapterError("no weight differs from the base: there is nothing to put in an adapter")
    r = max(math.ceil(c.numel() / sum(new.shape)) for _, _, new, c in layers)
    too_small = [name for name, _, new, _ in layers if r * sum(new.shape) > new.numel()]
    if too_small:
        raise AdapterError(f"SHiRA's r = {r} (needed by the most changed layer) stores more than all entries of "
                           f"{too_small[:3]}; peft refuses that, so this fine-tune has no SHiRA form: use the delta")
    tensors, targets = {}, []
    changed_total = inexact = 0
    max_err = max_ulps = 0.0
    for name, old, new, changed in layers:
        m, n = new.shape
        k = r * (m + n)
        old_flat, new_flat = old.reshape(-1), new.reshape(-1)
        d, exact = _differences(old_flat[changed], new_flat[changed])
        free = torch.ones(m * n, dtype=torch.bool)
        free[changed] = False
        pad = free.nonzero().flatten()[:k - changed.numel()]
        flat = torch.cat([changed, pad])
        values = torch.cat([d, torch.full((pad.numel(),), -0.0)])
        order = torch.argsort(flat)
        flat, values = flat[order], values[order]
        merged = old.clone()
        merged += torch.sparse_coo_tensor(torch.stack([flat // n, flat % n]), values, (m, n), check_invariants=False)  # as peft merges
        wrong = (merged.reshape(-1) != new_flat).nonzero().flatten()
        if wrong.numel() != int((~exact).sum()):
            raise AssertionError(f"{name}: the merge check disagrees with the per-entry one")
        if wrong.numel():
            err = (merged.reshape(-1)[wrong].double() - new_flat[wrong].double()).abs()
            ulps = err / _ulp(torch.maximum(old_flat[wrong].abs(), new_flat[wrong].abs()), new.dtype)
            if float(ulps.max()) > 1:
                raise AssertionError(f"{name}: an inexact entry is off by {float(ulps.max())} ulps")
            max_err, max_ulps = max(max_err, float(err.max())), max(max_ulps, float(ulps.max()))
            inexact += wrong.numel()
        module = canonical(name.rpartition(".")[0])
        targets.append(module)
        tensors[f"base_model.model.{module}.shira_indices"] = torch.stack([flat // n, flat % n]).to(torch.int32).contiguous()
        tensors[f"base_model.model.{module}.shira_weight"] = values.float().contiguous()
        changed_total += changed.numel()
    # The fields every supported peft (>= 0.17) knows; peft fills in the rest.
    config = {"peft_type": "SHIRA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
              "revision": None, "inference_mode": True, "r": r, "mask_type": "random", "random_seed": None,
              "target_modules": sorted(targets), "fan_in_fan_out": False, "init_weights": True,
              "modules_to_save": None, "auto_mapping": None}
    from safetensors.torch import save_file  # here: `import lift_kernels` stays light

    with atomic_dir(directory) as tmp:
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    stored = sum(r * sum(new.shape) for _, _, new, _ in layers)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return AdapterStats(len(layers), r, stored, changed_total, stored - changed_total, inexact, max_err, max_ulps, size)
