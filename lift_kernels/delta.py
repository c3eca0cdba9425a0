"""Sparse delta adapters: the entries fine-tuning changed, stored as (flat index, difference) pairs.

A LIFT run changes only the union of its selections, a few percent of each matrix, so the difference
to the base model is small when stored sparsely. The file is safetensors: for every changed weight
``NAME`` it holds ``NAME.indices`` (int32 flat indices, strictly increasing) and ``NAME.values`` (the
difference at those entries).

Round trips are exact: ``apply_delta`` on the base gives the fine-tuned weights bit for bit and
``remove_delta`` gives the base back. A difference is stored in the weight's dtype where both
directions are exact for that entry (most entries: close floats subtract exactly); the few others,
typically weights that crossed zero, go to ``NAME.indices.float64`` / ``NAME.values.float64``.
``save_delta`` checks both directions of every entry before it writes. A weight whose entries
mostly changed (full fine-tuning, a merged LoRA) is stored as a plain ``NAME.dense`` difference
instead, zero where unchanged, as that is smaller than index/value pairs.

The metadata records, per weight, its shape, dtype, number of changed entries and two fingerprints
(hashes of the changed entries' indices and values): of the base and of the fine-tuned weight. So
``apply_delta`` refuses a model that is not the base (another model of the same shapes, or the base
with the delta applied already) and ``remove_delta`` one the delta is not applied to; both also
check that the result matches the fingerprint before writing. A checksum over every tensor and the
metadata detects a damaged file. Everything is checked before the first weight changes: an error
leaves the model as it was. Names are matched without wrapper prefixes (``_orig_mod.``, ``module.``),
so deltas move between a model and its torch.compile / DDP wrapper.

A model whose linears are ``lift_kernels.quantized.LIFTQuantLinear`` (LIFT over a bitsandbytes base)
has no float weight to compare; ``save_delta`` takes such a layer ``M`` as the float weight
``M.weight`` it computes with: ``effective_weight()`` (fp32) against its own frozen base,
``dequantized()``, unless ``base_state_dict`` names ``M.weight``. Only the layer's delta positions can
differ; of those, the file holds the ones whose fp32 effective weight differs from the base (a delta
value too small to change the fp32 sum changes nothing in the trained model either). The layer's own
state (``M.delta``, ``M.positions``, ``M.base.*``) is not compared. The delta is an fp32 one, so
``apply_delta`` on a float model of the same architecture that holds the dequantized base gives the
trained model's weights exactly.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._atomic import atomic_path
from ._digest import update_tensor
from ._names import canonical, canonical_map

_FORMAT = "lift_kernels.delta/3"
# Written by lift_kernels 0.1 without fingerprints or checksum: still read (with a warning), as its
# indices can be validated, but a wrong base or a second application cannot be detected.
_LEGACY_FORMAT = "lift_kernels.delta/2"
# Dtypes a difference may be stored in, narrowest first; each entry goes to the first that is exact.
_TIERS = {torch.bfloat16: [torch.bfloat16, torch.float32, torch.float64],
          torch.float16: [torch.float16, torch.float32, torch.float64],
          torch.float32: [torch.float32, torch.float64],
          torch.float64: [torch.float64]}
_SUFFIXES = ("", ".float32", ".float64")  # key suffix of the first tier, then of the wider ones
_SUFFIX_DTYPE = {".float32": torch.float32, ".float64": torch.float64}
_KEY = re.compile(r"^(?P<name>.+)\.(?:(?P<part>indices|values)(?P<suffix>\.float32|\.float64)?|(?P<dense>dense))$")
_DTYPES = {str(d).removeprefix("torch."): d for d in _TIERS}


# Frames from the warning in _parse_specs up to the caller of apply_delta / remove_delta:
# _parse_specs, _plan, _add, torch.no_grad's wrapper, apply_delta.
_USER_FRAME = 6


class DeltaError(ValueError):
    """A delta file that is damaged, foreign, or does not fit the model; the model was not changed."""


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


def _unique_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state tensors with tied aliases dropped (lm_head tied to the embedding counts once),
    and {every state name: the name kept for its tensor}."""
    out, kept, alias = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in kept:
            kept[key] = name
            out[name] = t.detach()
        alias[name] = kept[key]
    return out, alias


def _quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: LIFTQuantLinear} of ``model`` (none when lift_kernels.quantized is absent)."""
    try:
        from .quantized import LIFTQuantLinear
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LIFTQuantLinear)}


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


def _fingerprint(idx: Tensor, values: Tensor) -> str:
    """Hash of which entries (int64 flat indices) hold which values; -0.0 counts as 0.0 (they add alike)."""
    h = hashlib.blake2b(digest_size=16)
    update_tensor(h, idx.to(torch.int64))
    update_tensor(h, torch.where(values == 0, torch.zeros_like(values), values))
    return h.hexdigest()


def _checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """Hash of every tensor (name, dtype, shape, bytes) and every metadata field but the checksum."""
    h = hashlib.blake2b(digest_size=32)
    for key in sorted(metadata):
        if key != "checksum":
            h.update(json.dumps([key, metadata[key]]).encode())
    for key in sorted(tensors):
        h.update(json.dumps(key).encode())
        update_tensor(h, tensors[key])
    return "blake2b-256:" + h.hexdigest()


def _match_base(model: nn.Module, base_state_dict: Mapping[str, Tensor],
                alias: dict[str, str], virtual: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """{name kept by _unique_state: base tensor}; refuses a base whose names are not all the model's.
    ``virtual``: names of weights the model computes with but does not store (LIFTQuantLinear's "M.weight");
    with any, an empty base is fine (those layers hold their own)."""
    if isinstance(base_state_dict, nn.Module):
        raise TypeError("save_delta: pass the base model's state_dict(), not the module")
    alias = {**alias, **{name: name for name in virtual}}
    model_names = canonical_map(alias, "the model")
    base_names = canonical_map(base_state_dict.keys(), "base_state_dict")
    if not base_names and not virtual:
        raise DeltaError("save_delta: base_state_dict is empty, so nothing can be compared; pass the state "
                         "dict of the model as it was before fine-tuning (a copy of model.state_dict())")
    unmatched = [raw for key, raw in base_names.items() if key not in model_names]
    if unmatched:
        raise DeltaError(
            f"save_delta: {len(unmatched)} of the {len(base_names)} names in base_state_dict are not in the "
            f"model, e.g. {unmatched[:3]}; the model's names look like {list(alias)[:3]}. Wrapper prefixes "
            "(torch.compile's '_orig_mod.', DDP's 'module.', FSDP's) are matched already; take the base from "
            "the same model (model.state_dict() before training) or rename its keys. Nothing was written.")
    return {alias[model_names[key]]: base_state_dict[raw] for key, raw in base_names.items()}


def save_delta(model: nn.Module, base_state_dict: Mapping[str, Tensor], path: str | os.PathLike) -> DeltaStats:
    """Write the entries of ``model`` that differ from ``base_state_dict`` to ``path`` (safetensors).

    ``base_state_dict`` maps state-dict names to the base tensors (any device). Every name in it must
    be one of the model's (up to wrapper prefixes, see the module doc); weights of the model it lacks
    are taken as unchanged. The file appears only when complete.
    """
    state, alias = _unique_state(model)
    quant = _quant_layers(model)
    virtual = {f"{name}.weight" if name else "weight": m for name, m in quant.items()}
    base = _match_base(model, base_state_dict, alias, tuple(virtual))
    owned = tuple(f"{name}." for name in quant)  # state of a LIFTQuantLinear: compared as its M.weight
    tensors: dict[str, Tensor] = {}
    weights: dict[str, dict] = {}
    entries = 0
    pairs = ((name, new) for name, new in state.items() if not (owned and name.startswith(owned)))
    # chain, not a list: a LIFTQuantLinear's dense matrices exist only while it is compared
    for name, new, old in itertools.chain(((n, t, base.get(n)) for n, t in pairs), _quant_pairs(virtual, base)):
        if old is None or not new.is_floating_point():
            continue
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
        key = canonical(name)
        for suffix, where, values in _split_exact(new_flat[idx], old_flat[idx], name):
            if suffix == "" and where.numel() * (4 + values.element_size()) > new.numel() * values.element_size():
                # Mostly changed (full fine-tuning, merged LoRA): the plain difference is smaller than
                # (index, value) pairs. Unchanged entries hold 0, which apply/remove skip.
                dense = torch.zeros(new.numel(), dtype=values.dtype)
                dense[idx[where]] = values
                tensors[f"{key}.dense"] = dense
                continue
            tensors[f"{key}.indices{suffix}"] = idx[where].to(torch.int32).contiguous()
            tensors[f"{key}.values{suffix}"] = values.contiguous()
        weights[key] = {"shape": list(new.shape), "dtype": str(new.dtype).removeprefix("torch."),
                        "entries": idx.numel(), "base": _fingerprint(idx, old_flat[idx]),
                        "tuned": _fingerprint(idx, new_flat[idx])}
        entries += idx.numel()
    metadata = {"format": _FORMAT, "weights": json.dumps(weights, sort_keys=True)}
    metadata["checksum"] = _checksum(tensors, metadata)
    from safetensors.torch import save_file  # here, not at the top: `import lift_kernels` stays light

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    # The float model the delta applies to: a quantized layer (LIFTQuantLinear or a plain bitsandbytes
    # one) counts as its fp32 weight, not its packed state.
    packed = _bnb_layers(model)
    prefixes = tuple(f"{name}." for name in packed)
    model_bytes = sum(t.numel() * t.element_size() for name, t in state.items()
                      if not (prefixes and name.startswith(prefixes)))
    model_bytes += sum(4 * m.out_features * m.in_features + _bias_bytes(m) for m in packed.values())
    return DeltaStats(len(weights), entries, os.path.getsize(path), model_bytes)


def _bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} of the quantized linears: LIFTQuantLinear, and bitsandbytes ones outside them."""
    quant = _quant_layers(model)
    if not quant and "bitsandbytes" not in sys.modules:
        return {}
    from .quantized.dequant import bnb_kind

    inner = {id(m.base) for m in quant.values()}
    return {**quant, **{name: m for name, m in model.named_modules() if bnb_kind(m) and id(m) not in inner}}


def _bias_bytes(layer: nn.Module) -> int:
    bias = getattr(getattr(layer, "base", layer), "bias", None)
    return 0 if bias is None else bias.numel() * bias.element_size()


def _quant_pairs(virtual: dict[str, nn.Module], base: dict[str, Tensor]):
    """(name, new, old) per LIFTQuantLinear, one at a time (two dense fp32 matrices while compared).
    Outside the layer's positions effective_weight() is its dequantized base, so only those can differ."""
    with torch.no_grad():
        for name, layer in virtual.items():
            old = base[name] if name in base else layer.dequantized(torch.float32)
            yield name, layer.effective_weight(torch.float32), old


@dataclass
class _Change:
    """One weight's part of a delta, checked against the model: write ``result`` at ``idx``."""
    weight: Tensor
    idx: Tensor       # int64 flat indices on the weight's device
    result: Tensor    # the new values, in the weight's dtype and on its device


def _read_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Tensor]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"delta file not found: {path}")
    from safetensors import safe_open  # here, not at the top: `import lift_kernels` stays light

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own error type: a cut or garbled file, or not safetensors
        raise DeltaError(f"cannot read delta {path}: {err}; the file is damaged or not a delta "
                         "(re-create it with save_delta)") from None


def _parse_specs(path, meta: dict[str, str], tensors: dict[str, Tensor]) -> tuple[dict[str, dict], bool]:
    """{name: {"shape", "dtype", "entries", "base", "tuned"}} and whether fingerprints can be checked."""
    fmt = meta.get("format")
    if "checksum" in meta:  # checked whatever the format says: a flipped format byte must not skip it
        if meta["checksum"] != _checksum(tensors, meta):
            raise DeltaError(f"{path} is damaged: its checksum does not match its contents; re-create it "
                             "with save_delta or copy it again")
        if fmt != _FORMAT:
            raise DeltaError(f"{path} has delta format {fmt!r}, which this lift_kernels does not read "
                             f"(it reads {_FORMAT!r}); upgrade lift_kernels")
    elif fmt == _FORMAT:
        raise DeltaError(f"{path} is damaged: its checksum is missing; re-create it with save_delta")
    elif fmt == _LEGACY_FORMAT and "shapes" in meta:
        warnings.warn(f"{path} was written by lift_kernels 0.1 (format {fmt}) without base fingerprints or "
                      "checksum: applying it to the wrong base, twice, or damaged cannot be detected. Save it "
                      "again with save_delta for those checks.", UserWarning, stacklevel=_USER_FRAME)
        shapes = _json(path, meta["shapes"])
        if not all(_is_shape(s) for s in shapes.values()):
            raise DeltaError(f"{path}: the delta's metadata is malformed; re-create it with save_delta")
        return {name: {"shape": shape} for name, shape in shapes.items()}, False
    else:
        raise DeltaError(f"{path} is not a lift_kernels delta (metadata format {fmt!r})")
    specs = _json(path, meta.get("weights"))
    for name, spec in specs.items():
        ok = (isinstance(spec, dict) and set(spec) == {"shape", "dtype", "entries", "base", "tuned"}
              and _is_shape(spec["shape"]) and spec["dtype"] in _DTYPES
              and isinstance(spec["entries"], int) and spec["entries"] > 0
              and all(isinstance(spec[k], str) for k in ("base", "tuned")))
        if not ok:
            raise DeltaError(f"{path}: the metadata of {name} is malformed; re-create the delta with save_delta")
    return specs, True


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)


def _json(path, text) -> dict:
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise DeltaError(f"{path}: the delta's metadata is malformed; re-create it with save_delta")
    return value


def _group_tensors(path, tensors: dict[str, Tensor], specs: dict[str, dict]) -> dict[str, dict[str, Tensor]]:
    """{name: {"dense" | "indices<suffix>" | "values<suffix>": tensor}}, every key accounted for."""
    groups: dict[str, dict[str, Tensor]] = {name: {} for name in specs}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m["name"] not in specs:
            raise DeltaError(f"{path}: unexpected tensor {key!r}: it belongs to no weight the delta records")
        part = "dense" if m["dense"] else m["part"] + (m["suffix"] or "")
        groups[m["name"]][part] = t
    for name, parts in groups.items():
        if not parts:
            raise DeltaError(f"{path}: the delta records {name} but holds no entries for it")
    return groups


def _check_part(path, name: str, idx: Tensor, values: Tensor, dtype: torch.dtype, numel: int) -> None:
    """Indices int32, strictly increasing (sorted, unique), in [0, numel); values finite, one per index."""
    if idx.dtype != torch.int32 or idx.dim() != 1:
        raise DeltaError(f"{path}: {name} has indices of dtype {idx.dtype} and shape {tuple(idx.shape)}; "
                         "expected a 1-D int32 tensor")
    if values.dtype != dtype or values.shape != idx.shape:
        raise DeltaError(f"{path}: {name} has {values.numel()} {values.dtype} values for {idx.numel()} indices; "
                         f"expected one {dtype} value per index")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all())):
        raise DeltaError(f"{path}: {name} has indices that are negative, not below its {numel} entries, or not "
                         "strictly increasing (sorted, no duplicates); the file is damaged")
    if not bool(torch.isfinite(values).all()):
        raise DeltaError(f"{path}: {name} has non-finite differences; the file is damaged")


def _parts(path, name: str, group: dict[str, Tensor], w: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(int64 indices, values) of every storage dtype of one weight, checked."""
    tiers = _TIERS.get(w.dtype)
    if tiers is None:
        raise DeltaError(f"{path}: {name} is {w.dtype} in this model; deltas hold float weights only")
    out = []
    if "dense" in group:
        dense = group.pop("dense")
        if dense.dtype != w.dtype or dense.shape != (w.numel(),) or not bool(torch.isfinite(dense).all()):
            raise DeltaError(f"{path}: {name} has a dense difference of {dense.dtype} {tuple(dense.shape)}; "
                             f"expected {w.numel()} finite {w.dtype} entries")
        idx = torch.nonzero(dense).flatten()  # a changed entry never has a zero difference
        out.append((idx, dense[idx]))
    for suffix in _SUFFIXES:
        idx, values = group.pop(f"indices{suffix}", None), group.pop(f"values{suffix}", None)
        if idx is None and values is None:
            continue
        dtype = _SUFFIX_DTYPE.get(suffix, w.dtype)
        if idx is None or values is None or dtype not in tiers[1 if suffix else 0:]:
            raise DeltaError(f"{path}: {name} has a lone or misplaced indices{suffix}/values{suffix} part; "
                             "the file is damaged")
        _check_part(path, name, idx, values, dtype, w.numel())
        out.append((idx.to(torch.int64), values))
    return out


def _plan(model: nn.Module, path: str | os.PathLike, sign: int) -> list[_Change]:
    """Everything ``apply_delta`` (sign +1) or ``remove_delta`` (-1) will write, all checked first."""
    meta, tensors = _read_file(path)
    specs, fingerprinted = _parse_specs(path, meta, tensors)
    groups = _group_tensors(path, tensors, specs)
    model_state = model.state_dict(keep_vars=True)
    names = canonical_map(model_state, "the model")
    try:
        canonical_map(specs, str(path))  # two names of one weight would change it twice
    except ValueError as err:
        raise DeltaError(str(err)) from None
    # First which weights and whether they fit (the clearest error for a foreign model), then entries.
    weights, seen = {}, set()
    for name, spec in specs.items():
        if canonical(name) not in names:
            quant = {canonical(f"{n}.weight") for n in _quant_layers(model)}
            if canonical(name) in quant:
                raise DeltaError(f"{path}: the delta changes {name}, which is a LIFTQuantLinear (quantized base) "
                                 "in this model; apply the delta to a float model of the same architecture that "
                                 "holds the dequantized base")
            raise DeltaError(f"{path}: the delta changes {name}, which this model does not have")
        w = model_state[names[canonical(name)]].detach()
        if list(w.shape) != spec["shape"]:
            raise DeltaError(f"{path}: {name} has shape {tuple(spec['shape'])} in the delta but "
                             f"{tuple(w.shape)} in this model; apply it to the model it was made from")
        if fingerprinted and _DTYPES[spec["dtype"]] != w.dtype:
            raise DeltaError(f"{path}: {name} is {spec['dtype']} in the delta but {w.dtype} in this model; load "
                             f"the model in {spec['dtype']}, the dtype it was fine-tuned in")
        if w.data_ptr() in seen:
            raise DeltaError(f"{path}: {name} is the same tensor as another weight of the delta (tied weights)")
        seen.add(w.data_ptr())
        weights[name] = w
    changes = []
    for name, spec in specs.items():
        w = weights[name]
        flat = w.reshape(-1)
        parts = _parts(path, name, groups[name], w)
        # Each part adds in its own storage dtype (exactness was checked per dtype when saving).
        results = [(flat[i.to(w.device)].cpu().to(v.dtype) + sign * v).to(w.dtype) for i, v in parts]
        idx, order = torch.sort(torch.cat([i for i, _ in parts]))
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise DeltaError(f"{path}: {name} stores an entry in two parts; the file is damaged")
        if fingerprinted and idx.numel() != spec["entries"]:
            raise DeltaError(f"{path}: {name} holds {idx.numel()} entries, its metadata says {spec['entries']}; "
                             "the file is damaged")
        result = torch.cat(results)[order]
        if fingerprinted:
            _check_fingerprints(path, name, spec, sign, idx, flat[idx.to(w.device)].cpu(), result)
        changes.append(_Change(w, idx.to(w.device), result.to(w.device)))
    return changes


def _check_fingerprints(path, name: str, spec: dict, sign: int, idx: Tensor, current: Tensor,
                        result: Tensor) -> None:
    """The model holds the values the delta starts from, and the result is the values it should end at."""
    start, end = (spec["base"], spec["tuned"]) if sign > 0 else (spec["tuned"], spec["base"])
    now = _fingerprint(idx, current)
    if now != start:
        if now == end and sign > 0:
            raise DeltaError(f"{path}: {name} already holds the fine-tuned values: this delta is applied to "
                             "this model already, and applying it again would add the difference twice; "
                             "apply it to the base model (or remove_delta first)")
        if now == end:
            raise DeltaError(f"{path}: {name} holds the base values: this delta is not applied to this model, "
                             "so there is nothing to remove; remove it only from the model it was applied to")
        what = ("the base values this delta was made from" if sign > 0 else "the values this delta produces")
        raise DeltaError(f"{path}: {name} does not hold {what} (the fingerprint of its {idx.numel()} changed "
                         f"entries differs): this is another model of the same shapes; "
                         f"{'apply' if sign > 0 else 'remove'} the delta only with the model it was saved "
                         "against")
    if _fingerprint(idx, result) != end:
        raise DeltaError(f"{path}: {name} would not get the values recorded when the delta was saved; the file "
                         "is damaged; re-create it with save_delta")


@torch.no_grad()
def _add(model: nn.Module, path: str | os.PathLike, sign: int) -> None:
    # Every weight is read, checked and computed before the first one changes, so an error leaves the
    # model as it was.
    for change in _plan(model, path, sign):
        change.weight.view(-1)[change.idx] = change.result


def apply_delta(model: nn.Module, path: str | os.PathLike) -> None:
    """Add the delta at ``path`` to ``model``'s weights in place (base -> fine-tuned).

    Raises :class:`DeltaError` (the model unchanged) when the file is damaged or foreign, or when the
    model is not the base the delta was saved against (another model, or the delta applied already).
    """
    _add(model, path, +1)


def remove_delta(model: nn.Module, path: str | os.PathLike) -> None:
    """Subtract the delta at ``path`` from ``model``'s weights in place (fine-tuned -> base).

    Raises :class:`DeltaError` (the model unchanged) when the file is damaged or foreign, or when the
    delta is not applied to ``model``.
    """
    _add(model, path, -1)
