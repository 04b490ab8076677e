"""The Trainer's pieces: the schedule against transformers' schedulers, AdamW's groups, checkpoint atomicity."""
import json
import struct

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from rmcore.training.checkpoints import Checkpointer
from rmcore.training.distributed import Dist
from rmcore.training.trainer import lr_at, make_optimizer, warmup_steps


@pytest.mark.parametrize("schedule,reference", [("linear", get_linear_schedule_with_warmup),
                                                ("cosine", get_cosine_schedule_with_warmup)])
@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_lr_at_matches_transformers_schedulers(schedule, reference, warmup):
    total, peak = 50, 2e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = reference(opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        # every step, the warmup's first (lr 0, as in HF) included
        assert (lr_at(step, total_steps=total, peak_lr=peak, warmup_steps=warmup, schedule=schedule)
                == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15))
        opt.step()
        sched.step()


@pytest.mark.parametrize("ratio,total", [(0.05, 164), (0.05, 231), (0.03, 10), (0.1, 100), (0.0, 7)])
def test_warmup_length_matches_transformers(ratio, total):
    from types import SimpleNamespace

    from transformers import TrainingArguments
    # HF's own method (a ratio is passed as warmup_steps < 1), called without building TrainingArguments,
    # which would need accelerate
    assert warmup_steps(ratio, total) == TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)


def test_lr_floor_and_constant():
    assert (lr_at(99, total_steps=100, peak_lr=1.0, schedule="linear", min_lr_ratio=0.1)
            == pytest.approx(0.1 + 0.9 * 0.01))
    assert lr_at(100, total_steps=100, peak_lr=1.0, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(5, total_steps=100, peak_lr=3.0, schedule="constant") == 3.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(5, total_steps=100, peak_lr=1.0, schedule="step")


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_checkpoint_partial_save_is_never_resumed(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, lr=1e-2)
    ckpt = Checkpointer(tmp_path, Dist(), keep=2)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    saved = ckpt.save(model, opt, 3, {"loader": {"epoch": 0, "position": 6}})
    # a save that died after writing tensors but before trainer.json/rename: what a crash or full disk leaves
    (tmp_path / "checkpoints" / "step_0000009.partial").mkdir()
    (tmp_path / "checkpoints" / "step_0000010").mkdir()  # renamed dir without trainer.json: not complete either
    assert ckpt.latest() == saved
    weights = model.weight.detach().clone()
    exp_avg = opt.state[model.weight]["exp_avg"].clone()
    with torch.no_grad():
        model.weight.zero_()
    opt.state[model.weight]["exp_avg"].zero_()
    state = ckpt.load(ckpt.candidates("auto")[-1], model, opt)
    assert state == {"step": 3, "loader": {"epoch": 0, "position": 6}}
    assert torch.equal(model.weight, weights)
    assert torch.equal(opt.state[model.weight]["exp_avg"], exp_avg)
    # keep=2: older complete checkpoints are pruned
    for step in (4, 5):
        ckpt.save(model, opt, step, {})
    assert [p.name for p in ckpt.complete()] == ["step_0000004", "step_0000005"]
    assert json.loads((ckpt.latest() / "trainer.json").read_text())["step"] == 5


def test_checkpoints_without_crc32_load_exactly_and_torch_load_never_checked_it(tmp_path):
    """launch.setup turns torch.save's CRC32 off (DCP writes each tensor through it): a checkpoint written so loads
    the same tensors; and torch.load reads a file whose data changed after its CRC32 was written without a word,
    so the CRC protected nothing it costs time for."""
    before = torch.serialization.get_crc32_options()
    try:
        torch.serialization.set_crc32_options(True)
        torch.save(torch.arange(1000, dtype=torch.float32), tmp_path / "t.pt")
        raw = bytearray((tmp_path / "t.pt").read_bytes())
        raw[raw.find(struct.pack("<f", 500.0))] ^= 1  # one bit of element 500
        (tmp_path / "t.pt").write_bytes(raw)
        assert torch.load(tmp_path / "t.pt")[500] != 500.0
        torch.serialization.set_crc32_options(False)
        model = torch.nn.Linear(3, 2)
        opt = make_optimizer(model, lr=1e-2)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        want = model.weight.detach().clone(), opt.state[model.weight]["exp_avg"].clone()
        ckpt = Checkpointer(tmp_path, Dist())
        saved = ckpt.save(model, opt, 1, {})
        with torch.no_grad():
            model.weight.zero_()
        opt.state[model.weight]["exp_avg"].zero_()
        ckpt.load(saved, model, opt)
        assert torch.equal(model.weight, want[0]) and torch.equal(opt.state[model.weight]["exp_avg"], want[1])
    finally:
        torch.serialization.set_crc32_options(before)
