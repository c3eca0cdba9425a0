"""The Triton sparse AdamW step (on CPU under TRITON_INTERPRET=1) and the C++ CPU step of
lift_kernels._C against the reference op."""
from __future__ import annotations

import pytest
import torch

import lift_kernels as lk
from lift_kernels import ops
from lift_kernels._triton_loader import load_kernel_module
from lift_kernels.ops import native, use_backend
from lift_kernels.reference import sparse_adamw_step as reference_step
from sm90_compile import triton_facts

kernels = load_kernel_module("sparse_adamw_step")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (shape, k): odd sizes, a single entry, a weight with nothing selected, more than four blocks
SHAPES = [((123, 77), 2000), ((5, 7), 1), ((40, 40), 0), ((64, 100), 4097), ((1, 3), 3), ((77, 123), 1025)]
# (step, lr) of consecutive calls: lr and step change from call to call, as under a scheduler
CALLS = [(1, 1e-2), (2, 3e-3), (9, 2e-2)]
HP = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _case(dtype, gathered: bool, masters: bool, shapes=SHAPES, device=DEVICE):
    """Fresh random weights, sorted int32 indices, moments and (optionally) fp32 master copies."""
    case = {"params": [], "idxs": [], "exp_avgs": [], "exp_avg_sqs": [], "masters": []}
    for shape, k in shapes:
        p = torch.randn(shape, device=device).to(dtype)
        idx = torch.randperm(p.numel(), device=device)[:k].sort().values.to(torch.int32)
        case["params"].append(p)
        case["idxs"].append(idx)
        case["exp_avgs"].append(0.01 * torch.randn(k, device=device))
        case["exp_avg_sqs"].append(1e-4 * torch.rand(k, device=device))
        case["masters"].append(p.view(-1)[idx.long()].float() if masters else None)
    case["grads"] = [_grads(case, dtype, gathered) for _ in CALLS]
    return case


def _grads(case, dtype, gathered: bool):
    grads = [torch.randn(p.shape, device=p.device).to(dtype) for p in case["params"]]
    return [g.view(-1)[i.long()].clone() for g, i in zip(grads, case["idxs"])] if gathered else grads


def _run(step_fn, case, cast=None):
    """Runs CALLS on a copy of ``case`` (cast to ``cast`` first if given) and returns it."""
    def copy(t):
        return None if t is None else t.clone() if cast is None else t.to(cast)
    state = {key: [copy(t) for t in case[key]] for key in ("params", "idxs", "exp_avgs", "exp_avg_sqs")}
    state["idxs"] = [i.to(torch.int32) for i in state["idxs"]]
    if cast is not None:  # the oracle: all arithmetic in fp64, through a master copy of every weight
        state["masters"] = [p.view(-1)[i.long()].clone() for p, i in zip(state["params"], state["idxs"])]
    else:
        state["masters"] = [copy(t) for t in case["masters"]]
    has_masters = any(m is not None for m in state["masters"])
    for (step, lr), grads in zip(CALLS, case["grads"]):
        step_fn(state["params"], [copy(g) for g in grads], state["idxs"], state["exp_avgs"],
                state["exp_avg_sqs"], state["masters"] if has_masters or cast else None,
                step=step, lr=lr, **HP)
    return state


def _fp64_step(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, *, step, lr, beta1, beta2, eps,
               weight_decay):
    """AdamW on the selected entries with fp64 tensors throughout (the accuracy oracle)."""
    for p, g, idx, m, v, w in zip(params, grads, idxs, exp_avgs, exp_avg_sqs, masters):
        g = g.reshape(-1)[idx.long()] if g.shape == p.shape else g
        w.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        w.sub_(lr / (1 - beta1**step) * m / (v.sqrt() / (1 - beta2**step) ** 0.5 + eps))
        p.view(-1)[idx.long()] = w


def _updated(state):
    return [t for key in ("params", "exp_avgs", "exp_avg_sqs", "masters")
            for t in state.get(key, ()) if t is not None]


@pytest.mark.parametrize("masters", [False, True], ids=["no_master", "master"])
@pytest.mark.parametrize("gathered", [False, True], ids=["dense_grad", "gathered_grad"])
def test_fp32_matches_reference(gathered, masters):
    case = _case(torch.float32, gathered, masters)
    got, want = _run(kernels.sparse_adamw_step, case), _run(reference_step, case)
    for g, w in zip(_updated(got), _updated(want)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("masters", [False, True], ids=["no_master", "master"])
@pytest.mark.parametrize("gathered", [False, True], ids=["dense_grad", "gathered_grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_at_most_twice_torch(dtype, gathered, masters):
    """bf16/fp16 weights: the kernel's error against fp64 is at most twice that of the reference
    op run in the same dtype, for every updated tensor (plus fp32-level slack, for the fp32 moments
    whose torch error can be zero by luck)."""
    case = _case(dtype, gathered, masters)
    _assert_error_at_most_twice_torch(kernels.sparse_adamw_step, case)


def _assert_error_at_most_twice_torch(step, case):
    """``step``'s error against the fp64 oracle is at most twice the reference's in the same dtype."""
    got, torch_same = _run(step, case), _run(reference_step, case)
    oracle = _run(_fp64_step, case, cast=torch.float64)
    # zip stops before the oracle's own masters when the case has none
    for g, t, o in zip(_updated(got), _updated(torch_same), _updated(oracle)):
        if o.numel() == 0:
            continue
        err_kernel = (g.double() - o).abs().max().item()
        err_torch = (t.double() - o).abs().max().item()
        slack = 1e-6 * o.abs().max().item()
        assert err_kernel <= 2 * err_torch + slack, (g.dtype, tuple(g.shape), err_kernel, err_torch)


def test_weights_of_several_dtypes_in_one_call():
    """One launch per (weight dtype, grad dtype) pair, all in one call, non-contiguous grads too;
    beta1 < 0.5 takes torch.lerp's other formula."""
    shapes = [((33, 65), 400), ((9, 4), 0)]
    cases = [_case(dtype, False, False, shapes) for dtype in (torch.float32, torch.bfloat16)]
    merged = {key: cases[0][key] + cases[1][key] for key in ("params", "idxs", "exp_avgs", "exp_avg_sqs")}
    grads = [g.t().contiguous().t() for g in cases[0]["grads"][0] + cases[1]["grads"][0]]
    assert not grads[0].is_contiguous()
    results = []
    for fn in (kernels.sparse_adamw_step, reference_step):
        state = {key: [t.clone() for t in ts] for key, ts in merged.items()}
        fn(state["params"], grads, state["idxs"], state["exp_avgs"], state["exp_avg_sqs"], step=4, lr=1e-2,
           **{**HP, "beta1": 0.3})
        results.append(state)
    for g, w in zip(_updated(results[0]), _updated(results[1])):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_pointer_table_is_built_once_per_set_of_tensors():
    case = _case(torch.float32, False, True, SHAPES[:2])
    args = [case[key] for key in ("params", "grads", "idxs", "exp_avgs", "exp_avg_sqs")]
    args[1] = args[1][0]
    kernels._tables.clear()
    for step, lr in CALLS:  # new lr and step every call: same table
        kernels.sparse_adamw_step(*args, case["masters"], step=step, lr=lr, **HP)
    assert len(kernels._tables) == 1
    table = next(iter(kernels._tables.values()))[0]
    kernels.sparse_adamw_step(*args, case["masters"], step=5, lr=1e-3, **HP)
    assert next(iter(kernels._tables.values()))[0] is table
    kernels.sparse_adamw_step(*args, None, step=5, lr=1e-3, **HP)  # other tensors: another table
    assert len(kernels._tables) == 2


def test_hyperparameters_are_runtime_arguments_of_the_h100_kernel():
    """Compiled for sm_90: lr, betas, eps, weight decay and the bias corrections arrive as seven fp32
    kernel parameters (never constexpr, so a new lr does not recompile); only the grad's layout,
    the master copy, alignment and BLOCK are compile-time. (Access widths: test_sm90_sass.py.)"""
    for variant, facts in triton_facts("sparse_adamw_step").items():
        assert facts["constexpr_args"] == ["GATHERED_GRAD", "MASTER", "ALIGNED", "BLOCK"], variant
        assert facts["param_types"].count("f32") == 7, (variant, facts["param_types"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
def test_changing_lr_and_step_does_not_recompile_on_gpu():
    case = _case(torch.bfloat16, False, True, SHAPES[:3])
    args = [case[key] for key in ("params", "grads", "idxs", "exp_avgs", "exp_avg_sqs")]
    args[1] = args[1][0]
    cache = kernels._sparse_adamw_kernel.device_caches[torch.cuda.current_device()][0]
    kernels.sparse_adamw_step(*args, case["masters"], step=1, lr=1e-3, **HP)
    compiled = len(cache)
    for step in range(2, 12):
        kernels.sparse_adamw_step(*args, case["masters"], step=step, lr=1e-3 / step, beta1=0.8 + step / 100,
                                  beta2=0.99, eps=1e-6 * step, weight_decay=0.01 * step)
    assert len(cache) == compiled


def test_registered_op_declares_its_mutations():
    case = _case(torch.bfloat16, False, True, SHAPES[:2])
    args = (case["params"], case["grads"][0], case["idxs"], case["exp_avgs"], case["exp_avg_sqs"],
            case["masters"], 3, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    args, kwargs = args[:6], dict(zip(("step", "lr", "beta1", "beta2", "eps", "weight_decay"), args[6:]))
    with use_backend("triton"):
        torch.library.opcheck(torch.ops.lift_kernels.sparse_adamw_step.default, args, kwargs,
                              test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_clear_errors():
    case = _case(torch.float32, False, False, SHAPES[:1])
    args = [case[key] for key in ("params", "grads", "idxs", "exp_avgs", "exp_avg_sqs")]
    args[1] = args[1][0]
    with pytest.raises(ValueError, match="exp_avg must be a contiguous fp32 vector"):
        kernels.sparse_adamw_step(*args[:3], [m.double() for m in args[3]], args[4], step=1, lr=1e-3, **HP)
    with pytest.raises(ValueError, match="grad must have the weight's shape"):
        kernels.sparse_adamw_step(args[0], [g[:5] for g in args[1]], *args[2:], step=1, lr=1e-3, **HP)


def test_forcing_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = _case(torch.float32, False, False, SHAPES[:1])
    cpu = {key: [t.cpu() for t in case[key]] for key in ("params", "idxs", "exp_avgs", "exp_avg_sqs")}
    with use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        lk.sparse_adamw_step(cpu["params"], [g.cpu() for g in case["grads"][0]], cpu["idxs"],
                             cpu["exp_avgs"], cpu["exp_avg_sqs"], step=1, lr=1e-3, **HP)


# ------------------------------------------------------------------------ the C++ CPU step (_C)
cpp_step = native.kernel("sparse_adamw_step", "cpu")  # the C++ kernel, called directly
needs_cpp = pytest.mark.skipif(cpp_step is None, reason=native.why_not("sparse_adamw_step", "cpu") or "")


@needs_cpp
@pytest.mark.parametrize("masters", [False, True], ids=["no_master", "master"])
@pytest.mark.parametrize("gathered", [False, True], ids=["dense_grad", "gathered_grad"])
def test_cpp_fp32_matches_reference(gathered, masters):
    case = _case(torch.float32, gathered, masters, device="cpu")
    got, want = _run(cpp_step, case), _run(reference_step, case)
    for g, w in zip(_updated(got), _updated(want)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@needs_cpp
@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=["lerp_from_grad", "lerp_from_moment"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpp_moments_round_exactly_as_torch(dtype, beta1):
    """The moments involve no sqrt, so they are bit-identical to the reference's: lerp and addcmul
    round as torch's kernels round on this CPU (fused multiply-add or not, both lerp formulas)."""
    case = _case(dtype, True, False, device="cpu")
    states = []
    for fn in (cpp_step, reference_step):
        state = {key: [t.clone() for t in case[key]] for key in ("params", "idxs", "exp_avgs", "exp_avg_sqs")}
        for (step, lr), grads in zip(CALLS, case["grads"]):
            fn(state["params"], grads, state["idxs"], state["exp_avgs"], state["exp_avg_sqs"], step=step, lr=lr,
               **{**HP, "beta1": beta1})
        states.append(state)
    for key in ("exp_avgs", "exp_avg_sqs"):
        for g, w in zip(states[0][key], states[1][key]):
            assert torch.equal(g, w), key


@needs_cpp
@pytest.mark.parametrize("masters", [False, True], ids=["no_master", "master"])
@pytest.mark.parametrize("gathered", [False, True], ids=["dense_grad", "gathered_grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpp_low_precision_error_at_most_twice_torch(dtype, gathered, masters):
    _assert_error_at_most_twice_torch(cpp_step, _case(dtype, gathered, masters, device="cpu"))


@needs_cpp
def test_cpp_many_weights_split_over_threads_match_one_thread_and_reference():
    """Mixed sizes (tiny to 100k entries, k = 0 too) in one call: the entries of all weights are split
    over the threads, ranges crossing weight boundaries. Two threads give exactly one thread's result."""
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 400, (60, 2), generator=g).tolist() + [[300, 700], [1, 1], [4097, 3]]
    shapes = [((m, n), int(torch.randint(0, m * n + 1, (1,), generator=g))) for m, n in sizes]
    shapes[5] = ((17, 9), 0)
    case = _case(torch.bfloat16, False, True, shapes, device="cpu")
    assert sum(k for _, k in shapes) > 4 * 2**15  # several parallel ranges of the kernel
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(cpp_step, case)
        torch.set_num_threads(2)
        two = _run(cpp_step, case)
    finally:
        torch.set_num_threads(threads)
    want = _run(reference_step, case)
    for a, b, w in zip(_updated(one), _updated(two), _updated(want)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, rtol=2**-7 if a.dtype == torch.bfloat16 else 1e-6, atol=1e-7)


@needs_cpp
def test_cpp_weights_of_several_dtypes_in_one_call():
    """fp32, bf16 and fp16 weights with dense (some non-contiguous) and gathered grads of other
    dtypes, masters for some weights only, beta1 < 0.5 and a small lr: all in one call."""
    shapes = [((33, 65), 400), ((9, 4), 0), ((123, 77), 4097)]
    cases = [_case(dtype, gathered, dtype != torch.float32, shapes, device="cpu")
             for dtype, gathered in ((torch.float32, False), (torch.bfloat16, True), (torch.float16, False))]
    merged = {key: sum((c[key] for c in cases), []) for key in ("params", "idxs", "exp_avgs", "exp_avg_sqs", "masters")}
    grads = sum((c["grads"][0] for c in cases), [])
    grads[0] = grads[0].t().contiguous().t()
    grads[3] = grads[3].float()  # a gathered fp32 grad for a bf16 weight
    assert not grads[0].is_contiguous()
    results = []
    for fn in (cpp_step, reference_step):
        state = {key: [None if t is None else t.clone() for t in ts] for key, ts in merged.items()}
        fn(state["params"], grads, state["idxs"], state["exp_avgs"], state["exp_avg_sqs"], state["masters"], step=4,
           lr=3e-4, **{**HP, "beta1": 0.3})
        results.append(state)
    for g, w in zip(_updated(results[0]), _updated(results[1])):
        torch.testing.assert_close(g, w, rtol=1e-6 if g.dtype == torch.float32 else 2**-7, atol=1e-7)


@needs_cpp
def test_cpp_op_declares_its_mutations():
    case = _case(torch.bfloat16, True, True, SHAPES[:3], device="cpu")
    args = (case["params"], case["grads"][0], case["idxs"], case["exp_avgs"], case["exp_avg_sqs"],
            case["masters"], 3, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    args, kwargs = args[:6], dict(zip(("step", "lr", "beta1", "beta2", "eps", "weight_decay"), args[6:]))
    with use_backend("native"):
        torch.library.opcheck(torch.ops.lift_kernels.sparse_adamw_step.default, args, kwargs)
        torch.library.opcheck(torch.ops.lift_kernels.sparse_adamw_step.default, (*args[:5], None), kwargs)


@needs_cpp
@pytest.mark.parametrize("broken, message", [
    (lambda a: a.update(idxs=a["idxs"][:1]), r"grads, idxs, exp_avgs and exp_avg_sqs need one tensor per weight"),
    (lambda a: a.update(masters=a["masters"][:1]), r"masters must be empty .* or hold one entry"),
    (lambda a: a["exp_avgs"].__setitem__(1, a["exp_avgs"][1].double()), r"exp_avgs\[1\] must be a contiguous fp32"),
    (lambda a: a["exp_avg_sqs"].__setitem__(0, a["exp_avg_sqs"][0][:-1]), r"exp_avg_sqs\[0\] must be .* length k="),
    (lambda a: a["masters"].__setitem__(1, a["masters"][1].bfloat16()), r"masters\[1\] must be a contiguous fp32"),
    (lambda a: a["grads"].__setitem__(0, a["grads"][0][:5]), r"grads\[0\] must have the weight's shape"),
    (lambda a: a["grads"].__setitem__(0, a["grads"][0].double()), r"grads\[0\] must be fp32, bf16 or fp16"),
    (lambda a: a["idxs"].__setitem__(0, a["idxs"][0].long()), r"idxs\[0\] must be a contiguous 1-D int32"),
    (lambda a: a["idxs"].__setitem__(1, a["idxs"][1] + 10**6), r"idxs\[1\] must be sorted flat indices in \[0, "),
    (lambda a: a["idxs"][1].__setitem__(2000, 10**6), r"an index in idxs lies outside its weight"),
    (lambda a: a["params"].__setitem__(0, a["params"][0].t()), r"params\[0\] must be contiguous"),
    (lambda a: a["params"].__setitem__(0, a["params"][0].double()), r"params\[0\] must be fp32, bf16 or fp16"),
    (lambda a: a.update(step=0), r"step .* must be >= 1"),
], ids=["list_lengths", "masters_length", "moment_dtype", "moment_length", "master_dtype", "grad_shape",
        "grad_dtype", "idx_dtype", "idx_range", "idx_inner_out_of_range", "param_layout", "param_dtype", "step"])
def test_cpp_bad_inputs_raise_errors_naming_the_argument(broken, message):
    case = _case(torch.float32, False, True, [((40, 30), 100), ((64, 100), 4097)], device="cpu")
    args = {key: list(case[key]) for key in ("params", "idxs", "exp_avgs", "exp_avg_sqs", "masters")}
    args.update(grads=list(case["grads"][0]), step=1)
    broken(args)
    with pytest.raises(RuntimeError, match=message):
        cpp_step(args["params"], args["grads"], args["idxs"], args["exp_avgs"],
                                     args["exp_avg_sqs"], args["masters"], step=args["step"], lr=1e-3, **HP)


@needs_cpp
def test_cpp_step_is_the_cpu_default_and_the_reference_can_be_forced(monkeypatch):
    assert ops.chosen("sparse_adamw_step", "cpu") == ("native", "default for cpu")
    monkeypatch.setenv("LIFT_BACKEND", "reference")
    with use_backend():
        assert ops.chosen("sparse_adamw_step", "cpu") == ("reference", "forced by LIFT_BACKEND=reference")
