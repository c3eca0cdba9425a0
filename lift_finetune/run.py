"""One fine-tuning run, start to finish: check inputs, evaluate the base, train, evaluate, write results.

Every input is checked (data, model, method, checkpoint) before the output folder is created, and
every file in it is written atomically, so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field

import torch

from lift_kernels import info, save_delta
from lift_kernels.build import ensure as ensure_extension
from . import checkpoint, data, evaluate, export, methods, model as model_io, quantize, report, schedule
from .features import encode, resolve_style
from .train import LoopConfig, steps_per_epoch, train

_BUILTIN_TRAIN, _BUILTIN_TEST = 5000, 500
# Run length by device, for the flags left unset. CPU: 32 steps of 8 problems and 64 held-out problems,
# sized to finish well under 10 minutes on a busy 2-core machine (measurements in the README).
# Accelerator: 3 epochs over the built-in training set, as the paper's math runs, and the whole held-out set.
CPU_DEFAULTS = {"max_steps": 32, "epochs": None, "batch_size": 8, "max_eval": 64}
ACCEL_DEFAULTS = {"max_steps": None, "epochs": 3, "batch_size": 16, "max_eval": None}
# Flags that change the trajectory: a checkpoint resumes only a run with the same values.
_FINGERPRINT = ("model", "data", "eval_data", "method", "target_modules", "rank", "lra_rank", "update_interval",
                "svd", "lr", "schedule", "warmup", "weight_decay", "max_grad_norm", "batch_size", "grad_accum",
                "max_steps", "seed", "max_length", "prompt_style", "bf16", "moment_bits", "load_in_4bit",
                "load_in_8bit", "bnb_4bit_quant_type")
# Fingerprint flags added after checkpoints were written without them: the value those runs had.
_FINGERPRINT_ADDED = {"moment_bits": 32, "load_in_4bit": False, "load_in_8bit": False, "bnb_4bit_quant_type": None}


def fail(message: str) -> SystemExit:
    return SystemExit(f"lift-finetune: error: {message}")


def _device(spec: str | None) -> torch.device:
    if spec is None:
        accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accel or torch.device("cpu")
    try:
        device = torch.device(spec)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise fail(f"--device {spec}: {err}") from None
    return device


def _apply_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    defaults = CPU_DEFAULTS if device.type == "cpu" else ACCEL_DEFAULTS
    if args.max_steps is None and args.epochs is None:
        args.max_steps, args.epochs = defaults["max_steps"], defaults["epochs"]
    for key in ("batch_size", "max_eval"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.bf16 is None:
        args.bf16 = device.type != "cpu" and torch.accelerator.is_available() and _bf16_supported(device)
    if args.svd == "auto":
        # fast on the CPU too: at equal quality (agreement with exact >= 0.998 on every matrix) it is
        # as fast as exact or faster on the main job's model (SmolLM2-135M, rank 16, lra_rank 32, 2 cores,
        # medians of interleaved rounds scaled to the whole model: 6.3 vs 5.8 s alone, 6.2 vs 18.3 s
        # beside a busy process, 6.5 vs 10.9 s on one thread; bench/bench_selection_cpu.py)
        args.svd = "fast"
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.data is None else 256


def _bf16_supported(device: torch.device) -> bool:
    module = torch.get_device_module(device)
    return bool(getattr(module, "is_bf16_supported", lambda: False)())


def _datasets(args: argparse.Namespace):
    """(train, held-out) examples, the held-out cut to --max-eval."""
    if args.data is None:
        if args.eval_data is not None:
            raise fail("--eval-data needs --data (the built-in set has its own held-out split)")
        train_set, test_set = data.arithmetic_problems(_BUILTIN_TRAIN, _BUILTIN_TEST)
    else:
        train_set = data.load_jsonl(args.data)
        if args.eval_data is not None:
            test_set = data.load_jsonl(args.eval_data)
        else:  # hold out --max-eval examples of --data, chosen by --seed, and train on the rest
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed)).tolist()
            n_test = min(args.max_eval or max(1, len(train_set) // 10), len(train_set) - 1)
            test_set = [train_set[i] for i in order[:n_test]]
            train_set = [train_set[i] for i in order[n_test:]]
    if args.max_eval is not None:
        test_set = test_set[:args.max_eval]
    return train_set, test_set


def _held_out_note(args: argparse.Namespace, n_train: int, n_held: int) -> str:
    """Where the training examples went when --max-eval held them out of --data (else nothing to add)."""
    if args.data is None or args.eval_data is not None:
        return ""
    rule = f"--max-eval {args.max_eval}" if args.max_eval is not None else "a tenth, --max-eval being unset"
    return (f"; {n_held} of the {n_train + n_held} examples in --data were held out for evaluation ({rule}), "
            f"leaving {n_train} for training: lower --max-eval or pass --eval-data")


def _checkpoint_to_resume(args: argparse.Namespace) -> str | None:
    """The checkpoint file --resume asks for (None for a fresh run); refuses to overwrite an earlier run."""
    existing = checkpoint.checkpoint_files(args.output_dir) if os.path.isdir(args.output_dir) else []
    if args.resume is None:
        if existing or os.path.exists(os.path.join(args.output_dir, "summary.json")):
            raise fail(f"{args.output_dir} already holds a run; pass --resume to continue it or choose "
                       "another --output-dir")
        return None
    if args.resume != "latest":
        if not os.path.isfile(args.resume):
            raise fail(f"--resume: checkpoint not found: {args.resume}")
        return args.resume
    if not existing:
        raise fail(f"--resume: no checkpoint-*.pt in {args.output_dir}")
    return existing[-1]


def _load_checkpoint(path: str, fingerprint: dict) -> dict:
    """The checkpoint at ``path``, checked to come from a run with the same settings."""
    payload = checkpoint.load(path)
    saved = payload["extra"]["fingerprint"]
    saved = {**_FINGERPRINT_ADDED, **saved}
    differs = [k for k in _FINGERPRINT if saved.get(k) != fingerprint.get(k)]
    if differs:
        detail = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {fingerprint.get(k)!r})" for k in differs)
        raise fail(f"{path} was written by a run with other settings: {detail}")
    return payload


@dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written."""
    source: model_io.ModelSource
    tokenizer: object
    style: str
    features: list
    dropped: int
    test_set: list
    setup: methods.Setup
    scheduler: object
    fingerprint: dict
    quant: quantize.Quant | None = None
    start_step: int = 0
    history: list = field(default_factory=list)
    base_eval: dict | None = None


def _kernels_line(device: torch.device) -> str:
    """Which lift_kernels build runs: a user (and CI) sees at once whether the compiled extension loaded."""
    ensure_extension()  # a plain `pip install .` compiles _C on first use: now, so that this line is true
    facts = info()
    ext = facts["extension"]
    built = "compiled extension loaded" if ext["loaded"] else f"compiled extension NOT loaded: {ext['error']}"
    ops = facts["ops"]
    where = device.type if device.type in ops["sparse_adamw_step"] else "cpu"
    used = ", ".join(f"{op} {ops[op][where]['backend']}" for op in ops)
    return f"lift_kernels {facts['version']} ({built}); backends on {where}: {used}"


def _prepare(args: argparse.Namespace, device: torch.device) -> Prepared:
    try:
        resume_from = _checkpoint_to_resume(args)
        train_set, test_set = _datasets(args)
        source = model_io.resolve(args.model)
        quant = quantize.from_args(args, device)
        print(f"lift-finetune: {args.method} on {source.name}"
              f"{f', base quantized to {quant.describe()}' if quant else ''}, device {device}", flush=True)
        print(f"lift-finetune: {_kernels_line(device)}", flush=True)
        model, tokenizer = model_io.load(source, device, quant)
        style = resolve_style(tokenizer, args.prompt_style)
        features, dropped = encode(tokenizer, train_set, style, args.max_length)
        per_step = args.batch_size * args.grad_accum
        if len(features) < per_step:
            raise fail(f"--batch-size x --grad-accum = {per_step} exceeds the {len(features)} usable training "
                       f"examples ({dropped} had no response left within --max-length)"
                       f"{_held_out_note(args, len(train_set), len(test_set))}")
        if args.max_steps is None:
            args.max_steps = max(1, math.ceil(args.epochs * steps_per_epoch(len(features), args.batch_size,
                                                                             args.grad_accum)))
        fingerprint = {k: getattr(args, k) for k in _FINGERPRINT}
        payload = None if resume_from is None else _load_checkpoint(resume_from, fingerprint)
        hp = methods.Hyper(lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay, rank=args.rank,
                           lra_rank=args.lra_rank, update_interval=args.update_interval, seed=args.seed,
                           target_modules=args.target_modules, svd=args.svd, moment_bits=args.moment_bits,
                           quant=quant)
        setup = methods.build(args.method, model, hp)
        scheduler = schedule.build(setup.optimizer, args.schedule, schedule.warmup_steps(args.warmup, args.max_steps),
                                   args.max_steps)
        prep = Prepared(source, tokenizer, style, features, dropped, test_set, setup, scheduler, fingerprint, quant)
        if payload is not None:
            prep.start_step = checkpoint.restore(payload, setup.model, setup.optimizer, scheduler, device,
                                                 resume_from)
            prep.history, prep.base_eval = payload["extra"]["history"], payload["extra"]["base_eval"]
            print(f"lift-finetune: resumed from step {prep.start_step} (checkpoint {resume_from})", flush=True)
        return prep
    except (data.DataError, model_io.ModelError, methods.MethodError, checkpoint.CheckpointError) as err:
        raise fail(str(err)) from None


def _evaluate(phase: str, model, prep: Prepared, args: argparse.Namespace, device: torch.device) -> dict:
    acc, records = evaluate.accuracy(model, prep.tokenizer, prep.test_set, prep.style, device,
                                     batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
                                     bf16=args.bf16, desc=f"eval {phase}")
    print(f"{phase} model held-out exact match: {acc:.3f} ({len(records)} examples)", flush=True)
    return {"phase": phase, "accuracy": acc, "n": len(records), "records": records}


def run(args: argparse.Namespace) -> dict:
    """Fine-tune as ``args`` say; returns the summary also written to summary.json."""
    clock = _PhaseClock()
    device = _device(args.device)
    _apply_device_defaults(args, device)
    prep = _prepare(args, device)
    clock.lap("load")
    print(f"train: {len(prep.features)} examples ({prep.dropped} dropped), {args.max_steps} steps of "
          f"{args.batch_size * args.grad_accum}; held-out: {len(prep.test_set)}; "
          f"trainable entries: {prep.setup.trainable:,}", flush=True)
    if prep.base_eval is None:  # a resumed run has it from its checkpoint
        prep.base_eval = _evaluate("base", prep.setup.model, prep, args, device)
    clock.lap("eval_base")
    os.makedirs(args.output_dir, exist_ok=True)
    loop = LoopConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
                      max_grad_norm=args.max_grad_norm, bf16=args.bf16, seed=args.seed,
                      save_every=args.save_every, output_dir=args.output_dir)
    history = train(prep.setup.model, prep.setup.optimizer, prep.scheduler, prep.features, loop, device=device,
                    pad_id=prep.tokenizer.pad_token_id, start_step=prep.start_step, history=prep.history,
                    extra={"fingerprint": prep.fingerprint, "base_eval": prep.base_eval})
    clock.lap("train")
    tuned = prep.setup.export()
    final_eval = _evaluate("fine-tuned", tuned, prep, args, device)
    clock.lap("eval_final")
    return _write_results(args, prep, device, clock, tuned, history, final_eval)


class _PhaseClock:
    """Wall seconds per phase of this session (a resumed run counts only its own)."""

    def __init__(self):
        self.began = self._last = time.time()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.phases[name] = round(now - self._last, 2)
        self._last = now

    def total(self) -> float:
        return time.time() - self.began


def _write_results(args, prep: Prepared, device, clock: _PhaseClock, tuned, history, final_eval) -> dict:
    out, base_eval = args.output_dir, prep.base_eval
    if prep.setup.to_float is not None:
        stats, model_entry, adapter_entry, quant_entry = _write_quantized(args, prep)
    else:
        stats, model_entry, adapter_entry = _write_float(args, prep, tuned)
        quant_entry = None
    evals = [{k: v for k, v in e.items() if k != "records"} for e in (base_eval, final_eval)]
    report.write_metrics(os.path.join(out, "metrics.jsonl"), history, evals)
    report.write_jsonl(os.path.join(out, "predictions.jsonl"),
                       [{"phase": e["phase"], **r} for e in (base_eval, final_eval) for r in e["records"]])
    report.plot_loss(os.path.join(out, "loss_curve.png"), history,
                     f"{args.method} on {prep.source.name} (rank {args.rank})")
    clock.lap("write")
    peak, peak_kind = report.peak_memory(device)
    rss_mib = report.rss_high_water_mib()
    summary = {
        "model": prep.source.name, "method": args.method, "device": str(device),
        "trainable_entries": prep.setup.trainable, "steps": args.max_steps, "held_out_examples": final_eval["n"],
        "accuracy_base": base_eval["accuracy"], "accuracy_finetuned": final_eval["accuracy"],
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind, "rss_high_water_mib": rss_mib,
        "wall_seconds": round(clock.total(), 2), "phase_seconds": clock.phases,
        "delta": {"path": "delta.safetensors", "bytes": stats.file_bytes, "changed_entries": stats.entries,
                  "tensors": stats.tensors, "model_bytes": stats.model_bytes, "ratio": stats.ratio},
        "model_folder": model_entry, "peft_adapter": adapter_entry, "quantized_base": quant_entry,
        "args": vars(args),
    }
    report.write_json(os.path.join(out, "summary.json"), summary)
    phases = ", ".join(f"{k} {report.human_seconds(v)}" for k, v in clock.phases.items())
    print(f"\nheld-out exact match: base {base_eval['accuracy']:.3f} -> fine-tuned {final_eval['accuracy']:.3f} "
          f"({final_eval['n']} examples)\n"
          f"peak memory: {report.human_bytes(peak)} ({peak_kind})"
          + (f"; RSS high-water mark {rss_mib:.0f} MiB" if device.type != "cpu" else "") + "\n"
          f"wall time: {report.human_seconds(summary['wall_seconds'])} ({phases})\n"
          f"delta: {os.path.join(out, 'delta.safetensors')} {report.human_bytes(stats.file_bytes)} = "
          f"{100 * stats.ratio:.2f}% of the model's {report.human_bytes(stats.model_bytes)} "
          f"({stats.entries:,} changed entries in {stats.tensors} tensors)\n"
          + (export.describe(out, model_entry, adapter_entry) + "\n" if model_entry or adapter_entry else "")
          + f"metrics: {os.path.join(out, 'metrics.jsonl')}, loss curve: {os.path.join(out, 'loss_curve.png')}",
          flush=True)
    return summary


def _adapter_skipped(args) -> dict | None:
    if args.method in ("full", "lora"):
        return {"path": None, "skipped": f"--method {args.method} changes every entry of its weights, "
                                         "more than a SHiRA adapter holds"}
    return None


def _write_float(args, prep: Prepared, tuned):
    out = args.output_dir
    stats = save_delta(tuned, prep.setup.base, os.path.join(out, "delta.safetensors"))
    model_entry = adapter_entry = None
    if args.save_model:
        model_entry = export.save_model_folder(tuned, prep.tokenizer, os.path.join(out, "model"))
    if args.peft_adapter:
        adapter_entry = _adapter_skipped(args) or export.save_adapter(
            tuned, prep.setup.base, os.path.join(out, "peft-adapter"), export.base_name(prep.source))
    return stats, model_entry, adapter_entry


def _write_quantized(args, prep: Prepared):
    """Delta, model folder and adapter of a run over a quantized base, all relative to the dequantized base
    (quantize.py): the trained model is exactly dequant(base) + delta (LIFT) or dequant(base) + LoRA."""
    out, setup = args.output_dir, prep.setup
    lift = args.method != "lora"
    entry = {**prep.quant.as_dict(), "base": "dequantized fp32 (the delta and adapter apply to it)"}
    if lift:  # the sparse delta straight from the LIFTQuantLinear layers (lift_kernels.delta)
        sizes = [m.delta_size for m in setup.model.modules() if hasattr(m, "delta_size")]
        # in memory: an fp32 value and an int32 position per entry (the union of the selections so far)
        entry.update(trained_delta_entries=int(sum(sizes)), trained_delta_bytes=int(sum(sizes)) * 8)
        stats = save_delta(setup.model, {}, os.path.join(out, "delta.safetensors"))
    adapter = args.peft_adapter and not _adapter_skipped(args)
    if lift and not (adapter or args.save_model):
        return stats, None, _adapter_skipped(args) if args.peft_adapter else None, entry
    base = setup.float_base() if not lift or adapter else None
    float_model = setup.to_float(torch.float32)  # the quantized layers are gone after this
    if not lift:
        stats = save_delta(float_model, base, os.path.join(out, "delta.safetensors"))
    adapter_entry = None
    if args.peft_adapter:
        adapter_entry = _adapter_skipped(args) or export.save_adapter(
            float_model, base, os.path.join(out, "peft-adapter"), export.base_name(prep.source))
        if adapter_entry.get("path"):
            adapter_entry["base"] = "the dequantized base (lift_finetune.export.load_run_base)"
    model_entry = None
    if args.save_model:
        # bf16 when the run computed in bf16, else fp32: the fp32 weights are the exact trained ones.
        if args.bf16:
            float_model.to(torch.bfloat16)
        model_entry = export.save_model_folder(float_model, prep.tokenizer, os.path.join(out, "model"))
    return stats, model_entry, adapter_entry, entry
