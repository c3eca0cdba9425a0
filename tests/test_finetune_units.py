"""Pieces of lift-finetune on their own: data, answer matching, label masking, LR schedule."""
import json

import pytest
from finetune_fixtures import build_tiny_model

from lift_finetune import data, schedule
from lift_finetune.evaluate import is_correct, last_number
from lift_finetune.features import IGNORE, Features, collate, encode, prompt_text


def test_builtin_problems_fixed_disjoint_and_correct():
    train, test = data.arithmetic_problems(300, 50)
    again_train, again_test = data.arithmetic_problems(500, 50)
    assert test == again_test  # held-out set does not depend on the training set's size
    assert train == again_train[:300]
    assert not {ex.instruction for ex in train} & {ex.instruction for ex in test}
    for ex in train + test:
        expr, answer = ex.output.split("=")
        assert eval(expr.replace("/", "//")) == int(answer) == int(ex.answer)  # noqa: S307 (our own digits)
        assert "/" not in expr or eval(expr) == int(answer)  # divisions come out even


def test_load_jsonl_and_json_array(tmp_path):
    rows = [{"instruction": "a", "input": "x", "output": "1"}, {"instruction": "b", "output": "2", "answer": 2}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(rows))
    for path in (jl, arr):
        got = data.load_jsonl(str(path))
        assert got == [data.Example("a", "1", "x", None), data.Example("b", "2", "", "2")]


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(data.DataError, match="no examples"):
        data.load_jsonl(str(tmp_path / "e.jsonl"))


@pytest.mark.parametrize("text, value", [("so 3 + 4 = 7.", 7.0), ("-12 apples", -12.0), ("1,234 total", 1234.0),
                                         ("x = 2.5", 2.5), ("none", None)])
def test_last_number(text, value):
    assert last_number(text) == value


def test_is_correct():
    assert is_correct("9 * 2 = 18", "18")
    assert not is_correct("10 + 30 = 30", "40")
    assert not is_correct("no idea", "40")
    assert is_correct("the correct answer is option2", "the correct answer is option2")
    assert not is_correct("the correct answer is option1", "option2")


def test_labels_cover_only_the_response(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model(str(tmp_path)))
    ex = data.Example("Tom has 3 apples and gets 4 more. How many apples does Tom have now?", "3 + 4 = 7")
    (feat,), dropped = encode(tok, [ex], "chat", 512)
    assert dropped == 0
    prompt = prompt_text(tok, ex, "chat")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert feat.labels[:n_prompt] == [IGNORE] * n_prompt
    learned = tok.decode([t for t in feat.labels if t != IGNORE])
    assert learned.startswith("3 + 4 = 7") and "<|im_end|>" in learned  # the model learns to stop
    short = Features(feat.input_ids[:n_prompt + 2], feat.labels[:n_prompt + 2])
    batch = collate([feat, short], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(feat.input_ids))
    assert int(batch["attention_mask"][1].sum()) == n_prompt + 2
    assert (batch["labels"][1, n_prompt + 2:] == IGNORE).all()
    assert encode(tok, [ex], "chat", n_prompt) == ([], 1)  # no room left for the response: dropped


def test_schedule_linear_with_warmup():
    f = [schedule.lr_factor("linear", s, 2, 10) for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3)  # no zero-LR step
    assert f[2] == 1.0 and f[-1] == pytest.approx(1 / 8)
    assert all(a > b for a, b in zip(f[2:], f[3:]))
    assert [schedule.lr_factor("constant", s, 0, 5) for s in range(5)] == [1.0] * 5
    assert schedule.lr_factor("cosine", 0, 0, 10) == 1.0
    assert schedule.warmup_steps(0.03, 32) == 1 and schedule.warmup_steps(100, 32) == 100


def test_a_mistyped_target_module_beside_a_matching_one_is_named():
    """--target-modules q_proj,v_prj: v_prj matches nothing; the run stops naming it (it was ignored)."""
    from torch import nn

    from lift_finetune.methods import MethodError, target_matrices

    model = nn.Module()
    model.q_proj, model.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
    assert list(target_matrices(model, ["q_proj", "v_proj"])) == ["q_proj.weight", "v_proj.weight"]
    with pytest.raises(MethodError, match=r"--target-modules: target_modules \['v_prj'\] matched no"):
        target_matrices(model, ["q_proj", "v_prj"])
    assert all(p.requires_grad for p in model.parameters())  # the check leaves the model as it was
