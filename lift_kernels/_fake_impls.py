"""Fake (meta) implementations of the native ops, so torch.compile and FakeTensor can trace them.

Imported by _ext.py right after lift_kernels._C has registered the op schemas.
"""
import torch


@torch.library.register_fake("lift_kernels::remap_state")
def _remap_state_fake(old_idx, new_idx, states):
    return [s.new_empty(new_idx.shape) for s in states]


@torch.library.register_fake("lift_kernels::sparse_adamw_step")
def _sparse_adamw_step_fake(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, step, lr, beta1, beta2, eps,
                            weight_decay):
    return None  # updates its arguments in place (declared in the schema), returns nothing


@torch.library.register_fake("lift_kernels::principal_weights")
def _principal_weights_fake(W, k, lra_rank, largest, seed):
    return W.new_empty((W.shape[0], k), dtype=torch.int32)


def _work_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("lift_kernels::_lowrank")
def _lowrank_fake(W, rank, seed, passes, oversample):
    b, m, n = W.shape
    dtype = _work_dtype(W.dtype)
    return W.new_empty((b, m, rank), dtype=dtype), W.new_empty((b, rank, n), dtype=dtype)


@torch.library.register_fake("lift_kernels::_topk_abs_product")
def _topk_abs_product_fake(L, R, k, largest):
    return L.new_empty((L.shape[0], k), dtype=torch.int32)
