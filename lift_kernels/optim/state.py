"""The optimizer state of each parameter: the one place it is born, and how a new selection carries it.

A LIFT weight's ``state[p]`` is born at its first selection, when its size k is known
(``install_selection``), with every field at once:

- ``step``: the steps taken (an int; bias correction uses it, and a selection is due when
  ``step + 1`` is a multiple of the group's ``update_interval``);
- ``shape``: the weight's shape, so that a weight resized afterwards is refused;
- ``idx``: sorted int32 flat indices of the k selected entries, into the part of the weight this
  process holds (a row shard's own rows under FSDP2);
- ``exp_avg``, ``exp_avg_sq``: fp32 moments of those entries; or, in a group with ``moment_bits=8``,
  ``exp_avg_codes``, ``exp_avg_sq_codes`` (uint8, k) and ``exp_avg_scales``, ``exp_avg_sq_scales``
  (fp32, one per block of 256 entries in selection order): the same moments in 8 bits (moments.py);
- ``master``: fp32 values of those entries, for half-precision weights (``uses_master``);
- ``selected_at``: the step the current selection was made for (a selection made early, in a
  gradient hook or ``clip_grad_norm_``, is not made again by ``step()``).

A later selection keeps the state and carries the moments and masters from the old indices to
the new ones (``ops.remap_state``): entries selected before and after keep theirs, new ones start
at zero (Algorithm 1); 8-bit moments are read back, carried the same way and coded again. A dense parameter's state is torch.optim.AdamW's (``init_dense_state``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .moments import bits_of_state, decode, encode


def init_dense_state(state: dict, p: Tensor, on_device: bool = False) -> dict:
    """torch.optim.AdamW's state, made once: its functional step takes a tensor ``step``, on the CPU
    unless the fused implementation runs (``on_device``: it reads the step on the weight's device)."""
    if not state:
        state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                         else torch.tensor(0.0))
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def uses_master(group: dict, p: Tensor) -> bool:
    """fp32 masters of the selected entries: on by default for half-precision weights."""
    wanted = group["master_weights"]
    if wanted is None:
        return p.dtype in (torch.bfloat16, torch.float16)
    return bool(wanted)


def install_selection(state: dict, p: Tensor, local: Tensor, new_idx: Tensor, master: bool, t: int,
                      books: tuple[Tensor, Tensor] | None = None) -> None:
    """Make ``new_idx`` the selection of LIFT weight ``p`` for step ``t``: the birth of its state at
    the first selection, a carry of moments (and masters) from the old selection after that.

    ``local`` is the weight as this process holds it (its idx address it). A master is the fp32 value
    of an entry whose weight holds it rounded. Dropped entries need no write-back (each step already
    rounds masters into the weight). Kept entries keep their master exactly: what is remapped is the
    rounding residual master - weight, which is exact in fp32 (Sterbenz), and weight + residual gives
    the master back; new entries get residual 0, i.e. the weight's own value.

    ``books`` (the code books on the weight's device) asks for 8-bit moments (``moment_bits=8``):
    they are born as the codes of zeros; a carry reads them back in fp32, remaps them as fp32
    moments are remapped and codes them again. The blocks are runs of 256 entries of the selection,
    so a new selection makes new blocks: a kept entry keeps its value up to the rounding into its new
    block (whose scale is the largest |value| there).
    """
    flat = local.detach().view(-1)
    new_idx = new_idx.contiguous()
    bits = 32 if books is None else 8
    if "idx" not in state:
        zeros = torch.zeros(new_idx.numel(), dtype=torch.float32, device=local.device)
        state.update(step=state.get("step", 0), shape=tuple(p.shape))
        if books is None:
            state.update(exp_avg=zeros, exp_avg_sq=zeros.clone())
        else:
            state.update(encode(zeros, zeros, books))
        if master:
            state["master"] = flat.index_select(0, new_idx.long()).float()
    else:
        check_same_bits(state, bits)
        old_idx = state["idx"]
        carried = [state["exp_avg"], state["exp_avg_sq"]] if books is None else list(decode(state, books))
        if master:
            if "master" not in state:  # e.g. master_weights switched on after a checkpoint
                state["master"] = flat.index_select(0, old_idx.long()).float()
            carried.append(state["master"] - flat.index_select(0, old_idx.long()).float())
        out = ops.remap_state(old_idx, new_idx, carried)
        if books is None:
            state["exp_avg"], state["exp_avg_sq"] = out[0], out[1]
        else:
            state.update(encode(out[0], out[1], books))
        if master:
            state["master"] = flat.index_select(0, new_idx.long()).float().add_(out[2])
    state["idx"] = new_idx
    state["selected_at"] = t


def check_same_bits(state: dict, bits: int, name: str = "a LIFT weight") -> None:
    """A group's moment_bits cannot change once its weights hold moments: the saved format is not
    converted behind the caller's back (8 -> 32 would be exact, 32 -> 8 rounds every moment)."""
    have = bits_of_state(state)
    if have is not None and have != bits:
        raise ValueError(f"{name} holds {have}-bit moments but its group now asks for moment_bits={bits}; "
                         f"moment_bits cannot change once a weight has optimizer state: set it back to {have}, "
                         "or build a new optimizer (fresh moments) with the new moment_bits")
