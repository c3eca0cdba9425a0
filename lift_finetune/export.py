"""The fine-tuned model as users take it: a Hugging Face model folder and a PEFT SHiRA adapter.

Written at the end of a run (OUTPUT_DIR/model/, OUTPUT_DIR/peft-adapter/) and by
`lift-finetune export --delta D --output-dir O [--model M]`, which builds both from a base and a
delta without training. The model folder is save_pretrained's (safetensors, config, generation
config, tokenizer) in fp32, the dtype lift-finetune trains in (a GGUF base is dequantized to fp32).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from lift_kernels._atomic import atomic_dir


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def save_model_folder(model, tokenizer, path: str) -> dict:
    """save_pretrained of model and tokenizer into ``path``, atomically; returns its summary entry."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return {"path": os.path.basename(path), "bytes": folder_bytes(path), "dtype": ",".join(dtypes)}


def save_adapter(model, base: dict, path: str, base_name: str | None) -> dict:
    """The SHiRA adapter of ``model`` against ``base`` in ``path``; the reason instead where it has none."""
    from lift_kernels.integrations.peft_export import AdapterError, save_shira_adapter

    try:
        stats = save_shira_adapter(model, base, path, base_model_name_or_path=base_name)
    except AdapterError as err:
        return {"path": None, "skipped": str(err)}
    return {"path": os.path.basename(path), "bytes": stats.file_bytes, **stats.as_dict()}


def describe(out: str, model_entry: dict | None, adapter_entry: dict | None) -> str:
    from .report import human_bytes

    lines = []
    if model_entry:
        lines.append(f"model folder: {os.path.join(out, 'model')} {human_bytes(model_entry['bytes'])} "
                     f"({model_entry['dtype']}; AutoModelForCausalLM.from_pretrained)")
    if adapter_entry and adapter_entry.get("path"):
        a = adapter_entry
        lines.append(f"peft adapter: {os.path.join(out, 'peft-adapter')} {human_bytes(a['bytes'])} (SHiRA r={a['r']}, "
                     f"{a['layers']} layers, {a['changed_entries']:,} changed + {a['padding_entries']:,} padding "
                     f"entries; {a['inexact_entries']} merge inexactly, at most {a['max_error_ulps']:.2g} ulp)")
    elif adapter_entry:
        lines.append(f"peft adapter: not written: {adapter_entry['skipped']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lift-finetune export",
                                description="Build OUTPUT_DIR/model/ (and OUTPUT_DIR/peft-adapter/) from a base "
                                            "model and a delta, without training.")
    p.add_argument("--delta", required=True, help="delta.safetensors written by lift-finetune or lk.save_delta")
    p.add_argument("--output-dir", required=True, help="where model/ and peft-adapter/ go (not overwritten)")
    p.add_argument("--model", default=None,
                   help="the base the delta was taken from (default: the --model of the run whose summary.json "
                        "sits beside the delta, else the built-in SmolLM2-135M-Instruct); for a run over a "
                        "quantized base, that base quantized as the run did and dequantized to fp32")
    p.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True, help="write model/")
    p.add_argument("--peft-adapter", action=argparse.BooleanOptionalAction, default=True,
                   help="write peft-adapter/")
    return p


def _run_args(delta: str) -> dict:
    """The flags of the run whose summary.json sits beside ``delta`` ({} if none)."""
    summary = os.path.join(os.path.dirname(os.path.abspath(delta)), "summary.json")
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            return json.load(f).get("args", {})
    return {}


def main(argv: list[str]) -> int:
    from lift_kernels import apply_delta
    from lift_kernels.delta import DeltaError
    from . import model as model_io

    a = parser().parse_args(argv)
    fail = lambda msg: SystemExit(f"lift-finetune export: error: {msg}")  # noqa: E731
    if not os.path.isfile(a.delta):
        raise fail(f"--delta: file not found: {a.delta}")
    targets = [n for n, on in (("model", a.save_model), ("peft-adapter", a.peft_adapter)) if on]
    if not targets:
        raise fail("--no-save-model and --no-peft-adapter leave nothing to write")
    taken = [t for t in targets if os.path.exists(os.path.join(a.output_dir, t))]
    if taken:
        raise fail(f"{os.path.join(a.output_dir, taken[0])} exists; choose another --output-dir")
    run_args = _run_args(a.delta)
    spec = a.model if a.model is not None else run_args.get("model")
    # A delta of a run over a quantized base applies to that base dequantized: quantized as the run did.
    quant = run_quant(run_args) if a.model is None or a.model == run_args.get("model") else None
    try:
        source = model_io.resolve(spec)
        model, tokenizer = load_base(source, quant)
    except model_io.ModelError as err:
        raise fail(str(err)) from None
    changed = _delta_weights(a.delta)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()
            if (k in changed if changed is not None else v.dim() == 2)}
    try:
        apply_delta(model, a.delta)
    except DeltaError as err:
        raise fail(f"{err} (the base was {source.name}; pass --model)") from None
    os.makedirs(a.output_dir, exist_ok=True)
    model_entry = save_model_folder(model, tokenizer, os.path.join(a.output_dir, "model")) if a.save_model else None
    adapter_entry = (save_adapter(model, base, os.path.join(a.output_dir, "peft-adapter"), base_name(source))
                     if a.peft_adapter else None)
    print(f"lift-finetune export: {a.delta} on {source.name}"
          f"{f' (dequantized from {quant.describe()})' if quant else ''}")
    print(describe(a.output_dir, model_entry, adapter_entry), flush=True)
    return 0


def _delta_weights(path: str) -> set[str] | None:
    """Names of the weights the delta changes (None where its metadata does not list them)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return set(json.loads((f.metadata() or {})["weights"]))
    except Exception:  # an older or damaged delta: apply_delta says what is wrong with it
        return None


def base_name(source) -> str:
    """What adapter_config.json names as the base: the hub id, folder or GGUF file."""
    if source.gguf_file:
        return os.path.join(os.path.abspath(source.location), source.gguf_file)
    return source.location if not source.offline else os.path.abspath(source.location)


def run_quant(args: dict):
    """The quantize.Quant a run's recorded flags (summary.json's "args") ask for, on the CPU; None for a float run."""
    from argparse import Namespace

    from . import quantize

    flags = Namespace(load_in_4bit=bool(args.get("load_in_4bit")), load_in_8bit=bool(args.get("load_in_8bit")),
                      bnb_4bit_quant_type=args.get("bnb_4bit_quant_type"), bf16=False)
    return quantize.from_args(flags, torch.device("cpu"))


def load_base(source, quant=None):
    """(model, tokenizer) on the CPU: the float base, or for a quantized run its dequantized base, the
    fp32 model the run's delta and adapter apply to."""
    from . import model as model_io, quantize

    model, tokenizer = model_io.load(source, torch.device("cpu"), quant)
    if quant is not None:
        model = quantize.to_float(model, torch.float32, with_delta=False)
    return model, tokenizer


def load_run_base(output_dir: str, device: str = "cpu"):
    """(model, tokenizer): the base model of the lift-finetune run in ``output_dir``, loaded as the run
    loaded it (fp32; a GGUF file dequantized; a --load-in-4bit/8bit base quantized as the run did, then
    dequantized to fp32), for PeftModel.from_pretrained or apply_delta."""
    from . import model as model_io

    with open(os.path.join(output_dir, "summary.json"), encoding="utf-8") as f:
        args = json.load(f)["args"]
    model, tokenizer = load_base(model_io.resolve(args["model"]), run_quant(args))
    return model.to(device), tokenizer
