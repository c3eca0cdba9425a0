"""`python -m lift_kernels.build`: compiles lift_kernels._C now instead of on first use.

For a package installed by plain `pip install .` (a wheel built without torch, compiled on first use
for the torch that imports it): build it ahead of a job, in a Docker layer, or once before several
DDP ranks start; a failed build is retried and the compiler's output printed. Where _C was compiled
at install time (`pip install --no-build-isolation .`) there is nothing to do.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import _ext
from .ops.backends import load_native


def ensure(verbose: bool = False, retry: bool = False) -> bool:
    """Builds lift_kernels._C now where it would compile on first use (or loads its cached build);
    True if _C is loaded, from the install or from the cache."""
    return load_native(verbose=verbose, retry=retry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lift_kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="do not print the compiler's commands")
    args = parser.parse_args(argv)
    if _ext.SOURCE == "install":
        print(f"lift_kernels._C was compiled at install time: {_ext.PATH}; nothing to build")
        return 0
    if not _ext.pending():
        print(f"lift_kernels._C cannot be built here: {_ext.EXT_ERROR}", file=sys.stderr)
        return 1
    ok = ensure(verbose=not args.quiet, retry=True)
    print(json.dumps(_ext.describe(), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
