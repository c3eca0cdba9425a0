"""lift-finetune checkpoints: a checksum catches damage, a refusal changes nothing (issue 12, item 5)."""
import os
from pathlib import Path

import pytest
import torch
from file_fixtures import extra, small_run, snapshot, train_steps, write_checkpoint

from lift_kernels._digest import structure_digest
from lift_finetune import checkpoint


def _restored(path):
    model, opt, sched = small_run()  # the untrained base, as a resumed run rebuilds it
    step = checkpoint.restore(checkpoint.load(path), model, opt, sched, torch.device("cpu"), path)
    return step, model, opt, sched


def test_round_trip_is_exact(tmp_path):
    path = write_checkpoint(str(tmp_path))
    model, opt, sched = small_run()
    train_steps(model, opt, sched, 3)
    step, model2, opt2, sched2 = _restored(path)
    assert step == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert structure_digest(opt.state_dict()) == structure_digest(opt2.state_dict())
    assert sched.state_dict() == sched2.state_dict()


def test_bit_flip_in_a_weight_is_refused(tmp_path):
    path = write_checkpoint(str(tmp_path))
    raw = bytearray(open(path, "rb").read())
    weight = torch.load(path, weights_only=True)["trainable"]["0.weight"]
    at = raw.find(weight.numpy().tobytes())  # torch stores each tensor's bytes as they are
    assert at > 0
    raw[at + 13] ^= 0x04  # a low mantissa bit: a plausible weight, a different run
    open(path, "wb").write(bytes(raw))
    model, opt, sched = small_run()
    before = snapshot(model, opt, sched)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{path} is damaged: its checksum does not match"):
        checkpoint.restore(checkpoint.load(path), model, opt, sched, torch.device("cpu"), path)
    assert snapshot(model, opt, sched) == before


def test_optimizer_refusal_leaves_the_weights(tmp_path):
    """The optimizer refuses a state of another layout; the weights must not have been copied first."""
    path = write_checkpoint(str(tmp_path))
    payload = checkpoint.load(path)
    payload["optimizer"]["param_groups"].append(dict(payload["optimizer"]["param_groups"][0], params=[99]))
    model, opt, sched = small_run()
    before = snapshot(model, opt, sched)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{path}: the optimizer state does not fit"):
        checkpoint.restore(payload, model, opt, sched, torch.device("cpu"), path)
    assert snapshot(model, opt, sched) == before


def test_weight_of_other_dtype_is_refused(tmp_path):
    path = write_checkpoint(str(tmp_path))
    payload = checkpoint.load(path)
    payload["trainable"]["0.weight"] = payload["trainable"]["0.weight"].double()
    model, opt, sched = small_run()
    with pytest.raises(checkpoint.CheckpointError, match=r"0\.weight is torch.float64 .* the model's is torch.float32"):
        checkpoint.restore(payload, model, opt, sched, torch.device("cpu"), path)


def test_legacy_checkpoint_resumes_with_a_warning(tmp_path):
    path = write_checkpoint(str(tmp_path))
    payload = torch.load(path, weights_only=True)
    del payload["checksum"]
    payload["format"] = "lift_kernels.finetune.checkpoint/1"
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="without a checksum"):
        step, *_ = _restored(path)
    assert step == 3


def test_missing_checksum_or_foreign_payload_is_refused(tmp_path):
    path = write_checkpoint(str(tmp_path))
    payload = torch.load(path, weights_only=True)
    del payload["checksum"]
    torch.save(payload, path)
    with pytest.raises(checkpoint.CheckpointError, match="checksum is missing"):
        checkpoint.load(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="is not a lift-finetune checkpoint"):
        checkpoint.load(path)


def test_a_file_that_is_no_checkpoint_gets_advice_and_a_one_line_cause(tmp_path):
    """torch.load's paragraphs (which advise weights_only=False) never reach the user; its cause does, in brief."""
    for name, content, cause in [("data.jsonl", b'{"instruction": "q", "output": "1"}\n',
                                  "UnpicklingError: Unsupported operand 123"),
                                 ("cut.pt", b"PK\x03\x04garbage", "RuntimeError: PytorchStreamReader failed "
                                                                  "reading zip archive: not a ZIP archive")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError) as err:
            checkpoint.load(str(path))
        assert str(err.value) == (f"cannot read checkpoint {path}: the file is damaged or not a lift-finetune "
                                  "checkpoint (checkpoint-NNNNNN.pt in a run's --output-dir); resume from another "
                                  "checkpoint (--resume PATH) or start the run again in a new --output-dir "
                                  f"[torch.load: {cause}]")


def test_names_are_zero_padded_and_only_the_newest_is_kept_as_the_readme_says(tmp_path):
    model, opt, sched = small_run()
    for step in (4, 8):
        path = checkpoint.save(str(tmp_path), step, model, opt, sched, extra(step), torch.device("cpu"))
        if step == 4:
            assert os.path.basename(path) == "checkpoint-000004.pt"
    assert os.listdir(tmp_path) == ["checkpoint-000008.pt"]  # step 4's was deleted once step 8's was complete
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "zero-padded to six digits (`checkpoint-000004.pt` after step 4)" in readme
    assert "the older ones are deleted, so only the newest checkpoint is kept" in readme
