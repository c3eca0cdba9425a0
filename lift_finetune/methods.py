"""Fine-tuning methods: which weights train and with which optimizer.

``lift`` trains the principal weights of every target matrix (LIFTAdamW); ``magnitude`` and
``random`` are the paper's ablations (same budget, other selection); ``full`` trains every weight
with AdamW; ``lora`` trains peft LoRA adapters of rank ``--rank`` on the same matrices, which is the
same trainable count as LIFT at that rank: (m + n) * rank per m x n matrix.

Over a bitsandbytes-quantized base (``Hyper.quant``) the base weights stay frozen in their 4/8-bit
format: ``lift``/``magnitude``/``random`` wrap each target in lift_kernels' LIFTQuantLinear and train
its sparse fp32 delta with LIFTAdamW; ``lora`` is QLoRA (peft's k-bit preparation, fp32 adapters);
``full`` is refused (cli.py, before anything loads).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lift_kernels import LIFTAdamW, lift_param_groups
from lift_kernels.optim.selection import budget

METHODS = ("lift", "full", "lora", "magnitude", "random")
_SELECTOR = {"lift": "lift", "magnitude": "magnitude", "random": "random"}


class MethodError(ValueError):
    """A method that does not fit the model (no target modules, a rank too large)."""


@dataclass
class Hyper:
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    rank: int
    lra_rank: int
    update_interval: int
    seed: int
    target_modules: list[str] | None = None
    svd: str = "fast"
    moment_bits: int = 32  # LIFTAdamW's moments: fp32 or 8-bit codes
    quant: object = None   # quantize.Quant of a bitsandbytes base, or None


@dataclass
class Setup:
    model: nn.Module                      # what the training loop calls
    optimizer: torch.optim.Optimizer
    trainable: int                        # entries the method trains
    base: dict[str, Tensor]               # CPU copy of every weight training may change (for the delta)
    export: Callable[[], nn.Module]       # the fine-tuned model in the original layout (LoRA merged)
    # Quantized base only (else None): the fine-tuned model as a plain float model of a dtype (replaces
    # the quantized layers in place, so called once, at the end), and {"<module>.weight": fp32
    # dequantized base} of the targets, formed when called (not held through training).
    to_float: Callable[[torch.dtype], nn.Module] | None = None
    float_base: Callable[[], dict[str, Tensor]] | None = None


def target_matrices(model: nn.Module, targets: list[str] | None) -> dict[str, Tensor]:
    """name -> weight of each target matrix, as LIFT selects them (all nn.Linear but lm_head by default)."""
    # lift_param_groups freezes every other parameter; here we only want the names, so the flags
    # are put back afterwards.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        groups = lift_param_groups(model, targets)
    except ValueError as err:
        raise MethodError(f"--target-modules: {err}") from None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return dict(zip(groups[0]["param_names"], groups[0]["params"]))


def _check_rank(mats: dict[str, Tensor], rank: int) -> None:
    """The budget must fit every matrix (an --lra-rank of min(m, n) or more selects by |W|)."""
    for name, w in mats.items():
        m, n = w if isinstance(w, tuple) else w.shape
        if rank * (m + n) >= m * n:
            raise MethodError(
                f"--rank {rank} does not fit {name} ({m}x{n}): the budget (m+n)*rank = {rank * (m + n)} "
                f"is not below its {m * n} entries; use --rank {(m * n - 1) // (m + n)} or less")


def _copy_to_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def build(method: str, model: nn.Module, hp: Hyper) -> Setup:
    if method not in METHODS:
        raise MethodError(f"--method must be one of {METHODS}, got {method!r}")
    if hp.quant is not None:
        return _build_quantized(method, model, hp)
    mats = target_matrices(model, hp.target_modules)
    if method == "full":
        return _full(model, hp)
    _check_rank(mats, hp.rank)
    if method == "lora":
        return _lora(model, hp, mats)
    groups = lift_param_groups(model, hp.target_modules)
    opt = LIFTAdamW(groups, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay, rank=hp.rank,
                    lra_rank=hp.lra_rank, update_interval=hp.update_interval, selector=_SELECTOR[method],
                    svd=hp.svd, seed=hp.seed, moment_bits=hp.moment_bits)
    trainable = sum(budget(w.shape, hp.rank, None) for w in mats.values())
    return Setup(model, opt, trainable, _copy_to_cpu(mats), lambda: model)


def _full(model: nn.Module, hp: Hyper) -> Setup:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
    return Setup(model, opt, sum(p.numel() for p in params.values()), _copy_to_cpu(params), lambda: model)


def _lora(model: nn.Module, hp: Hyper, mats: dict[str, Tensor]) -> Setup:
    from peft import LoraConfig, get_peft_model

    base = _copy_to_cpu(mats)
    modules = [name.removesuffix(".weight") for name in mats]
    # alpha = 2 * rank is the usual pairing; dropout 0 so LoRA and LIFT see the same forward pass.
    config = LoraConfig(r=hp.rank, lora_alpha=2 * hp.rank, lora_dropout=0.0, target_modules=modules, bias="none")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
    return Setup(peft_model, opt, sum(p.numel() for p in params), base, peft_model.merge_and_unload)


def quantized_targets(model: nn.Module, targets: list[str] | None) -> dict[str, tuple[int, int]]:
    """{"<module>.weight": (out, in)} of the bitsandbytes linears LIFT or QLoRA trains: those the targets
    name, matched as lift_param_groups matches them (default: all but lm_head, which stays float)."""
    from lift_kernels._names import module_matches

    from .quantize import is_bnb_linear

    found, matched = {}, set()
    for name, module in model.named_modules():
        if not is_bnb_linear(module):
            continue
        hits = [t for t in targets if module_matches(name, t)] if targets else [None]
        if hits and name.split(".")[-1] != "lm_head":
            matched.update(hits)
            found[f"{name}.weight"] = (module.out_features, module.in_features)
    listing = [n.removesuffix(".weight") for n in found] or [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise MethodError(f"--target-modules: {targets!r} matched no quantized linear layer; the model's "
                          f"linear modules are {listing[:12]}")
    unmatched = [t for t in targets or () if t not in matched]
    if unmatched:
        raise MethodError(f"--target-modules: {unmatched!r} matched no quantized linear layer (mistyped?); "
                          f"the quantized ones are {listing[:12]}")
    return found


def _dequantized_targets(model: nn.Module, names) -> Callable[[], dict[str, Tensor]]:
    from .quantize import dequantize

    def base() -> dict[str, Tensor]:
        out = {}
        for name in names:
            module = model.get_submodule(name.removesuffix(".weight"))
            if hasattr(module, "dequantized"):  # a LIFTQuantLinear
                w = module.dequantized(torch.float32)
            else:  # a bitsandbytes layer, or peft's LoRA layer around one
                w = dequantize(getattr(module, "base_layer", module))
            out[name] = w.detach().to("cpu", copy=True)
        return out
    return base


def _build_quantized(method: str, model: nn.Module, hp: Hyper) -> Setup:
    from . import quantize

    shapes = quantized_targets(model, hp.target_modules)
    _check_rank(shapes, hp.rank)
    if method == "lora":
        return _qlora(model, hp, shapes)
    if method not in _SELECTOR:
        raise MethodError(f"--method {method} cannot train a quantized base")
    from lift_kernels.quantized import quantize_for_lift

    quantize_for_lift(model, [n.removesuffix(".weight") for n in shapes])
    groups = lift_param_groups(model, hp.target_modules)
    opt = LIFTAdamW(groups, lr=hp.lr, betas=hp.betas, weight_decay=0.0, rank=hp.rank,
                    lra_rank=hp.lra_rank, update_interval=hp.update_interval, selector=_SELECTOR[method],
                    svd=hp.svd, seed=hp.seed, moment_bits=hp.moment_bits)
    trainable = sum(budget(shape, hp.rank, None) for shape in shapes.values())
    return Setup(model, opt, trainable, {}, lambda: model,
                 to_float=lambda dtype: quantize.to_float(model, dtype),
                 float_base=_dequantized_targets(model, list(shapes)))


def _qlora(model: nn.Module, hp: Hyper, shapes: dict[str, tuple[int, int]]) -> Setup:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from . import quantize

    # peft's usual QLoRA preparation: base frozen, non-quantized weights in fp32. No gradient
    # checkpointing: it trades compute for activation memory, a choice the float runs do not make either.
    modules = [name.removesuffix(".weight") for name in shapes]
    config = LoraConfig(r=hp.rank, lora_alpha=2 * hp.rank, lora_dropout=0.0, target_modules=modules, bias="none")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
        warnings.simplefilter("ignore", FutureWarning)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        peft_model = get_peft_model(model, config)  # adapters are created in fp32 (peft's default)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
    # Evaluated as trained (4-bit base + adapters); exported by merging into the dequantized base in fp32.
    return Setup(peft_model, opt, sum(p.numel() for p in params), {}, lambda: peft_model,
                 to_float=lambda dtype: quantize.to_float(peft_model, dtype),
                 float_base=_dequantized_targets(peft_model.get_base_model(), list(shapes)))
