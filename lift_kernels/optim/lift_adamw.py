"""LIFTAdamW: AdamW that trains only each matrix's principal weights (Algorithm 1 of the paper)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as dense_adamw

from .. import ops
from . import grad_hooks
from .checkpoint import load_lift_state_dict
from .gathered_grad import GatheredGrad
from .selection import needs_grad, needs_selection, refresh
from .strategy import make_strategy
from .validation import (check_finite_weights, check_hyperparameters, check_lift_param, check_seed,
                         check_unchanged_shape)


class LIFTAdamW(torch.optim.Optimizer):
    """AdamW over the principal weights of every LIFT matrix, dense AdamW over everything else.

    A LIFT weight keeps in its state the sorted int32 flat indices ``idx`` of its k selected entries
    and length-k fp32 moments ``exp_avg``/``exp_avg_sq`` (and ``master``, the fp32 values of those
    entries, for half-precision weights); nothing of size m*n. Restricted to those entries, a step
    is exactly torch.optim.AdamW's. The selection is made before step 1 and re-made before every
    step t with ``t % update_interval == 0``; entries selected before and after keep their moments,
    new ones start at zero, and bias correction keeps the global step t.

    Group options (each may be set per group): ``lift`` (True: every tensor is a LIFT weight and
    must be 2-D; False: dense AdamW; None, the default: 2-D tensors are LIFT weights), ``rank``
    (budget k = min((m+n)*rank, m*n), as LoRA of that rank), ``density`` (k = round(density*m*n),
    overrides rank), ``lra_rank`` (rank of the low-rank filter), ``update_interval``, ``selector``
    ("lift", or the ablations "magnitude", "random", "gradient", "movement": selection.py), ``svd`` ("fast" or "exact"),
    ``largest`` (False selects the smallest entries) and ``master_weights`` (None: fp32 masters of
    the selected entries for bf16/fp16 weights, so small updates are not rounded away).

    ``sparse_grad=True`` gathers each LIFT weight's gradient at its selected entries in a
    post-accumulate-grad hook and frees the dense gradient at once, so a backward pass holds about
    one weight matrix of dense gradient. The gathered gradient is ``p.grad`` itself (a
    :class:`GatheredGrad` of the weight's shape holding k fp32 values), so torch's
    ``clip_grad_norm_``, GradScaler and ``zero_grad`` act on it, and micro-batches accumulate into
    it (same trajectory as dense mode). In dense mode the same hook zeroes the gradient outside the
    selection, so torch's tools see in both modes the gradient the step applies. A step whose
    selector scores the dense gradient ("gradient", "movement") keeps it whole when it selects.
    ``seed`` seeds the randomized SVD and the random selector per (seed, weight, step), so a resumed
    run makes the same selections. ``skip_nonfinite=True`` skips (changing nothing, not counting it)
    a step whose applied gradient has a NaN or inf, and counts it in ``skipped_steps``.

    Multi-process runs (README, "Multi-GPU training"): weights that every rank holds whole (DDP) are selected
    on the first rank of ``selection_group`` ("world": the default group once torch.distributed is
    initialized; None: each rank selects alone) and broadcast; DTensor weights sharded on rows
    (FSDP2) are selected collectively, and their state (``idx`` as flat indices into the local
    shard) covers this rank's rows only. The optimizer reaches processes only through its strategy
    (strategy.py), which lift_kernels.distributed provides.

    ``state[p]`` of a LIFT weight holds ``step`` (an int), ``shape``, ``idx``, ``exp_avg``,
    ``exp_avg_sq``, ``master`` (when used) and ``selected_at`` (the step its selection was made
    for); that of a dense parameter is torch.optim.AdamW's (``step`` a tensor, dense moments).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float | Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int = 128, density: float | None = None, lra_rank: int = 64,
                 update_interval: int = 400, selector: str = "lift", svd: str = "fast",
                 largest: bool = True, seed: int = 0, sparse_grad: bool = False,
                 master_weights: bool | None = None, selection_group="world",
                 skip_nonfinite: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        density=density, lra_rank=lra_rank, update_interval=update_interval,
                        selector=selector, svd=svd, largest=largest, lift=None,
                        master_weights=master_weights)
        self._seed = check_seed(seed)
        for flag, value in (("sparse_grad", sparse_grad), ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        self.selection_group = selection_group  # validated; builds self.strategy
        self.sparse_grad = sparse_grad
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        # Gathered fp32 gradients of row-sharded (FSDP2 DTensor) weights, until step(); the
        # gradients of plain weights are gathered into p.grad itself (a GatheredGrad).
        self._sparse_grads: dict[Tensor, Tensor] = {}
        self._hooks = []
        grad_hooks.remove_when_collected(self, self._hooks)
        self._built = False
        super().__init__(params, defaults)
        self._built = True
        for p in self.lift_parameters():
            grad_hooks.claim(self, p)

    # ----------------------------------------------------------------------------- public surface
    # What training stacks and distributed strategies (lift_kernels.distributed) may use.
    @property
    def selection_group(self):
        return self._selection_group

    @selection_group.setter
    def selection_group(self, value) -> None:
        self.strategy = make_strategy(value)  # raises on a bad value, leaving the old one
        self._selection_group = value

    @property
    def selection_seed(self) -> int:
        """The seed of every selection's random stream (saved in checkpoints)."""
        return self._seed

    @selection_seed.setter
    def selection_seed(self, value: int) -> None:
        self._seed = check_seed(value)

    def lift_parameters(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if self._is_lift(g, p)]

    def is_lift(self, p: Tensor) -> bool:
        """Whether ``p`` is a LIFT weight of this optimizer (False for dense or foreign parameters)."""
        group = self._group_of(p)
        return group is not None and self._is_lift(group, p)

    def selected_indices(self, p: Tensor) -> Tensor | None:
        """The sorted int32 flat indices a LIFT weight's next step updates (None before its first
        selection, and for other parameters)."""
        return self.state.get(p, {}).get("idx") if self.is_lift(p) else None

    def selects_before_next_step(self, p: Tensor) -> bool:
        """Whether LIFT weight ``p`` gets a new selection before its next step (whose gradient
        must then be whole: the selection may score it, and the step applies it at new entries)."""
        if not self.is_lift(p):
            return False
        state = self.state.get(p, {})
        return needs_selection(state, self._group_of(p), state.get("step", 0) + 1)

    def next_step(self) -> int:
        """The step the gradients of this backward pass are for (1 before any step)."""
        for p in self.lift_parameters():
            state = self.state.get(p)
            if state and "step" in state:
                return int(state["step"]) + 1
        return 1

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        gi = len(self.param_groups) - 1
        lift = [(p, name or f"param_groups[{gi}]['params'][{i}]")
                for i, (p, name) in enumerate(zip(group["params"], names)) if self._is_lift(group, p)]
        try:  # everything checked before any hook is installed
            check_hyperparameters(group)
            for p, name in lift:
                check_lift_param(p, name, group, self.sparse_grad)
        except ValueError:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        for p, _ in lift:
            if p.requires_grad:
                grad_hooks.install(self, p, self._hooks)
                if self._built:  # a group added later; __init__ claims its groups' weights at its end
                    grad_hooks.claim(self, p)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # Only the gathered gradients of sharded (DTensor) weights live outside p.grad, where
        # GradScaler cannot unscale them; it then hands the scale to step(), which refuses it.
        return self.sparse_grad and any(self.strategy.is_dtensor(p) for p in self.lift_parameters())

    @staticmethod
    def _is_lift(group: dict, p: Tensor) -> bool:
        return group["lift"] is True or (group["lift"] is None and p.dim() == 2)

    def _lift_of(self, group: dict) -> list[Tensor]:
        return [p for p in group["params"] if self._is_lift(group, p)]

    def _group_of(self, p: Tensor) -> dict | None:
        return next((g for g in self.param_groups if any(q is p for q in g["params"])), None)

    def _name_of(self, p: Tensor) -> str:
        for gi, g in enumerate(self.param_groups):
            for i, q in enumerate(g["params"]):
                if q is p:
                    names = g.get("param_names")
                    return names[i] if names else f"param_groups[{gi}]['params'][{i}]"
        return "a parameter not in this optimizer"

    def _init_state(self, group: dict, p: Tensor) -> dict:
        """The one place state is born, lazily (as torch.optim's _init_group). A LIFT weight's
        length-k vectors are sized by its first selection (selection.install_selection); a dense
        parameter's state is torch.optim.AdamW's, whose functional step takes a tensor ``step``."""
        state = self.state[p]
        if state:
            return state
        if self._is_lift(group, p):
            state["step"] = 0
            state["shape"] = tuple(p.shape)
        else:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # ----------------------------------------------------------------------------- selection
    def _select_due(self, group: dict, params: list[Tensor]) -> None:
        """The one entry to selection: select the LIFT weights of ``params`` that are due before
        their next step. step() calls it, and so, earlier, do clip_grad_norm_ and the gradient
        hooks (through ``_select_due_of``) so that they act on the entries the step will update."""
        due = []
        for p in params:
            state = self._init_state(group, p)
            check_unchanged_shape(p, state, self._name_of)
            if needs_selection(state, group, state["step"] + 1):
                due.append(p)
        if not due:
            return
        check_finite_weights(due, self._name_of, self.strategy.local)
        grads = None
        if needs_grad(group):
            grads = {p: p.grad for p in due}
            if any(g is None for g in grads.values()):
                raise RuntimeError(f"selector={group['selector']!r} needs the dense gradient of the selecting step")
        by_step = defaultdict(list)
        for p in due:
            by_step[self.state[p]["step"] + 1].append(p)
        positions = {id(p): i for i, p in enumerate(self.lift_parameters())}
        for t, ps in by_step.items():
            refresh(group, ps, t, positions, self._seed, self.state, grads, self.strategy)

    def _select_due_of(self, p: Tensor) -> None:
        """From a gradient hook: if ``p`` is due, select every due weight of its group at once,
        batched exactly as step() would (a selection reads only the weights, which stay as they are
        until step(), so it equals step()'s)."""
        group, state = self._group_of(p), self.state[p]
        if not state or needs_selection(state, group, state["step"] + 1):
            self._select_due(group, self._lift_of(group))

    def _waits_for_grad(self, p: Tensor) -> bool:
        """Whether ``p`` selects before its next step by scoring its gradient: then that step keeps
        the dense gradient and selects in step(), once the gradient is complete."""
        group, state = self._group_of(p), self.state[p]
        return needs_grad(group) and needs_selection(state, group, state.get("step", 0) + 1)

    # ----------------------------------------------------------------------------- gradients
    def _has_grad(self, p: Tensor) -> bool:
        return p.grad is not None or p in self._sparse_grads

    @torch.no_grad()
    def _before_accumulate(self, p: Tensor) -> None:
        """Hook before a backward adds to p.grad: select if due, then make sure a gathered p.grad
        belongs to the current selection."""
        if self.strategy.is_dtensor(p) or self._waits_for_grad(p):
            return  # DTensor weights select after accumulation; gradient scorers in step()
        if self.strategy.replicated():
            if self.sparse_grad:
                raise RuntimeError("LIFTAdamW(sparse_grad=True) gathers gradients before DDP averages them; "
                                   "under DDP use sparse_grad=False with lk.sparse_allreduce_hook(opt)")
            return  # DDP: lk.sparse_allreduce_hook sends (and keeps) only the selected entries
        self._select_due_of(p)
        check_unchanged_shape(p, self.state[p], self._name_of)
        g = p.grad
        if isinstance(g, GatheredGrad) and not self._current(g, p):
            if g.values.count_nonzero():
                raise RuntimeError(
                    f"the gradient of {self._name_of(p)} was gathered at the selection before a refresh "
                    "and never cleared; call zero_grad() after every step() in sparse_grad=True mode")
            p.grad = None  # zero_grad(set_to_none=False) left zeros at the old entries

    @torch.no_grad()
    def _after_accumulate(self, p: Tensor) -> None:
        """Sparse mode: gather p.grad at the selected entries (freeing the dense gradient); dense
        mode: zero it outside them, so torch's tools see the gradient the step applies."""
        if self.strategy.is_dtensor(p):
            if self.sparse_grad:
                self._gather_sharded(p)
            return
        if p.grad is None or isinstance(p.grad, GatheredGrad) or self._waits_for_grad(p):
            return
        if self.strategy.replicated() or "idx" not in self.state[p]:
            return
        idx = self.state[p]["idx"].long()
        if self.sparse_grad:
            p.grad = GatheredGrad(p.grad.reshape(-1).index_select(0, idx).float(), self.state[p]["idx"], p)
        else:
            if not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            flat = p.grad.view(-1)
            kept = flat.index_select(0, idx)
            flat.zero_()
            flat.index_copy_(0, idx, kept)

    def _gather_sharded(self, p: Tensor) -> None:
        """Sparse mode on a DTensor (FSDP2) weight: keep grad[idx] of the local rows in fp32."""
        if self._waits_for_grad(p):
            return  # step() needs the whole accumulated gradient
        self._select_due_of(p)
        if p.grad is None:
            return
        g = self.strategy.local(p.grad).view(-1).index_select(0, self.state[p]["idx"].long()).float()
        buf = self._sparse_grads.get(p)
        self._sparse_grads[p] = g if buf is None else buf.add_(g)
        p.grad = None

    def _current(self, g: GatheredGrad, p: Tensor) -> bool:
        idx = self.state[p].get("idx")
        return idx is not None and (g.idx is idx or (g.idx.shape == idx.shape and torch.equal(g.idx, idx)))

    def _applied_grad(self, p: Tensor) -> Tensor:
        """The gradient the step applies: gathered (sparse mode) or the dense one."""
        if p in self._sparse_grads:
            return self._sparse_grads[p]
        g = p.grad
        if isinstance(g, GatheredGrad):
            if not self._current(g, p):
                raise RuntimeError(
                    f"the gradient of {self._name_of(p)} was gathered at another selection than this "
                    "optimizer's (another LIFTAdamW on the same weights, a load_state_dict after backward, "
                    "or a refresh without zero_grad()); call zero_grad() and run backward again")
            return g.values
        return g

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._sparse_grads.clear()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> Tensor:
        """Clip, like torch.nn.utils.clip_grad_norm_, the gradient this optimizer is about to apply.

        The norm is taken over the selected entries of every LIFT weight (gathered or dense) and all
        entries of dense parameters, so it is the same in sparse- and dense-gradient mode, and the
        same as torch's clip_grad_norm_ over the parameters' p.grad (which the hooks gather or mask
        to the selection) except for a selector that scores the gradient on a selecting step, where
        p.grad is still whole. Weights due for selection are selected first (with the same result
        step() would get). Returns the total norm.
        """
        parts, scaled, owners = [], [], []
        for group in self.param_groups:
            self._select_due(group, [p for p in self._lift_of(group) if self._has_grad(p)])
            for p in group["params"]:
                if not self._has_grad(p):
                    continue
                applied = self._applied_grad(p)
                g = self.strategy.local(applied)  # a shard's rows: the strategy adds up their norms
                if self._is_lift(group, p) and applied.shape == p.shape:
                    parts.append(g.view(-1).index_select(0, self.state[p]["idx"].long()))
                else:
                    parts.append(g)
                scaled.append(g)
                owners.append(p)
        if not parts:
            return torch.tensor(0.0)
        total = self.strategy.total_norm(parts, owners, norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite")
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in scaled:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise NotImplementedError(
                "fp16 GradScaler cannot unscale or inf-check the gradients that sparse_grad=True "
                "gathers for sharded (FSDP2) weights; use bf16 autocast (no scaler needed) or "
                "LIFTAdamW(..., sparse_grad=False)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_nonfinite and not self._grads_finite():
            self.skipped_steps += 1  # nothing else changes: the step is not counted either
            return loss
        for group in self.param_groups:
            lift, dense = [], []
            for p in group["params"]:
                if not self._has_grad(p):
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("LIFTAdamW does not take torch.sparse gradients")
                (lift if self._is_lift(group, p) else dense).append(p)
            if dense:
                self._dense_step(group, dense)
            if lift:
                self._lift_step(group, lift)
        self._sparse_grads.clear()
        return loss

    def _grads_finite(self) -> bool:
        """Whether every gradient this step would apply is finite (one host sync; agreed on by all
        ranks that share parameters, so that they all skip or all step)."""
        flags, owners = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if self._has_grad(p):
                    flags.append(torch.isfinite(self.strategy.local(self._applied_grad(p))).all())
                    owners.append(p)
        if not flags:
            return True
        ok = torch.stack([f.to(flags[0].device) for f in flags]).all().to(torch.int32)
        return self.strategy.all_finite(ok, owners)

    def _dense_step(self, group: dict, params: list[Tensor]) -> None:
        states = [self._init_state(group, p) for p in params]
        beta1, beta2 = group["betas"]
        dense_adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
                    beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                    eps=group["eps"], maximize=False)

    def _lift_step(self, group: dict, params: list[Tensor]) -> None:
        self._select_due(group, params)
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            state["step"] += 1
            g = self._applied_grad(p)
            buckets[(p.device, p.dtype, state["step"], "master" in state, g.shape == p.shape)].append(p)
        local = self.strategy.local
        for (_, _, step, has_master, _), ps in buckets.items():
            states = [self.state[p] for p in ps]
            ops.sparse_adamw_step(  # on the local rows of sharded weights, with their local idx
                [local(p) for p in ps], [local(self._applied_grad(p)) for p in ps],
                [s["idx"] for s in states],
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["master"] for s in states] if has_master else None, step=step,
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"])

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lift_seed"] = self._seed
        sd["lift_skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint; LIFT state keeps its dtypes (fp32 moments and masters, int32 indices).

        Everything is checked against this optimizer's parameters before anything changes, so a
        checkpoint of another model raises and leaves the optimizer as it was.
        """
        load_lift_state_dict(self, state_dict, super().load_state_dict)
        self._seed = int(state_dict["lift_seed"])
        self.skipped_steps = int(state_dict.get("lift_skipped_steps", 0))
