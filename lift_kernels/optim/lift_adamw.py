"""LIFTAdamW: AdamW that trains only each matrix's principal weights (Algorithm 1 of the paper)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as dense_adamw

from .. import ops
from . import grad_hooks
from .applied_grad import applied_grad, has_grad
from .checkpoint import load_lift_state_dict
from . import quant_weights
from .moments import Books, bits_of_state
from .selection import needs_grad, needs_selection, refresh
from .state import check_same_bits, init_dense_state, install_selection, uses_master
from .strategy import LocalStrategy
from .validation import (check_finite_weights, check_flag, check_hyperparameters, check_lift_param,
                         check_seed, check_step_dtypes, check_unchanged_shape)

# Runs outside torch.compile's graphs (eagerly, never traced). torch.optim's own decorator imports
# dynamo at the first call; torch.compiler.disable would import it with lift_kernels.
host_side = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable

# What a copy or pickle of the optimizer carries beyond torch's defaults, state and param_groups.
_CONFIG = ("selection_seed", "selection_group", "sparse_grad", "skip_nonfinite", "skipped_steps")


class LIFTAdamW(torch.optim.Optimizer):
    """AdamW over the principal weights of every LIFT matrix, dense AdamW over everything else.

    A LIFT weight keeps in its state the sorted int32 flat indices ``idx`` of its k selected entries
    and length-k fp32 moments ``exp_avg``/``exp_avg_sq`` (and ``master``, the fp32 values of those
    entries, for half-precision weights); nothing of size m*n (state.py describes every field).
    Restricted to those entries, a step is exactly torch.optim.AdamW's. The selection is made
    before step 1 and re-made before every step t with ``t % update_interval == 0``; entries
    selected before and after keep their moments, new ones start at zero, and bias correction keeps
    the global step t.

    Group options (each may be set per group): ``lift`` (True: every tensor is a LIFT weight and
    must be 2-D; False: dense AdamW; None, the default: 2-D tensors are LIFT weights), ``rank``
    (budget k = min((m+n)*rank, m*n), as LoRA of that rank), ``density`` (k = round(density*m*n),
    overrides rank), ``lra_rank`` (rank of the low-rank filter), ``update_interval``, ``selector``
    ("lift", or the ablations "magnitude", "random", "gradient", "movement": selection.py), ``svd``
    ("fast" or "exact"), ``largest`` (False selects the smallest entries), ``master_weights`` (None:
    fp32 masters of the selected entries for bf16/fp16 weights, so small updates are not rounded
    away), ``moment_bits`` (32: fp32 moments; 8: the moments of the selected entries as block-wise
    scaled uint8 codes, ``ops.sparse_adamw8bit_step``; fixed once a weight has state), and
    torch.optim.AdamW's ``lr``, ``betas`` (floats or one-element tensors), ``eps``,
    ``weight_decay`` and ``maximize``. ``foreach`` and ``fused`` choose the implementation of the
    dense AdamW part as in torch.optim.AdamW (LIFT weights always step with one fused kernel per
    bucket). ``amsgrad``, ``capturable`` and ``differentiable`` are accepted only as False.

    ``sparse_grad=True`` gathers each LIFT weight's gradient at its selected entries in a
    post-accumulate-grad hook and frees the dense gradient at once, so a backward pass holds about
    one weight matrix of dense gradient. The gathered gradient is ``p.grad`` itself (a
    :class:`GatheredGrad` of the weight's shape holding k fp32 values), so torch's
    ``clip_grad_norm_``, GradScaler and ``zero_grad`` act on it, and micro-batches accumulate into
    it (same trajectory as dense mode). In dense mode the same hook zeroes the gradient outside the
    selection, so torch's tools see in both modes the gradient the step applies (applied_grad.py).
    A step whose selector scores the dense gradient ("gradient", "movement") keeps it whole when it
    selects. ``seed`` seeds the randomized SVD and the random selector per (seed, weight, step), so
    a resumed run makes the same selections. ``skip_nonfinite=True`` skips (changing nothing, not
    counting it) a step whose applied gradient has a NaN or inf, and counts it in ``skipped_steps``.

    Copies and pickles (``copy.deepcopy``, ``pickle``, torch.multiprocessing) carry every option and
    the state, and the copy hooks its own weights. ``torch.compile(opt.step)`` compiles the dense
    part; the LIFT part (selection decisions on the host, one fused kernel per bucket) runs outside
    the graph, so steps and refreshes never recompile it.

    Multi-process runs (README, "Multi-GPU training"): this class selects in one process
    (``Strategy = LocalStrategy``); ``lk.LIFTAdamW`` (lift_kernels.distributed) is this optimizer
    on the multi-process strategy: weights that every rank holds whole (DDP) are selected on the
    first rank of ``selection_group`` ("world": the default group once torch.distributed is
    initialized; None: each rank selects alone) and broadcast; DTensor weights sharded on rows
    (FSDP2) are selected collectively, and their state (``idx`` as flat indices into the local
    shard) covers this rank's rows only.
    """

    Strategy = LocalStrategy

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float | Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int = 128, density: float | None = None, lra_rank: int = 64,
                 update_interval: int = 400, selector: str = "lift", svd: str = "fast",
                 largest: bool = True, seed: int = 0, sparse_grad: bool = False,
                 master_weights: bool | None = None, selection_group="world",
                 skip_nonfinite: bool = False, *, moment_bits: int = 32, maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, amsgrad: bool = False, capturable: bool = False,
                 differentiable: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused, rank=rank,
                        density=density, lra_rank=lra_rank, update_interval=update_interval,
                        selector=selector, svd=svd, largest=largest, lift=None, master_weights=master_weights,
                        moment_bits=moment_bits)
        self._seed = check_seed(seed)
        self.sparse_grad = check_flag("sparse_grad", sparse_grad)
        self.skip_nonfinite = check_flag("skip_nonfinite", skip_nonfinite)
        self.selection_group = selection_group  # validated; builds self.strategy
        self.skipped_steps = 0
        self._init_runtime()
        self._built = False
        super().__init__(params, defaults)
        self._built = True
        self._hook_all()

    def _init_runtime(self) -> None:
        """What lives only in this process: never saved, rebuilt by a copy or an unpickle."""
        # Gathered fp32 gradients of row-sharded (FSDP2 DTensor) weights, until step(); the
        # gradients of plain weights are gathered into p.grad itself (a GatheredGrad).
        self._sparse_grads: dict[Tensor, Tensor] = {}
        self._hooks = []
        grad_hooks.remove_when_collected(self, self._hooks)
        self._books = Books()  # the 8-bit moments' code books, once per device
        self._counting = quant_weights.Counting()  # 0..U-1 for quantized layers' whole-delta selections

    def _hook_all(self) -> None:
        """Hook every LIFT weight that trains and make this optimizer the one whose hooks act on it."""
        for p in self.lift_parameters():
            self._hook(p)
        for p in self.lift_parameters():
            grad_hooks.claim(self, p)

    def _hook(self, p: Tensor) -> None:
        if p.requires_grad:
            grad_hooks.install(self, p, self._hooks)
        if quant_weights.is_quant(p):
            quant_weights.install_forward_hook(self, p, self._hooks)

    # ----------------------------------------------------------------------------- copies, pickles
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if self.selection_group not in ("world", None):
            raise TypeError("a LIFTAdamW whose selection_group is a ProcessGroup cannot be copied or pickled "
                            "(process groups belong to one process); set opt.selection_group = 'world' "
                            "first, and back in the copy")
        quant = [self._name_of(p) for p in self.lift_parameters() if quant_weights.is_quant(p)]
        if quant:
            raise TypeError(f"a LIFTAdamW training quantized layers ({quant[0]}, ...) cannot be copied or pickled: "
                            "a copy's deltas would be detached from their layers; save opt.state_dict() "
                            "with the model's state_dict() instead")
        state["lift_config"] = {key: getattr(self, key) for key in _CONFIG}
        return state

    def __setstate__(self, state: dict) -> None:
        config = state.pop("lift_config", None)
        super().__setstate__(state)
        for group in self.param_groups:  # groups of older checkpoints lack the newer options
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if config is None:  # torch's load_state_dict refreshing state and param_groups of a live optimizer
            return
        self._seed = config["selection_seed"]
        for key in _CONFIG[1:]:
            setattr(self, key, config[key])
        self._init_runtime()
        self._built = True
        self._hook_all()

    # ----------------------------------------------------------------------------- public surface
    # What training stacks and distributed strategies (lift_kernels.distributed) may use.
    @property
    def selection_group(self):
        return self._selection_group

    @selection_group.setter
    def selection_group(self, value) -> None:
        self.strategy = self.Strategy(value)  # raises on a bad value, leaving the old one
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
        """The optimizer's next step: one more than the most steps any LIFT weight has taken (a
        weight left without gradients for a while has taken fewer), 1 before any step."""
        return 1 + max((self.state[p].get("step", 0) for p in self.lift_parameters() if p in self.state), default=0)

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        named = [g for g in self.param_groups if "param_names" in g]
        if named and isinstance(param_group, dict) and "param_names" not in param_group:
            # torch requires all groups with names or none; a group added as torch documents it,
            # {"params": [w]}, after named ones (lift_param_groups) gets positional names
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            if not any(isinstance(p, tuple) for p in params):
                gi = len(self.param_groups)
                param_group = {**param_group, "params": params,
                               "param_names": [f"param_groups[{gi}]['params'][{i}]" for i in range(len(params))]}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        gi = len(self.param_groups) - 1
        lift = [(p, name or f"param_groups[{gi}]['params'][{i}]")
                for i, (p, name) in enumerate(zip(group["params"], names)) if self._is_lift(group, p)]
        try:  # everything checked before any hook is installed
            check_hyperparameters(group)
            if group["lift"] is False:
                for i, p in enumerate(group["params"]):
                    if quant_weights.is_quant(p):
                        raise ValueError(f"{names[i] or f'param_groups[{gi}][{i}]'} is the sparse delta of a "
                                         "quantized layer, which only LIFT trains; put it in a group with "
                                         "lift=True or lift unset")
            for p, name in lift:
                check_lift_param(p, name, group, self.sparse_grad)
                if group["moment_bits"] == 8 and self.strategy.is_dtensor(p):
                    # block scales cover runs of a rank's own entries, which the distributed
                    # checkpoint could not reshard onto another number of ranks
                    raise ValueError(f"moment_bits=8 is not supported on FSDP2-sharded (DTensor) weights "
                                     f"such as {name}; use moment_bits=32 for sharded weights")
        except ValueError:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        if self._built:  # a group added later; __init__ hooks its groups' weights at its end
            for p, _ in lift:
                self._hook(p)
                grad_hooks.claim(self, p)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # Only the gathered gradients of sharded (DTensor) weights live outside p.grad, where
        # GradScaler cannot unscale them; it then hands the scale to step(), which refuses it.
        return self.sparse_grad and any(self.strategy.is_dtensor(p) for p in self.lift_parameters())

    @staticmethod
    def _is_lift(group: dict, p: Tensor) -> bool:
        return group["lift"] is True or (group["lift"] is None and (p.dim() == 2 or quant_weights.is_quant(p)))

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

    # ----------------------------------------------------------------------------- selection
    def _select_due(self, group: dict, params: list[Tensor], in_forward: bool = False) -> None:
        """The one entry to selection: select the LIFT weights of ``params`` that are due before
        their next step. step() calls it, and so, earlier, do clip_grad_norm_ and the gradient
        hooks (through ``_select_due_of``) so that they act on the entries the step will update.
        Quantized layers' deltas select earlier still, in their forward pre-hook (``in_forward``:
        quant_weights.py says why); one found due anywhere else missed it."""
        due = []
        for p in params:
            state = self.state[p]
            check_unchanged_shape(p, state, self._name_of)
            if quant_weights.is_quant(p) != in_forward:
                if not in_forward and needs_selection(state, group, state.get("step", 0) + 1) and has_grad(self, p):
                    raise RuntimeError(
                        f"{self._name_of(p)} (a quantized layer's delta) is due for a selection, which is made "
                        "before its layer's forward pass, but it has a gradient from a forward pass made "
                        "without that selection (before this optimizer was built or loaded?); call "
                        "zero_grad() and run forward and backward again")
                continue
            if needs_selection(state, group, state.get("step", 0) + 1):
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
            by_step[self.state[p].get("step", 0) + 1].append(p)
        positions = {id(p): i for i, p in enumerate(self.lift_parameters())}
        for t, ps in by_step.items():
            for p, idx in refresh(group, ps, t, positions, self._seed, grads, self.strategy):
                state, books = self.state[p], self._moment_books(group, p)
                if in_forward:
                    quant_weights.install_quant_selection(
                        state, p, idx, lambda slots: install_selection(state, p, p, slots, False, t, books),
                        self._counting)
                else:
                    install_selection(state, p, self.strategy.local(p), idx, uses_master(group, p), t, books)

    def _moment_books(self, group: dict, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """The code books on ``p``'s device for a group with 8-bit moments, else None."""
        return self._books.on(self.strategy.local(p).device) if group["moment_bits"] == 8 else None

    def _select_due_of(self, p: Tensor) -> None:
        """From a gradient hook: if ``p`` is due, select every due weight of its group at once,
        batched exactly as step() would (a selection reads only the weights, which stay as they are
        until step(), so it equals step()'s)."""
        group, state = self._group_of(p), self.state[p]
        if needs_selection(state, group, state.get("step", 0) + 1):
            self._select_due(group, self._lift_of(group))

    # A selection (host decisions, a grown delta) is never traced into a compiled forward, and records
    # nothing for autograd: inside an activation-checkpointed block the recompute (which does not
    # select again) must save exactly what the forward saved.
    @host_side
    @torch.no_grad()
    def _before_quant_forward(self, p: Tensor, layer) -> None:
        """Before a forward of quantized ``layer`` (whose delta is ``p``): select its group's quantized
        layers if due, and show the layer the slots whose gradient its backward forms."""
        if grad_hooks.owner(p) is not self:
            return  # a newer LIFTAdamW on the same layer acts on it
        group, state = self._group_of(p), self.state[p]
        if needs_selection(state, group, state.get("step", 0) + 1):
            self._select_due(group, [q for q in self._lift_of(group) if quant_weights.is_quant(q)], in_forward=True)
        layer.selected = state["idx"]

    def _waits_for_grad(self, p: Tensor) -> bool:
        """Whether ``p`` selects before its next step by scoring its gradient: then that step keeps
        the dense gradient and selects in step(), once the gradient is complete."""
        group, state = self._group_of(p), self.state[p]
        return needs_grad(group) and needs_selection(state, group, state.get("step", 0) + 1)

    # ----------------------------------------------------------------------------- gradients
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
            self._select_due(group, [p for p in self._lift_of(group) if has_grad(self, p)])
            for p in group["params"]:
                if not has_grad(self, p):
                    continue
                applied = applied_grad(self, p)
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
        dense_steps = self._plan_dense_steps()
        if dense_steps is None:
            return loss
        for tensors, options in dense_steps:  # what torch.compile traces: torch's functional AdamW
            dense_adamw(*tensors, **options)
        self._lift_steps()
        return loss

    @host_side
    def _plan_dense_steps(self) -> list[tuple[list, dict]] | None:
        """None if skip_nonfinite skips this step (counted, nothing else changes); else, per group,
        the tensor lists and options of its dense AdamW step. Host-side so that a compiled step never
        holds a LIFT weight (its gradient may be a GatheredGrad, and its state is read on the host)."""
        for group in self.param_groups:  # before the dense part steps: nothing changes on a refusal
            for p in self._lift_of(group):
                check_same_bits(self.state.get(p, {}), group["moment_bits"], self._name_of(p))
        if self.skip_nonfinite and not self._grads_finite():
            self.skipped_steps += 1
            return None
        plan = []
        for group in self.param_groups:
            params = [p for p in group["params"] if not self._is_lift(group, p) and p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LIFTAdamW does not take torch.sparse gradients")
            states = [init_dense_state(self.state[p], p, on_device=bool(group["fused"])) for p in params]
            beta1, beta2 = group["betas"]
            tensors = [params, [p.grad for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states]]
            plan.append((tensors, dict(amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                                       weight_decay=group["weight_decay"], eps=group["eps"],
                                       maximize=group["maximize"], foreach=group["foreach"],
                                       fused=group["fused"])))
        return plan

    def _grads_finite(self) -> bool:
        """Whether every gradient this step would apply is finite (one host sync; agreed on by all
        ranks that share parameters, so that they all skip or all step)."""
        flags, owners = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if has_grad(self, p):
                    flags.append(torch.isfinite(self.strategy.local(applied_grad(self, p))).all())
                    owners.append(p)
        if not flags:
            return True
        ok = torch.stack([f.to(flags[0].device) for f in flags]).all().to(torch.int32)
        return self.strategy.all_finite(ok, owners)

    # The LIFT part decides on the host (which weights select, which step each is at) and calls one
    # fused kernel per bucket: traced by torch.compile it would be specialized on every step's int.
    @host_side
    def _lift_steps(self) -> None:
        for group in self.param_groups:
            lift = [p for p in self._lift_of(group) if has_grad(self, p)]
            if lift:
                self._lift_step(group, lift)
        self._sparse_grads.clear()

    def _lift_step(self, group: dict, params: list[Tensor]) -> None:
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            raise RuntimeError("LIFTAdamW does not take torch.sparse gradients")
        check_step_dtypes(params, self._name_of)  # before any state changes
        if float(group["weight_decay"]) != 0.0 and any(quant_weights.is_quant(p) for p in params):
            raise ValueError("weight_decay must stay 0 in a group with quantized layers' deltas (the frozen "
                             "base cannot decay); nothing was changed")
        self._select_due(group, params)
        beta1, beta2 = (float(b) for b in group["betas"])
        maximize = group["maximize"]
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        grads, local = {}, self.strategy.local
        for p in params:
            state = self.state[p]
            grads[p] = self._step_grad(p, maximize)
            dense = grads[p].shape == local(p).shape
            key = (p.device, p.dtype, state["step"] + 1, "master" in state, dense, bits_of_state(state))
            buckets[key].append(p)
        for (_, _, step, has_master, _, bits), ps in buckets.items():
            states = [self.state[p] for p in ps]
            hyper = dict(step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            masters = [s["master"] for s in states] if has_master else None
            # on the local rows of sharded weights, with their local idx
            weights, step_grads, idxs = [local(p) for p in ps], [grads[p] for p in ps], [s["idx"] for s in states]
            if bits == 8:
                exp_avg_book, exp_avg_sq_book = self._books.on(weights[0].device)
                ops.sparse_adamw8bit_step(
                    weights, step_grads, idxs, [s["exp_avg_codes"] for s in states],
                    [s["exp_avg_scales"] for s in states], [s["exp_avg_sq_codes"] for s in states],
                    [s["exp_avg_sq_scales"] for s in states], masters, exp_avg_book=exp_avg_book,
                    exp_avg_sq_book=exp_avg_sq_book, **hyper)
            else:
                ops.sparse_adamw_step(weights, step_grads, idxs, [s["exp_avg"] for s in states],
                                      [s["exp_avg_sq"] for s in states], masters, **hyper)
            for s in states:
                s["step"] = step

    def _step_grad(self, p: Tensor, maximize: bool) -> Tensor:
        """The gradient handed to the kernel (this process's part of it). ``maximize`` ascends:
        the kernel gets the negated selected entries, gathered (k values: negation is exact, and
        gathered and dense gradients take the same arithmetic in the kernel)."""
        g = self.strategy.local(applied_grad(self, p))
        if not maximize:
            return g
        if g.shape == self.strategy.local(p).shape:
            g = g.reshape(-1).index_select(0, self.state[p]["idx"].long())
        return g.float().neg()

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lift_seed"] = self._seed
        sd["lift_skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint; LIFT state keeps its dtypes (fp32 moments and masters, int32 indices).

        Load-state-dict pre-hooks run first and the checkpoint they return is what is checked and
        loaded; everything is checked against this optimizer's parameters before anything changes
        (a checkpoint of another model raises and leaves the optimizer as it was); post-hooks run
        last and see the LIFT state as loaded.
        """
        load_lift_state_dict(self, state_dict, super().load_state_dict)
