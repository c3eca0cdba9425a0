"""The README's "What to do with a result" blocks, run verbatim on a tiny model's run (issue 19, item 6)."""
import os
import re
import subprocess
import sys

import pytest
import torch
from finetune_fixtures import build_tiny_model

pytest.importorskip("peft")
from lift_finetune import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def block(tag: str) -> str:
    """The fenced block right after <!-- tag --> in the README."""
    m = re.search(rf"^<!-- {tag} -->\n```\w*\n(.*?)^```", README, re.S | re.M)
    assert m, f"README has no <!-- {tag} --> block"
    return m.group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding lift-finetune-out, a 3-step run on a tiny model."""
    work = tmp_path_factory.mktemp("work")
    model = build_tiny_model(str(tmp_path_factory.mktemp("tiny")))
    cli.main(["--model", model, "--output-dir", str(work / "lift-finetune-out"), "--rank", "2", "--lra-rank", "2",
              "--batch-size", "4", "--max-eval", "4", "--max-new-tokens", "4", "--device", "cpu", "--max-steps", "3"])
    return work


def run_block(tag, workdir, monkeypatch) -> dict:
    monkeypatch.chdir(workdir)
    scope: dict = {}
    exec(compile(block(tag), f"README.md <!-- {tag} -->", "exec"), scope)  # noqa: S102
    return scope


def tuned(workdir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workdir / "lift-finetune-out" / "model", dtype=torch.float32)


def same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_block(workdir, monkeypatch):
    scope = run_block("result-model", workdir, monkeypatch)
    assert same(scope["model"], tuned(workdir))
    trained = torch.load(workdir / "lift-finetune-out" / "checkpoint-000003.pt", weights_only=True)["trainable"]
    state = scope["model"].state_dict()
    assert all(torch.equal(state[k], w) for k, w in trained.items())


def test_adapter_block(workdir, monkeypatch):
    import json

    scope = run_block("result-adapter", workdir, monkeypatch)
    inexact = json.loads((workdir / "lift-finetune-out" / "summary.json").read_text())["peft_adapter"]["inexact_entries"]
    want = tuned(workdir).state_dict()
    got = scope["merged"].state_dict()
    assert sum(int((got[k] != v).sum()) for k, v in want.items()) == inexact


def test_delta_blocks(workdir, monkeypatch):
    from safetensors.torch import load_file

    cmd = block("result-delta").strip()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    subprocess.run(["bash", "-c", cmd], cwd=workdir, env=env, check=True, timeout=600)
    a = load_file(workdir / "exported" / "model" / "model.safetensors")
    b = load_file(workdir / "lift-finetune-out" / "model" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (workdir / "exported" / "peft-adapter" / "adapter_model.safetensors").is_file()
    scope = run_block("result-delta-python", workdir, monkeypatch)
    assert same(scope["model"], tuned(workdir))


def test_readme_cites_only_files_in_the_repository():
    """Every file the README names under a repository folder, and every .md / .pdf it names, exists here."""
    cited = set(re.findall(r"\b((?:bench|tests|lift_kernels|lift_finetune|csrc|triton)/[\w./-]*\.(?:py|md|sh|json|cpp|cu|h))\b",
                           README))
    cited |= {p for p in re.findall(r"[\w./-]+\.(?:md|pdf)\b", README) if p != "README.md"}
    assert "DESIGN.md" in cited or "DESIGN.md" not in README
    missing = sorted(p for p in cited if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, missing
