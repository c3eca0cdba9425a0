"""Resuming through Trainer checkpoints and accelerate's save_state/load_state is bit-exact.

Both load the optimizer through accelerate's optimizer wrapper, which has run torch's
load_state_dict once already (that call ends in __setstate__, adding defaults), so a second load
must work; the resumed run must then continue exactly as the uninterrupted one.
"""
import copy

import pytest
import torch

import lift_kernels as lk

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from lift_kernels.integrations.hf import LIFTTrainer  # noqa: E402
from test_hf_integration import dataset, tiny_llama  # noqa: E402


def _optimizer(model, sparse, seed=3):
    """The random selector draws every selection from the seed: a resumed run built with another
    seed continues exactly only if the checkpoint's selection seed is restored."""
    groups = lk.lift_param_groups(model, train_other=True)
    return lk.LIFTAdamW(groups, lr=2e-3, rank=2, lra_rank=4, update_interval=2, selector="random", seed=seed,
                        sparse_grad=sparse)


def _trainer(model, out, trainer_cls, sparse, max_steps, seed=3):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=max_steps,
        max_grad_norm=0.5, logging_steps=1, report_to=[], save_strategy="steps", save_steps=3,
        use_cpu=True, seed=0, disable_tqdm=True)
    opt = _optimizer(model, sparse, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - 0.1 * step)
    return transformers_trainer(trainer_cls, model, args, opt, sched)


def transformers_trainer(trainer_cls, model, args, opt, sched):
    return trainer_cls(model=model, args=args, train_dataset=dataset(), optimizers=(opt, sched),
                       data_collator=transformers.default_data_collator)


@pytest.mark.parametrize("trainer_cls", [transformers.Trainer, LIFTTrainer])
@pytest.mark.parametrize("sparse", [False, True])
def test_trainer_resume_from_checkpoint_is_bit_exact(tmp_path, trainer_cls, sparse):
    base = tiny_llama()
    straight = copy.deepcopy(base)
    _trainer(straight, tmp_path / "straight", trainer_cls, sparse, max_steps=6).train()

    first = copy.deepcopy(base)
    _trainer(first, tmp_path / "run", trainer_cls, sparse, max_steps=3).train()  # stops after saving step 3
    resumed = copy.deepcopy(base)  # a new process would start from the base weights
    trainer = _trainer(resumed, tmp_path / "run", trainer_cls, sparse, max_steps=6, seed=11)
    trainer.train(resume_from_checkpoint=True)  # the latest checkpoint in output_dir: checkpoint-3
    assert trainer.state.global_step == 6
    assert trainer.optimizer.optimizer.selection_seed == 3  # the checkpoint's, not the constructor's 11
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("sparse", [False, True])
def test_accelerate_save_and_load_state_is_bit_exact(tmp_path, sparse):
    data = dataset(n=12)

    def run(model, steps, load=None, save=None, seed=3):
        acc = accelerate.Accelerator(cpu=True)
        opt = _optimizer(model, sparse, seed)
        model, opt = acc.prepare(model, opt)
        if load is not None:
            acc.load_state(str(load))
            opt.load_state_dict(opt.state_dict())  # and once more, as a user might: still fine
        for batch in steps:
            out = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None])
            acc.backward(out.loss)
            acc.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        if save is not None:
            acc.save_state(str(save))
        return acc.unwrap_model(model)

    base = tiny_llama()
    straight = run(copy.deepcopy(base), data)
    half = run(copy.deepcopy(base), data[:5], save=tmp_path / "state")  # refresh at 2, 4; saved after 5
    assert not torch.equal(half.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    resumed = run(copy.deepcopy(base), data[5:], load=tmp_path / "state", seed=11)  # restores the weights
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name

