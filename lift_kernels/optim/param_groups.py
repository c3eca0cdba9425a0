"""Builds LIFTAdamW parameter groups from a model: which weights are LIFT weights."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .._names import module_matches

from ..quantized.linear import LIFTQuantLinear

# Set on a parameter that lift_param_groups froze (it was trainable): a later call counts it as
# trainable again, so every call on a model gives the groups the first gave.
_FROZEN_HERE = "_lift_param_groups_froze"


def _trainable(p: Tensor) -> bool:
    return p.requires_grad or getattr(p, _FROZEN_HERE, False)


def _train(p: Tensor) -> None:
    if getattr(p, _FROZEN_HERE, False):
        p.requires_grad_(True)
        delattr(p, _FROZEN_HERE)


def _lift_candidates(model: nn.Module):
    """(name, module, weight, weight's attribute name) of every layer whose weight LIFT may train: each
    nn.Linear's weight, and each LIFTQuantLinear's sparse delta in place of its frozen bnb base's."""
    bases = {id(m.base) for m in model.modules() if isinstance(m, LIFTQuantLinear)}
    for name, module in model.named_modules():
        if isinstance(module, LIFTQuantLinear):
            yield name, module, module.delta, "delta"
        elif isinstance(module, nn.Linear) and id(module) not in bases:
            yield name, module, module.weight, "weight"


def lift_param_groups(model: nn.Module, target_modules: str | Sequence[str] | None = None,
                      train_other: bool = False) -> list[dict]:
    """Parameter groups for :class:`LIFTAdamW`.

    The LIFT group holds the weight of every ``nn.Linear`` except ``lm_head`` (of a LIFTQuantLinear,
    a linear over a quantized base, its ``delta``, named ``"<module>.delta"``) or, when
    ``target_modules`` is given, of the linears whose qualified name has one of the targets as a
    dotted component or suffix (``["q_proj", "down_proj"]``, ``"mlp"``, ``"mlp.down_proj"``); every
    target must match a trainable linear (a mistyped one is an error that names it).
    Every other trainable parameter is frozen (``requires_grad=False``), or, with
    ``train_other=True``, put in a second group trained by ordinary dense AdamW.

    Heads: by default a classification head (``score``, ``classifier``: an ``nn.Linear`` that is not
    ``lm_head``) is a LIFT weight. A head thinner than ``lra_rank`` (2 x 128 under ``lra_rank=64``) is
    no error: its best rank-``lra_rank`` approximation is the head itself, so its largest |W| are
    selected. To train a head densely instead, leave it out of ``target_modules`` and pass
    ``train_other=True``.

    Calling it again on the same model gives the same groups: the parameters an earlier call froze
    count as trainable (a target among them is unfrozen); those frozen by the user stay out.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = list(target_modules) if target_modules else None
    lift_names, lift_params, seen = [], [], set()
    matched: set[str] = set()
    for name, _, w, w_name in _lift_candidates(model):
        if targets is None:
            chosen = name.split(".")[-1] != "lm_head"
        else:
            hits = [t for t in targets if module_matches(name, t)]
            if _trainable(w):
                matched.update(hits)
            chosen = bool(hits)
        if chosen and _trainable(w) and id(w) not in seen:
            seen.add(id(w))
            lift_names.append(f"{name}.{w_name}" if name else w_name)
            lift_params.append(w)
    linears = [name for name, *_ in _lift_candidates(model)]
    listing = f"{linears[:12]}{' ...' if len(linears) > 12 else ''}"
    if not lift_params:
        raise ValueError(
            f"target_modules={target_modules!r} matched no trainable nn.Linear weight; the model's "
            f"linear modules are {listing}")
    unmatched = [t for t in targets or () if t not in matched]
    if unmatched:
        raise ValueError(
            f"target_modules {unmatched!r} matched no trainable nn.Linear weight (mistyped?); every target "
            f"must match one; the model's linear modules are {listing}")
    for p in lift_params:
        _train(p)
    other_names, other_params = [], []
    for name, p in model.named_parameters():
        if id(p) in seen or not _trainable(p):
            continue
        seen.add(id(p))
        if train_other:
            _train(p)
            other_names.append(name)
            other_params.append(p)
        elif p.requires_grad:
            p.requires_grad_(False)
            setattr(p, _FROZEN_HERE, True)
    groups = [{"params": lift_params, "param_names": lift_names, "lift": True}]
    if other_params:
        groups.append({"params": other_params, "param_names": other_names, "lift": False})
    return groups
