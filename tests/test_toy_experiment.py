"""The Appendix G.5 toy experiment (bench/toy_experiment.py) on tiny seed-fixed settings: every method
fine-tunes (its best validation loss is below the pre-trained model's on the new task), sparse methods
change no more than their budget, and the table, results and plot are written."""
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import toy_experiment  # noqa: E402

FLAGS = ["--seeds", "1", "--lrs", "1e-3", "--max-steps", "30", "--patience", "10", "--pretrain-steps", "20",
         "--update-interval", "10"]


def test_every_method_fine_tunes_and_the_outputs_are_written(tmp_path, capsys):
    results = toy_experiment.main(["--out", str(tmp_path), *FLAGS])
    assert set(results) == {"full", "lift", "weight_mag", "grad_mag"}
    # The pre-trained model (seed 0, 20 steps, as main built it) on the fine-tuning task, before any step.
    base = toy_experiment.pretrain(0, 20)
    _, _, xv, yv = toy_experiment.finetune_data(0)
    with torch.no_grad():
        before = nn.functional.mse_loss(base(xv), yv).item()
    table = (tmp_path / "table.md").read_text()
    for method, (run,) in results.items():
        assert f"| {method} |" in table
        assert math.isfinite(run["best_val"]) and run["best_val"] < 0.9 * before, (method, run["best_val"], before)
        assert run["best_val"] == min(run["val_curve"]) == run["val_curve"][run["best_step"] - 1]
        assert run["train_at_best"] == run["train_curve"][run["best_step"] - 1]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["lift"][0]["best_val"] == results["lift"][0]["best_val"]
    assert saved["zero_baseline"] == [yv.square().mean().item()]
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert "best val loss" in capsys.readouterr().out


def test_sparse_methods_train_at_most_their_budget_of_w():
    """Equal trainable count: between refreshes a sparse method changes at most k = (d + h) * rank
    entries of W; every method trains `a` densely."""
    rank, base = 2, toy_experiment.pretrain(0, 5)
    x, y, _, _ = toy_experiment.finetune_data(0)
    k = (toy_experiment.D + toy_experiment.H) * rank
    for method in ("full", "lift", "weight_mag", "grad_mag"):
        model = toy_experiment.TwoLayer()
        model.load_state_dict(base.state_dict())
        opt = toy_experiment.make_optimizer(model, method, 1e-2, rank, lra_rank=4, interval=100)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        changed_w = (model.W.weight != base.W.weight).sum().item()
        assert (model.a.weight != base.a.weight).float().mean() > 0.5, method
        if method == "full":
            assert changed_w > k, changed_w
        else:
            assert 0 < changed_w <= k, (method, changed_w, k)
