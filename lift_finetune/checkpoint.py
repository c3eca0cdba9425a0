"""Checkpoints of a run: trainable weights, optimizer, scheduler, step, RNG and the log so far.

One file per checkpoint (``checkpoint-STEP.pt``), written atomically; older ones are deleted only
after the new one is complete. Everything in it is tensors and plain containers, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code.

It carries a checksum over all of its content (every tensor's dtype, shape and bytes, every number
and string), so a bit flip on disk is refused on resume instead of continuing a different run. A
checkpoint is checked completely (checksum, layout, names, shapes and dtypes of the weights, the
optimizer's own checks) before the model, optimizer, scheduler or RNG change.
"""
from __future__ import annotations

import glob
import os
import random
import re
import warnings

import torch
from torch import nn

from lift_kernels._atomic import atomic_path
from lift_kernels._digest import structure_digest

# The format tags name the package's old home: they are file contents (checkpoints on disk carry
# them), not import paths, so they stay as they are.
FORMAT = "lift_kernels.finetune.checkpoint/2"
# Written by lift_kernels 0.1, without a checksum: still resumed (with a warning and every other check).
_LEGACY_FORMAT = "lift_kernels.finetune.checkpoint/1"
_KEYS = {"format", "step", "trainable", "optimizer", "scheduler", "rng", "extra"}
_FIX = "resume from another checkpoint (--resume PATH) or start the run again in a new --output-dir"
_NAME = re.compile(r"checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this run or cannot be read."""


def checkpoint_files(folder: str) -> list[str]:
    """Checkpoints in ``folder``, oldest step first."""
    found = [p for p in glob.glob(os.path.join(folder, "checkpoint-*.pt")) if _NAME.search(p)]
    return sorted(found, key=lambda p: int(_NAME.search(p).group(1)))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, and the positions of each LIFTQuantLinear's delta: a quantized LIFT run's
    trained state is its sparse delta, whose size grows with each selection."""
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, module in _quant_layers(model).items():
        state[f"{name}.positions"] = module.positions
    return state


def _quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    from lift_kernels.delta import _quant_layers as layers

    return layers(model)


def _resize_quant_layers(model: nn.Module, saved: dict) -> list:
    """Load each LIFTQuantLinear's delta and positions from ``saved`` (its module resizes both to the
    checkpoint's sizes); returns what undoes it, for a refusal that comes later."""
    undo = []
    for name, module in _quant_layers(model).items():
        undo.append((module, module.delta.detach().clone(), module.positions.clone()))
        module.load_state_dict({"delta": saved[f"{name}.delta"], "positions": saved[f"{name}.positions"]},
                               strict=False)
    return undo


def _sized_by_checkpoint(model: nn.Module) -> set[str]:
    """Names whose shape comes from the checkpoint (a LIFTQuantLinear's delta and positions)."""
    return {f"{name}.{part}" for name in _quant_layers(model) for part in ("delta", "positions")}


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
    payload["checksum"] = structure_digest(payload)  # last key: load() pops it and hashes the rest
    path = os.path.join(folder, f"checkpoint-{step:06d}.pt")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    for old in checkpoint_files(folder)[:-keep]:
        os.remove(old)
    return path


def load(path: str) -> dict:
    """The checkpoint at ``path``, its checksum and layout checked; raises CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated, garbled or foreign file: our advice, then torch's cause in brief
        raise CheckpointError(f"cannot read checkpoint {path}: the file is damaged or not a lift-finetune "
                              f"checkpoint (checkpoint-NNNNNN.pt in a run's --output-dir); {_FIX} "
                              f"[torch.load: {_one_line(err)}]") from None
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, _LEGACY_FORMAT) and (
            "checksum" not in payload):
        raise CheckpointError(f"{path} is not a lift-finetune checkpoint")
    if "checksum" in payload:  # checked whatever the format says: a flipped format byte must not skip it
        saved = payload.pop("checksum")
        try:
            actual = structure_digest(payload)
        except TypeError:
            actual = None
        if saved != actual:
            raise CheckpointError(f"{path} is damaged: its checksum does not match its contents; {_FIX}")
        if payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} has checkpoint format {payload.get('format')!r}, which this "
                                  f"lift-finetune does not read (it reads {FORMAT!r})")
    elif payload["format"] == FORMAT:
        raise CheckpointError(f"{path} is damaged: its checksum is missing; {_FIX}")
    else:
        warnings.warn(f"{path} was written by lift-finetune 0.1 without a checksum: damage on disk cannot be "
                      "detected in it", UserWarning, stacklevel=2)
    _check_layout(path, payload)
    return payload


def _one_line(err: Exception) -> str:
    """torch.load's error in one line. Its own message runs to paragraphs and, for any file that is not
    a weights-only pickle, advises weights_only=False, which would let the file run code."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # the part that names what the unpickler met
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first_sentence = re.split(r"(?<=\.)\s", lines[0])[0] if lines else ""
    return f"{type(err).__name__}: {first_sentence[:200].rstrip('.')}"


def _check_layout(path: str, payload: dict) -> None:
    """What every checkpoint of this app holds, with the types restore() relies on."""
    problem = None
    if set(payload) != _KEYS:
        problem = f"its entries are {sorted(payload)}, expected {sorted(_KEYS)}"
    elif not isinstance(payload["step"], int) or isinstance(payload["step"], bool) or payload["step"] < 0:
        problem = f"its step is {payload['step']!r}"
    elif not isinstance(payload["trainable"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["trainable"].items()):
        problem = "its trainable weights are not a dict of tensors"
    elif not all(isinstance(payload[k], dict) for k in ("optimizer", "scheduler", "rng", "extra")):
        problem = "its optimizer, scheduler, rng or extra entry is not a dict"
    elif not _rng_ok(payload["rng"]):
        problem = "its RNG state is malformed"
    elif not (isinstance(payload["extra"].get("fingerprint"), dict)
              and isinstance(payload["extra"].get("history"), list) and "base_eval" in payload["extra"]):
        problem = "its run record (fingerprint, history, base_eval) is malformed"
    if problem:
        raise CheckpointError(f"{path} is not a valid lift-finetune checkpoint: {problem}; {_FIX}")


def _rng_ok(state: dict) -> bool:
    """Whether ``state`` sets the RNGs, tried on throwaway generators so the global ones stay as they are."""
    if set(state) - {"device"} != {"torch", "python"} or not isinstance(state["python"], (tuple, list)):
        return False
    try:
        torch.Generator().set_state(state["torch"])
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def restore(payload: dict, model: nn.Module, optimizer, scheduler, device: torch.device,
            path: str = "the checkpoint") -> int:
    """Load weights, optimizer, scheduler and RNG from ``payload``; returns the step to continue from.

    Everything that can be checked is checked first; the optimizer's load_state_dict refuses a state
    that does not fit before changing anything, and it runs before the weights are copied, so a
    refusal leaves model, optimizer, scheduler and RNG as they were.
    """
    params = trainable_state(model)
    saved = payload["trainable"]
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"{path}: the checkpoint's trainable weights do not match this run (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}); resume with the same "
                              "--model, --method and --target-modules")
    resized = _sized_by_checkpoint(model)
    for name in sorted(resized):
        module, _, part = name.rpartition(".")
        twin = f"{module}.{'positions' if part == 'delta' else 'delta'}"
        if saved[name].dim() != 1 or saved[name].shape != saved[twin].shape:
            raise CheckpointError(f"{path}: checkpoint {name} has shape {tuple(saved[name].shape)} beside "
                                  f"{twin} of shape {tuple(saved[twin].shape)}; a quantized layer's delta and "
                                  f"positions are one 1-D entry per changed position; {_FIX}")
    for name, p in params.items():
        if name in resized and saved[name].dtype == p.dtype:
            continue
        if saved[name].shape != p.shape or saved[name].dtype != p.dtype:
            raise CheckpointError(f"{path}: checkpoint weight {name} is {saved[name].dtype} of shape "
                                  f"{tuple(saved[name].shape)}, the model's is {p.dtype} of shape "
                                  f"{tuple(p.shape)}; resume with the same --model")
    if set(payload["scheduler"]) != set(scheduler.state_dict()):
        raise CheckpointError(f"{path}: the scheduler state has entries {sorted(payload['scheduler'])}, this "
                              f"run's scheduler {sorted(scheduler.state_dict())}; resume with the same --schedule")
    # A quantized layer takes the checkpoint's delta size first: the optimizer's state indexes into it.
    undo = _resize_quant_layers(model, saved) if resized else []
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        for module, delta, positions in undo:
            module.load_state_dict({"delta": delta, "positions": positions}, strict=False)
        raise CheckpointError(f"{path}: the optimizer state does not fit this run's optimizer ({err}); resume "
                              "with the same --method and settings") from None
    scheduler.load_state_dict(payload["scheduler"])
    with torch.no_grad():
        for name, p in params.items():
            if name not in resized:
                p.copy_(saved[name])
    _set_rng_state(payload["rng"], device)
    return int(payload["step"])
