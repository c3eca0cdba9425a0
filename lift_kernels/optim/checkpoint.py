"""Loading a LIFTAdamW checkpoint: validate first, then load without recasting LIFT state."""
from __future__ import annotations

import copy
from collections.abc import Callable

from torch import Tensor

_PER_ENTRY = ("exp_avg", "exp_avg_sq", "master")


def load_lift_state_dict(opt, state_dict: dict, torch_load: Callable[[dict], None]) -> None:
    """torch's Optimizer.load_state_dict casts floating state to each parameter's dtype (and would
    turn int32 indices into floats); LIFT state is restored with its own dtypes instead."""
    saved_state = state_dict["state"]
    lift_entries = []
    for gi, (saved_group, group) in enumerate(zip(state_dict["param_groups"], opt.param_groups)):
        for pid, p in zip(saved_group["params"], group["params"]):
            s = saved_state.get(pid)
            if s is None or "idx" not in s:
                continue
            where = f"param_groups[{gi}] parameter {pid}"
            if tuple(s["shape"]) != tuple(p.shape):
                raise ValueError(f"checkpoint mismatch at {where}: the saved LIFT state is for a "
                                 f"{tuple(s['shape'])} weight, this parameter is {tuple(p.shape)}; "
                                 "load a checkpoint of this model")
            k = s["idx"].numel()
            if any(key in s and s[key].numel() != k for key in _PER_ENTRY) or (
                    k and int(s["idx"].max()) >= p.numel()):
                raise ValueError(f"checkpoint at {where} is corrupt: its indices and moments disagree")
            lift_entries.append((p, s))
    torch_load(state_dict)  # validates group and parameter counts, loads the dense state
    for p, s in lift_entries:
        opt.state[p] = {key: (v.to(p.device) if isinstance(v, Tensor) else copy.copy(v))
                        for key, v in s.items()}
