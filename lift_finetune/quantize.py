"""A bitsandbytes-quantized base (``--load-in-4bit`` / ``--load-in-8bit``): loading it, and turning the
trained model back into a plain float model for the model folder, the delta's base and the adapter.

Loading (model.load): transformers quantizes with bitsandbytes while it loads a folder or hub model, but
refuses a quantization config together with a GGUF file. A GGUF model is therefore loaded as today
(dequantized to fp32), written with save_pretrained into a temporary folder, and loaded again from there
with the quantization config; the folder is deleted at once.

Float export: every bitsandbytes layer becomes an ``nn.Linear`` holding the weight the trained model
computes with: a LIFTQuantLinear's ``effective_weight()`` (dequantized base + delta), an untrained
bnb layer's dequantized weight, a QLoRA layer's dequantized base plus its LoRA product, formed in fp32.
Merging LoRA into the 4-bit weight, as peft's merge_and_unload does, would round the merged weight back
to 4 bits; merging into the dequantized float weight loses nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Quant:
    bits: int                      # 4 or 8
    quant_type: str | None         # nf4 / fp4 for 4 bits
    compute_dtype: torch.dtype     # bitsandbytes' compute dtype: fp32 on the CPU, bf16 under --bf16

    @property
    def flag(self) -> str:
        return f"--load-in-{self.bits}bit"

    def describe(self) -> str:
        kind = self.quant_type.upper() if self.bits == 4 else "LLM.int8"
        return f"{self.bits}-bit {kind} (bitsandbytes, compute {str(self.compute_dtype).removeprefix('torch.')})"

    def as_dict(self) -> dict:
        return {"bits": self.bits, "quant_type": self.quant_type,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}


def from_args(args, device: torch.device) -> Quant | None:
    if not (getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)):
        return None
    # bf16 compute only where the run computes in bf16 anyway (--bf16 on an accelerator); the CPU
    # default stays fp32, as the float runs do.
    dtype = torch.bfloat16 if args.bf16 and device.type != "cpu" else torch.float32
    if args.load_in_4bit:
        return Quant(4, args.bnb_4bit_quant_type or "nf4", dtype)
    return Quant(8, None, dtype)


class _Once(logging.Filter):
    """Lets a message through the first time only."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _quiet_int8_cast_warning() -> None:
    # bitsandbytes logs "inputs will be cast ... to float16" on every 8-bit matmul of fp32 inputs, which
    # buries the progress output; once is enough to tell the user.
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in log.filters):
        log.addFilter(_Once())


def bnb_config(quant: Quant):
    from transformers import BitsAndBytesConfig

    if quant.bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                                  bnb_4bit_compute_dtype=quant.compute_dtype)
    _quiet_int8_cast_warning()
    return BitsAndBytesConfig(load_in_8bit=True)


def require_bitsandbytes(quant: Quant) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{quant.flag} needs bitsandbytes (pip install bitsandbytes): {err}") from None


def device_map(device: torch.device) -> dict:
    # bitsandbytes quantizes while the weights are placed, so the device is chosen at load time.
    return {"": device.index if device.type == "cuda" and device.index is not None else str(device)}


def is_bnb_linear(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized(model: nn.Module) -> bool:
    return any(is_bnb_linear(m) for m in model.modules())


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight a bitsandbytes Linear4bit / Linear8bitLt computes with, read back as
    LIFTQuantLinear.dequantized() reads its base, so untrained layers and LIFT's base agree."""
    from lift_kernels.quantized.dequant import bnb_kind, dequantize as read_back

    return read_back(layer, bnb_kind(layer))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias.detach().float())
    lin.requires_grad_(False)
    return lin


def _lift_quant_class():
    try:
        from lift_kernels.quantized import LIFTQuantLinear
    except ImportError:  # lift_kernels without the quantized package: no such layers can exist
        return ()
    return LIFTQuantLinear


def _float_weight(module: nn.Module, with_delta: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(fp32 weight, bias) of a quantized layer as the model computes with it, or None for other modules."""
    lql = _lift_quant_class()
    if lql and isinstance(module, lql):
        w = module.effective_weight(torch.float32) if with_delta else module.dequantized(torch.float32)
        return w, module.base.bias
    if is_bnb_linear(module):
        return dequantize(module), module.bias
    lora = _lora_layer_weight(module)
    if lora is not None:
        return lora
    return None


def _lora_layer_weight(module: nn.Module):
    """A peft LoRA layer over a bitsandbytes base: dequantized base + its active adapters' product (fp32)."""
    base = getattr(module, "base_layer", None)
    if base is None or not is_bnb_linear(base) or not hasattr(module, "get_delta_weight"):
        return None
    w = dequantize(base)
    for name in module.active_adapters:
        if name in getattr(module, "lora_A", {}):
            w = w + module.get_delta_weight(name).float().to(w.device)
    return w, base.bias


@torch.no_grad()
def to_float(model: nn.Module, dtype: torch.dtype = torch.float32, with_delta: bool = True) -> nn.Module:
    """Replace, in place, every quantized layer of ``model`` by an ``nn.Linear`` of ``dtype`` (see the module
    doc) and drop transformers' quantization record, so save_pretrained writes a plain float model that
    loads without bitsandbytes. ``with_delta=False`` gives the base: LIFT's delta left out. Returns ``model``
    (for a peft model, the underlying transformers model)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    replace = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in replace):
            continue  # inside a layer replaced already (LIFTQuantLinear.base, a LoRA layer's base_layer)
        found = _float_weight(module, with_delta)
        if found is not None:
            replace.append((name, found))
    for name, (weight, bias) in replace:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _linear(weight, bias, torch.float32))
    if dtype != torch.float32:
        model.to(dtype)
    _forget_quantization(model)
    return model


def _forget_quantization(model: nn.Module) -> None:
    """Drop transformers' bitsandbytes record (hf_quantizer, config.quantization_config, is_loaded_in_*)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if attr in getattr(model, "__dict__", {}):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if hasattr(config, "_is_quantized"):
            del config._is_quantized
