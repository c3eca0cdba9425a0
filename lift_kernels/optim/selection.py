"""Which entries of a weight LIFT trains: every selector, the budget, and making a selection.

A selector is one scoring function registered under its name with ``@selector``: it reads a
:class:`Matrices` (a stack of same-shaped weights, or this process's rows of them, with their
gradients and the selection's random stream) and returns a score per entry; the k best scores of
each matrix are selected (the largest, or with ``largest=False`` the smallest). Adding a selector is
one such function (plus its test). The single-process path ranks the scores of whole matrices with
``topk_flat_indices``; a strategy that splits matrices over processes (lift_kernels.distributed, on
FSDP2 row shards) calls the same functions on its rows and ranks collectively.

``refresh`` makes the selections of weights due at one step, chunk by chunk (matrices of one shape
together); the optimizer installs them in the weights' state (state.py).
"""
from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from .. import ops
from ..reference import exact_lowrank, fast_lowrank, topk_flat_indices
from ..reference.select import SVD_MODES, full_rank
from .cpu_threads import run_jobs
from .quant_weights import matrix_numel, matrix_shape, selection_matrix

# Matrices of one shape are selected together; a bucket's stacked copy is kept under this many bytes
# (at least one matrix) so a refresh never doubles the memory of the weights.
SELECT_BUCKET_BYTES = 1 << 28


def _whole_lowrank(W: Tensor, rank: int, svd: str, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    return exact_lowrank(W, rank) if svd == "exact" else fast_lowrank(W, rank, generator=generator)


@dataclass
class Matrices:
    """What a selector scores: ``W`` (m, n) or a stack (b, m, n), or the block ``rows`` of them that
    this process holds; ``grad`` their dense gradients (selectors with ``needs_grad``), ``shape`` the
    whole stack's shape, ``lowrank(A, rank, svd, generator)`` rank-r factors (L of these rows, R)."""

    W: Tensor
    grad: Tensor | None
    group: dict
    generator: torch.Generator
    shape: tuple[int, ...] = ()
    rows: slice = field(default_factory=lambda: slice(None))
    lowrank: Callable[..., tuple[Tensor, Tensor]] = _whole_lowrank

    def __post_init__(self):
        self.shape = self.shape or tuple(self.W.shape)

    def uniform(self) -> Tensor:
        """U(0, 1) scores drawn for the whole stack on the CPU (the same stream on every process and
        device), restricted to these rows."""
        full = torch.rand(self.shape, generator=self.generator, device="cpu")
        return full[..., self.rows, :].to(self.W.device)


@dataclass(frozen=True)
class Selector:
    score: Callable[[Matrices], Tensor]
    needs_grad: bool = False  # scores the dense gradient of the selecting step (kept whole for it)
    uses_largest: bool = True  # False: the k largest scores whatever ``largest`` says (random)
    # whole matrices: one op that makes the same selection (lift: ops.principal_weights, whose
    # kernels fuse the low-rank filter and the top-k); row blocks always rank ``score``
    fused: Callable[[Tensor, int, dict, torch.Generator], Tensor] | None = None


SELECTORS: dict[str, Selector] = {}


def selector(name: str, **options):
    """Register ``score`` as the selector ``name`` (options: see Selector)."""
    def register(score: Callable[[Matrices], Tensor]) -> Callable[[Matrices], Tensor]:
        SELECTORS[name] = Selector(score, **options)
        return score
    return register


def _principal_weights_op(W: Tensor, k: int, group: dict, generator: torch.Generator) -> Tensor:
    return ops.principal_weights(W, k, group["lra_rank"], group["svd"], group["largest"], generator)


@selector("lift", fused=_principal_weights_op)
def lift(x: Matrices) -> Tensor:
    """|W'|, W' the best rank-``lra_rank`` approximation of W: the principal weights (|W| itself
    when ``lra_rank`` reaches min(m, n))."""
    if full_rank(x.shape, x.group["lra_rank"]):
        return x.W.abs()
    L, R = x.lowrank(x.W, x.group["lra_rank"], x.group["svd"], x.generator)
    return (L @ R).abs_()


@selector("magnitude")
def magnitude(x: Matrices) -> Tensor:
    return x.W.abs()


@selector("random", uses_largest=False)
def random(x: Matrices) -> Tensor:
    return x.uniform()


@selector("gradient", needs_grad=True)
def gradient(x: Matrices) -> Tensor:
    return x.grad.abs()


@selector("movement", needs_grad=True)
def movement(x: Matrices) -> Tensor:
    """First-order movement pruning (Sanh et al. 2020): -W * dL/dW, the entries that training moves
    away from zero, from the gradient of the selecting step."""
    return -(x.W.float() * x.grad.float())


# ------------------------------------------------------------------------------------ budget, checks
def budget(shape: tuple[int, int], rank: int, density: float | None) -> int:
    """Selected entries per matrix: LoRA's count at ``rank``, or ``density`` of the entries."""
    m, n = shape
    if density is not None:
        return int(round(density * m * n))
    return min((m + n) * rank, m * n)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not a rank


def real(v) -> float | None:
    """v as a float if it is a real number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def check_selection(group: dict, shape: tuple[int, int] | None = None, name: str = "") -> None:
    """The selection options of a group (and, given a weight's shape, whether they fit it): the one
    check of them, for the optimizer's groups and for loaded checkpoints. Comparisons are written so
    that NaN fails them."""
    if not is_int(group["rank"]) or group["rank"] < 1:
        raise ValueError(f"rank must be an integer >= 1 (the LoRA-equivalent budget), got {group['rank']!r}")
    density = group["density"]
    if density is not None and (real(density) is None or not 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1] or None (then rank sets the budget), got {density!r}")
    if not is_int(group["lra_rank"]) or group["lra_rank"] < 1:
        raise ValueError(f"lra_rank must be an integer >= 1, got {group['lra_rank']!r}")
    if not is_int(group["update_interval"]) or group["update_interval"] < 1:
        raise ValueError(f"update_interval must be an integer >= 1 (steps between re-selections), "
                         f"got {group['update_interval']!r}")
    if not isinstance(group["largest"], bool):
        raise ValueError(f"largest must be True or False, got {group['largest']!r}")
    if group["selector"] not in SELECTORS:
        raise ValueError(f"selector must be one of {tuple(SELECTORS)}, got {group['selector']!r}")
    if group["svd"] not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {group['svd']!r}")
    if shape is None:
        return
    m, n = shape
    if budget(shape, group["rank"], group["density"]) == 0:
        raise ValueError(f"density={group['density']} selects round({group['density']}*{m}*{n}) = 0 entries "
                         f"of {name} (shape {m}x{n}), which would never be trained; raise density, or "
                         "put that weight in a group with lift=False or leave it out")


def needs_grad(group: dict) -> bool:
    return SELECTORS[group["selector"]].needs_grad


# ------------------------------------------------------------------------------------ making selections
def selection_generator(seed: int, position: int, step: int) -> torch.Generator:
    """The random stream of one selection, from (seed, weight's position, step): resume-safe."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{position}:{step}".encode()))


def needs_selection(state: dict, group: dict, t: int) -> bool:
    """Whether the weight must be (re)selected before step ``t``: before step 1 and every interval
    (``selected_at`` records the step the current selection was made for, so a selection made
    early, in a gradient hook or clip_grad_norm_, is not made again by step())."""
    if "idx" not in state:
        return True
    return t % group["update_interval"] == 0 and state.get("selected_at") != t


def stack(ts: list[Tensor]) -> Tensor:
    """One matrix as it is, several as a batch."""
    return ts[0] if len(ts) == 1 else torch.stack(ts)


@dataclass
class Chunk:
    """Same-shaped weights of one group due at one step, selected together: ``k`` entries each."""

    params: list[Tensor]
    grads: list[Tensor] | None  # dense gradients, for selectors that score them
    k: int
    group: dict
    generator: torch.Generator

    @property
    def selector(self) -> Selector:
        return SELECTORS[self.group["selector"]]

    @property
    def largest(self) -> bool:
        return self.group["largest"] if self.selector.uses_largest else True

    def stacked(self, local: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None]:
        """The weights (and, for selectors that score them, gradients) as ``stack`` lays them out,
        each as ``local`` gives this process's part of it."""
        grad = stack([local(g) for g in self.grads]) if self.grads is not None else None
        return stack([local(selection_matrix(p)).detach() for p in self.params]), grad

    def scores(self, x: Matrices) -> Tensor:
        return self.selector.score(x)

    def whole_indices(self, W: Tensor, grad: Tensor | None) -> Tensor:
        """(b, k) or (k,) sorted int32 indices of the whole matrices W (a stack, see ``stack``)."""
        if self.selector.fused is not None:
            return self.selector.fused(W, self.k, self.group, self.generator)
        x = Matrices(W, grad, self.group, self.generator)
        return topk_flat_indices(self.scores(x), self.k, self.largest)


def standalone_group(selector: str = "lift", lra_rank: int = 64, svd: str = "fast", largest: bool = True) -> dict:
    """The selection options of a selection made outside an optimizer, as a checked group (the
    budget and interval fields, which such a caller sets itself, hold placeholders)."""
    group = {"selector": selector, "lra_rank": lra_rank, "svd": svd, "largest": largest, "rank": 1,
             "density": None, "update_interval": 1}
    check_selection(group)
    return group


def select(W: Tensor, k: int, *, selector: str = "lift", lra_rank: int = 64, svd: str = "fast",
           largest: bool = True, grad: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Sorted int32 flat indices of the ``k`` entries of W (m, n), or of each matrix of a stack
    (b, m, n), that ``selector`` picks, outside any optimizer (studies, analysis, PEFT masks);
    ``grad`` is the dense gradient for selectors that score it."""
    group = standalone_group(selector, lra_rank, svd, largest)
    check_selection(group, tuple(W.shape[-2:]), "W")
    if SELECTORS[selector].needs_grad and grad is None:
        raise ValueError(f"selector={selector!r} scores the gradient: pass grad (the dense gradient of W)")
    chunk = Chunk([W], None, k, group, generator if generator is not None else torch.Generator())
    return chunk.whole_indices(W.detach(), grad)


def refresh(group: dict, params: list[Tensor], t: int, positions: dict[int, int], seed: int,
            grads: dict[Tensor, Tensor] | None, strategy) -> list[tuple[Tensor, Tensor]]:
    """The selections of ``params`` (all due at step ``t``): (weight, sorted int32 indices) pairs.

    ``grads`` gives the dense gradient of each weight when the selector scores it; ``strategy``
    (see strategy.py) decides who computes each chunk's selection. Nothing is installed here: the
    optimizer hands each selection to ``state.install_selection``.
    """
    by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        by_shape[(matrix_shape(p), p.dtype, p.device)].append(p)
    chunks: list[Chunk] = []
    for (shape, _, _), ps in by_shape.items():
        k = budget(shape, group["rank"], group["density"])
        per_batch = max(1, SELECT_BUCKET_BYTES // (matrix_numel(ps[0]) * ps[0].element_size()))
        for start in range(0, len(ps), per_batch):
            chunk = ps[start:start + per_batch]
            gen = selection_generator(seed, positions[id(chunk[0])], t)
            chunks.append(Chunk(chunk, [grads[p] for p in chunk] if grads is not None else None, k, group, gen))
    # Largest chunks first, so that side by side they finish together; returned in their own order.
    order = sorted(range(len(chunks)), key=lambda i: -sum(matrix_numel(p) for p in chunks[i].params))
    on_cpu = all(p.device.type == "cpu" for p in params)
    results = run_jobs([partial(strategy.select, chunks[i]) for i in order], on_cpu,
                       side_by_side=strategy.side_by_side())
    idxs_of = dict(zip(order, results))
    return [(p, new_idx) for i, chunk in enumerate(chunks) for p, new_idx in zip(chunk.params, idxs_of[i])]
