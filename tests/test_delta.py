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


# --- Names: a base taken before or after torch.compile / DDP wrapping still matches (issue 12, item 4) ---

class _DDPLike(nn.Module):
    """DDP's naming (``module.``) without a process group."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _equal_states(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wrap", ["compile", "ddp", "compile+ddp"])
@pytest.mark.parametrize("wrapped_side", ["model", "base"])
def test_wrapper_prefixes_are_matched(tmp_path, wrap, wrapped_side):
    model = _model()
    wrapped = {"compile": torch.compile, "ddp": _DDPLike,
               "compile+ddp": lambda m: torch.compile(_DDPLike(m))}[wrap](model)
    base = _copy(wrapped if wrapped_side == "base" else model)
    changed = _perturb(model, 0.1, 1e-2)
    tuned = _copy(model)
    path = tmp_path / "d.safetensors"
    stats = lk.save_delta(wrapped if wrapped_side == "model" else model, base, path)
    assert stats.entries == changed and stats.tensors == 2
    fresh = _model()  # plain names, as a user loads the base
    lk.apply_delta(fresh, path)
    assert _equal_states(fresh.state_dict(), tuned)
    compiled = torch.compile(_model())  # and the other way round: a wrapped base takes the delta too
    lk.apply_delta(compiled, path)
    assert _equal_states(compiled._orig_mod.state_dict(), tuned)


@pytest.mark.parametrize("case", ["none", "part"])
def test_unmatched_base_names_are_refused(tmp_path, case):
    model = _model()
    base = {("peft." if case == "none" or k.startswith("2.") else "") + k: v for k, v in _copy(model).items()}
    _perturb(model, 0.1, 1e-2)
    with pytest.raises(lk.delta.DeltaError, match=r"names in base_state_dict are not in the model.*peft\.") as err:
        lk.save_delta(model, base, tmp_path / "d.safetensors")
    assert "Nothing was written" in str(err.value)
    assert not os.listdir(tmp_path)


def test_empty_base_is_refused(tmp_path):
    with pytest.raises(lk.delta.DeltaError, match="base_state_dict is empty"):
        lk.save_delta(_model(), {}, tmp_path / "d.safetensors")
    assert not os.listdir(tmp_path)


def test_partial_base_of_trained_weights_is_accepted(tmp_path):
    """lift-finetune passes only the target matrices as the base: names the base lacks are unchanged."""
    model = _model()
    base = {"0.weight": model[0].weight.detach().clone()}
    _perturb(model, 0.1, 1e-2)
    stats = lk.save_delta(model, base, tmp_path / "d.safetensors")
    assert stats.tensors == 1


# --- Fingerprints: the delta goes only onto its base, once; it comes off only where it was applied ---

def _tuned_and_path(tmp_path):
    model = _model()
    base = _copy(model)
    _perturb(model, 0.1, 1e-2)
    path = tmp_path / "d.safetensors"
    lk.save_delta(model, base, path)
    return model, base, path


def test_apply_twice_is_refused_and_changes_nothing(tmp_path):
    model, _, path = _tuned_and_path(tmp_path)
    before = _copy(model)
    with pytest.raises(lk.delta.DeltaError, match=r"d\.safetensors: 0\.weight already holds the fine-tuned values"):
        lk.apply_delta(model, path)
    assert _equal_states(model.state_dict(), before)


def test_remove_from_the_base_is_refused_and_changes_nothing(tmp_path):
    model, base, path = _tuned_and_path(tmp_path)
    fresh = _model()
    with pytest.raises(lk.delta.DeltaError, match="holds the base values: this delta is not applied"):
        lk.remove_delta(fresh, path)
    assert _equal_states(fresh.state_dict(), base)


@pytest.mark.parametrize("direction", ["apply", "remove"])
def test_other_model_of_same_shapes_is_refused(tmp_path, direction):
    _, _, path = _tuned_and_path(tmp_path)
    other = _model(seed=5)
    before = _copy(other)
    with pytest.raises(lk.delta.DeltaError, match=r"fingerprint of its \d+ changed entries differs"):
        (lk.apply_delta if direction == "apply" else lk.remove_delta)(other, path)
    assert _equal_states(other.state_dict(), before)


def test_only_the_last_weight_differs_nothing_changes(tmp_path):
    """The first weight fits, the second does not: the first must not have been written."""
    _, base, path = _tuned_and_path(tmp_path)
    target = _model()
    with torch.no_grad():
        target[2].weight.mul_(1.5)
    before = _copy(target)
    with pytest.raises(lk.delta.DeltaError, match=r"2\.weight does not hold"):
        lk.apply_delta(target, path)
    assert _equal_states(target.state_dict(), before)


def test_other_dtype_is_refused(tmp_path):
    _, _, path = _tuned_and_path(tmp_path)
    target = _model().double()
    with pytest.raises(lk.delta.DeltaError, match="is float32 in the delta but torch.float64"):
        lk.apply_delta(target, path)


# --- Damaged files: indices, values, checksum ---

def _rewrite(path, edit, resign=True):
    """Let ``edit(tensors, metadata)`` change the file; with ``resign`` the checksum is recomputed, so the
    structural checks behind it are what must catch the change."""
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    if resign:
        meta["checksum"] = lk.delta._checksum(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _set(key, fn):
    def edit(tensors, meta):
        tensors[key] = fn(tensors[key].clone())
    return edit


def _neg(t):
    t[0] = -1
    return t


def _swap(t):
    t[[0, 1]] = t[[1, 0]]
    return t


def _dup(t):
    t[1] = t[0]
    return t


def _big(t):
    t[-1] = 40 * 24
    return t


def _nudge(t):
    t[3] = t[3] * 2
    return t


@pytest.mark.parametrize("edit,message", [
    (_set("0.weight.indices", _neg), "negative, not below its 960 entries, or not strictly increasing"),
    (_set("0.weight.indices", _swap), "not strictly increasing"),
    (_set("0.weight.indices", _dup), "not strictly increasing"),
    (_set("0.weight.indices", _big), "not below its 960 entries"),
    (_set("0.weight.indices", lambda t: t.long()), "expected a 1-D int32 tensor"),
    (_set("0.weight.values", lambda t: t[:-1]), "expected one torch.float32 value per index"),
    (_set("0.weight.values", _nudge), "would not get the values recorded"),
    (_set("0.weight.values", lambda t: t.double()), "expected one torch.float32 value per index"),
])
@pytest.mark.parametrize("direction", ["apply", "remove"])
def test_damaged_entries_are_refused_and_change_nothing(tmp_path, edit, message, direction):
    tuned, base, path = _tuned_and_path(tmp_path)
    _rewrite(path, edit)
    target = _model() if direction == "apply" else tuned
    before = _copy(target)
    with pytest.raises(lk.delta.DeltaError, match=message):
        (lk.apply_delta if direction == "apply" else lk.remove_delta)(target, path)
    assert _equal_states(target.state_dict(), before)


def test_checksum_detects_a_changed_value(tmp_path):
    _, _, path = _tuned_and_path(tmp_path)
    _rewrite(path, _set("2.weight.values", _nudge), resign=False)
    target = _model()
    before = _copy(target)
    with pytest.raises(lk.delta.DeltaError, match="is damaged: its checksum does not match"):
        lk.apply_delta(target, path)
    assert _equal_states(target.state_dict(), before)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(40, 24)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(lk.delta.DeltaError, match="is not a lift_kernels delta"):
        lk.apply_delta(_model(), tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(lk.delta.DeltaError, match="cannot read delta .*junk.safetensors"):
        lk.apply_delta(_model(), tmp_path / "junk.safetensors")


def _legacy_file(path, indices):
    """A delta as lift_kernels 0.1 wrote it (format /2: shapes only, no fingerprints or checksum)."""
    import json

    from safetensors.torch import save_file

    save_file({"0.weight.indices": torch.tensor(indices, dtype=torch.int32),
               "0.weight.values": torch.full((len(indices),), 0.5)},
              str(path), metadata={"format": "lift_kernels.delta/2", "shapes": json.dumps({"0.weight": [40, 24]})})


def test_legacy_delta_applies_with_a_warning_and_checked_indices(tmp_path):
    _legacy_file(tmp_path / "old.safetensors", [1, 5])
    model = _model()
    expected = model[0].weight.detach().clone().reshape(-1)
    expected[[1, 5]] += 0.5
    with pytest.warns(UserWarning, match="without base fingerprints"):
        lk.apply_delta(model, tmp_path / "old.safetensors")
    assert torch.equal(model[0].weight.reshape(-1), expected)
    _legacy_file(tmp_path / "bad.safetensors", [-1, 5])  # lift_kernels 0.1 wrapped it onto the last entry
    before = _copy(model)
    with pytest.warns(UserWarning), pytest.raises(lk.delta.DeltaError, match="negative"):
        lk.apply_delta(model, tmp_path / "bad.safetensors")
    assert _equal_states(model.state_dict(), before)
