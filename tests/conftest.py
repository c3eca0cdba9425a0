"""Test setup shared by every test file.

Without a GPU, Triton kernels are tested under the interpreter; TRITON_INTERPRET must be set before
triton decorates any kernel, so it is set here, before test modules import anything.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if torch.cuda.is_available():  # on a GPU machine the kernels run natively
    os.environ.pop("TRITON_INTERPRET", None) if os.environ.get("TRITON_INTERPRET") == "1" and \
        os.environ.get("LIFT_TEST_INTERPRET") != "1" else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
