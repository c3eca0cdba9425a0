"""quantize_for_lift: wraps a model's bitsandbytes linears in LIFTQuantLinear, in place."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .._names import module_matches
from .dequant import bnb_kind
from .linear import LIFTQuantLinear


def _output_layers(model: nn.Module) -> set[int]:
    """ids of the modules that produce the logits: never wrapped (LIFT trains the body, as for lm_head)."""
    out = {id(m) for name, m in model.named_modules() if name.split(".")[-1] == "lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (AttributeError, NotImplementedError):
            head = None
        if head is not None:
            out.add(id(head))
    return out


def quantize_for_lift(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> list[str]:
    """Wraps every bitsandbytes Linear4bit / Linear8bitLt of ``model`` (or, with ``target_modules``,
    those whose qualified name has a target as a dotted component or suffix, as lift_param_groups
    matches them) in a LIFTQuantLinear, in place; never lm_head or the output embeddings.

    Returns the names of the modules wrapped now. Layers wrapped already count as matched and stay
    as they are, so a second call wraps nothing. Raises ValueError when the model has no bnb linear,
    or a target matches none.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = list(target_modules) if target_modules else None
    heads = _output_layers(model)
    wrapped_bases = {id(m.base) for m in model.modules() if isinstance(m, LIFTQuantLinear)}
    layers = []  # (name, whether it is wrapped already) of every bnb linear that may be wrapped
    for name, module in model.named_modules():
        is_wrapper = isinstance(module, LIFTQuantLinear)
        if not is_wrapper and (bnb_kind(module) is None or id(module) in wrapped_bases):
            continue
        if id(module) not in heads and not (is_wrapper and id(module.base) in heads):
            layers.append((name, is_wrapper))
    if not layers:
        raise ValueError(
            "quantize_for_lift: the model has no bitsandbytes Linear4bit or Linear8bitLt layer to wrap (lm_head "
            "and the output embeddings are never wrapped); load it quantized, e.g. from_pretrained(..., "
            "quantization_config=BitsAndBytesConfig(load_in_4bit=True)), or for a full-precision model pass "
            "lift_param_groups(model) to LIFTAdamW directly")
    if targets is None:
        candidates = [name for name, wrapped in layers if not wrapped]
    else:
        candidates = [name for name, wrapped in layers if not wrapped and any(module_matches(name, t) for t in targets)]
        unmatched = [t for t in targets if not any(module_matches(name, t) for name, _ in layers)]
        if unmatched:
            names = [name for name, _ in layers]
            raise ValueError(f"quantize_for_lift: target_modules {unmatched!r} matched no bitsandbytes linear "
                             f"(mistyped? lm_head is never wrapped); the model's are "
                             f"{names[:12]}{' ...' if len(names) > 12 else ''}")
    if "" in candidates:
        raise ValueError("quantize_for_lift: the model is itself a bitsandbytes linear; wrap it as "
                         "LIFTQuantLinear(model) instead")
    for name in candidates:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LIFTQuantLinear(getattr(parent, child)))
    return candidates
