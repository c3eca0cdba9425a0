"""quant_owner: the LIFTQuantLinear whose .delta a parameter is, without keeping either alive.

Keyed by the parameter's id, checked against weak references: a dead parameter's id may be reused,
and tensors compare element-wise, so they cannot key a WeakKeyDictionary.
"""
from __future__ import annotations

import weakref

from torch import Tensor, nn

_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(delta) -> (delta, module)


def register(module: nn.Module) -> None:
    """Records ``module`` as the owner of its current ``.delta`` (again after a copy or a load)."""
    p = module.delta
    key = id(p)

    def forget(ref, key=key):
        if _OWNERS.get(key, (None,))[0] is ref:
            del _OWNERS[key]

    _OWNERS[key] = (weakref.ref(p, forget), weakref.ref(module))


def quant_owner(p: Tensor):
    """The LIFTQuantLinear whose ``.delta`` is ``p``, or None (any other tensor)."""
    entry = _OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    module = entry[1]()
    return module if module is not None and module.delta is p else None
