"""lift_param_groups: which weights LIFT trains in a model."""
import pytest
import torch
from torch import nn

import lift_kernels as lk
from lift_kernels.reference import topk_flat_indices


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(16, 8, bias=True)
        self.norm = nn.LayerNorm(8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 10, bias=False)


def names(group):
    return group["param_names"]


def test_default_is_every_linear_but_lm_head_and_freezes_the_rest():
    model = Tiny()
    groups = lk.lift_param_groups(model)
    assert len(groups) == 1 and groups[0]["lift"] is True
    assert names(groups[0]) == ["layers.0.q_proj.weight", "layers.0.mlp.down_proj.weight",
                                "layers.1.q_proj.weight", "layers.1.mlp.down_proj.weight"]
    assert not model.lm_head.weight.requires_grad and not model.embed.weight.requires_grad
    assert not model.layers[0].mlp.down_proj.bias.requires_grad
    assert model.layers[0].q_proj.weight.requires_grad


@pytest.mark.parametrize("targets,expected", [
    (["q_proj"], ["layers.0.q_proj.weight", "layers.1.q_proj.weight"]),
    ("mlp", ["layers.0.mlp.down_proj.weight", "layers.1.mlp.down_proj.weight"]),
    (["mlp.down_proj", "lm_head"], ["layers.0.mlp.down_proj.weight", "layers.1.mlp.down_proj.weight",
                                    "lm_head.weight"]),
])
def test_target_modules(targets, expected):
    assert names(lk.lift_param_groups(Tiny(), target_modules=targets)[0]) == expected


def test_train_other_puts_the_rest_in_a_dense_group():
    model = Tiny()
    groups = lk.lift_param_groups(model, target_modules=["q_proj"], train_other=True)
    assert groups[1]["lift"] is False
    assert "embed.weight" in names(groups[1]) and "layers.0.norm.weight" in names(groups[1])
    opt = lk.LIFTAdamW(groups, rank=1, lra_rank=2)
    model.embed.weight.grad = torch.randn_like(model.embed.weight)
    model.layers[0].mlp.down_proj.weight.grad = torch.randn(8, 16)
    opt.step()  # the 2-D embedding and down_proj in the dense group are trained densely
    assert opt.state[model.embed.weight]["exp_avg"].shape == model.embed.weight.shape


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target_modules=\['o_proj'\] matched no trainable nn.Linear"):
        lk.lift_param_groups(Tiny(), target_modules=["o_proj"])


def test_tied_weights_are_counted_once():
    model = Tiny()
    model.layers[1].q_proj.weight = model.layers[0].q_proj.weight
    groups = lk.lift_param_groups(model, train_other=True)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("first,second", [
    (dict(), dict()),
    (dict(target_modules=["q_proj"]), dict(target_modules=["q_proj"])),
    (dict(target_modules=["q_proj"]), dict(target_modules=["q_proj"], train_other=True)),
    (dict(target_modules=["q_proj"]), dict(target_modules=["mlp"])),
])
def test_a_second_call_gives_the_groups_of_a_first_call_on_a_fresh_model(first, second):
    """The weights a first call froze are trainable to a second (which names them as targets, or puts
    them in the dense group): it returns what it returns on an untouched model, with the same flags."""
    torch.manual_seed(0)
    model = Tiny()
    fresh = Tiny()
    fresh.load_state_dict(model.state_dict())
    lk.lift_param_groups(model, **first)
    again, want = lk.lift_param_groups(model, **second), lk.lift_param_groups(fresh, **second)
    assert [names(g) for g in again] == [names(g) for g in want]
    assert [g["lift"] for g in again] == [g["lift"] for g in want]
    assert ([p.requires_grad for p in model.parameters()] == [p.requires_grad for p in fresh.parameters()])


def test_weights_the_user_froze_stay_out_of_later_calls():
    model = Tiny()
    model.layers[1].q_proj.weight.requires_grad_(False)
    model.embed.weight.requires_grad_(False)
    for _ in range(2):
        groups = lk.lift_param_groups(model, target_modules=["q_proj"], train_other=True)
        assert names(groups[0]) == ["layers.0.q_proj.weight"]
        assert "embed.weight" not in names(groups[1])
    assert not model.layers[1].q_proj.weight.requires_grad and not model.embed.weight.requires_grad


@pytest.mark.parametrize("targets,bad", [
    (["q_proj", "v_prj"], ["v_prj"]),
    (["qproj", "mlp", "down"], ["qproj", "down"]),
    (["lm_head", "lm_haed"], ["lm_haed"]),
])
def test_every_target_must_match_a_linear(targets, bad):
    with pytest.raises(ValueError, match=rf"target_modules {bad!r}".replace("[", r"\[").replace("]", r"\]")):
        lk.lift_param_groups(Tiny(), target_modules=targets)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_sequence_classification_head_thinner_than_lra_rank_trains_its_largest_weights(sparse):
    """LlamaForSequenceClassification's 2 x 128 `score` head is a LIFT weight; under lra_rank=64 its
    best rank-64 approximation is the head itself, so LIFTAdamW selects (and trains) its top-k |W|."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=160, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_labels=2, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg)
    groups = lk.lift_param_groups(model)
    head = model.score.weight
    assert head.shape == (2, 128) and "score.weight" in names(groups[0])
    opt = lk.LIFTAdamW(groups, lr=1e-2, rank=1, lra_rank=64, sparse_grad=sparse)
    before = head.detach().clone()
    ids = torch.randint(1, 32, (3, 6), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss.backward()
    opt.step()
    k = (2 + 128) * 1
    want = topk_flat_indices(before.abs(), k)
    assert torch.equal(opt.state[head]["idx"], want)
    moved = (head.detach() != before).view(-1).nonzero().view(-1)
    assert moved.numel() > 0 and bool(torch.isin(moved, want.long()).all())
