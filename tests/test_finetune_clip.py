"""lift-finetune clips with LIFTAdamW's documented semantics: the norm of the gradient it applies."""
import copy

import pytest
import torch

import lift_kernels as lk

transformers = pytest.importorskip("transformers")
from lift_finetune import train as loop  # noqa: E402
from lift_finetune.features import Features  # noqa: E402


def test_logged_grad_norm_is_the_norm_lift_adamw_clips(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    features = [Features(ids, [-100] * 4 + ids[4:]) for ids in torch.randint(1, 40, (8, 10), generator=g).tolist()]
    kw = dict(lr=1e-3, rank=1, lra_rank=2, selector="magnitude")
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    lc = loop.LoopConfig(batch_size=2, grad_accum=2, max_steps=1, max_grad_norm=1e-3, bf16=False, seed=0,
                         save_every=0, output_dir=str(tmp_path))
    history = loop.train(model, opt, sched, features, lc, device=torch.device("cpu"), pad_id=0, start_step=0,
                         history=[], extra={})
    # the same step's gradient, by hand, normed the way LIFTAdamW.clip_grad_norm_ documents it
    ref_opt = lk.LIFTAdamW(lk.lift_param_groups(twin), **kw)
    batches = loop._step_batches(features, lc, 0, 0)
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    lk.lift_param_groups(plain)  # the same trainable set, no optimizer: whole gradients
    for m in (twin, plain):
        for b in batches:
            (loop._loss_sum(m, b, torch.device("cpu"), False) / n_tokens).backward()
    selected_norm = float(ref_opt.clip_grad_norm_(float("inf")))
    dense_norm = float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters() if p.grad is not None]))
    assert history[0]["grad_norm"] == pytest.approx(selected_norm, rel=1e-5)
    assert selected_norm < dense_norm  # the two semantics differ here, so the test can tell them apart
