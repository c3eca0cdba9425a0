"""Content hashes of tensors and of plain containers, for the checksums and fingerprints in saved files.

A hash covers each tensor's dtype, shape and bytes, and each container's type and length, so two
different contents cannot hash alike by shifting bytes from one field into the next.
"""
from __future__ import annotations

import hashlib

import torch


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (on the CPU, contiguous, row-major); any dtype, bf16 included."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _field(h, tag: bytes, payload: bytes) -> None:
    h.update(tag + len(payload).to_bytes(8, "little") + payload)


def update_tensor(h, t: torch.Tensor) -> None:
    _field(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
    data = tensor_bytes(t)
    h.update(data.nbytes.to_bytes(8, "little"))
    h.update(data)


def update_structure(h, obj) -> None:
    """Hash a tree of dicts, lists, tuples, strings, numbers, None and tensors (what torch.save stores).

    Dict order counts: pickling keeps it, so an intact file gives the same order back.
    """
    if isinstance(obj, torch.Tensor):
        update_tensor(h, obj)
    elif isinstance(obj, dict):
        _field(h, b"d", str(len(obj)).encode())
        for key, value in obj.items():
            update_structure(h, key)
            update_structure(h, value)
    elif isinstance(obj, (list, tuple)):
        _field(h, b"l" if isinstance(obj, list) else b"t", str(len(obj)).encode())
        for item in obj:
            update_structure(h, item)
    elif isinstance(obj, str):
        _field(h, b"s", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, bool):  # before int: bool is an int subclass
        _field(h, b"b", b"1" if obj else b"0")
    elif isinstance(obj, int):
        _field(h, b"i", str(obj).encode())
    elif isinstance(obj, float):
        _field(h, b"f", obj.hex().encode())
    elif obj is None:
        _field(h, b"n", b"")
    elif isinstance(obj, (torch.dtype, torch.device)):  # optimizer options may name a dtype or device
        _field(h, b"D" if isinstance(obj, torch.dtype) else b"V", str(obj).encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__}; only tensors and plain containers are saved")


def structure_digest(obj) -> str:
    h = hashlib.blake2b(digest_size=32)
    update_structure(h, obj)
    return "blake2b-256:" + h.hexdigest()
