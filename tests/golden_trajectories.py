"""Training runs whose every bit is recorded, so a refactor can prove it changed no arithmetic.

``python tests/golden_trajectories.py`` records tests/data/golden_trajectories.pt (only when the
arithmetic is meant to change), with the fingerprint of the machine that made it (machine_numerics.py);
tests/test_golden_trajectories.py replays every run and compares.
Each run: TinyMLP, two LIFT groups (own lr, a scheduler) and a dense group, refreshes every 3 steps
over 9 steps, one thread (so BLAS reductions run in one order).
"""
from __future__ import annotations

import copy
import os

import torch

from helpers import TinyMLP, make_batch

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_trajectories.pt")
STEPS = 9

# name -> (LIFTAdamW keyword arguments, weight dtype, LIFT_BACKEND, clip, resume at step)
RUNS = {
    "lift_fast_fp32": ({"svd": "fast"}, torch.float32, None, None, None),
    "lift_fast_fp32_sparse_grad": ({"svd": "fast", "sparse_grad": True}, torch.float32, None, 1.0, None),
    "lift_exact_fp32_reference": ({"svd": "exact"}, torch.float32, "reference", None, None),
    "lift_fast_bf16_masters_sparse": ({"svd": "fast", "sparse_grad": True}, torch.bfloat16, None, None, None),
    "lift_fast_bf16_no_masters": ({"svd": "fast", "master_weights": False}, torch.bfloat16, None, None, None),
    "magnitude_fp32_clip": ({"selector": "magnitude"}, torch.float32, None, 0.5, None),
    "random_fp32": ({"selector": "random", "seed": 7}, torch.float32, None, None, None),
    "gradient_fp32": ({"selector": "gradient"}, torch.float32, None, None, None),
    "lift_density_smallest_resumed": ({"density": 0.2, "largest": False}, torch.float32, None, None, 4),
}


def run(name: str) -> dict[str, list]:
    """Loss of each step, and the parameters and LIFT state after the last step, of run ``name`` (CPU),
    on the backend the run names (None: the defaults, whatever LIFT_BACKEND says)."""
    from lift_kernels.ops import use_backend

    kwargs, dtype, forced, clip, resume_at = RUNS[name]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_backend(forced):
            return _train(kwargs, dtype, clip, resume_at)
    finally:
        torch.set_num_threads(old_threads)


def _train(kwargs: dict, dtype: torch.dtype, clip: float | None, resume_at: int | None) -> dict[str, list]:
    import lift_kernels as lk

    torch.manual_seed(0)
    model = copy.deepcopy(TinyMLP()).to(dtype)

    def make_opt():
        groups = [
            {"params": [model.up.weight], "lift": True, "lr": 2e-2},
            {"params": [model.down.weight], "lift": True, "lr": 5e-3, "weight_decay": 0.0},
            {"params": [model.up.bias, *model.norm.parameters()], "lift": False},
        ]
        opt = lk.LIFTAdamW(groups, rank=2, lra_rank=3, update_interval=3, weight_decay=0.05, **kwargs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.8**s, lambda s: 1.0 + s, lambda s: 1.0])
        return opt, sched

    opt, sched = make_opt()
    g = torch.Generator().manual_seed(1)
    out = {"loss": [], "params": [], "state": []}
    for step in range(1, STEPS + 1):
        if resume_at is not None and step == resume_at:
            saved, saved_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()
            opt.zero_grad()
            opt, sched = make_opt()
            opt.load_state_dict(saved)
            sched.load_state_dict(saved_sched)
        x, y = (t.to(dtype) for t in make_batch(generator=g))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        sched.step()
        out["loss"].append(loss.detach().float().clone())
    # the losses show where a run first departs; the end state holds every bit of the rest
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["state"] = [{k: v.clone() for k, v in sorted(opt.state[p].items())
                     if k in ("idx", "exp_avg", "exp_avg_sq", "master")}
                    for p in (model.up.weight, model.down.weight)]
    return out


if __name__ == "__main__":
    from machine_numerics import fingerprint

    torch.save({"machine": fingerprint(), "runs": {name: run(name) for name in RUNS}}, GOLDEN)
    print("wrote", GOLDEN)
