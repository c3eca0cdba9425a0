"""Trainer(optimizer_cls_and_kwargs=(lk.LIFTAdamW, {...})) without a subclass, on a tiny Llama (CPU).

Trainer builds the optimizer itself from its own groups: every trainable parameter, split by weight
decay. LIFTAdamW sees tensors only, so its rule for groups without ``lift`` holds: every 2-D tensor is
a LIFT weight, the input embeddings and ``lm_head`` included; 1-D ones (norms, biases) train densely.
Calling ``lk.lift_param_groups(model)`` before building the Trainer freezes what the paper freezes,
so Trainer's groups then hold exactly its LIFT weights.
"""
import copy

import pytest
import torch

import lift_kernels as lk

transformers = pytest.importorskip("transformers")
from test_hf_integration import dataset  # noqa: E402

OPTIONS = dict(lr=1e-2, rank=2, lra_rank=4, update_interval=100)


def llama(tied: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def train(model, out, **trainer_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        weight_decay=0.1, max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                   data_collator=transformers.default_data_collator, **trainer_kwargs)
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(opt, lk.LIFTAdamW)
    return opt


def changed_only_at_selection(opt, p, before) -> bool:
    changed = (p != before).view(-1)
    outside = torch.ones_like(changed)
    outside[opt.selected_indices(p).long()] = False
    return bool(changed.any()) and not bool((changed & outside).any())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
def test_trainer_groups_make_every_trainable_matrix_a_lift_weight(tmp_path, tied, sparse):
    model = llama(tied)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = train(model, tmp_path, optimizer_cls_and_kwargs=(lk.LIFTAdamW, {**OPTIONS, "sparse_grad": sparse}))
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as the embedding
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (embed is head) == tied
    assert {id(p) for p in opt.lift_parameters()} == {id(p) for p in params.values() if p.dim() == 2}
    assert opt.is_lift(embed) and opt.is_lift(head)
    # Trainer's weight decay reaches the groups: every matrix decays, norms do not
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    for name, p in params.items():
        if opt.is_lift(p):
            assert changed_only_at_selection(opt, p, before[name]), name
        else:  # a norm: dense AdamW
            assert (p != before[name]).all(), name


def test_lift_param_groups_before_the_trainer_gives_the_paper_targets_and_trajectory(tmp_path):
    """Frozen first, Trainer's groups are lift_param_groups' LIFT group (and an empty no-decay group):
    the same selections and trajectory as handing Trainer LIFTAdamW(lift_param_groups(model))."""
    model = llama(tied=False)
    twin = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = lk.lift_param_groups(model)
    opt = train(model, tmp_path / "a", optimizer_cls_and_kwargs=(lk.LIFTAdamW, dict(OPTIONS)))
    assert [id(p) for p in opt.lift_parameters()] == [id(p) for p in groups[0]["params"]]
    assert opt.param_groups[1]["params"] == []
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name

    direct = lk.LIFTAdamW(lk.lift_param_groups(twin), weight_decay=0.1, **OPTIONS)
    train(twin, tmp_path / "b", optimizers=(direct, None))  # Trainer's own scheduler in both runs
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_params_in_the_kwargs_replace_trainers_groups(tmp_path):
    """Trainer takes a "params" entry of the kwargs as the groups (and pops it): lift_param_groups with
    train_other=True trains embeddings, lm_head and norms with dense AdamW, as the paper does when
    they are trained at all."""
    model = llama(tied=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {**OPTIONS, "params": lk.lift_param_groups(model, train_other=True)}
    opt = train(model, tmp_path, optimizer_cls_and_kwargs=(lk.LIFTAdamW, kwargs))
    assert "params" not in kwargs  # gone: a second Trainer needs a new dict
    params = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not opt.is_lift(params[name]) and (params[name] != before[name]).any(), name
    q = params["model.layers.0.self_attn.q_proj.weight"]
    assert opt.is_lift(q) and changed_only_at_selection(opt, q, before["model.layers.0.self_attn.q_proj.weight"])
