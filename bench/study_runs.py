"""Resumable, shareable run bookkeeping for the SmolLM2 studies.

A study is a list of runs, each with a key (method, learning rate, seed, ...) and a result JSON
named after it. A run whose result exists is skipped, so a rerun (or a longer study on a GPU) only
adds what is missing. Several worker processes can work through one list: a worker claims a run by
creating ``<key>.claim`` exclusively; a claim whose process is gone is stale and taken over.
"""
from __future__ import annotations

import json
import os

from finetune_common import write_json


class RunStore:
    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".json")

    def done(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def load(self, key: str) -> dict:
        with open(self.path(key)) as f:
            return json.load(f)

    def save(self, key: str, result: dict) -> None:
        write_json(self.path(key), result)

    def claim(self, key: str) -> bool:
        """True if this process now owns ``key`` (not done, and no live process claimed it first)."""
        if self.done(key):
            return False
        claim = os.path.join(self.folder, key + ".claim")
        for _ in range(2):  # second try after removing a stale claim
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _alive(_claim_pid(claim)):
                    return False
                with _suppress():
                    os.remove(claim)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return not self.done(key)  # another worker may have finished it between the checks
        return False

    def release(self, key: str) -> None:
        with _suppress():
            os.remove(os.path.join(self.folder, key + ".claim"))


def _claim_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True  # a claim being written right now: its pid follows in a moment
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)
