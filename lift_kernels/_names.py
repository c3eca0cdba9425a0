"""State-dict names without the prefixes that wrappers add, so a model matches its own base.

torch.compile puts the model under ``_orig_mod``, DDP and DataParallel under ``module``, FSDP1 and
activation checkpointing under ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module``. A base
state dict taken before wrapping (or after) then names the same weights differently.
"""
from __future__ import annotations

from collections.abc import Iterable

# Segments that only wrappers insert, wherever they appear (torch.compile of a submodule puts
# ``_orig_mod`` mid-name).
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# DDP / DataParallel wrap the whole model, so their ``module`` is only ever leading.
_LEADING_WRAPPER = "module"


def canonical(name: str) -> str:
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == _LEADING_WRAPPER:
        parts.pop(0)
    return ".".join(parts)


def canonical_map(names: Iterable[str], what: str) -> dict[str, str]:
    """{canonical name: original name}; refuses two names that differ only by wrapper prefixes."""
    out: dict[str, str] = {}
    for name in names:
        key = canonical(name)
        if key in out and out[key] != name:
            raise ValueError(f"{what} has both {out[key]!r} and {name!r}, which differ only by a wrapper "
                             "prefix (_orig_mod., module.); pass the state dict of one model, unwrapped")
        out[key] = name
    return out


def module_matches(module_name: str, target: str) -> bool:
    """Whether ``target`` names module ``module_name``: as one of its dotted components ("q_proj",
    "mlp"), a dotted suffix ("mlp.down_proj") or the whole name (how target_modules are matched)."""
    return target in module_name.split(".") or module_name.endswith("." + target) or module_name == target
