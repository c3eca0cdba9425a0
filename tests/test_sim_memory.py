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


def _nf4_projection(out_features, in_features):
    """A module holding one NF4 q_proj on fake storage, as the 4-bit methods build their projections."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with torch.device("meta"):
        model = torch.nn.Module()
        model.q_proj = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    sim_memory.quantize_nf4(model)
    sim_memory.to_fake(model, mode)
    return model, mode


def test_nf4_weight_has_the_layout_bitsandbytes_quantizes_to():
    import pytest
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    model, _ = _nf4_projection(172, 64)
    fake = model.q_proj.weight
    packed, real = bnb.functional.quantize_4bit(torch.randn(172, 64, dtype=torch.bfloat16), blocksize=64,
                                                compress_statistics=True, quant_type="nf4")

    def layout(t):
        return None if t is None else (tuple(t.shape), t.dtype)

    assert layout(fake) == layout(packed) == ((172 * 64 // 2, 1), torch.uint8)
    state = fake.quant_state
    assert state.nested and real.nested and state.blocksize == real.blocksize == 64
    for a, b in ((state, real), (state.state2, real.state2)):
        assert [layout(a.absmax), layout(a.code), layout(a.offset)] == [layout(b.absmax), layout(b.code), layout(b.offset)]
    assert layout(state.absmax) == ((172,), torch.uint8)  # one 8-bit absmax per 64 weights
    assert isinstance(model.q_proj, bnb.nn.Linear4bit) and not fake.requires_grad


def test_unfused_gemm_4bit_holds_the_dequantized_weight_while_it_writes_the_output(monkeypatch):
    import pytest
    import torch

    pytest.importorskip("bitsandbytes")
    model, mode = _nf4_projection(128, 256)
    rows = 8
    with mode:
        x = torch.empty(rows, 256, dtype=torch.bfloat16)
    for max_m, unfused in ((rows, False), (rows - 1, True)):
        monkeypatch.setattr(sim_memory, "GEMM_4BIT_CUSTOM_MAX_M", max_m)
        tracker = sim_memory.SelectionAwareTracker(2)
        tracker.track_external(model)
        tracker.track_quant_states(model)
        with tracker, torch.no_grad():
            model.q_proj(x)
        peak = sim_memory.by_category(tracker.get_tracker_snapshot("peak"))
        assert tracker.gemm_4bit_fallbacks == int(unfused)
        blocks = 128 * 256 // 64
        # the bf16 weight and the rebuilt fp32 absmax (and its copy plus the offset), next to the output
        assert peak["Temp"] == (128 * 256 * 2 + 2 * 4 * blocks if unfused else 0)
        assert peak["Activation"] == rows * 128 * 2
        assert peak["Parameter"] == 128 * 256 // 2


def _quant_state_bytes(numel):
    """uint8 absmax per 64 weights, the fp32 NF4 code book (16), the fp32 offset, an fp32 absmax per
    256 absmax blocks and their 8-bit code book (256 fp32)."""
    blocks = numel // 64
    return blocks + 4 * 16 + 4 + 4 * -(-blocks // 256) + 4 * 256


# the tiny Llama with NF4 projections: bf16 embeddings, lm_head and norms, packed 4-bit projections,
# the rotary inv_freq and original_inv_freq (fp32) and the projections' quantization states
NF4_PARAMETERS = 2 * (2 * 256 * 64 + 2 * 2 * 64 + 64) + 2 * (4 * 64 * 64 + 3 * 64 * 172) // 2
NF4_BUFFERS = 2 * 4 * (64 // 4 // 2) + 2 * (4 * _quant_state_bytes(64 * 64) + 3 * _quant_state_bytes(64 * 172))


def test_qlora_base_is_packed_nf4_with_fp32_adapters_and_quant_states_as_buffers():
    import pytest

    pytest.importorskip("bitsandbytes")
    result = sim_memory.simulate("qlora", _args())
    adapters = result["trainable"]
    assert adapters == 2 * (4 * (64 + 64) + 3 * (64 + 172)) * 2
    assert result["peak_bytes"]["Parameter"] == NF4_PARAMETERS + 4 * adapters

    assert result["peak_bytes"]["Buffer"] == NF4_BUFFERS
    for it in result["iterations"]:
        assert it["end_bytes"]["Optstate"] >= 8 * adapters and it["selection_calls"] == 0


def test_sampled_weight_grad_counts_the_reference_chunk_it_runs_on_a_gpu(monkeypatch):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lift_kernels import ops

    T, m, n, k, chunk = 32, 48, 40, 300, 128
    monkeypatch.setattr(sim_memory, "SDDMM_CHUNK_ELEMENTS", T * chunk)
    mode = FakeTensorMode()
    with mode:
        grad_out, x = torch.empty(T, m, dtype=torch.bfloat16), torch.empty(T, n, dtype=torch.bfloat16)
        idx = torch.empty(k, dtype=torch.int32)
        tracker = sim_memory.SelectionAwareTracker(2)
        with tracker:
            ops.sampled_weight_grad(grad_out, x, idx)
    peak = sim_memory.by_category(tracker.get_tracker_snapshot("peak"))
    # int64 idx, fp32 copies of both operands, a chunk's int64 rows and columns and its three (T, chunk)
    # fp32 tensors; the fp32 (k,) result next to them
    assert peak["Temp"] == 8 * k + 4 * T * (m + n) + 2 * 8 * chunk + 3 * 4 * T * chunk
    assert peak["Activation"] == 4 * k


def test_lift_4bit_trains_a_delta_over_the_nf4_base_that_a_refresh_grows():
    import pytest

    pytest.importorskip("bitsandbytes")
    for method, moments_per_entry in (("lift-4bit", 8), ("lift-4bit-8bit", 2)):
        result = sim_memory.simulate(method, _args())
        k = result["trainable"]
        assert k == 2 * 2 * (4 * (64 + 64) + 3 * (64 + 172))  # the same budget as the bf16 rows
        assert [it["selection_calls"] > 0 for it in result["iterations"]] == [True, False, True]
        for it, entries in zip(result["iterations"], (k, k, 2 * k)):
            end = it["end_bytes"]
            # the fp32 delta is a parameter and its int32 positions a buffer, one each per entry the
            # run has trained: k after the first selection, 2k after a refresh that shares none
            assert end["Parameter"] == NF4_PARAMETERS + 4 * entries
            assert end["Buffer"] == NF4_BUFFERS + 4 * entries
            # the moments of the selected entries (fp32, or uint8 codes with their block scales and
            # the two code books), no master copy (the delta is fp32), and int32 slots: while the
            # selection is the whole delta a view of one 0..U-1 the optimizer shares (grown by
            # doubling, at most 4 * 4 * 472 bytes here), after a refresh that grew it 4 bytes per entry
            own_idx = 4 * k if entries > k else 0
            extra = end["Optstate"] - moments_per_entry * k - own_idx
            assert 0 <= extra <= 4 * 4 * 472 + (0 if moments_per_entry == 8 else 4096)
            assert end["Gradient"] == 0
