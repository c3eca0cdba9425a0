"""Fine-tuning methods: which weights train and with which optimizer.

``lift`` trains the principal weights of every target matrix (LIFTAdamW); ``magnitude`` and
``random`` are the paper's ablations (same budget, other selection); ``full`` trains every weight
with AdamW; ``lora`` trains peft LoRA adapters of rank ``--rank`` on the same matrices, which is the
same trainable count as LIFT at that rank: (m + n) * rank per m x n matrix.
"""
from __future__ import annotations

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


@dataclass
class Setup:
    model: nn.Module                      # what the training loop calls
    optimizer: torch.optim.Optimizer
    trainable: int                        # entries the method trains
    base: dict[str, Tensor]               # CPU copy of every weight training may change (for the delta)
    export: Callable[[], nn.Module]       # the fine-tuned model in the original layout (LoRA merged)


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
        m, n = w.shape
        if rank * (m + n) >= m * n:
            raise MethodError(
                f"--rank {rank} does not fit {name} ({m}x{n}): the budget (m+n)*rank = {rank * (m + n)} "
                f"is not below its {m * n} entries; use --rank {(m * n - 1) // (m + n)} or less")


def _copy_to_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def build(method: str, model: nn.Module, hp: Hyper) -> Setup:
    if method not in METHODS:
        raise MethodError(f"--method must be one of {METHODS}, got {method!r}")
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
