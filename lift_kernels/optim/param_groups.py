"""Builds LIFTAdamW parameter groups from a model: which weights are LIFT weights."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def _matches(module_name: str, targets: Sequence[str]) -> bool:
    parts = module_name.split(".")
    return any(t in parts or module_name.endswith("." + t) or module_name == t for t in targets)


def lift_param_groups(model: nn.Module, target_modules: str | Sequence[str] | None = None,
                      train_other: bool = False) -> list[dict]:
    """Parameter groups for :class:`LIFTAdamW`.

    The LIFT group holds the weight of every ``nn.Linear`` except ``lm_head`` or, when
    ``target_modules`` is given, of the linears whose qualified name has one of the targets as a
    dotted component or suffix (``["q_proj", "down_proj"]``, ``"mlp"``, ``"mlp.down_proj"``).
    Every other trainable parameter is frozen (``requires_grad=False``), or, with
    ``train_other=True``, put in a second group trained by ordinary dense AdamW.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    lift_names, lift_params, seen = [], [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        chosen = _matches(name, target_modules) if target_modules else name.split(".")[-1] != "lm_head"
        w = module.weight
        if chosen and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            lift_names.append(f"{name}.weight" if name else "weight")
            lift_params.append(w)
    if not lift_params:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={target_modules!r} matched no trainable nn.Linear weight; the model's "
            f"linear modules are {linears[:12]}{' ...' if len(linears) > 12 else ''}")
    other_names, other_params = [], []
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if train_other:
            other_names.append(name)
            other_params.append(p)
        else:
            p.requires_grad_(False)
    groups = [{"params": lift_params, "param_names": lift_names, "lift": True}]
    if other_params:
        groups.append({"params": other_params, "param_names": other_names, "lift": False})
    return groups
