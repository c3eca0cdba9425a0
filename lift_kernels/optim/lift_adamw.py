"""LIFTAdamW: AdamW that trains only each matrix's principal weights (Algorithm 1 of the paper)."""
from __future__ import annotations

import copy
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as dense_adamw

from .. import ops
from ..reference.select import select_indices
from .validation import budget, check_hyperparameters, check_lift_param

# Matrices of one shape are selected together; a bucket's stacked copy is kept under this many bytes
# (at least one matrix) so a refresh never doubles the memory of the weights.
_SELECT_BUCKET_BYTES = 1 << 28


class LIFTAdamW(torch.optim.Optimizer):
    """AdamW over the principal weights of every LIFT matrix, dense AdamW over everything else.

    A LIFT weight keeps in its state the sorted int32 flat indices ``idx`` of its k selected entries
    and length-k fp32 moments ``exp_avg``/``exp_avg_sq``; nothing of size m*n. Restricted to those
    entries, a step is exactly torch.optim.AdamW's. The selection is made before step 1 and
    re-made before every step t with ``t % update_interval == 0``; entries selected before and after
    keep their moments, new ones start at zero, and bias correction keeps the global step t.

    Group options (each may be set per group): ``lift`` (True: every tensor is a LIFT weight and
    must be 2-D; False: dense AdamW; None, the default: 2-D tensors are LIFT weights), ``rank``
    (budget k = min((m+n)*rank, m*n), as LoRA of that rank), ``density`` (k = round(density*m*n),
    overrides rank), ``lra_rank`` (rank of the low-rank filter), ``update_interval``, ``selector``
    ("lift", or the ablations "magnitude", "random", "gradient"), ``svd`` ("fast" or "exact") and
    ``largest`` (False selects the smallest entries). ``seed`` seeds the randomized SVD and the
    random selector; each selection's stream is derived from (seed, parameter, step), so resuming
    from a checkpoint reproduces the selections of an uninterrupted run.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float | Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int = 128, density: float | None = None, lra_rank: int = 64,
                 update_interval: int = 400, selector: str = "lift", svd: str = "fast",
                 largest: bool = True, seed: int = 0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        density=density, lra_rank=lra_rank, update_interval=update_interval,
                        selector=selector, svd=svd, largest=largest, lift=None)
        self.seed = int(seed)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameters(group)
        names = group.get("param_names") or [None] * len(group["params"])
        gi = len(self.param_groups) - 1
        for i, (p, name) in enumerate(zip(group["params"], names)):
            if self._is_lift(group, p):
                check_lift_param(p, name or f"param_groups[{gi}]['params'][{i}]", group)

    @staticmethod
    def _is_lift(group: dict, p: Tensor) -> bool:
        return group["lift"] is True or (group["lift"] is None and p.dim() == 2)

    def lift_parameters(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if self._is_lift(g, p)]

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lift, dense = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LIFTAdamW does not take torch.sparse gradients")
                (lift if self._is_lift(group, p) else dense).append(p)
            if dense:
                self._dense_step(group, dense)
            if lift:
                self._lift_step(group, lift)
        return loss

    def _dense_step(self, group: dict, params: list[Tensor]) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        dense_adamw(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                    beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                    eps=group["eps"], maximize=False)

    def _lift_step(self, group: dict, params: list[Tensor]) -> None:
        to_select = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["shape"] = tuple(p.shape)
            state["step"] += 1
            if "idx" not in state or state["step"] % group["update_interval"] == 0:
                to_select.append(p)
        if to_select:
            self._select(group, to_select)
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, p.dtype, self.state[p]["step"])].append(p)
        for (_, _, step), ps in buckets.items():
            states = [self.state[p] for p in ps]
            ops.sparse_adamw_step(
                ps, [p.grad for p in ps], [s["idx"] for s in states], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], None, step=step, lr=float(group["lr"]),
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    # ----------------------------------------------------------------------------- selection
    def _generator(self, position: int, step: int) -> torch.Generator:
        """A generator seeded by (seed, position of the weight in the optimizer, step): resume-safe."""
        key = f"{self.seed}:{position}:{step}".encode()
        return torch.Generator().manual_seed(zlib.crc32(key))

    def _select(self, group: dict, params: list[Tensor]) -> None:
        """(Re)select the entries of ``params``, batching matrices of one shape and dtype."""
        positions = {id(p): i for i, p in enumerate(self.lift_parameters())}
        by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            by_shape[(p.shape, p.dtype, p.device)].append(p)
        for (shape, dtype, _), ps in by_shape.items():
            k = budget(shape, group["rank"], group["density"])
            per_batch = max(1, _SELECT_BUCKET_BYTES // (ps[0].numel() * ps[0].element_size()))
            for start in range(0, len(ps), per_batch):
                chunk = ps[start:start + per_batch]
                W = chunk[0] if len(chunk) == 1 else torch.stack(chunk)
                grad = None
                if group["selector"] == "gradient":
                    grad = chunk[0].grad if len(chunk) == 1 else torch.stack([p.grad for p in chunk])
                gen = self._generator(positions[id(chunk[0])], self.state[chunk[0]]["step"])
                if group["selector"] == "lift":
                    idx = ops.principal_weights(W, k, group["lra_rank"], group["svd"], group["largest"], gen)
                else:
                    idx = select_indices(W, k, selector=group["selector"], lra_rank=group["lra_rank"],
                                         svd=group["svd"], largest=group["largest"], grad=grad, generator=gen)
                idx = idx.reshape(len(chunk), k)
                for p, new_idx in zip(chunk, idx):
                    self._install_selection(p, new_idx.contiguous())

    def _install_selection(self, p: Tensor, new_idx: Tensor) -> None:
        state = self.state[p]
        old_idx = state.get("idx")
        if old_idx is None:
            zeros = torch.zeros(new_idx.numel(), dtype=torch.float32, device=p.device)
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
        else:
            state["exp_avg"], state["exp_avg_sq"] = ops.remap_state(
                old_idx, new_idx, [state["exp_avg"], state["exp_avg_sq"]])
        state["idx"] = new_idx

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lift_seed"] = self.seed
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint; LIFT state keeps its dtypes (fp32 moments, int32 indices).

        Everything is checked against this optimizer's parameters before anything is changed, so a
        checkpoint of another model raises and leaves the optimizer as it was.
        """
        saved_state = state_dict["state"]
        lift_entries = {}
        for gi, (saved_group, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
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
                if s["exp_avg"].numel() != k or s["exp_avg_sq"].numel() != k or (
                        k and int(s["idx"].max()) >= p.numel()):
                    raise ValueError(f"checkpoint at {where} is corrupt: indices and moments disagree")
                lift_entries[pid] = (p, s)
        super().load_state_dict(state_dict)  # validates group and parameter counts
        for p, s in lift_entries.values():
            self.state[p] = {key: (v.to(p.device) if isinstance(v, Tensor) else copy.copy(v))
                             for key, v in s.items()}
        self.seed = int(state_dict.get("lift_seed", self.seed))
