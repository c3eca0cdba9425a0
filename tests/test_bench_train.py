"""bench/bench_train.py --tiny: LIFT, LoRA and full fine-tuning trained end to end on the CPU, one JSON."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_train  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "train.json"
    returned = bench_train.main(["--tiny", "--steps", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["results"] == json.loads(json.dumps(returned["results"]))
    return written


def test_every_method_trains_and_is_timed(result):
    assert result["tiny"] and result["dtype"] == "bf16" and result["steps"] == 2
    by = {r["method"]: r for r in result["results"]}
    assert sorted(by) == ["full", "lift", "lora"]
    for r in by.values():
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]), r
        assert r["first_step_s"] > 0 and math.isfinite(r["final_loss"]), r
        assert r["peak_gb"] is None  # no peak memory on the CPU
    # LoRA trains adapters only; LIFT's group is every linear weight but lm_head, fewer than full FT's.
    assert by["lora"]["trainable"] < by["lift"]["trainable"] < by["full"]["trainable"]
    # LIFT selected its entries in the warm-up: rank * (m + n) per weight at the tiny rank 2.
    hidden, inter, layers = 64, 172, 2
    per_layer = 4 * (hidden + hidden) + 3 * (inter + hidden)  # q k v o, gate up down
    assert by["lift"]["selected"] == 2 * per_layer * layers


def test_ratios_are_lift_over_each_baseline(result):
    by = {r["method"]: r for r in result["results"]}
    ratios = result["ratios"]
    for other in ("lora", "full"):
        assert ratios[f"lift_tokens_per_s_vs_{other}"] == pytest.approx(
            by["lift"]["tokens_per_s"] / by[other]["tokens_per_s"])
        assert ratios[f"lift_peak_vs_{other}"] is None


def test_ratios_of_gpu_peaks():
    rows = {"lift": {"tokens_per_s": 90.0, "peak_gb": 12.0}, "lora": {"tokens_per_s": 100.0, "peak_gb": 10.0},
            "full": {"tokens_per_s": 60.0, "peak_gb": 24.0}}
    assert bench_train.ratios(rows) == pytest.approx({"lift_tokens_per_s_vs_lora": 0.9, "lift_peak_vs_lora": 1.2,
                                                      "lift_tokens_per_s_vs_full": 1.5, "lift_peak_vs_full": 0.5})


def test_warmup_must_include_the_selection_step():
    with pytest.raises(SystemExit):
        bench_train.main(["--tiny", "--warmup", "0"])
