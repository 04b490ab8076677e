"""The LM head at the real response tokens only (rmcore.align.rollouts.response_logits), over the padded batch and
over one packed row (each prompt once), against the full head over every padded position: the same log-probs,
entropies and gradients."""
import pytest
import torch

from rmcore.align.rollouts import at_responses, pack, packed_row, response_logits
from rmcore.generate import token_logprobs
from rmcore.model import CausalLM, ModelConfig
from rmcore.rl import token_entropy


@pytest.mark.parametrize("packed", [False, True])
def test_head_at_response_tokens_only_gives_the_full_heads_logprobs_entropies_and_gradients(packed):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    model = CausalLM(cfg)
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (7, 2, 5, 4)]
    prompts = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[3], prompts[0]]  # K samples share a prompt
    responses = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 6, 1, 4, 5, 2)]
    batch = pack(prompts, responses, pad_id=0)
    real = batch.response_mask.bool()
    weights = torch.randn(real.shape, generator=g)

    def loss_and_grads(logp, ent):
        loss = (logp * weights).sum() + 0.1 * (ent * weights).sum()
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    # the full head: every position's logits, the response's columns read, padding zeroed
    P, T = batch.prompt_width, real.shape[1]
    full = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    logits = full[:, P - 1:P - 1 + T] / 0.7
    logp_full = torch.where(real, token_logprobs(logits, batch.responses), 0)
    ent_full = torch.where(real, token_entropy(logits), 0)
    grads_full = loss_and_grads(logp_full, ent_full)

    picked = response_logits(model, batch, packed=packed) / 0.7
    assert picked.shape == (int(real.sum()), cfg.vocab_size)  # the head ran at the real response tokens only
    logp = at_responses(token_logprobs(picked, batch.responses[real]), batch)
    ent = at_responses(token_entropy(picked), batch)
    grads = loss_and_grads(logp, ent)
    assert torch.allclose(logp, logp_full, atol=1e-5, rtol=0) and (logp[~real] == 0).all()
    assert torch.allclose(ent, ent_full, atol=1e-5, rtol=0)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_full):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name


def test_a_packed_row_holds_each_prompt_once_and_predicts_each_response_token_from_its_own_column():
    batch = pack([[5, 6, 7], [8], [5, 6, 7]], [[20, 21], [30, 31, 32], [40]], pad_id=0)
    row = packed_row(batch)
    assert row.input_ids.tolist() == [[5, 6, 7, 20, 21, 8, 30, 31, 32, 40]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 3]]
    assert row.seq_lens == (3, 2, 1, 3, 1) and row.continues == (-1, 0, -1, 2, 0)
    assert row.predicting.tolist() == [2, 3, 5, 6, 7, 2]
