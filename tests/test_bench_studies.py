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
    flags = ["--out", str(out), "--small", "--model", tiny, "--rank", "2", "--lra-rank", "4"]
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
