"""LIFTAdamW inside transformers.Trainer and accelerate, on a tiny LlamaForCausalLM (CPU)."""
import copy
import math

import pytest
import torch

import lift_kernels as lk

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
import lift_kernels.integrations.hf  # noqa: E402,F401  (needs transformers)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def dataset(n=16, length=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def train_with_trainer(model, opt, tmp_path, trainer_cls, max_grad_norm=0.5):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5,
        max_grad_norm=max_grad_norm, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - 0.1 * step)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset(), optimizers=(opt, sched),
                          data_collator=transformers.default_data_collator)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def _record_norms(opt) -> list[float]:
    """The values opt.clip_grad_norm_ returns from now on, as floats, in order."""
    norms, clip = [], opt.clip_grad_norm_

    def recording(*args, **kwargs):
        norm = clip(*args, **kwargs)
        norms.append(float(norm))
        return norm

    opt.clip_grad_norm_ = recording
    return norms


def test_plain_trainer_with_density_one_equals_torch_adamw(tmp_path):
    model = tiny_llama()
    twin = copy.deepcopy(model)
    hp = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    groups = lk.lift_param_groups(model, train_other=True)
    lk_loss, _ = train_with_trainer(model, lk.LIFTAdamW(groups, density=1.0, lra_rank=4, **hp), tmp_path / "a",
                                    transformers.Trainer)
    lk.lift_param_groups(twin, train_other=True)  # same trainable set
    ref_loss, _ = train_with_trainer(twin, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], **hp),
                                     tmp_path / "b", transformers.Trainer)
    assert lk_loss == pytest.approx(ref_loss, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_lift_trainer_sparse_grads_equal_dense_grads_and_train_only_selected(tmp_path):
    runs = []
    for sparse in (False, True):
        model = tiny_llama()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = lk.LIFTAdamW(lk.lift_param_groups(model), lr=1e-2, rank=2, lra_rank=4, update_interval=100,
                           sparse_grad=sparse)
        clipped = _record_norms(opt)
        losses, trainer = train_with_trainer(model, opt, tmp_path / str(sparse), lk.integrations.hf.LIFTTrainer)
        runs.append((model, losses))
        q = model.model.layers[0].self_attn.q_proj.weight
        changed = (q != start["model.layers.0.self_attn.q_proj.weight"]).view(-1)
        selected = torch.zeros_like(changed)
        selected[opt.state[q]["idx"].long()] = True
        assert changed.any() and not (changed & ~selected).any()  # no refresh in 5 steps
        assert torch.equal(model.model.embed_tokens.weight, start["model.embed_tokens.weight"])  # frozen
        # LIFTTrainer logs, at every optimizer step, the norm LIFTAdamW.clip_grad_norm_ returned.
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 5 and all("grad_norm" in h for h in logged), logged
        assert [h["grad_norm"] for h in logged] == clipped
        assert all(math.isfinite(n) and n > 0 for n in clipped), clipped
    (dense_model, dense_loss), (sparse_model, sparse_loss) = runs
    assert sparse_loss == pytest.approx(dense_loss, rel=1e-6)
    for p, q in zip(dense_model.parameters(), sparse_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_accelerate_loop_with_accumulation_and_clipping():
    from accelerate import Accelerator

    def run(make_opt):
        model = tiny_llama()
        lk.lift_param_groups(model)
        opt = make_opt(model)
        acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
        model, opt = acc.prepare(model, opt)
        data = dataset()
        for i in range(0, len(data), 2):
            batch = transformers.default_data_collator(data[i:i + 2])
            with acc.accumulate(model):
                acc.backward(model(**batch).loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                opt.zero_grad()
        return model

    hp = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)  # torch.optim.AdamW defaults to 0.01, we to 0
    ours = run(lambda m: lk.LIFTAdamW([p for p in m.parameters() if p.requires_grad], density=1.0, lra_rank=4, **hp))
    ref = run(lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], **hp))
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_plain_trainer_clips_like_lift_trainer(tmp_path, sparse):
    """Trainer's max_grad_norm (torch's clip_grad_norm_ through accelerate) clips the gradient the
    step applies, in both modes: the same trajectory and logged norms as LIFTTrainer."""
    runs = []
    for cls, sparse_grad in ((transformers.Trainer, sparse), (lk.integrations.hf.LIFTTrainer, False)):
        model = tiny_llama()
        opt = lk.LIFTAdamW(lk.lift_param_groups(model, train_other=True), lr=1e-2, rank=2, lra_rank=4,
                           update_interval=3, sparse_grad=sparse_grad)
        losses, trainer = train_with_trainer(model, opt, tmp_path / f"{cls.__name__}{sparse_grad}", cls,
                                             max_grad_norm=0.05)
        norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        runs.append((model, losses, norms))
    (model, losses, norms), (ref_model, ref_losses, ref_norms) = runs
    assert min(ref_norms) > 0.05, "clipping must be exercised"
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    # The two norms are summed in different orders (torch's foreach norms vs LIFTAdamW's), so the clip
    # coefficients differ in the last bits; Adam divides by sqrt(v) + eps, which magnifies that in
    # entries whose v is tiny (seen: 1.2e-6 absolute on one of 512 entries with transformers 4.57).
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-6)


def test_accelerate_clip_in_sparse_mode_equals_opt_clip():
    from accelerate import Accelerator

    def run(sparse, clip):
        model = tiny_llama()
        opt = lk.LIFTAdamW(lk.lift_param_groups(model), lr=1e-2, rank=2, lra_rank=4, sparse_grad=sparse)
        acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
        model, prepared = acc.prepare(model, opt)
        data, norms = dataset(), []
        for i in range(0, len(data), 2):
            with acc.accumulate(model):
                acc.backward(model(**transformers.default_data_collator(data[i:i + 2])).loss)
                if acc.sync_gradients:
                    norms.append(float(clip(acc, model, opt)))
                prepared.step()
                prepared.zero_grad()
        return model, norms

    model, norms = run(True, lambda acc, model, opt: acc.clip_grad_norm_(model.parameters(), 0.05))
    ref, ref_norms = run(False, lambda acc, model, opt: opt.clip_grad_norm_(0.05))
    assert min(ref_norms) > 0.05
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
