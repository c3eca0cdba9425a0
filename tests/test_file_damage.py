"""Random damage to delta and checkpoint files: a clear error with nothing changed, or an exact round trip.

Damage is what disks, copies and hand edits do: bit flips anywhere (the safetensors header, the
pickle, tensor bytes), truncation, overwritten or swapped byte ranges; for deltas also edits that keep
a valid checksum (changed indices and values, edited metadata), which the structural checks and
fingerprints behind the checksum must catch.
"""
import json
import os
import shutil

import pytest
import torch
from file_fixtures import small_model, small_run, snapshot, write_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import lift_kernels as lk
from lift_kernels.delta import DeltaError
from lift_finetune import checkpoint

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _flip(data: bytes, offsets, bits) -> bytes:
    out = bytearray(data)
    for at, bit in zip(offsets, bits):
        out[at % len(out)] ^= 1 << bit
    return bytes(out)


@st.composite
def byte_damage(draw, size: int, header: int):
    """A function bytes -> damaged bytes; ``header`` bytes at the start are where formats keep their layout."""
    kind = draw(st.sampled_from(["flip_data", "flip_header", "truncate", "overwrite", "swap"]))
    if kind.startswith("flip"):
        n = draw(st.integers(1, 3))
        low, high = (0, header) if kind == "flip_header" else (header, size)
        offsets = draw(st.lists(st.integers(low, high - 1), min_size=n, max_size=n))
        bits = draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))
        return kind, lambda d: _flip(d, offsets, bits)
    if kind == "truncate":
        keep = draw(st.integers(0, size - 1))
        return kind, lambda d: d[:keep]
    if kind == "overwrite":
        at, junk = draw(st.integers(0, size - 1)), draw(st.binary(min_size=1, max_size=16))
        return kind, lambda d: d[:at] + junk + d[at + len(junk):]
    length = draw(st.integers(1, 64))
    a, b = sorted(draw(st.lists(st.integers(0, size - length), min_size=2, max_size=2, unique=True)))
    if b - a < length:
        b = min(size - length, a + length)
    return kind, lambda d: d[:a] + d[b:b + length] + d[a + length:b] + d[a:a + length] + d[b + length:]


# ------------------------------------------------------------------------------------------------ deltas

@pytest.fixture(scope="module")
def delta_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("delta")
    model = small_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            mask = torch.rand(p.shape, generator=gen) < 0.2
            p[mask] += torch.randn(int(mask.sum()), generator=gen)  # large enough that some go to float64
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    path = folder / "intact.safetensors"
    lk.save_delta(model, base, path)
    return folder, path.read_bytes(), base, tuned


def _header_size(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _check_delta(folder, damaged_path, base, tuned, direction):
    """Apply or remove the damaged delta: DeltaError naming the file with the model unchanged, or exact."""
    target = small_model()
    target.load_state_dict(base if direction == "apply" else tuned)
    before = snapshot(target)
    try:
        (lk.apply_delta if direction == "apply" else lk.remove_delta)(target, damaged_path)
    except DeltaError as err:
        assert str(damaged_path) in str(err)
        assert snapshot(target) == before
        return "refused: " + str(err).split(str(damaged_path))[-1][:50]
    expected = tuned if direction == "apply" else base
    assert all(torch.equal(target.state_dict()[k], v) for k, v in expected.items())
    return "exact"


@SETTINGS
@given(data=st.data(), direction=st.sampled_from(["apply", "remove"]))
def test_delta_byte_damage(delta_case, data, direction):
    folder, intact, base, tuned = delta_case
    kind, damage = data.draw(byte_damage(len(intact), _header_size(intact)))
    damaged = damage(intact)
    path = folder / "damaged.safetensors"
    path.write_bytes(damaged)
    outcome = _check_delta(folder, path, base, tuned, direction)
    event(f"{kind}: {outcome[:40]}")
    if damaged != intact and kind != "flip_header":
        # A change of the tensor bytes can only be refused (a header flip may hit JSON padding).
        assert outcome.startswith("refused") or damaged[_header_size(intact):] == intact[_header_size(intact):]


_NON_FINITE = [float("nan"), float("inf"), -float("inf")]


def _edits(draw, tensors, meta):
    """One change to an intact delta that keeps its checksum valid (a tool that rewrote the file)."""
    key = draw(st.sampled_from(sorted(tensors)))
    t = tensors[key].clone()
    kind = draw(st.sampled_from(["element", "swap", "metadata", "drop"]))
    if kind == "element":  # an index (to a neighbour, out of range, negative) or a value (non-finite too)
        pos = draw(st.integers(0, t.numel() - 1))
        if t.is_floating_point():
            t[pos] = draw(st.one_of(st.floats(-4, 4, width=32), st.sampled_from([0.0, -0.0, *_NON_FINITE])))
        else:
            t[pos] = draw(st.one_of(st.integers(-2, 16 * 16), st.just(int(t[pos]) + 1)))
        tensors[key] = t
    elif kind == "swap":
        other = draw(st.sampled_from(sorted(set(tensors) - {key})))
        tensors[key], tensors[other] = tensors[other], tensors[key]
    elif kind == "metadata":
        weights = json.loads(meta["weights"])
        name = draw(st.sampled_from(sorted(weights)))
        field = draw(st.sampled_from(["shape", "dtype", "entries", "base", "tuned"]))
        weights[name][field] = {"shape": [16, 13], "dtype": "float64", "entries": weights[name]["entries"] + 1,
                                "base": weights[name]["tuned"], "tuned": weights[name]["base"]}[field]
        meta["weights"] = json.dumps(weights)
    else:
        del tensors[key]
    return kind, key


@SETTINGS
@given(data=st.data(), direction=st.sampled_from(["apply", "remove"]))
def test_delta_edits_behind_a_valid_checksum(delta_case, data, direction):
    folder, intact, base, tuned = delta_case
    src = folder / "intact.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    kind, key = _edits(data.draw, tensors, meta)
    meta["checksum"] = lk.delta._checksum(tensors, meta)
    path = folder / "edited.safetensors"
    save_file(tensors, str(path), metadata=meta)
    event(f"{kind}: {_check_delta(folder, path, base, tuned, direction)}")


# ------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def checkpoint_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    path = write_checkpoint(str(folder))
    model, opt, sched = small_run()
    checkpoint.restore(checkpoint.load(path), model, opt, sched, torch.device("cpu"), path)
    expected = snapshot(model, opt, sched)
    with open(path, "rb") as f:
        return folder, path, f.read(), expected


@SETTINGS
@given(data=st.data())
def test_checkpoint_byte_damage(checkpoint_case, data):
    folder, intact_path, intact, expected = checkpoint_case
    kind, damage = data.draw(byte_damage(len(intact), 512))  # the zip's first record holds the pickle
    path = os.path.join(folder, "checkpoint-000009.pt")
    with open(path, "wb") as f:
        f.write(damage(intact))
    model, opt, sched = small_run()
    before = snapshot(model, opt, sched)
    try:
        checkpoint.restore(checkpoint.load(path), model, opt, sched, torch.device("cpu"), path)
    except checkpoint.CheckpointError as err:
        assert path in str(err)
        assert snapshot(model, opt, sched) == before
        event(f"{kind}: refused ({str(err).split(path)[-1][:40]})")
        return
    event(f"{kind}: exact")
    # Accepted: then it restores exactly what the intact file restores (RNG included).
    assert snapshot(model, opt, sched) == expected


def _tensor_paths(obj, prefix=()):
    """Paths to every tensor in a checkpoint payload, for edits."""
    if isinstance(obj, torch.Tensor):
        yield prefix
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensor_paths(v, (*prefix, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensor_paths(v, (*prefix, i))


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _put(obj, path, value):
    _get(obj, path[:-1])[path[-1]] = value


@SETTINGS
@given(data=st.data())
def test_checkpoint_edits_without_a_new_checksum_are_refused(checkpoint_case, data):
    """A file rewritten by a tool (tensors swapped or changed, the step edited) keeps the old checksum."""
    folder, intact_path, _, _ = checkpoint_case
    payload = torch.load(intact_path, weights_only=True)
    paths = sorted(_tensor_paths({k: v for k, v in payload.items() if k != "rng"}), key=repr)
    kind = data.draw(st.sampled_from(["swap", "element", "step"]))
    if kind == "swap":  # two tensors of the same shape and dtype trade places (exp_avg <-> exp_avg_sq ...)
        a = data.draw(st.sampled_from(paths))
        same = [p for p in paths if p != a and _get(payload, p).shape == _get(payload, a).shape
                and _get(payload, p).dtype == _get(payload, a).dtype and not torch.equal(_get(payload, p),
                                                                                          _get(payload, a))]
        if not same:
            return
        b = data.draw(st.sampled_from(same))
        ta, tb = _get(payload, a), _get(payload, b)
        _put(payload, a, tb)
        _put(payload, b, ta)
    elif kind == "element":
        p = data.draw(st.sampled_from([p for p in paths if _get(payload, p).numel()]))
        t = _get(payload, p).clone().reshape(-1)
        pos = data.draw(st.integers(0, t.numel() - 1))
        t[pos] = t[pos] + 1
        _put(payload, p, t.reshape(_get(payload, p).shape))
    else:
        payload["step"] = payload["step"] + data.draw(st.sampled_from([-1, 1, 100]))
    event(kind)
    path = os.path.join(folder, "checkpoint-000008.pt")
    torch.save(payload, path)
    model, opt, sched = small_run()
    before = snapshot(model, opt, sched)
    with pytest.raises(checkpoint.CheckpointError, match=f"{path} is damaged: its checksum does not match"):
        checkpoint.restore(checkpoint.load(path), model, opt, sched, torch.device("cpu"), path)
    assert snapshot(model, opt, sched) == before


def test_damage_strategies_do_damage(delta_case, tmp_path):
    """Guard against a test that cannot fail: the intact files load, and plain damage is refused."""
    folder, intact, base, tuned = delta_case
    assert _check_delta(folder, folder / "intact.safetensors", base, tuned, "apply") == "exact"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    assert _check_delta(folder, bad, base, tuned, "apply").startswith("refused")
    shutil.copy(folder / "intact.safetensors", tmp_path / "copy.safetensors")
    assert _check_delta(folder, tmp_path / "copy.safetensors", base, tuned, "remove") == "exact"
