"""The SmolLM2 fixture in the tree (tests/data/smollm2_q4_1_layers.safetensors) is the recorded file,
and dequantises, with torch alone, to the very fp32 matrices that gguf gives from the installed package."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import smollm2


def test_fixture_is_the_recorded_file():
    assert smollm2.fixture_sha256() == smollm2.FIXTURE_SHA256


def test_fixture_holds_every_projection_of_its_layers():
    P = smollm2.fixture_projections()
    assert sorted(P) == sorted((layer, proj) for layer in smollm2.FIXTURE_LAYERS for proj in smollm2.SHAPES)
    for (layer, proj), w in P.items():
        assert w.dtype == torch.float32 and tuple(w.shape) == smollm2.SHAPES[proj]
        assert torch.isfinite(w).all() and w.std() > 0, (layer, proj)


def test_fixture_equals_the_package_bit_for_bit():
    reason = smollm2.package_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    full = smollm2.package_projections()
    for key, w in smollm2.fixture_projections().items():
        assert torch.equal(w.view(torch.int32), full[key].view(torch.int32)), key


def test_dequantize_q4_1_matches_gguf_on_random_blocks():
    """Every code, odd fp16 scales and minima (subnormal, negative, zero) against gguf's dequantiser."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(8, 6 * smollm2.Q4_1_BYTES), dtype=np.uint8)
    scales = np.array([0.0, -0.0, 1e-7, -3.5, 65504.0, 2.0 ** -14], dtype=np.float16).view(np.uint8)
    blocks.reshape(8, 6, 20)[0, :, 0:2] = scales.reshape(6, 2)
    blocks.reshape(8, 6, 20)[1, :, 2:4] = scales.reshape(6, 2)
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    got = smollm2.dequantize_q4_1(torch.from_numpy(blocks))
    assert got.shape == (8, 6 * smollm2.Q4_1_BLOCK)
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))


def test_env_forces_the_fixture(monkeypatch):
    monkeypatch.setenv("LIFT_TEST_SMOLLM2", "fixture")
    assert smollm2.source() == "fixture"
    assert smollm2.missing_reason() is None
    monkeypatch.setenv("LIFT_TEST_SMOLLM2", "bogus")
    with pytest.raises(ValueError):
        smollm2.source()
