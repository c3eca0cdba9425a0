import os
import sys

# `python -m` puts the working directory first on sys.path. From a source checkout's root, its
# top-level triton/ folder (kernel sources, no __init__.py) would then be imported as a namespace
# package named `triton`, which transformers takes for an installed Triton, and its lift_kernels/
# folder would hide a non-editable install. Only this package is imported at this point (lift_kernels
# is not), so the entry can go.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.getcwd() and os.path.isdir("triton") \
        and not os.path.exists(os.path.join("triton", "__init__.py")):
    sys.path.pop(0)

from .cli import main  # noqa: E402

sys.exit(main())
