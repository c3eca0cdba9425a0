"""LIFTAdamW(moment_bits=8): the selected entries' Adam moments as block-wise 8-bit codes.

The option is checked like the others; the state holds uint8 codes and fp32 block scales instead of
fp32 moments (6 B per entry + scales); the first step equals the fp32-moment step (the update uses
the moments before they are rounded); later steps stay within a bound that a wrong book or scale
breaks; a re-selection carries kept entries; checkpoints, copies and resumes are bit-exact; a
checkpoint of the other format, damaged 8-bit state and a changed moment_bits are refused.
"""
import copy
import io
import pickle

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, loss_step, make_batch
from lift_kernels import ops
from lift_kernels.optim.moments import decode, encode
from lift_kernels.optim.state import install_selection
from lift_kernels.optim.strategy import LocalStrategy
from lift_kernels.reference.moment_codes import EXP_AVG_BOOK, EXP_AVG_SQ_BOOK, QBLOCK, num_blocks

BOOKS = (EXP_AVG_BOOK, EXP_AVG_SQ_BOOK)
# The widest gap between neighbours of the signed book, relative to the block scale: a decoded
# exp_avg is within half of it (times its block's scale) of its value.
HALF_GAP = float(EXP_AVG_BOOK.diff().max()) / 2
# Neighbours of the log book are 10**(7/255) apart: a decoded exp_avg_sq is within that ratio
# (about 3.2 %) of its value, for values above the smallest book value times the scale.
SQ_RATIO = 10 ** (7 / 255)


def _opt(params, **kw):
    kw = {"lr": 1e-2, "rank": 2, "lra_rank": 3, "update_interval": 4, "seed": 5, **kw}
    return lk.LIFTAdamW(params, **kw)


def _batches(n, seed=9):
    g = torch.Generator().manual_seed(seed)
    return [make_batch(generator=g) for _ in range(n)]


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _block_max(x):
    pad = num_blocks(x.numel()) * QBLOCK - x.numel()
    blocks = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, QBLOCK).amax(dim=1)
    return blocks.repeat_interleave(QBLOCK)[: x.numel()]


def _assert_codes_hold(state, exp_avg, exp_avg_sq):
    """The 8-bit state reads back as (exp_avg, exp_avg_sq) to the format's resolution."""
    m, v = decode(state, BOOKS)
    assert torch.all((m - exp_avg).abs() <= HALF_GAP * _block_max(exp_avg) * (1 + 1e-4))
    floor = float(EXP_AVG_SQ_BOOK[0]) * _block_max(exp_avg_sq)
    big = exp_avg_sq > floor
    assert torch.all(v[big] <= exp_avg_sq[big] * SQ_RATIO) and torch.all(v[big] >= exp_avg_sq[big] / SQ_RATIO)
    assert torch.all(v[~big] <= floor[~big] * SQ_RATIO)


# ------------------------------------------------------------------------------------------ option
@pytest.mark.parametrize("bad", [4, 16, "8", 8.0, True, None])
def test_moment_bits_other_than_32_or_8_is_refused_by_name(bad):
    W = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"moment_bits must be 32 .* or 8 .*got"):
        _opt([W], moment_bits=bad)
    with pytest.raises(ValueError, match="moment_bits must be"):
        _opt([{"params": [W], "moment_bits": bad}])


def test_moment_bits_is_a_group_option():
    A, B = torch.nn.Parameter(torch.randn(20, 16)), torch.nn.Parameter(torch.randn(20, 16))
    opt = _opt([{"params": [A], "moment_bits": 8}, {"params": [B]}])
    A.grad, B.grad = torch.randn_like(A), torch.randn_like(B)
    opt.step()
    assert "exp_avg_codes" in opt.state[A] and "exp_avg" not in opt.state[A]
    assert "exp_avg" in opt.state[B] and "exp_avg_codes" not in opt.state[B]


# ------------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_is_codes_and_block_scales(dtype):
    W = torch.nn.Parameter(torch.randn(300, 200, dtype=dtype))
    opt = _opt([W], rank=2, moment_bits=8)
    W.grad = torch.randn_like(W)
    opt.step()
    s = opt.state[W]
    k = s["idx"].numel()
    assert k == 2 * (300 + 200) and num_blocks(k) == 4
    assert not {"exp_avg", "exp_avg_sq"} & s.keys()
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        assert s[key].dtype == torch.uint8 and s[key].shape == (k,)
    for key in ("exp_avg_scales", "exp_avg_sq_scales"):
        assert s[key].dtype == torch.float32 and s[key].shape == (num_blocks(k),)
    per_entry = sum(s[key].numel() * s[key].element_size() for key in
                    ("idx", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")) / k
    assert per_entry == 4 + 2 + 8 * num_blocks(k) / k  # 6 B per entry and 8 B per 256 entries
    assert ("master" in s) == (dtype == torch.bfloat16) and (dtype == torch.float32 or s["master"].dtype == torch.float32)


def test_first_step_equals_the_fp32_moment_step():
    """From zero moments both formats read back zeros, and the update uses the new moments before
    they are rounded: the weights after step 1 are bit-identical; the codes hold the fp32 moments."""
    torch.manual_seed(0)
    model = TinyMLP()
    model8 = copy.deepcopy(model)
    opt, opt8 = _opt(model.parameters()), _opt(model8.parameters(), moment_bits=8)
    x, y = make_batch(generator=torch.Generator().manual_seed(1))
    with ops.use_backend("reference"):  # the same fp32 arithmetic for both formats' step
        loss_step(model, opt, x, y)
        loss_step(model8, opt8, x, y)
    for (name, p), q in zip(model.named_parameters(), model8.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(opt.lift_parameters(), opt8.lift_parameters()):
        assert torch.equal(opt.state[p]["idx"], opt8.state[q]["idx"])
        _assert_codes_hold(opt8.state[q], opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])


def _trajectories(steps, planted=None):
    torch.manual_seed(0)
    model = TinyMLP()
    start = copy.deepcopy(model)
    model8 = copy.deepcopy(model)
    opt, opt8 = _opt(model.parameters(), lr=3e-3), _opt(model8.parameters(), lr=3e-3, moment_bits=8)
    if planted is not None:
        opt8._books.on = planted
    for x, y in _batches(steps):
        loss_step(model, opt, x, y)
        loss_step(model8, opt8, x, y)
    return start, model, model8


def _relative_gap(start, model, model8):
    """|W8 - W32| / |W32 - W0| over the LIFT weights: the 8-bit run's distance from the fp32 one,
    relative to how far training moved the weights."""
    gap = moved = 0.0
    for name in ("up.weight", "down.weight"):
        w0, w, w8 = (m.get_parameter(name).detach() for m in (start, model, model8))
        gap += float((w8 - w).square().sum())
        moved += float((w - w0).square().sum())
    return (gap / moved) ** 0.5


# 24 steps (selections at 4, 8, ..., 24): the 8-bit run stays this close to the fp32 one. A planted
# error in the books
# (the signed book's values halved, or a linear book for the second moment) moves it far past this
# bound (the planted checks below run them).
GAP_BOUND = 0.09


def test_training_stays_close_to_fp32_moments():
    assert _relative_gap(*_trajectories(24)) < GAP_BOUND


@pytest.mark.parametrize("plant", ["halved_exp_avg_book", "linear_exp_avg_sq_book"])
def test_a_wrong_book_breaks_the_bound(plant):
    """The bound above is tight enough to catch a wrong book: a planted one breaks it."""
    def wrong(device):
        m, v = (b.to(device) for b in BOOKS)
        if plant == "halved_exp_avg_book":
            return m * 0.5, v
        return m, torch.linspace(0.0, 1.0, 256, device=device)  # small second moments lost
    assert _relative_gap(*_trajectories(24, planted=wrong)) > GAP_BOUND


# ------------------------------------------------------------------------------------------ re-selection
def test_reselection_carries_kept_entries_and_zeroes_new_ones():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(40, 30))
    opt = _opt([W], rank=6, moment_bits=8)  # k = 420: two blocks
    for _ in range(3):
        W.grad = torch.randn_like(W)
        opt.step()
    state = opt.state[W]
    old_idx = state["idx"]
    old_m, old_v = decode(state, BOOKS)
    # keep every other entry, add entries that were not selected
    unselected = torch.ones(W.numel(), dtype=torch.bool)
    unselected[old_idx.long()] = False
    new_entries = unselected.nonzero().view(-1)[:150].to(torch.int32)
    new_idx = torch.cat([old_idx[::2], new_entries]).sort().values
    install_selection(state, W, W, new_idx, master=False, t=4, books=BOOKS)
    assert torch.equal(state["idx"], new_idx) and state["exp_avg_codes"].numel() == new_idx.numel()
    m, v = decode(state, BOOKS)
    kept = torch.isin(new_idx, old_idx)
    where_old = torch.searchsorted(old_idx, new_idx[kept])
    want_m = torch.zeros(new_idx.numel())
    want_v = torch.zeros(new_idx.numel())
    want_m[kept], want_v[kept] = old_m[where_old], old_v[where_old]
    # kept entries: their read-back value, coded again in the new blocks
    _assert_codes_hold(state, want_m, want_v)
    assert torch.all(m[~kept] == 0)  # the signed book holds an exact zero
    assert torch.all(v[~kept] <= float(EXP_AVG_SQ_BOOK[0]) * _block_max(want_v)[~kept])  # the log book's floor


def test_encode_decode_are_the_reference_format():
    x = torch.randn(700)
    fields = encode(x, x.abs(), BOOKS)
    m, v = decode(fields, BOOKS)
    _assert_codes_hold(fields, x, x.abs())
    assert m.dtype == v.dtype == torch.float32


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_across_a_reselection_is_bit_exact(dtype):
    torch.manual_seed(0)
    model = TinyMLP().to(dtype)
    start = copy.deepcopy(model.state_dict())
    kw = dict(moment_bits=8, selector="random")
    batches = [(x.to(dtype), y.to(dtype)) for x, y in _batches(14)]
    opt = _opt(model.parameters(), **kw)
    for x, y in batches:
        loss_step(model, opt, x, y)

    model2 = TinyMLP().to(dtype)
    model2.load_state_dict(start)
    opt2 = _opt(model2.parameters(), **kw)
    for x, y in batches[:6]:  # after the selection at step 4, before the one at 8
        loss_step(model2, opt2, x, y)
    saved_model, saved_opt = copy.deepcopy(model2.state_dict()), _roundtrip(opt2.state_dict())
    model3 = TinyMLP().to(dtype)
    model3.load_state_dict(saved_model)
    opt3 = _opt(model3.parameters(), **{**kw, "seed": 77})
    opt3.load_state_dict(saved_opt)
    opt3.load_state_dict(copy.deepcopy(saved_opt))  # twice, as accelerate and Trainer do
    s = opt3.state[model3.up.weight]
    assert s["exp_avg_codes"].dtype == torch.uint8 and s["exp_avg_scales"].dtype == torch.float32
    for x, y in batches[6:]:
        loss_step(model3, opt3, x, y)
    for key, value in model.state_dict().items():
        assert torch.equal(value, model3.state_dict()[key]), key


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_the_run(how):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = _opt(model.parameters(), moment_bits=8, sparse_grad=True)
    batches = _batches(9)
    for x, y in batches[:3]:
        loss_step(model, opt, x, y)
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    for x, y in batches[3:]:
        loss_step(model, opt, x, y)
        loss_step(model2, opt2, x, y)
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), name
    assert opt2.param_groups[0]["moment_bits"] == 8


def _trained(bits, steps=2):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = _opt(model.parameters(), moment_bits=bits)
    for x, y in _batches(steps):
        loss_step(model, opt, x, y)
    return model, opt


@pytest.mark.parametrize("saved_bits, bits", [(32, 8), (8, 32)])
def test_a_checkpoint_of_the_other_format_is_refused_and_nothing_changes(saved_bits, bits):
    _, saved = _trained(saved_bits)
    model, opt = _trained(bits, steps=1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"moment_bits={saved_bits} in the checkpoint and {bits} here"):
        opt.load_state_dict(_roundtrip(saved.state_dict()))
    after = opt.state_dict()
    assert after["param_groups"][0]["moment_bits"] == bits
    for pid, s in before["state"].items():
        for key, v in s.items():
            assert torch.equal(v, after["state"][pid][key]) if torch.is_tensor(v) else v == after["state"][pid][key]


def test_a_checkpoint_written_before_moment_bits_existed_loads_as_fp32_moments():
    _, saved = _trained(32)
    sd = _roundtrip(saved.state_dict())
    for g in sd["param_groups"]:
        del g["moment_bits"]
    model, opt = _trained(32, steps=1)
    opt.load_state_dict(sd)
    assert all(g["moment_bits"] == 32 for g in opt.param_groups)
    _, opt8 = _trained(8, steps=1)
    with pytest.raises(ValueError, match="moment_bits=32 in the checkpoint and 8 here"):
        opt8.load_state_dict(sd)


def _damage_codes(s):
    s["exp_avg_codes"] = s["exp_avg_codes"].long()


def _damage_scales_length(s):
    s["exp_avg_sq_scales"] = s["exp_avg_sq_scales"][:0]


def _damage_negative_scale(s):
    s["exp_avg_scales"] = -s["exp_avg_scales"] - 1


def _damage_missing(s):
    del s["exp_avg_sq_codes"]


def _damage_fp32_moments_in_an_8bit_group(s):
    s["exp_avg"] = torch.zeros(s["idx"].numel())
    s["exp_avg_sq"] = torch.zeros(s["idx"].numel())
    for key in ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"):
        del s[key]


@pytest.mark.parametrize("damage, match", [
    (_damage_codes, "exp_avg_codes must be a torch.uint8 vector"),
    (_damage_scales_length, "exp_avg_sq_scales must be a torch.float32 vector"),
    (_damage_negative_scale, "exp_avg_scales has negative, NaN or infinite entries"),
    (_damage_missing, "exp_avg_sq_codes is missing"),
    (_damage_fp32_moments_in_an_8bit_group, "moment_bits=8, so it needs"),
])
def test_damaged_8bit_state_is_refused_and_nothing_changes(damage, match):
    model, opt = _trained(8)
    sd = _roundtrip(opt.state_dict())
    damage(sd["state"][0])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg_codes"], before["state"][0]["exp_avg_codes"])


def test_changing_moment_bits_of_a_group_with_state_is_refused_before_anything_changes():
    model, opt = _trained(8)
    opt.param_groups[0]["moment_bits"] = 32
    before = copy.deepcopy(opt.state_dict())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="holds 8-bit moments but its group now asks for moment_bits=32"):
        opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert opt.state_dict()["state"][0]["step"] == before["state"][0]["step"]


# ------------------------------------------------------------------------------------------ compile, distributed
def test_compiled_step_compiles_once_and_matches_eager():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyMLP()
    groups = [{"params": [model.up.weight, model.down.weight], "lift": True},
              {"params": [model.up.bias, *model.norm.parameters()], "lift": False}]
    opt = _opt(groups, moment_bits=8)
    eager_model, eager_opt = copy.deepcopy((model, opt))
    counter = CompileCounter()
    compiled = torch.compile(opt.step, backend=counter)
    counts = []
    for x, y in _batches(9):
        for m, step in ((model, compiled), (eager_model, eager_opt.step)):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            step()
        counts.append(counter.frame_count)
    assert opt.state[model.up.weight]["selected_at"] == 8
    assert counts[1] == counts[-1], counts  # selections at 4 and 8 and new step numbers reuse it
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_sharded_weights_are_refused_with_8bit_moments():
    class Sharded(LocalStrategy):  # what lift_kernels.distributed reports for an FSDP2 weight
        def is_dtensor(self, p):
            return True

    class ShardedLIFTAdamW(lk.optim.lift_adamw.LIFTAdamW):
        Strategy = Sharded

    W = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"moment_bits=8 is not supported on FSDP2-sharded \(DTensor\) weights"):
        ShardedLIFTAdamW([W], rank=1, lra_rank=2, moment_bits=8)
    ShardedLIFTAdamW([W], rank=1, lra_rank=2)  # fp32 moments are


def test_distributed_checkpoint_refuses_8bit_moments_before_writing(tmp_path):
    from lift_kernels.distributed import save_checkpoint

    model, opt = _trained(8)
    with pytest.raises(NotImplementedError, match="does not write 8-bit moments"):
        save_checkpoint(tmp_path / "ckpt", model, opt)
    assert not (tmp_path / "ckpt").exists()
