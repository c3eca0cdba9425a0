"""LIFT's selection as a PEFT SHiRA mask function: a SHiRA adapter on each weight's principal weights.

SHiRA (``peft.ShiraConfig``) trains a fixed set of r*(m+n) entries of every targeted linear weight;
which entries is up to its ``mask_fn(base_layer, r, **kwargs)``, which returns an m x n 0/1 mask.
``lift_mask_fn(...)`` returns one that marks LIFT's principal weights: the r*(m+n) largest entries
of the best rank-``lra_rank`` approximation of the weight, chosen once when ``get_peft_model`` wraps
the layer. That is LIFT without re-selection (LIFTAdamW with ``update_interval`` longer than the run),
trained by whatever optimizer the PEFT user picks (the SHiRA weights are a dense vector to it).

Quantized bases (bitsandbytes 4-bit and 8-bit, and what else peft dequantizes) are selected from the
dequantized weight, as LIFT selects from dequant(base) + delta; peft >= 0.20 puts SHiRA on them.
Older peft cannot (it mistakes bitsandbytes layers for plain linears and fails later, obscurely), so
there the mask function refuses a quantized layer with an error naming the peft version needed.

peft is imported only when a quantized layer needs dequantizing (``import lift_kernels`` never does).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..optim.selection import budget, is_int, select, standalone_group
from ..optim.validation import check_seed

__all__ = ["lift_mask_fn"]

QUANTIZED_SHIRA_PEFT = "0.20"  # the first peft whose SHiRA adapts quantized linears


def lift_mask_fn(lra_rank: int = 64, svd: str = "fast", seed: int = 0) -> Callable[..., Tensor]:
    """A SHiRA ``mask_fn`` that selects each layer's principal weights.

    ``lra_rank`` and ``svd`` are LIFTAdamW's (rank of the low-rank filter; "fast" randomized block
    Krylov or "exact" SVD); ``seed`` seeds the fast path's sketch (every layer draws from
    ``torch.Generator().manual_seed(seed)``, so masks are reproducible; "exact" ignores it). SHiRA's
    ``r`` sets the budget, r*(m+n) entries (LoRA's count at rank r), capped at m*n like LIFTAdamW's
    ``rank`` (peft itself refuses an r with r*(m+n) > m*n)::

        config = ShiraConfig(r=32, target_modules=["q_proj", "v_proj"])
        config.mask_fn = lift_mask_fn(lra_rank=32)
        model = get_peft_model(model, config)
    """
    standalone_group(lra_rank=lra_rank, svd=svd)  # bad options fail here, not inside get_peft_model
    check_seed(seed)

    def mask_fn(base_layer: nn.Module, r: int, **peft_kwargs) -> Tensor:
        # peft passes keyword arguments of its own (bias, quantization details): none change LIFT's choice.
        if not is_int(r) or r < 1:
            raise ValueError(f"ShiraConfig r must be an integer >= 1 (the budget r*(m+n) per layer), got {r!r}")
        W = dense_weight(base_layer)
        m, n = W.shape  # an lra_rank >= min(m, n) selects by |W|, as LIFTAdamW does
        idx = select(W, budget((m, n), r, None), selector="lift", lra_rank=lra_rank, svd=svd,
                     generator=torch.Generator().manual_seed(seed))
        like = getattr(base_layer, "weight", W)  # peft's contract: the base weight's dtype and device
        mask = torch.zeros(m * n, dtype=like.dtype, device=like.device)
        mask[idx.to(like.device).long()] = 1
        return mask.view(m, n)

    return mask_fn


def dense_weight(base_layer: nn.Module) -> Tensor:
    """The layer's weight (out_features, in_features) as floats: as it is, or dequantized by peft."""
    w = getattr(base_layer, "weight", None)
    if isinstance(w, Tensor) and type(w) in (Tensor, nn.Parameter) and w.is_floating_point():
        return w.detach()
    # Params4bit / Int8Params (bitsandbytes), HQQ, torchao: peft's own dequantization, as its DoRA uses.
    import peft
    from packaging.version import Version
    from peft.utils.integrations import dequantize_module_weight

    if Version(peft.__version__) < Version(QUANTIZED_SHIRA_PEFT):
        # peft 0.17-0.19 take bitsandbytes' Linear4bit/Linear8bitLt (nn.Linear subclasses) for plain
        # linears, then fail deep inside SHiRA giving its weights the packed integer dtype.
        raise TypeError(f"SHiRA on a quantized {type(base_layer).__name__} needs peft >= {QUANTIZED_SHIRA_PEFT} "
                        f"(installed: {peft.__version__}); upgrade peft, or load the base model unquantized")
    W = dequantize_module_weight(base_layer).detach()
    if W.dim() != 2 or not W.is_floating_point():
        raise TypeError(f"{type(base_layer).__name__}: its weight dequantizes to a {W.dtype} tensor of shape "
                        f"{tuple(W.shape)}, not a float matrix; lift_mask_fn selects in float linear layers only")
    return W
