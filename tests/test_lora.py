"""LoRA: step 0 is the base model, only adapters and the head train, merged = unmerged, files interchangeable with
PEFT both ways, FSDP2 parity and exact resume, and the adapter-free policy as PPO's reference."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rmcore.errors import CheckpointError
from rmcore.interop.hf_checkpoint import load_pretrained, save_adapter, save_pretrained
from rmcore.lora import LoraConfig, LoraLinear, adapters_disabled, apply_lora, merged_state_dict
from rmcore.losses import pairwise_loss
from rmcore.model import CausalLM, ModelConfig, RewardModel
from rmcore.training.distributed import Dist
from rmcore.training.runtime import build_model
from rmcore.training.trainer import make_optimizer

import ppo
import train
from helpers.runs import args, losses, ppo_args, records, torchrun, weights

SHAPE = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
LORA = LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    model = RewardModel(ModelConfig(**SHAPE))
    model.init_weights()
    save_pretrained(model, tmp_path / "base")
    return tmp_path / "base"


def tokens(n=3, length=9):
    return torch.randint(3, SHAPE["vocab_size"], (n, length), generator=torch.Generator().manual_seed(1))


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
        if isinstance(model, RewardModel):
            model.score.weight.add_(torch.randn(model.score.weight.shape, generator=g))


def test_step_zero_is_the_base_model_and_only_adapters_and_head_train(base):
    plain = load_pretrained(RewardModel, base).eval()
    model = build_model(RewardModel, Dist(), init_from=str(base), lora=LORA, seed=3)
    x = tokens()
    model.eval()
    assert torch.equal(model(x), plain(x))  # B = 0: exactly the base model
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 7 * SHAPE["n_layers"]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        r = model(x)
        pairwise_loss(r[:2], r[1:], reduction="mean").backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    adapters_and_head = {k for k in before if ".lora_B." in k or k == "score.weight"}
    assert adapters_and_head <= changed  # B moves off zero (A too, once B is non-zero), the head trains fully
    assert all(".lora_" in k or k == "score.weight" for k in changed), changed  # the trunk is frozen
    model.eval()
    plain.score.weight.data.copy_(model.score.weight)  # the trained head on the untouched trunk
    with adapters_disabled(model):
        assert torch.equal(model(x), plain(x))  # adapters off: the base trunk, exactly
    assert not torch.equal(model(x), plain(x))


@pytest.mark.parametrize("cls", [RewardModel, CausalLM])
def test_merged_and_unmerged_forwards_agree(cls, tmp_path):
    torch.manual_seed(0)
    model = cls(ModelConfig(**SHAPE))
    model.init_weights()
    apply_lora(model, LORA, seed=4)
    randomize_adapters(model)
    plain = cls(ModelConfig(**SHAPE))
    plain.load_state_dict(merged_state_dict(model.state_dict(), LORA.alpha / LORA.rank))
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), plain.eval()(x), atol=1e-5)


def hf_rewards(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits[:, 0]


def test_rmcore_adapter_opens_in_peft_with_the_same_rewards(base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification
    model = build_model(RewardModel, Dist(), init_from=str(base), lora=LORA, seed=3)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", model.state_dict(), lora=LORA, base=base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    theirs = PeftModel.from_pretrained(LlamaForSequenceClassification.from_pretrained(base), tmp_path / "adapter")
    x = tokens()
    with torch.no_grad():
        ours = model.eval()(x)
    assert torch.allclose(hf_rewards(theirs.eval(), x), ours, atol=1e-4)
    # and back: the adapter directory alone (its base named inside) loads into rmcore with the same rewards
    again = load_pretrained(RewardModel, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(again(x), ours, atol=1e-5)


def test_peft_adapter_loads_into_rmcore_with_the_same_rewards(base, tmp_path):
    import peft
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(5)
    theirs = peft.get_peft_model(LlamaForSequenceClassification.from_pretrained(base), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_pretrained(RewardModel, base, adapter=tmp_path / "peft").eval()
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(ours(x), hf_rewards(theirs.eval(), x), atol=1e-4)


def test_two_process_lora_run_matches_one_process_and_resumes_exactly(tmp_path, hh_file, tok_dir):
    common = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.dropout=0", "optim.max_steps=4",
              "optim.epochs=2", "run.save_every=2", "run.eval_every=0"]
    one = torchrun(1, "train.py", args("rm", tmp_path / "one", hh_file, tok_dir, "optim.micro_batch_size=8", *common))
    assert one.returncode == 0, one.stderr[-3000:]
    trainable, total = map(lambda x: int(x.replace(",", "")),
                           re.search(r"parameters: ([\d,]+) trainable of ([\d,]+)", one.stdout + one.stderr).groups())
    assert 0 < trainable < total / 5 and "LoRA r 4" in one.stdout + one.stderr  # the trunk is frozen
    two = torchrun(2, "train.py", args("rm", tmp_path / "two", hh_file, tok_dir, "optim.micro_batch_size=4", *common))
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == 4 and all(abs(l1[s] - l2[s]) < 1e-5 for s in l1), (l1, l2)
    cut = torchrun(2, "train.py", args("rm", tmp_path / "cut", hh_file, tok_dir, "optim.micro_batch_size=4", *common,
                           "run.halt_at_step=3"))
    assert cut.returncode == 0, cut.stderr[-3000:]
    rest = torchrun(2, "train.py", args("rm", tmp_path / "cut", hh_file, tok_dir, "optim.micro_batch_size=4", *common))
    assert rest.returncode == 0 and "resumed from" in rest.stdout + rest.stderr
    assert losses(tmp_path / "cut") == l2


def test_ppo_with_lora_reads_its_reference_with_the_adapters_off(tmp_path, hh_file, policy_dir, rm_dir):
    # the old log-probs from a forward pass, as the reference's, so an unchanged policy's KL is exactly 0
    history = ppo.main(ppo_args(tmp_path / "p", hh_file, policy_dir, rm_dir, "ppo.iterations=2", "optim.lr=3e-3",
                                "model.lora.enabled=true", "model.lora.export=adapter", "ppo.old_logprobs=forward"))
    assert history[0]["objective/kl"] == 0  # B = 0: the policy is its reference, exactly
    assert history[1]["objective/kl"] != 0  # the adapters moved the policy; with them off, the reference did not
    first = next(r for r in records(tmp_path / "p") if "loss/policy" in r)
    assert abs(first["policy/ratio"] - 1) < 1e-6  # no LoRA dropout in PPO: the update reads the rollout's log-probs
    export = tmp_path / "p" / "export"
    assert json.loads((export / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    x = tokens()
    base, tuned = load_pretrained(CausalLM, policy_dir).eval(), load_pretrained(CausalLM, export).eval()
    with torch.no_grad():
        assert not torch.allclose(base(x), tuned(x))
    with pytest.raises(Exception, match="lora.dropout"):
        ppo.main(ppo_args(tmp_path / "q", hh_file, policy_dir, rm_dir, "model.lora.enabled=true",
                          "model.lora.dropout=0.1"))
    # an adapter whose base moved: the error says the path came from adapter_config.json
    moved = tmp_path / "moved_adapter"
    shutil.copytree(export, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"moved_adapter/adapter_config.json: base_model_name_or_path="
                                              r"'.*gone' is not a directory \(moved or deleted\?\)"):
        load_pretrained(CausalLM, moved)


def test_sft_stage_with_lora_changes_only_the_adapted_weights(tmp_path, hh_file, tok_dir, policy_dir):
    train.main(args("sft", tmp_path / "sft", hh_file, tok_dir, f"run.init_from={policy_dir}", "model.lora.enabled=true",
                    "optim.max_steps=3", "optim.lr=1e-2", "run.eval_every=0", "data.eval=[]"))
    base = load_file(str(policy_dir / "model.safetensors"))
    tuned = weights(tmp_path / "sft")  # the merged export: a plain checkpoint
    assert tuned.keys() == base.keys()
    adapted = {k for k in base if any(f".{t}." in k for t in LoraConfig().target_modules)}
    assert adapted and all(not torch.equal(tuned[k], base[k]) for k in adapted)
    assert all(torch.equal(tuned[k], base[k]) for k in base if k not in adapted)  # embeddings, norms, LM head
