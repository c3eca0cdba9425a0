"""DDP communication hook that all-reduces only the gradient entries LIFTAdamW will apply.

A LIFT step reads grad[idx] and nothing else of a LIFT weight's gradient, so a bucket's all-reduce
can carry, per LIFT weight, just its k selected entries (about 5% of the bytes at LIFT's budgets),
plus every entry of the other parameters. The averaged values are written back at their places in
the bucket; the other entries of LIFT weights are left zero (no step reads them). Steps that need
whole gradients all-reduce the bucket as plain DDP does: a selecting step (a weight without a
selection yet, or one due for re-selection: a selector may score the gradient, and the step applies
it at the *new* indices, which the hook cannot know before the selection is made). The hook asks the
optimizer through its public methods (``selects_before_next_step``, ``selected_indices``,
``next_step``).

    state = lk.sparse_allreduce_hook(opt)
    ddp_model.register_comm_hook(state, state.hook)   # or lk.distributed.sparse_allreduce_hook

``state.bytes_sent`` / ``state.bytes_dense`` count what the hook sent and what plain DDP would have
sent, in total and per optimizer step (``state.per_step[t] = (sent, dense)``).
"""
# No `from __future__ import annotations` here: DDP compares the hook's annotations with the real
# dist.GradBucket and torch.futures.Future[torch.Tensor] classes.
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor


class SparseAllreduceState:
    """The hook's view of the optimizer, and its byte counters."""

    def __init__(self, opt, process_group=None):
        self.opt = opt
        self.process_group = process_group
        self.bytes_sent = 0
        self.bytes_dense = 0
        self.per_step: dict[int, list[int]] = defaultdict(lambda: [0, 0])

    def needs_dense(self, params: list[Tensor]) -> bool:
        """Whether a LIFT weight among ``params`` selects before its next step."""
        return any(self.opt.selects_before_next_step(p) for p in params)

    def count(self, sent: Tensor, bucket: Tensor) -> None:
        sent_bytes, dense_bytes = sent.numel() * sent.element_size(), bucket.numel() * bucket.element_size()
        self.bytes_sent += sent_bytes
        self.bytes_dense += dense_bytes
        entry = self.per_step[self.opt.next_step()]
        entry[0] += sent_bytes
        entry[1] += dense_bytes

    def hook(self, state: "SparseAllreduceState", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        return sparse_allreduce(state, bucket)


def _pieces(state: SparseAllreduceState, bucket: dist.GradBucket):
    """(slice of the flat bucket, selected indices or None for all) per parameter of the bucket."""
    offset = 0
    for p in bucket.parameters():
        idx = state.opt.selected_indices(p)
        yield slice(offset, offset + p.numel()), (idx.long() if idx is not None else None)
        offset += p.numel()


def sparse_allreduce(state: SparseAllreduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    group = state.process_group or dist.group.WORLD
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    if state.needs_dense(bucket.parameters()):
        state.count(buf, buf)
        buf.div_(world)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    places = list(_pieces(state, bucket))
    packed = torch.cat([buf[sl] if idx is None else buf[sl].index_select(0, idx) for sl, idx in places])
    state.count(packed, buf)
    packed.div_(world)  # divide before summing, as DDP's default reduction does

    def unpack(fut) -> Tensor:
        reduced = fut.value()[0]
        buf.zero_()
        start = 0
        for sl, idx in places:
            n = sl.stop - sl.start if idx is None else idx.numel()
            if idx is None:
                buf[sl].copy_(reduced[start:start + n])
            else:
                buf[sl].index_copy_(0, idx, reduced[start:start + n])
            start += n
        return buf

    return dist.all_reduce(packed, group=group, async_op=True).get_future().then(unpack)


def sparse_allreduce_hook(opt, process_group=None) -> SparseAllreduceState:
    """The state to register with ``ddp_model.register_comm_hook(state, state.hook)``.

    ``opt`` is the LIFTAdamW over the DDP model's parameters (with ``sparse_grad=False``: DDP owns
    the gradients until its buckets are reduced).
    """
    if getattr(opt, "sparse_grad", False):
        raise ValueError("LIFTAdamW(sparse_grad=True) frees gradients before DDP reduces them; build it "
                         "with sparse_grad=False (the hook already sends only the selected entries)")
    return SparseAllreduceState(opt, process_group)
