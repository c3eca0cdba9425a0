"""Sparse delta adapters: exact round trips, size ~ changed entries, refusal of other shapes."""
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lift_kernels as lk


def _model(hidden=24, out=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(hidden, out), nn.ReLU(), nn.Linear(out, hidden, bias=False))
    model.register_buffer("steps", torch.tensor(3))  # non-float state must be ignored
    return model


def _copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturb(model, fraction, scale, seed=1):
    """Change a random ``fraction`` of each weight matrix, as a sparse fine-tuning run would."""
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Linear):
                mask = torch.rand(mod.weight.shape, generator=gen) < fraction
                mod.weight[mask] += scale * torch.randn(int(mask.sum()), generator=gen)
                changed += int(mask.sum())
    return changed


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # small updates, and large ones that flip signs
def test_round_trip_is_exact(tmp_path, scale):
    model = _model()
    base = _copy(model)
    _perturb(model, 0.1, scale)
    tuned = _copy(model)
    path = tmp_path / "delta.safetensors"
    lk.save_delta(model, base, path)
    with safe_open(str(path), framework="pt") as f:
        # Large updates flip signs: some differences are inexact in fp32 and must go to the fp64 part.
        assert scale < 1 or any(k.endswith(".values.float64") for k in f.keys())

    lk.remove_delta(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    lk.apply_delta(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tuned[k]), k

    fresh = _model()  # the base rebuilt from scratch, as a user would load it
    lk.apply_delta(fresh, path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, tuned[k]), k


def test_round_trip_bf16(tmp_path):
    model = _model().to(torch.bfloat16)
    base = _copy(model)
    _perturb(model, 0.2, 0.05)
    tuned = _copy(model)
    path = tmp_path / "d.safetensors"
    lk.save_delta(model, base, path)
    lk.remove_delta(model, path)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    lk.apply_delta(model, path)
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())


def test_size_follows_changed_entries(tmp_path):
    model = _model(hidden=64, out=96)
    with torch.no_grad():  # weights away from zero: small updates then subtract exactly in fp32
        for p in model.parameters():
            p.copy_(torch.sign(torch.randn_like(p)) * (0.5 + torch.rand_like(p)))
    base = _copy(model)
    changed = _perturb(model, 0.05, 1e-3)
    path = tmp_path / "d.safetensors"
    stats = lk.save_delta(model, base, path)
    assert stats.entries == changed
    assert stats.tensors == 2  # the biases did not change
    assert stats.file_bytes == os.path.getsize(path)
    payload = 8 * changed  # int32 index + fp32 difference per entry
    assert payload <= stats.file_bytes <= payload + 2048  # + safetensors header
    dense = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert stats.model_bytes == dense
    assert stats.ratio < 0.15
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert keys == {"0.weight.indices", "0.weight.values", "2.weight.indices", "2.weight.values"}
        assert f.get_tensor("0.weight.indices").dtype == torch.int32


def test_mostly_changed_weights_are_stored_dense(tmp_path):
    model = _model(hidden=32, out=48)
    base = _copy(model)
    changed = _perturb(model, 0.9, 1e-2)
    tuned = _copy(model)
    path = tmp_path / "d.safetensors"
    stats = lk.save_delta(model, base, path)
    assert stats.entries == changed
    with safe_open(str(path), framework="pt") as f:
        assert {"0.weight.dense", "2.weight.dense"} <= set(f.keys())
    assert stats.file_bytes < 8 * changed  # smaller than (int32 index, fp32 value) pairs would be
    lk.remove_delta(model, path)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    lk.apply_delta(model, path)
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())


def test_unchanged_model_gives_empty_delta(tmp_path):
    model = _model()
    stats = lk.save_delta(model, _copy(model), tmp_path / "d.safetensors")
    assert stats.entries == 0 and stats.tensors == 0


def test_tied_weights_counted_once(tmp_path):
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    base = _copy(model)
    with torch.no_grad():
        emb.weight[3, 2] += 1.0
    path = tmp_path / "d.safetensors"
    stats = lk.save_delta(model, base, path)
    assert stats.entries == 1
    lk.remove_delta(model, path)  # applied once, not once per alias
    assert torch.equal(emb.weight, base["emb.weight"])


@pytest.fixture
def delta_path(tmp_path):
    """A delta of a 10%-changed model built by _model()."""
    model = _model()
    base = _copy(model)
    _perturb(model, 0.1, 1e-2)
    lk.save_delta(model, base, tmp_path / "d.safetensors")
    return tmp_path / "d.safetensors"


def test_other_shapes_are_refused_and_model_untouched(delta_path):
    other = _model(hidden=24, out=41)
    before = _copy(other)
    with pytest.raises(ValueError, match=r"0\.weight has shape \(40, 24\) in the delta but \(41, 24\)"):
        lk.apply_delta(other, delta_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_missing_tensor_and_missing_file(delta_path, tmp_path):
    with pytest.raises(ValueError, match="does not have"):
        lk.apply_delta(nn.Sequential(nn.Linear(24, 40)), delta_path)
    with pytest.raises(FileNotFoundError):
        lk.apply_delta(_model(), tmp_path / "nope.safetensors")


def test_base_of_other_shape_is_refused(tmp_path):
    model = _model()
    base = _copy(_model(out=41))
    with pytest.raises(ValueError, match=r"0\.weight: the base tensor has shape"):
        lk.save_delta(model, base, tmp_path / "d.safetensors")
    assert not os.listdir(tmp_path)  # nothing half-written
