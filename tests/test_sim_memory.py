"""bench/sim_memory.py on a tiny Llama: the simulated categories hold exactly the bytes LIFT keeps."""
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import sim_memory  # noqa: E402


def _args(**kw):
    return Namespace(**{"layers": 2, "seq": 16, "batch": 2, "rank": 2, "lra_rank": 2, "small": True, **kw})


def test_lift_state_gradients_and_weights_are_counted_in_their_categories():
    result = sim_memory.simulate("lift", _args())
    k = result["trainable"]
    # tiny Llama: hidden 64, MLP 172, 4 heads, vocab 256, 2 layers; k = (m + n) * 2 per projection
    assert k == 2 * 2 * (4 * (64 + 64) + 3 * (64 + 172))
    assert [it["selection_calls"] > 0 for it in result["iterations"]] == [True, False, True]
    for it in result["iterations"]:
        end = it["end_bytes"]
        assert end["Optstate"] == 16 * k  # int32 idx, fp32 exp_avg, exp_avg_sq and master per selected entry
        assert end["Gradient"] == 0 and end["Temp"] < 16 * k  # gathered gradients freed by zero_grad
        peak = it["peak_bytes"]
        # at the peak the state is there (iterations 1 and 3: with the selection's temporaries, which
        # count as optimizer memory as step()'s do), not mislabelled as backward temporaries
        assert peak["Optstate"] >= 16 * k
        # fp32 gathered gradients (relabelled from Temp) and at most one dense bf16 gradient, which
        # the sparse-grad hook frees as soon as it has gathered it (the largest is 172 x 64). A
        # selecting iteration peaks in the selection, which runs before the first gradient is gathered.
        assert peak["Gradient"] <= 4 * k + 2 * 172 * 64
        assert (peak["Gradient"] > 0) == (it["selection_calls"] == 0)
    params = 2 * (2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 172 + 2 * 64) + 64)  # bf16 weights and norms
    assert result["peak_bytes"]["Parameter"] == params


def test_lora_adapters_are_fp32_parameters_on_top_of_the_bf16_model():
    result = sim_memory.simulate("lora", _args())
    adapters = result["trainable"]
    assert adapters == 2 * (4 * (64 + 64) + 3 * (64 + 172)) * 2
    base = 2 * (2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 172 + 2 * 64) + 64)
    assert result["peak_bytes"]["Parameter"] == base + 4 * adapters


def test_lift_8bit_state_is_codes_scales_index_and_master():
    from lift_kernels.reference.moment_codes import num_blocks

    result = sim_memory.simulate("lift-8bit", _args())
    k = result["trainable"]
    # per projection: k_i = (m + n) * 2 entries, each with its own blocks of 256
    ks = [2 * (64 + 64)] * 4 + [2 * (64 + 172)] * 3
    scales = 2 * 2 * 4 * sum(num_blocks(ki) for ki in ks)  # 2 layers, 2 moments, fp32
    for it in result["iterations"]:
        # int32 idx, two uint8 codes and the fp32 master per selected entry, the block scales, and
        # the two 256-value fp32 code books (once per device; counted where the tracker sees them made)
        assert it["end_bytes"]["Optstate"] - (10 * k + scales) in (0, 2 * 256 * 4)
