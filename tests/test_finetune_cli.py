"""lift-finetune end to end on a tiny model: outputs, resume after a crash, methods, bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from finetune_fixtures import build_tiny_model, crash_at_step, run_cli
from safetensors import safe_open

import lift_kernels as lk
from lift_finetune import cli, evaluate



@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


def fail_message(model, out, *extra) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(model, out, *extra)
    assert exc.value.code not in (0, None)
    return str(exc.value.code)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_outputs_exist_and_parse(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_cli(tiny_model, out, "--max-steps", "3")
    names = set(os.listdir(out))
    assert {"summary.json", "metrics.jsonl", "predictions.jsonl", "loss_curve.png", "delta.safetensors",
            "checkpoint-000003.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lift" and summary["steps"] == 3 and summary["held_out_examples"] == 6
    assert 0.0 <= summary["accuracy_base"] <= 1.0 and 0.0 <= summary["accuracy_finetuned"] <= 1.0
    assert summary["peak_memory_bytes"] > 0 and summary["wall_seconds"] > 0
    assert set(summary["phase_seconds"]) == {"load", "eval_base", "train", "eval_final", "write"}

    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["lr"] > 0 and r["loss_tokens"] > 0 for r in train_rows)
    assert [r["phase"] for r in rows if r["event"] == "eval"] == ["base", "fine-tuned"]
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == 12
    # The summary's accuracies are the predictions' own: each record judged as evaluate judges it,
    # and each phase's share of correct records is its accuracy.
    for phase, key in (("base", "accuracy_base"), ("fine-tuned", "accuracy_finetuned")):
        records = [r for r in predictions if r["phase"] == phase]
        assert len(records) == 6
        assert all(r["correct"] == evaluate.is_correct(r["generated"], r["reference"]) for r in records)
        assert summary[key] == sum(r["correct"] for r in records) / 6
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The delta applied to a fresh base gives exactly the trained weights of the final checkpoint.
    trained = torch.load(out / "checkpoint-000003.pt", weights_only=True)["trainable"]
    base = load_base(tiny_model)
    lk.apply_delta(base, out / "delta.safetensors")
    state = base.state_dict()
    assert all(torch.equal(state[name], w) for name, w in trained.items())
    # ... and it holds no more entries than LIFT trained (the budget, no refresh in 3 steps).
    assert summary["delta"]["changed_entries"] <= summary["trainable_entries"]
    assert summary["delta"]["changed_entries"] > 0


def test_resume_after_crash_equals_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    common = ["--max-steps", "4", "--save-every", "2", "--update-interval", "3"]  # a refresh after the resume
    run_cli(tiny_model, tmp_path / "whole", *common)

    crash_at_step(monkeypatch, 2, lambda: run_cli(tiny_model, tmp_path / "split", *common))
    assert sorted(os.listdir(tmp_path / "split")) == ["checkpoint-000002.pt"]  # nothing half-written
    run_cli(tiny_model, tmp_path / "split", *common, "--resume")
    whole = [r for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if r["event"] == "train"]
    split = [r for r in read_jsonl(tmp_path / "split" / "metrics.jsonl") if r["event"] == "train"]
    assert [r["loss"] for r in split] == [r["loss"] for r in whole]
    assert [r["lr"] for r in split] == [r["lr"] for r in whole]
    with safe_open(str(tmp_path / "whole" / "delta.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "split" / "delta.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_grad_accumulation_equals_one_large_batch(tiny_model, tmp_path):
    run_cli(tiny_model, tmp_path / "big", "--max-steps", "2", "--batch-size", "4")
    run_cli(tiny_model, tmp_path / "accum", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2")
    big = [r for r in read_jsonl(tmp_path / "big" / "metrics.jsonl") if r["event"] == "train"]
    accum = [r for r in read_jsonl(tmp_path / "accum" / "metrics.jsonl") if r["event"] == "train"]
    assert [r["loss_tokens"] for r in big] == [r["loss_tokens"] for r in accum]
    for a, b in zip(big, accum):  # same examples, loss normalised over the whole step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_resume_refuses_other_settings(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_cli(tiny_model, out, "--max-steps", "2")
    msg = fail_message(tiny_model, out, "--max-steps", "2", "--lr", "1e-3", "--resume")
    assert "--lr" in msg and "other settings" in msg
    msg = fail_message(tiny_model, out, "--max-steps", "2")  # no --resume: never overwrite a run
    assert "already holds a run" in msg


def test_resumed_run_says_from_which_step_and_checkpoint(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(tiny_model, out, "--max-steps", "2")
    capsys.readouterr()
    run_cli(tiny_model, out, "--max-steps", "2", "--resume")
    assert f"resumed from step 2 (checkpoint {out / 'checkpoint-000002.pt'})" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["full", "lora", "magnitude", "random"])
def test_methods(tiny_model, tmp_path, method):
    run_cli(tiny_model, tmp_path / method, "--method", method, "--max-steps", "2")
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["method"] == method
    if method == "lora":  # LoRA at rank r trains (m+n)*r per matrix: LIFT's budget at the same rank
        run_cli(tiny_model, tmp_path / "lift", "--max-steps", "1")
        lift = json.loads((tmp_path / "lift" / "summary.json").read_text())
        assert summary["trainable_entries"] == lift["trainable_entries"]
    if method == "full":
        assert summary["trainable_entries"] == sum(p.numel() for p in load_base(tiny_model).parameters())


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_data_and_held_out_file(tiny_model, tmp_path):
    rows = [{"instruction": f"What is {a} plus {a}?", "input": "", "output": f"{a} + {a} = {2 * a}"}
            for a in range(1, 13)]
    data = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    held = write_jsonl(tmp_path / "test.jsonl", rows[8:])
    run_cli(tiny_model, tmp_path / "run", "--data", data, "--eval-data", held, "--max-steps", "2")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["held_out_examples"] == 4


def test_accuracy_of_known_answers(tiny_model, tmp_path, monkeypatch):
    """Generation patched to give known answers: the base model answers none of the four held-out
    questions, the fine-tuned model the first three (one of them in words around the number); the
    summary, metrics and predictions must say exactly 0 and 0.75."""
    rows = [{"instruction": f"What is {a} plus {a}?", "input": "", "output": f"{a} + {a} = {2 * a}"}
            for a in range(1, 13)]
    data = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    held = write_jsonl(tmp_path / "test.jsonl", rows[8:])  # 9..12: answers 18, 20, 22, 24
    said = {"eval base": ["I do not know", "17", "21", "it is 25"],
            "eval fine-tuned": ["18", "that makes 20.", "1,2 then 22", "23"]}

    def known(model, tokenizer, examples, style, device, *, desc, **kwargs):
        assert [evaluate.reference_answer(ex) for ex in examples] == [r["output"] for r in rows[8:]]
        return list(said[desc])

    monkeypatch.setattr(evaluate, "generate", known)
    out = tmp_path / "run"
    run_cli(tiny_model, out, "--data", data, "--eval-data", held, "--max-steps", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_base"] == 0.0 and summary["accuracy_finetuned"] == 0.75
    evals = {r["phase"]: r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval"}
    assert evals["base"]["accuracy"] == 0.0 and evals["fine-tuned"]["accuracy"] == 0.75
    predictions = read_jsonl(out / "predictions.jsonl")
    assert [(r["phase"], r["generated"], r["correct"]) for r in predictions] == [
        *[("base", text, False) for text in said["eval base"]],
        *[("fine-tuned", text, ok) for text, ok in zip(said["eval fine-tuned"], (True, True, True, False))]]


# ----------------------------------------------------------------------------- bad input
def test_missing_data_file(tiny_model, tmp_path):
    out = tmp_path / "run"
    msg = fail_message(tiny_model, out, "--data", str(tmp_path / "nope.jsonl"))
    assert "data file not found" in msg and "nope.jsonl" in msg
    assert not out.exists()


def test_malformed_jsonl_lines_named(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "ok", "output": "1"},
        "{not json",
        {"instruction": "no output here"},
        "[1, 2]",
        {"instruction": 3, "output": "x"},
    ])
    out = tmp_path / "run"
    msg = fail_message(tiny_model, out, "--data", data)
    assert f"{data}:2: invalid JSON" in msg
    assert f"{data}:3: missing field 'output'" in msg
    assert f"{data}:4: expected a JSON object" in msg
    assert f"{data}:5: field 'instruction' must be a string" in msg
    assert f"{data}:1" not in msg
    assert not out.exists()


def test_missing_model(tmp_path):
    out = tmp_path / "run"
    msg = fail_message(str(tmp_path / "no-such-model"), out)
    assert "model not found" in msg
    msg = fail_message(str(tmp_path / "missing.gguf"), out)
    assert "GGUF file not found" in msg
    assert not out.exists()


def test_model_without_target_modules(tiny_model, tmp_path):
    out = tmp_path / "run"
    msg = fail_message(tiny_model, out, "--target-modules", "c_attn,c_proj")
    assert "matched no trainable nn.Linear" in msg and "q_proj" in msg  # names what the model has
    assert not out.exists()


@pytest.mark.parametrize("method", ["lift", "lora"])
def test_rank_that_does_not_fit(tiny_model, tmp_path, method):
    out = tmp_path / "run"
    msg = fail_message(tiny_model, out, "--method", method, "--rank", "11")
    assert "--rank 11 does not fit" in msg and "k_proj.weight (16x32)" in msg and "--rank 10 or less" in msg
    assert not out.exists()


def test_lra_rank_beyond_a_matrix_selects_by_magnitude(tiny_model, tmp_path):
    """--lra-rank 17 reaches min(m, n) = 16 of k_proj (16x32): its best rank-17 approximation is
    itself, so it trains (selected by |W|) instead of being refused."""
    run_cli(tiny_model, tmp_path / "run", "--lra-rank", "17", "--max-steps", "1", "--max-eval", "1")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1


def test_batch_larger_than_data(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "1"}] * 4)
    msg = fail_message(tiny_model, tmp_path / "run", "--data", data, "--max-eval", "1")  # 3 left to train on
    assert "--batch-size x --grad-accum = 4 exceeds the 3 usable training examples" in msg


def test_max_eval_beyond_the_data_says_how_many_were_held_out(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "1"}] * 10)
    msg = fail_message(tiny_model, tmp_path / "run", "--data", data, "--max-eval", "64")
    assert ("exceeds the 1 usable training examples (0 had no response left within --max-length); 9 of the 10 "
            "examples in --data were held out for evaluation (--max-eval 64), leaving 1 for training: lower "
            "--max-eval or pass --eval-data") in msg
    held = write_jsonl(tmp_path / "held.jsonl", [{"instruction": "q", "output": "1"}] * 2)
    msg = fail_message(tiny_model, tmp_path / "run", "--data", held, "--eval-data", held)  # nothing held out
    assert msg.endswith("within --max-length)")


def test_resume_without_checkpoint(tiny_model, tmp_path):
    msg = fail_message(tiny_model, tmp_path / "run", "--resume")
    assert "no checkpoint" in msg
    msg = fail_message(tiny_model, tmp_path / "run", "--resume", str(tmp_path / "x.pt"))
    assert "checkpoint not found" in msg


def test_resume_from_a_file_that_is_no_checkpoint_gives_advice_not_torch_text(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "q", "output": "1"}] * 3)
    msg = fail_message(tiny_model, tmp_path / "run", "--resume", data)
    assert msg.startswith(f"lift-finetune: error: cannot read checkpoint {data}: the file is damaged or not a "
                          "lift-finetune checkpoint")
    assert "--resume PATH" in msg and "\n" not in msg
    assert "weights_only" not in msg and "[torch.load: UnpicklingError: " in msg  # the cause, in brief, last
    assert not (tmp_path / "run").exists()


def test_bad_flag_values(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(tiny_model, tmp_path / "run", "--rank", "0")
    assert exc.value.code == 2 and "--rank must be >= 1" in capsys.readouterr().err


def test_command_line_exit_status(tmp_path):
    """The real entry point: a non-zero status and the message on stderr."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lift_finetune", "--data", str(tmp_path / "none.jsonl"),
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 1
    assert "lift-finetune: error: data file not found" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_moment_bits_8_trains_is_recorded_and_resume_refuses_a_mismatch(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_cli(tiny_model, out, "--max-steps", "2", "--moment-bits", "8")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["moment_bits"] == 8
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    msg = fail_message(tiny_model, out, "--max-steps", "2", "--resume")  # default --moment-bits 32
    assert "--moment-bits 8 (now 32)" in msg and "other settings" in msg


def test_moment_bits_8_is_refused_for_methods_without_liftadamw(tiny_model, tmp_path, capsys):
    fail_message(tiny_model, tmp_path / "run", "--method", "lora", "--moment-bits", "8")
    assert "--moment-bits 8 applies to LIFTAdamW" in capsys.readouterr().err
