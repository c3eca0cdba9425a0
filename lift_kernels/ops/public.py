"""The public ops as plain Python functions with a signature and a docstring.

``torch.ops.lift_kernels.<name>`` is an OpOverloadPacket: ``help()`` shows that class's help and
``inspect.signature`` fails on it. The functions here call the op and nothing else, so torch.compile
and the dispatcher see the op itself; their signatures are read from the op's schema and their
docstrings from library.DOCS, so each op is still defined in one place (library.py).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .library import DOCS, NAMESPACE

# The schemas' base types as Python annotations (a new type in a schema must be added here).
_TYPES = {"Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str,
          "Generator": torch.Generator}


def _annotation(jit_type):
    """The Python annotation of a schema argument's type: T? -> T | None, T[] -> list[T]."""
    if isinstance(jit_type, torch.OptionalType):
        return _annotation(jit_type.getElementType()) | None
    if isinstance(jit_type, torch.ListType):
        return list[_annotation(jit_type.getElementType())]
    return _TYPES[str(jit_type)]


def _returns(schema: torch._C.FunctionSchema):
    types = [_annotation(r.type) for r in schema.returns]
    if not types:
        return None
    return types[0] if len(types) == 1 else tuple[tuple(types)]


def signature(schema: torch._C.FunctionSchema) -> inspect.Signature:
    """The Python signature that calls with ``schema`` accept (keyword-only arguments after ``*``)."""
    params = []
    for arg in schema.arguments:
        kind = inspect.Parameter.KEYWORD_ONLY if arg.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = arg.default_value if arg.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(arg.name, kind, default=default, annotation=_annotation(arg.type)))
    return inspect.Signature(params, return_annotation=_returns(schema))


def public(name: str) -> Callable:
    """``torch.ops.lift_kernels.<name>`` as a documented function of the package ``lift_kernels``."""
    packet = getattr(getattr(torch.ops, NAMESPACE), name)

    def op(*args, **kwargs):
        return packet(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__module__ = "lift_kernels"
    op.__doc__ = DOCS[name]
    op.__signature__ = signature(packet.default._schema)
    return op
