"""The three SmolLM2 reproduction scripts (bench/finetune_*.py): --small smoke runs, resume, statistics.

The smoke runs use the tiny transformers model of finetune_fixtures (every code path, seconds per
run) instead of SmolLM2-135M, whose --small runs take minutes on a shared CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_fixtures import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from study_runs import RunStore  # noqa: E402
from study_stats import bootstrap, ratio_bootstrap, t_interval  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


def _script(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}


def test_learning_forgetting_small_runs_and_resumes(tiny, tmp_path):
    out = tmp_path / "forgetting"
    # the float methods only: the 4-bit ones have their own test below
    flags = ["--out", str(out), "--small", "--model", tiny, "--rank", "2", "--lra-rank", "4",
             "--methods", "lift,lora,random"]
    first = _script("finetune_learning_forgetting.py", *flags, "--workers", "2")
    result = json.loads((out / "forgetting.json").read_text())
    # Search: LIFT at 2 learning rates, LoRA at 1; seed 1 at each chosen rate; the ablation random
    # at LIFT's chosen rate, seeds 0 and 1; plus the base.
    runs = sorted(p.stem for p in (out / "runs").glob("*.json"))
    assert len(runs) == 8 and "base" in runs
    assert set(result["methods"]) == {"lift", "lora", "random"}
    assert result["methods"]["random"]["lr"] == result["methods"]["lift"]["lr"]
    verdicts = {c["claim"]: c["verdict"] for c in result["claims"]}
    assert verdicts["LIFT's selection beats random (target)"] != "not run"
    assert verdicts["LIFT >= full FT on the target"] == "not run"
    for m in result["methods"].values():
        assert m["seeds"] == [0, 1] and m["trainable"] == result["methods"]["lift"]["trainable"]
        assert len(m["loss"]) == 2 and all(len(curve) == 2 for curve in m["loss"])
    run = json.loads((out / "runs" / (result["methods"]["lift"]["runs"][0] + ".json")).read_text())
    assert len(run["val_correct"]) == 4 and len(run["test_correct"]) == 4 and len(run["text_nll"]) == 4
    assert not list((out / "runs").glob("*.claim")) and not list(out.glob("train/*/checkpoint-*.pt"))
    assert (out / "forgetting.png").stat().st_size > 0 and (out / "learning_curves.png").stat().st_size > 0
    before = _mtimes(out / "runs")
    second = _script("finetune_learning_forgetting.py", *flags)  # a rerun skips every finished run
    assert _mtimes(out / "runs") == before and "study: " not in second
    assert second.split("| method | lr | seeds")[1] == first.split("| method | lr | seeds")[1]


def test_noise_perturbation_small_resumes_and_extends(tiny, tmp_path):
    out = tmp_path / "noise"
    flags = ["--out", str(out), "--small", "--model", tiny, "--lra-rank", "4"]
    _script("finetune_noise_perturbation.py", *flags)
    before = _mtimes(out / "rows")
    assert len(before) == 1 + 3 * 2  # base + 3 selectors x 2 densities x 1 seed
    _script("finetune_noise_perturbation.py", *flags, "--seeds", "2")  # adds seed 1 only
    after = _mtimes(out / "rows")
    assert len(after) == 1 + 3 * 2 * 2 and all(after[k] == v for k, v in before.items())
    table = (out / "noise_perturbation.md").read_text()
    assert "| 1% |" in table and "| 5% |" in table and "LIFT - random" in table


def test_lra_rank_grid_small_reuses_cells(tiny, tmp_path):
    out = tmp_path / "grid"
    flags = ["--out", str(out), "--small", "--model", tiny]
    _script("finetune_lra_rank_grid.py", *flags)
    cells = json.loads((out / "lra_grid.json").read_text())["cells"]
    assert [(c["rank"], c["lra_rank"], c["seed"]) for c in cells] == [(4, 8, 0), (8, 8, 0)]
    summaries = {c["run"]: os.stat(os.path.join(c["run"], "summary.json")).st_mtime_ns for c in cells}
    _script("finetune_lra_rank_grid.py", *flags)
    assert {r: os.stat(os.path.join(r, "summary.json")).st_mtime_ns for r in summaries} == summaries


def test_t_interval():
    mean, low, high = t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert high - mean == pytest.approx(4.303 * 0.1 / 3 ** 0.5)  # t(0.975, 2) * sd / sqrt(n)
    assert t_interval([0.4]) == (0.4, 0.4, 0.4)


def test_bootstrap_separates_a_real_difference_only():
    ones, half = [1.0] * 200, [float(i % 2) for i in range(200)]
    low, high = bootstrap({"a": [ones, ones], "b": [half, half]}, lambda m: m["a"] - m["b"])
    assert 0.4 < low <= 0.5 <= high < 0.6
    low, high = bootstrap({"a": [half, half], "b": [half, half]}, lambda m: m["a"] - m["b"])
    assert low == high == 0.0  # same items, same scores: paired resampling leaves no difference


def test_ratio_bootstrap_is_the_perplexity_change():
    tokens = [10] * 50
    base = ([20.0] * 50, tokens)
    worse = ([20.0 + 10 * 0.1] * 50, tokens)  # +0.1 nats per token: perplexity x e^0.1
    low, high = ratio_bootstrap({"a": [worse]}, base, lambda m: m["a"])
    assert low == pytest.approx(100 * (2.718281828 ** 0.1 - 1)) == high


def test_run_store_claims_once_and_takes_over_stale_claims(tmp_path):
    store = RunStore(str(tmp_path))
    assert store.claim("x") and not store.claim("x")  # this process holds it
    store.release("x")
    (tmp_path / "y.claim").write_text("999999999")  # a worker that is gone
    assert store.claim("y")
    store.save("y", {"done": True})
    assert not store.claim("y") and store.load("y") == {"done": True}


# --- 4-bit methods (issue 20 item 5): lift-4bit (LIFT over an NF4 base) and qlora -----------------------

def _has_load_in_4bit() -> bool:
    try:
        import bitsandbytes  # noqa: F401

        from lift_finetune import cli
    except ImportError:
        return False
    return "--load-in-4bit" in cli.parser().format_help()


def test_4bit_methods_borrow_their_float_counterparts_learning_rate(tmp_path):
    import finetune_learning_forgetting as study

    cfg = dict(study.FULL)
    jobs = study.plan(study.FULL_LRS, cfg, 16)
    quant = [(m, s, phase) for _, m, _, s, phase in jobs if m in ("lift-4bit", "qlora")]
    # no search of their own: seeds 0-2 each, after every float method's jobs
    assert quant == [(m, s, "seed") for s in range(3) for m in ("lift-4bit", "qlora")]
    assert [m for _, m, *_ in jobs][-6:] == [m for m, _, _ in quant]
    assert [m for _, m, *_ in study.plan(study.FULL_LRS, cfg, 16, {"lift-4bit"})] == ["lift-4bit"] * 3
    store = RunStore(str(tmp_path))
    assert study.chosen_lr(store, "lift-4bit", study.FULL_LRS, cfg, 16) is None  # LIFT's search unfinished
    for method, lr, val in [("lift", 2e-4, 0.5), ("lift", 5e-4, 0.7), ("lora", 2e-4, 0.6), ("lora", 5e-4, 0.4)]:
        key = study.run_key(method, lr, 0, cfg, 16)
        store.save(key, {"key": key, "lr": lr, "val_accuracy": val, "final_loss": 0.1})
    assert study.chosen_lr(store, "lift-4bit", study.FULL_LRS, cfg, 16) == 5e-4
    assert study.chosen_lr(store, "qlora", study.FULL_LRS, cfg, 16) == 2e-4
    assert study.CLI["lift-4bit"][0] == "lift" and study.CLI["qlora"][0] == "lora"
    assert "--load-in-4bit" in study.QUANT_FLAGS and "--save-model" in study.QUANT_FLAGS


def _fake_run(method, seed, correct, nll, cfg, lr=5e-4):
    return {"key": f"{method}-{seed}", "method": method, "lr": lr, "seed": seed, "steps": cfg["steps"],
            "batch": cfg["batch"], "rank": 16, "trainable": 100, "val_accuracy": 0.5, "final_loss": 0.1,
            "val_correct": [1] * cfg["val"], "test_correct": correct, "test_accuracy": sum(correct) / len(correct),
            "text_nll": nll, "text_tokens": [100] * len(nll), "loss": [1.0, 0.5], "wall_seconds": 1.0}


def test_report_has_the_4bit_reference_and_comparisons(tmp_path):
    """Mocked runs: 4-bit LIFT clearly ahead of QLoRA on the target, equal to fp32 LIFT; the untrained
    4-bit base as the reference row, scored against the fp32 base."""
    import finetune_learning_forgetting as study
    from study_report import summarize, tables

    cfg = {**study.FULL, "val": 2, "test": 40, "texts": 8}
    lrs = {"lift": [5e-4], "lora": [5e-4], "lift-4bit": "as-lift", "qlora": "as-lora"}
    store = RunStore(str(tmp_path / "runs"))
    good = [1] * 30 + [0] * 10
    bad = [1] * 10 + [0] * 30
    nll = [200.0 + i for i in range(8)]
    store.save("base", {"key": "base", "correct": [0] * 42, "text_nll": nll, "text_tokens": [100] * 8})
    store.save("base-4bit", {"key": "base-4bit", "correct": [0, 0] + [1] * 4 + [0] * 36,
                             "text_nll": [x + 1.0 for x in nll], "text_tokens": [100] * 8})
    for seed in range(3):
        for method, correct in [("lift", good), ("lift-4bit", good), ("lora", good), ("qlora", bad)]:
            store.save(f"{method}-{seed}", _fake_run(method, seed, correct, [x + 0.5 for x in nll], cfg))
    s = summarize(str(tmp_path), lrs, cfg, 16)
    assert set(s["methods"]) == {"lift", "lora", "lift-4bit", "qlora"}
    assert s["methods"]["lift-4bit"]["lr"] == 5e-4 and s["methods"]["lift-4bit"]["seeds"] == [0, 1, 2]
    ref = s["reference_4bit"]
    assert ref["test_accuracy"] == pytest.approx(0.1) and ref["acc_vs_base"] == pytest.approx(0.1)
    assert ref["ppl_change"] == pytest.approx(100 * (2.718281828459045 ** 0.01 - 1))  # +1 nat per 100 tokens
    verdicts = {c["claim"]: c for c in s["claims"]}
    assert verdicts["4-bit LIFT vs QLoRA (target)"]["verdict"] == "a > b"
    assert verdicts["4-bit LIFT vs QLoRA (target)"]["difference_by_seed"] == {0: 0.5, 1: 0.5, 2: 0.5}
    same = verdicts["4-bit LIFT vs fp32 LIFT (target)"]
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["verdict"] == "not resolved at this scale"
    assert verdicts["QLoRA vs fp32 LoRA (target)"]["verdict"] == "a < b"
    text = tables(s, cfg)
    assert "| 4-bit base, untrained (reference) |" in text and "4-bit LIFT vs QLoRA (target) | +50.00 points" in text
    # the paper's claims table keeps its own rows; the comparisons have theirs
    assert text.count("4-bit LIFT vs QLoRA (target)") == 1


def test_scorer_scores_a_saved_folder_as_the_same_model_via_its_delta(tiny, tmp_path):
    """score_folder (how 4-bit runs are scored) gives what score(delta) gives for the same weights, and
    a saved model that lacks only the tied lm_head loads; a foreign one is refused."""
    import torch
    from study_eval import Scorer

    import lift_kernels as lk

    scorer = Scorer(torch.device("cpu"), 6, 3, max_new_tokens=4, model=tiny)
    model = scorer.model
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    lk.save_delta(model, scorer.base_state, str(tmp_path / "delta.safetensors"))
    model.save_pretrained(str(tmp_path / "model"), safe_serialization=True)
    model.load_state_dict(scorer.base_state)
    via_delta = scorer.score(str(tmp_path / "delta.safetensors"))
    via_folder = scorer.score_folder(str(tmp_path / "model"))
    assert via_folder.pop("ignored_tensors") == [] and via_folder == via_delta
    assert scorer.score(None)["text_nll"] != via_folder["text_nll"]  # the base was put back, and differs
    with pytest.raises(ValueError, match="does not fit"):  # a trained weight missing: refused
        scorer._load_weights({"not.a.weight": torch.zeros(1)})
    # a tensor the model has no place for is left out (as from_pretrained does) and named
    extra = {**scorer.base_state, "model.layers.0.mlp.up_proj.base_layer.weight": torch.zeros(1)}
    assert scorer._load_weights(extra) == ["model.layers.0.mlp.up_proj.base_layer.weight"]
    assert all(torch.equal(v, scorer.base_state[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif(not _has_load_in_4bit(), reason="needs bitsandbytes and lift-finetune --load-in-4bit")
def test_learning_forgetting_small_4bit_runs_score_the_merged_model(tiny, tmp_path):
    out = tmp_path / "forgetting"
    flags = ["--out", str(out), "--small", "--model", tiny, "--rank", "2", "--lra-rank", "4",
             "--methods", "lift,lora,lift-4bit,qlora"]
    _script("finetune_learning_forgetting.py", *flags)
    result = json.loads((out / "forgetting.json").read_text())
    assert {"lift-4bit", "qlora"} <= set(result["methods"])
    assert result["methods"]["lift-4bit"]["lr"] == result["methods"]["lift"]["lr"]
    assert result["methods"]["qlora"]["lr"] == result["methods"]["lora"]["lr"]
    for method in ("lift-4bit", "qlora"):
        for key in result["methods"][method]["runs"]:
            run = json.loads((out / "runs" / f"{key}.json").read_text())
            assert "--load-in-4bit" in run["flags"] and run["scored"] == "model folder (merged fp32)"
            # the folder the run saved is exactly dequant(base) + its delta
            check = run["folder_check"]
            assert check["entries_differing"] == 0 and check["max_abs_difference"] == 0.0
            if method == "lift-4bit":  # a sparse change within LIFT's budget
                assert 0 < check["changed_vs_dequantized_base"] <= run["trainable"]
            else:  # QLoRA merged: a change of at most LoRA's rank per matrix
                assert 0 < check["max_rank_of_change"] <= 2
            assert run["quantized_base"]["bits"] == 4
    ref = json.loads((out / "runs" / "base-4bit.json").read_text())
    base = json.loads((out / "runs" / "base.json").read_text())
    assert ref["quantized_base"]["quant_type"] == "nf4" and ref["text_nll"] != base["text_nll"]
    assert result["reference_4bit"] is not None
    verdicts = {c["claim"]: c["verdict"] for c in result["claims"]}
    assert verdicts["4-bit LIFT vs QLoRA (target)"] != "not run"
    before = _mtimes(out / "runs")
    second = _script("finetune_learning_forgetting.py", *flags)  # a rerun skips every finished run
    assert _mtimes(out / "runs") == before and "study: " not in second


def test_methods_without_the_learning_rate_they_borrow_are_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "finetune_learning_forgetting.py"), "--out",
                           str(tmp_path), "--small", "--methods", "qlora", "--workers", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "takes lora's chosen learning rate; list lora too" in done.stderr
