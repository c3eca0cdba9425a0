"""Loading a LIFTAdamW checkpoint: validate everything first, then load without recasting LIFT state.

A state dict is refused, before anything changes, when it is not a LIFTAdamW one (e.g. torch's
AdamW: its groups lack LIFT's options), when its groups or hyperparameters do not fit, or when a
LIFT entry is damaged: indices not int32, negative, out of range, unsorted or repeated; moments or
masters not fp32 vectors of the indices' length (8-bit moments: uint8 codes of that length and fp32
scales, one per block); a step that is not a count. A checkpoint whose ``moment_bits`` differ from the
optimizer's groups is refused (moments are never converted on load: see state.check_same_bits);
checkpoints written before the option existed hold fp32 moments and count as ``moment_bits=32``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from .moments import FIELDS, coded_sizes
from .quant_weights import is_quant, matrix_shape
from .validation import check_hyperparameters

_PER_ENTRY = ("exp_avg", "exp_avg_sq", "master")
# The group options every LIFTAdamW checkpoint has (older ones lack torch.optim.AdamW's maximize,
# foreach, ...: those load as this optimizer's values).
LIFT_OPTIONS = ("lr", "betas", "eps", "weight_decay", "rank", "density", "lra_rank", "update_interval",
                "selector", "svd", "largest", "lift", "master_weights")


def load_lift_state_dict(opt, state_dict: dict, torch_load: Callable[[dict], None]) -> None:
    """Load ``state_dict`` into LIFTAdamW ``opt`` as torch.optim's load_state_dict does, in its order
    (pre-hooks, then the load, then post-hooks), with two differences: the checkpoint the pre-hooks
    return is checked whole before anything changes, and LIFT state keeps its own dtypes (torch's
    ``torch_load`` casts floating state to each parameter's dtype and would turn int32 indices into
    floats), restored before the post-hooks see it."""
    state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
        # groups saved before moment_bits existed hold fp32 moments
        groups = [{**g, "moment_bits": 32} if isinstance(g, dict) and "moment_bits" not in g else g
                  for g in state_dict["param_groups"]]
        state_dict = {**state_dict, "param_groups": groups}
    lift_entries = check_state_dict(opt, state_dict)
    pre, post = opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks
    opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks = {}, {}
    try:  # torch's load of the groups' hyperparameters and the dense state, its hooks run here instead
        torch_load(state_dict)
    finally:
        opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks = pre, post
    for p, s in lift_entries:
        opt.state[p] = {key: (v.to(p.device) if isinstance(v, Tensor) else copy.copy(v))
                        for key, v in s.items()}
    opt.selection_seed = state_dict["lift_seed"]
    opt.skipped_steps = int(state_dict.get("lift_skipped_steps", 0))
    for hook in post.values():
        hook(opt)


def check_state_dict(opt, state_dict: dict) -> list[tuple[Tensor, dict]]:
    """Raise ValueError naming what does not fit; return (parameter, saved LIFT state) pairs."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups' "
                         "(pass opt.state_dict(), or torch.load of a file written from it)")
    if not isinstance(state_dict.get("lift_seed"), int):
        raise ValueError("not a LIFTAdamW state dict (it has no 'lift_seed'; a torch.optim.AdamW checkpoint?); "
                         "load a checkpoint written by LIFTAdamW.state_dict()")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(opt.param_groups)}; build the optimizer as the saved run did")
    lift_entries = []
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        missing = [k for k in LIFT_OPTIONS if k not in saved]
        if missing:
            raise ValueError(f"not a LIFTAdamW state dict: param_groups[{gi}] lacks {missing} (a "
                             "torch.optim.AdamW checkpoint?); load a checkpoint written by LIFTAdamW.state_dict()")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param_groups[{gi}] has {len(saved['params'])} parameters in the checkpoint and "
                             f"{len(group['params'])} here; build the optimizer as the saved run did")
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        try:
            check_hyperparameters(merged)
        except ValueError as e:
            raise ValueError(f"checkpoint param_groups[{gi}]: {e}") from None
        if merged["moment_bits"] != group["moment_bits"]:
            raise ValueError(f"param_groups[{gi}] has moment_bits={merged['moment_bits']} in the checkpoint and "
                             f"{group['moment_bits']} here; moments are not converted on load: build the "
                             f"optimizer with moment_bits={merged['moment_bits']} to resume this run")
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            s = saved_state.get(pid)
            if not s:
                continue
            where = f"param_groups[{gi}] parameter {i} ({opt._name_of(p)})"
            if opt._is_lift(merged, p):
                _check_lift_entry(s, p, opt.strategy.local(p), where, merged["moment_bits"])
                lift_entries.append((p, s))
            else:
                _check_dense_entry(s, p, opt.strategy.local(p), where)
    return lift_entries


def _corrupt(where: str, what: str) -> ValueError:
    return ValueError(f"checkpoint at {where} is corrupt: {what}; load an undamaged checkpoint of this run")


def _check_lift_entry(s: dict, p: Tensor, local: Tensor, where: str, bits: int = 32) -> None:
    if "idx" not in s:
        raise ValueError(f"checkpoint at {where}: a LIFT weight here, but the saved state is dense AdamW's "
                         "(keys %s); build the optimizer's groups (lift=...) as the saved run did" % sorted(s))
    if "shape" not in s or tuple(s["shape"]) != matrix_shape(p):
        raise ValueError(f"checkpoint mismatch at {where}: the saved LIFT state is for a "
                         f"{tuple(s.get('shape', ()))} weight, this parameter is {matrix_shape(p)}; "
                         "load a checkpoint of this model")
    step = s.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _corrupt(where, f"step must be an integer >= 0, got {step!r}")
    idx = s["idx"]
    if not isinstance(idx, Tensor) or idx.dtype != torch.int32 or idx.dim() != 1:
        raise _corrupt(where, f"idx must be a 1-D int32 tensor, got "
                              f"{getattr(idx, 'dtype', type(idx).__name__)} of shape {tuple(getattr(idx, 'shape', ()))}")
    k, numel = idx.numel(), local.numel()  # a shard's idx address its own rows
    other = 8 if bits == 32 else 32
    if any(key in s for key in FIELDS[other]):
        raise _corrupt(where, f"its group says moment_bits={bits}, so it needs {list(FIELDS[bits])}; "
                              f"found {sorted(key for key in s if key.startswith('exp_avg'))}")
    if bits == 8:
        _check_coded_moments(s, k, where)
    for key in _PER_ENTRY if bits == 32 else ("master",):
        v = s.get(key)
        if v is None and key != "master":
            raise _corrupt(where, f"{key} is missing")
        if v is not None and (not isinstance(v, Tensor) or v.dtype != torch.float32 or tuple(v.shape) != (k,)):
            raise _corrupt(where, f"{key} must be an fp32 vector of the {k} selected entries, got "
                                  f"{getattr(v, 'dtype', type(v).__name__)} of shape {tuple(getattr(v, 'shape', ()))}")
    if k:
        lo, hi = int(idx.min()), int(idx.max())
        if hi >= numel and lo >= 0 and is_quant(p):
            raise ValueError(f"checkpoint at {where}: its selection addresses {hi + 1} or more entries of a quantized "
                             f"layer's delta, which holds {numel} now; load the model's state (its deltas) "
                             "before the optimizer's")
        if lo < 0 or hi >= numel:
            raise _corrupt(where, f"indices must lie in [0, {numel}), found {lo if lo < 0 else hi}")
        if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise _corrupt(where, "indices must be sorted and distinct")
        if bits == 32 and not bool((s["exp_avg_sq"] >= 0).all()):
            raise _corrupt(where, "exp_avg_sq has negative or NaN entries")


def _check_coded_moments(s: dict, k: int, where: str) -> None:
    """8-bit moments: uint8 codes of the k entries, fp32 block scales (finite, >= 0: a block's scale
    is its largest |value|)."""
    for key, (shape, dtype) in coded_sizes(k).items():
        v = s.get(key)
        if v is None:
            raise _corrupt(where, f"{key} is missing")
        if not isinstance(v, Tensor) or v.dtype != dtype or tuple(v.shape) != shape:
            raise _corrupt(where, f"{key} must be a {dtype} vector of shape {shape}, got "
                                  f"{getattr(v, 'dtype', type(v).__name__)} of shape {tuple(getattr(v, 'shape', ()))}")
        if dtype == torch.float32 and v.numel() and not bool(((v >= 0) & torch.isfinite(v)).all()):
            raise _corrupt(where, f"{key} has negative, NaN or infinite entries")


def _check_dense_entry(s: dict, p: Tensor, local: Tensor, where: str) -> None:
    if "idx" in s:
        raise ValueError(f"checkpoint at {where}: the saved state is LIFT state but this parameter is trained "
                         "densely here; build the optimizer's groups (lift=...) as the saved run did")
    for key in ("exp_avg", "exp_avg_sq"):
        v = s.get(key)
        if isinstance(v, Tensor) and tuple(v.shape) != tuple(local.shape) and tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"checkpoint mismatch at {where}: {key} has shape {tuple(v.shape)}, the parameter "
                             f"{tuple(p.shape)}; load a checkpoint of this model")
