"""Sharded checkpoints of a model and its LIFTAdamW through torch.distributed.checkpoint (DCP).

``save_checkpoint(path, model, opt)`` writes each rank's share once (DTensor weights and dense
moments as DTensors, LIFT state as ranges of global vectors, see checkpoint_layout);
``load_checkpoint(path, model, opt)`` reads it back on any number of ranks, or in one process:
a run saved on N ranks continues on M ranks along the same trajectory. State is keyed by parameter
names (a DistributedDataParallel wrapper's "module." prefix is not part of them).
"""
from __future__ import annotations

import contextlib
import io
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from . import checkpoint_layout as layout
from .placement import local_tensor, row_shard


def _module(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def _named_params(model: nn.Module, opt) -> list[tuple[str, dict, torch.Tensor]]:
    names = {id(p): name for name, p in _module(model).named_parameters()}
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("every optimizer parameter must be a parameter of the model")
            out.append((names[id(p)], group, p))
    return out


@contextlib.contextmanager
def _quiet_sharded_tensor():
    """LIFT ranges are uneven (each rank's share depends on where its selected entries fall), which
    DTensor cannot describe; DCP reads and writes them as ShardedTensors, which torch warns about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
        yield


def _blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unblob(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _header(model, opt) -> dict:
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups]
    params = {}
    for name, group, p in _named_params(model, opt):
        s = opt.state.get(p) or {}
        if not s:
            params[name] = None
        elif opt.is_lift(p):
            params[name] = {"lift": True, "step": s["step"], "selected_at": s.get("selected_at"),
                            "shape": tuple(s["shape"]), "master": "master" in s}
        else:
            params[name] = {"lift": False}
    return {"groups": groups, "seed": opt.selection_seed, "params": params}


def _check_matches(header: dict, named, opt) -> None:
    """Refuse, before changing anything, a checkpoint of other parameters or other groups."""
    if len(header["groups"]) != len(opt.param_groups):
        raise ValueError(f"the checkpoint has {len(header['groups'])} parameter groups, this optimizer "
                         f"{len(opt.param_groups)}; build the optimizer as the saved run did")
    for name, group, p in named:
        if name not in header["params"]:
            raise ValueError(f"the checkpoint has no entry for parameter {name!r}")
        meta = header["params"][name]
        if meta is not None and meta["lift"] != opt.is_lift(p):
            raise ValueError(f"{name!r} is {'a' if meta['lift'] else 'not a'} LIFT weight in the checkpoint "
                             "but not here; build the optimizer's groups as the saved run did")
        if meta is not None and meta["lift"] and tuple(meta["shape"]) != tuple(p.shape):
            raise ValueError(f"{name!r} has shape {tuple(p.shape)}, the checkpoint {tuple(meta['shape'])}")


def save_checkpoint(checkpoint_id, model: nn.Module, opt) -> None:
    """Write the model and optimizer state; every rank of the run calls it."""
    coded = [name for name, group, p in _named_params(model, opt) if "exp_avg_codes" in (opt.state.get(p) or {})]
    if coded:  # refused before anything is written
        raise NotImplementedError(
            f"lk.distributed.save_checkpoint does not write 8-bit moments (moment_bits=8: {coded[:3]}...); "
            "save with opt.state_dict() (torch.save) on each rank, which holds them, or train with moment_bits=32")
    sd = {"model": _module(model).state_dict(), "optim_header": _blob(_header(model, opt))}
    for name, group, p in _named_params(model, opt):
        s = opt.state.get(p)
        if not s:
            continue
        if not opt.is_lift(p):
            sd[f"optim.{name}"] = {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
            continue
        shard = row_shard(p)
        rowptr = layout.rowptr_of(s["idx"], shard, tuple(s["shape"]))
        start, end = layout.my_range(rowptr, shard)
        total = int(rowptr[-1])
        sd[f"optim_rowptr.{name}"] = rowptr
        global_idx = s["idx"].long() + (shard.flat_offset if shard else 0)
        fields = {"idx": global_idx.to(torch.int32), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
        if "master" in s:
            fields["master"] = s["master"]
        sd[f"optim.{name}"] = {k: layout.range_tensor(v, start, total, shard) for k, v in fields.items()}
    with _quiet_sharded_tensor():
        dcp.save(sd, checkpoint_id=checkpoint_id)


def load_checkpoint(checkpoint_id, model: nn.Module, opt) -> None:
    """Read a checkpoint written by save_checkpoint on any number of ranks into this run."""
    named = _named_params(model, opt)
    first = {"optim_header": b""}
    dcp.load(first, checkpoint_id=checkpoint_id)  # what the state looks like, checked before any change
    header = _unblob(first["optim_header"])
    _check_matches(header, named, opt)
    lift_meta = {name: meta for name, meta in header["params"].items() if meta and meta["lift"]}
    rowptrs = {f"optim_rowptr.{name}": torch.zeros(meta["shape"][0] + 1, dtype=torch.int64)
               for name, meta in lift_meta.items()}
    model_sd = _module(model).state_dict()
    dcp.load({"model": model_sd, **rowptrs}, checkpoint_id=checkpoint_id)  # model in place
    _module(model).load_state_dict(model_sd)

    second, targets = {}, {}
    for name, group, p in named:
        meta = header["params"].get(name)
        if meta is None:
            continue
        if not meta["lift"]:
            second[f"optim.{name}"] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                                       "exp_avg_sq": torch.zeros_like(p)}
            continue
        shard = row_shard(p)
        rowptr = rowptrs[f"optim_rowptr.{name}"].to(local_tensor(p).device)
        start, end = layout.my_range(rowptr, shard)
        fields = [f for f in layout.FIELDS if f != "master" or meta["master"]]
        dtypes = {f: torch.int32 if f == "idx" else torch.float32 for f in fields}
        entries = {f: torch.empty(end - start, dtype=dtypes[f], device=rowptr.device) for f in fields}
        targets[name] = (shard, entries)
        second[f"optim.{name}"] = {f: layout.range_tensor(v, start, int(rowptr[-1]), shard)
                                   for f, v in entries.items()}
    if second:
        with _quiet_sharded_tensor():
            dcp.load(second, checkpoint_id=checkpoint_id)

    opt.state.clear()
    for name, group, p in named:
        meta = header["params"].get(name)
        if meta is None:
            continue
        if not meta["lift"]:
            opt.state[p] = second[f"optim.{name}"]
            continue
        shard, entries = targets[name]
        state = {"step": meta["step"], "shape": tuple(meta["shape"])}
        if meta["selected_at"] is not None:
            state["selected_at"] = meta["selected_at"]
        for f, v in entries.items():
            state[f] = v
        state["idx"] = (state["idx"].long() - (shard.flat_offset if shard else 0)).to(torch.int32)
        opt.state[p] = state
    for group, saved in zip(opt.param_groups, header["groups"]):
        group.update(saved)
    opt.selection_seed = int(header["seed"])
