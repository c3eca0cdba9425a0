"""Making and installing a selection for a group of LIFT weights (Algorithm 1, lines 5-11)."""
from __future__ import annotations

import zlib
from collections import defaultdict
from functools import partial

import torch
from torch import Tensor

from .. import ops
from ..distributed.placement import local_tensor
from ..distributed.route import chunk_indices
from ..reference.select import select_indices
from .cpu_threads import run_jobs
from .validation import budget

# Matrices of one shape are selected together; a bucket's stacked copy is kept under this many bytes
# (at least one matrix) so a refresh never doubles the memory of the weights.
SELECT_BUCKET_BYTES = 1 << 28


def selection_generator(seed: int, position: int, step: int) -> torch.Generator:
    """The random stream of one selection, from (seed, weight's position, step): resume-safe."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{position}:{step}".encode()))


def needs_selection(state: dict, group: dict, t: int) -> bool:
    """Whether the weight must be (re)selected before step ``t``: before step 1 and every interval."""
    if "idx" not in state:
        return True
    return t % group["update_interval"] == 0 and state.get("selected_at") != t


def select_group(group: dict, params: list[Tensor], t: int, positions: dict[int, int], seed: int,
                 states: dict, grads: dict[Tensor, Tensor] | None = None,
                 selection_group="world") -> None:
    """Select entries for ``params`` (all due at step ``t``) and install them in ``states``.

    ``grads`` gives the dense gradient of each weight for selector="gradient". In a multi-process
    run, ``distributed.route`` decides who computes a chunk's selection (see LIFTAdamW's
    ``selection_group``); in a single process it is ``local_indices``, here.
    """
    by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        by_shape[(p.shape, p.dtype, p.device)].append(p)
    chunks, jobs = [], []
    for (shape, _, _), ps in by_shape.items():
        k = budget(shape, group["rank"], group["density"])
        per_batch = max(1, SELECT_BUCKET_BYTES // (ps[0].numel() * ps[0].element_size()))
        for start in range(0, len(ps), per_batch):
            chunk = ps[start:start + per_batch]
            gen = selection_generator(seed, positions[id(chunk[0])], t)
            compute = partial(local_indices, group, k=k, generator=gen)
            chunks.append(chunk)
            jobs.append(partial(chunk_indices, group, chunk, k, gen, grads, compute, selection_group))
    # Largest chunks first, so that side by side they finish together; installed in their own order.
    order = sorted(range(len(jobs)), key=lambda i: -sum(p.numel() for p in chunks[i]))
    on_cpu = all(p.device.type == "cpu" for p in params)
    single_process = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    results = run_jobs([jobs[i] for i in order], on_cpu, side_by_side=single_process)
    idxs_of = dict(zip(order, results))
    for i, chunk in enumerate(chunks):
        for p, new_idx in zip(chunk, idxs_of[i]):
            install_selection(p, states[p], new_idx.contiguous(), uses_master(group, p))
            states[p]["selected_at"] = t


def local_indices(group: dict, W: Tensor, grad: Tensor | None, *, k: int,
                  generator: torch.Generator) -> Tensor:
    """Indices of a weight (m, n) or a stack (b, m, n) of them, (k,) or (b, k), under the group's selector."""
    if group["selector"] == "lift":
        return ops.principal_weights(W, k, group["lra_rank"], group["svd"], group["largest"], generator)
    return select_indices(W, k, selector=group["selector"], lra_rank=group["lra_rank"], svd=group["svd"],
                          largest=group["largest"], grad=grad, generator=generator)


def uses_master(group: dict, p: Tensor) -> bool:
    """fp32 masters of the selected entries: on by default for half-precision weights."""
    wanted = group["master_weights"]
    if wanted is None:
        return p.dtype in (torch.bfloat16, torch.float16)
    return bool(wanted)


def install_selection(p: Tensor, state: dict, new_idx: Tensor, master: bool) -> None:
    """Carry moments (and masters) from the old selection to ``new_idx``; new entries start at zero.

    A master is the fp32 value of an entry whose weight holds it rounded. Dropped entries need no
    write-back (each step already rounds masters into the weight). Kept entries keep their master
    exactly: what is remapped is the rounding residual master - weight, which is exact in fp32
    (Sterbenz), and weight + residual gives the master back; new entries get residual 0, i.e. the
    weight's own value.
    """
    flat = local_tensor(p).detach().view(-1)  # a shard's own rows: its idx are local
    old_idx = state.get("idx")
    if old_idx is None:
        zeros = torch.zeros(new_idx.numel(), dtype=torch.float32, device=p.device)
        state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
        if master:
            state["master"] = flat.index_select(0, new_idx.long()).float()
    else:
        carried = [state["exp_avg"], state["exp_avg_sq"]]
        if master:
            if "master" not in state:  # e.g. master_weights switched on after a checkpoint
                state["master"] = flat.index_select(0, old_idx.long()).float()
            carried.append(state["master"] - flat.index_select(0, old_idx.long()).float())
        out = ops.remap_state(old_idx, new_idx, carried)
        state["exp_avg"], state["exp_avg_sq"] = out[0], out[1]
        if master:
            state["master"] = flat.index_select(0, new_idx.long()).float().add_(out[2])
    state["idx"] = new_idx
