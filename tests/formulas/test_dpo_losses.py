"""The DPO family against TRL's own code (DPOTrainer._compute_loss and CPOTrainer.cpo_loss run on the same
log-probs), sequence log-probs against a per-sequence loop, and the response boundary against the text."""
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from trl import DPOTrainer
from trl.experimental.cpo import CPOTrainer

from rmcore.data.batching import collate_pairs
from rmcore.data.datasets import DataConfig, load_pairs
from rmcore.dpo import DPO_LOSSES, DpoConfig, PairLogps, implicit_rewards, pair_logps, sequence_logps
from rmcore.model import CausalLM, ModelConfig
from rmcore.tokenizer import Tokenizer
from rmcore.training.distributed import Dist


def random_pairs(seed=0, n=6):
    """Log-probs of n pairs with responses of 1..9 tokens: per-token values, so TRL sums them itself."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (2 * n,), generator=g)
    T = int(lengths.max()) + 4  # a 3-token prompt, the response, then padding
    completion = torch.zeros(2 * n, T, dtype=torch.long)
    for row, n_tok in enumerate(lengths.tolist()):
        completion[row, 3:3 + n_tok] = 1
    per_token = -torch.rand(2 * n, T - 1, generator=g, dtype=torch.float32) * 3 * completion[:, 1:]
    ref = -torch.rand(2 * n, generator=g) * 20
    logps = per_token.sum(1)
    lp = PairLogps(*logps.chunk(2), *ref.chunk(2), *completion.sum(1).float().chunk(2))
    return lp, per_token, completion, ref


def trl_dpo(loss_type, per_token, completion, ref, *, beta, label_smoothing=0.0):
    """TRL 1.16's DPOTrainer._compute_loss on these log-probs (precomputed reference, no model): (loss, metrics)."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    zeros = torch.zeros_like(per_token)

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref.chunk(2)[0],
              "ref_rejected_logps": ref.chunk(2)[1]}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss,label_smoothing", [("sigmoid", 0.0), ("robust", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_losses_equal_trls(loss, label_smoothing, beta):
    lp, per_token, completion, ref = random_pairs()
    theirs, metrics = trl_dpo(loss, per_token, completion, ref, beta=beta, label_smoothing=label_smoothing)
    ours = DPO_LOSSES[loss].loss(lp, beta=beta, label_smoothing=label_smoothing)
    assert ours.shape == (6,) and abs(float(ours.mean()) - theirs) < 1e-6
    # the metrics TRL logs, from our implicit rewards
    r_c, r_r = implicit_rewards(lp, beta=beta)
    for key, value in {"rewards/chosen": r_c.mean(), "rewards/rejected": r_r.mean(),
                       "rewards/margins": (r_c - r_r).mean(), "rewards/accuracies": (r_c > r_r).float().mean(),
                       "logps/chosen": lp.chosen.mean(), "logps/rejected": lp.rejected.mean()}.items():
        assert abs(float(value) - metrics[key]) < 1e-5, key


def trl_cpo(loss_type, chosen, rejected, *, beta, label_smoothing=0.0, gamma=0.5):
    trainer = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                              simpo_gamma=gamma, accelerator=SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trls_cpo_trainer(label_smoothing):
    lp, *_ = random_pairs(seed=1)
    # CPOTrainer gives SimPO the length-normalised log-probs (average_log_prob=True)
    losses, r_c, r_r = trl_cpo("simpo", lp.chosen / lp.chosen_tokens, lp.rejected / lp.rejected_tokens, beta=2.0,
                               label_smoothing=label_smoothing, gamma=0.8)
    ours = DPO_LOSSES["simpo"].loss(lp, beta=2.0, label_smoothing=label_smoothing, gamma=0.8)
    torch.testing.assert_close(ours, losses, atol=1e-6, rtol=0)
    mine = implicit_rewards(lp, beta=2.0, uses_reference=False)
    torch.testing.assert_close(mine[0], r_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(mine[1], r_r, atol=1e-6, rtol=0)


def test_conservative_dpo_equals_trls_label_smoothed_sigmoid():
    """cDPO: TRL 1.16's DPOTrainer dropped label smoothing from `sigmoid`; its CPOTrainer keeps the formula, which on
    the log-ratios is conservative DPO."""
    lp, *_ = random_pairs(seed=2)
    losses, *_ = trl_cpo("sigmoid", lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected, beta=0.3,
                         label_smoothing=0.15)
    torch.testing.assert_close(DPO_LOSSES["sigmoid"].loss(lp, beta=0.3, label_smoothing=0.15), losses, atol=1e-6,
                               rtol=0)


def test_losses_at_equal_policy_and_reference():
    """At the start (policy = reference) every DPO loss is its value at Δ = 0: log 2, 1, 1/(4β²)."""
    lp, *_ = random_pairs(seed=3)
    lp.ref_chosen, lp.ref_rejected = lp.chosen.clone(), lp.rejected.clone()
    assert torch.allclose(DPO_LOSSES["sigmoid"].loss(lp, beta=0.1), torch.full((6,), np.log(2.0)))
    assert torch.allclose(DPO_LOSSES["hinge"].loss(lp, beta=0.1), torch.ones(6))
    assert torch.allclose(DPO_LOSSES["ipo"].loss(lp, beta=0.1), torch.full((6,), 25.0))


def test_config_checks():
    for bad in ({"beta": 0}, {"label_smoothing": 0.5}, {"loss": "ipo", "label_smoothing": 0.1},
                {"loss": "sigmoid", "simpo_gamma": 1.0}):
        with pytest.raises(Exception, match="dpo"):
            DpoConfig(**bad).check("x.yaml")


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(hh_file, tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    data, _ = load_pairs([f"{hh_file}[:12]"], tok, DataConfig(max_length=400), "t", keep_examples=True,
                         response_starts=True)
    return tok, data


def test_response_starts_mark_the_response_text(pairs):
    """The tokens from response_start on decode to the response (the boundary token may carry its first space)."""
    tok, data = pairs
    for i, e in enumerate(data.examples):
        for side, seq, text in ((0, data.chosen[i], e.chosen), (1, data.rejected[i], e.rejected)):
            start = data.response_starts[i, side]
            assert tok.decode(seq[start:].tolist()).strip() == text.strip()
            assert text.strip() not in tok.decode(seq[:start].tolist())


@pytest.mark.parametrize("packed", [True, False])
def test_sequence_logps_equal_a_loop_over_sequences(pairs, packed):
    tok, data = pairs
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=tok.vocab_size,
                                 bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id))
    model.init_weights()
    idx = [0, 3, 5, 7]
    logps, counts = sequence_logps(model, collate_pairs(data, idx, tok.pad_id, packed=packed), Dist(), bf16=False)
    expected, n_expected = [], []
    for seqs, side in ((data.chosen, 0), (data.rejected, 1)):
        for i in idx:
            ids = torch.from_numpy(seqs[i].astype(np.int64))[None]
            with torch.no_grad():
                logp = model(ids)[0].log_softmax(-1)
            start = data.response_starts[i, side]
            expected.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1])))
            n_expected.append(ids.shape[1] - start)
    torch.testing.assert_close(logps, torch.tensor(expected), atol=1e-4, rtol=1e-6)
    assert counts.tolist() == n_expected
    lp = pair_logps((logps, counts), None)
    assert torch.equal(lp.ref_chosen, torch.zeros(4)) and torch.equal(lp.chosen, logps[:4])
