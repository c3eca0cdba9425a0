"""Checkpoints of a run: trainable weights, optimizer, scheduler, step, RNG and the log so far.

One file per checkpoint (``checkpoint-STEP.pt``), written atomically; older ones are deleted only
after the new one is complete. Everything in it is tensors and plain containers, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""
from __future__ import annotations

import glob
import os
import random
import re

import torch
from torch import nn

from .._atomic import atomic_path

FORMAT = "lift_kernels.finetune.checkpoint/1"
_NAME = re.compile(r"checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this run or cannot be read."""


def checkpoint_files(folder: str) -> list[str]:
    """Checkpoints in ``folder``, oldest step first."""
    found = [p for p in glob.glob(os.path.join(folder, "checkpoint-*.pt")) if _NAME.search(p)]
    return sorted(found, key=lambda p: int(_NAME.search(p).group(1)))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device).get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "device" in state and device.type != "cpu":
        torch.get_device_module(device).set_rng_state(state["device"], device)


def save(folder: str, step: int, model: nn.Module, optimizer, scheduler, extra: dict,
         device: torch.device, keep: int = 1) -> str:
    """Write ``checkpoint-STEP.pt`` into ``folder`` and keep only the newest ``keep`` checkpoints."""
    payload = {"format": FORMAT, "step": step,
               "trainable": {n: p.detach().cpu() for n, p in trainable_state(model).items()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": _rng_state(device), "extra": extra}
    path = os.path.join(folder, f"checkpoint-{step:06d}.pt")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    for old in checkpoint_files(folder)[:-keep]:
        os.remove(old)
    return path


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not a pickle traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lift-finetune checkpoint")
    return payload


def restore(payload: dict, model: nn.Module, optimizer, scheduler, device: torch.device) -> int:
    """Load weights, optimizer, scheduler and RNG from ``payload``; returns the step to continue from."""
    params = trainable_state(model)
    saved = payload["trainable"]
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"the checkpoint's trainable weights do not match this run (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}); resume with the same "
                              "--model, --method and --target-modules")
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise CheckpointError(f"checkpoint weight {name} has shape {tuple(saved[name].shape)}, "
                                  f"the model's is {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    _set_rng_state(payload["rng"], device)
    return int(payload["step"])
