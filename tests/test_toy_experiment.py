"""The Appendix G.5 toy experiment runs end to end and writes its outputs (tiny settings)."""
import json

from lift_kernels import toy_experiment


def test_toy_experiment_writes_table_results_and_plot(tmp_path, capsys):
    results = toy_experiment.main(["--out", str(tmp_path), "--seeds", "1", "--lrs", "1e-3", "--max-steps", "30",
                                   "--patience", "10", "--pretrain-steps", "20", "--update-interval", "10"])
    assert set(results) == {"full", "lift", "weight_mag", "grad_mag"}
    table = (tmp_path / "table.md").read_text()
    for method in results:
        assert f"| {method} |" in table
        assert results[method][0]["best_val"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["lift"][0]["best_step"] >= 1
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert "best val loss" in capsys.readouterr().out
