"""TRL's DPOTrainer and GRPOTrainer with LIFTAdamW, in both gradient modes, on a tiny Llama (CPU).

Each run is a few optimizer steps: the loss is finite, LIFT weights change only at their selected
entries, the logged grad norm is the norm over those entries (what LIFTAdamW.clip_grad_norm_ takes),
and resuming from a mid-run checkpoint ends bit for bit where the uninterrupted run does.
"""
import copy
import math

import pytest
import torch

import lift_kernels as lk

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from finetune_fixtures import build_tiny_model  # noqa: E402
from lift_kernels.integrations.hf import LIFTTrainerMixin  # noqa: E402
from lift_kernels.optim.gathered_grad import GatheredGrad  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, tokenizer): a 2-layer Llama with a byte-level BPE tokenizer, saved offline."""
    folder = build_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as Llama's (no token_type_ids for generate)
    return folder, tokenizer


def load(folder):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def preference_data():
    rows = [(f"What is {a} plus {b}?", f" {a + b}", f" {a + b + 1}") for a in range(3) for b in range(3)]
    return datasets.Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                                       "rejected": [r[2] for r in rows]})


def prompt_data():
    return datasets.Dataset.from_dict({"prompt": [f"What is {a} times {b}?" for a in range(4) for b in range(2)]})


def distinct_characters(completions, **kwargs):
    """A reward that differs between sampled completions, so GRPO's advantages are not all zero."""
    return [float(len(set(c))) for c in completions]


COMMON = dict(per_device_train_batch_size=2, max_steps=STEPS, max_grad_norm=1e-3, logging_steps=1,
              report_to=[], use_cpu=True, seed=0, disable_tqdm=True, save_strategy="steps", save_steps=2)


def dpo_trainer(cls, model, folder, tokenizer, out, opt, max_steps):
    args = trl.DPOConfig(output_dir=str(out), **{**COMMON, "max_steps": max_steps}, gradient_accumulation_steps=2,
                         beta=0.1, max_length=32)
    return cls(model=model, ref_model=load(folder), args=args, train_dataset=preference_data(),
               processing_class=tokenizer, optimizers=(opt, schedule(opt)))


def grpo_trainer(cls, model, folder, tokenizer, out, opt, max_steps):
    args = trl.GRPOConfig(output_dir=str(out), **{**COMMON, "max_steps": max_steps}, num_generations=2,
                          max_completion_length=6, temperature=1.0)
    return cls(model=model, reward_funcs=distinct_characters, args=args, train_dataset=prompt_data(),
               processing_class=tokenizer, optimizers=(opt, schedule(opt)))


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - 0.1 * step)


def optimizer(model, sparse):
    return lk.LIFTAdamW(lk.lift_param_groups(model), lr=2e-2, rank=2, lra_rank=4, update_interval=100,
                        sparse_grad=sparse)


def selected_norm(opt) -> float:
    """The norm over the selected entries of LIFT weights and all entries of the others, computed
    here from p.grad (gathered values, or the dense gradient indexed at the selection)."""
    total = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if opt.is_lift(p):
                g = g.values if isinstance(g, GatheredGrad) else g.reshape(-1)[opt.selected_indices(p).long()]
            total += float(g.double().pow(2).sum())
    return math.sqrt(total)


def record_norms(trainer, opt) -> list[float]:
    """selected_norm at every clipping, taken before the clip scales the gradient."""
    norms, clip = [], trainer.accelerator.clip_grad_norm_

    def recording(*args, **kwargs):
        norms.append(selected_norm(opt))
        return clip(*args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = recording
    return norms


TRAINERS = {"dpo": (dpo_trainer, trl.DPOTrainer), "grpo": (grpo_trainer, trl.GRPOTrainer)}


class LIFTDPOTrainer(LIFTTrainerMixin, trl.DPOTrainer):
    pass


class LIFTGRPOTrainer(LIFTTrainerMixin, trl.GRPOTrainer):
    pass


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_trl_trainer_trains_selected_entries_logs_lift_norm_and_resumes_exactly(tiny, tmp_path, kind, sparse):
    folder, tokenizer = tiny
    make, cls = TRAINERS[kind]
    base = load(folder)

    model = copy.deepcopy(base)
    opt = optimizer(model, sparse)
    trainer = make(cls, model, folder, tokenizer, tmp_path / "straight", opt, STEPS)
    norms = record_norms(trainer, opt)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logs) == STEPS and all(math.isfinite(h["loss"]) for h in logs), logs
    assert min(norms) > COMMON["max_grad_norm"], "clipping must be exercised"
    assert [h["grad_norm"] for h in logs] == pytest.approx(norms, rel=1e-5)
    start = dict(base.named_parameters())
    moved = 0
    for name, p in model.named_parameters():
        changed = (p != start[name]).view(-1)
        if opt.is_lift(p):  # no refresh in these steps: the first selection is the only one
            outside = torch.ones_like(changed)
            outside[opt.selected_indices(p).long()] = False
            assert not (changed & outside).any(), name
            moved += int(changed.any())
        else:
            assert not changed.any(), name  # frozen by lift_param_groups
    assert moved > len(opt.lift_parameters()) // 2

    first = copy.deepcopy(base)
    make(cls, first, folder, tokenizer, tmp_path / "run", optimizer(first, sparse), STEPS // 2).train()
    resumed = copy.deepcopy(base)
    trainer = make(cls, resumed, folder, tokenizer, tmp_path / "run", optimizer(resumed, sparse), STEPS)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == STEPS
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_trl_trainer_with_lift_mixin_equals_the_plain_one(tiny, tmp_path, kind):
    """LIFTTrainerMixin routes clipping and the logged norm through opt.clip_grad_norm_: on TRL's
    trainers it trains the same trajectory and logs the same norms as the plain trainer."""
    folder, tokenizer = tiny
    make, cls = TRAINERS[kind]
    runs = []
    for trainer_cls in (cls, {"dpo": LIFTDPOTrainer, "grpo": LIFTGRPOTrainer}[kind]):
        model = load(folder)
        opt = optimizer(model, True)
        trainer = make(trainer_cls, model, folder, tokenizer, tmp_path / trainer_cls.__name__, opt, STEPS)
        trainer.args.save_strategy = "no"
        trainer.train()
        runs.append((model, [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]))
    (model, norms), (ref, ref_norms) = runs
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-6)  # clip coefficients differ in the last bits
