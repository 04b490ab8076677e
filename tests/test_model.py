"""The model against transformers' LLaMA on the same random weights, checkpoint I/O both ways, and generation."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # the `dev` extra

from rmcore import CausalLM, ModelConfig, RewardModel
from rmcore.data.batching import pad
from rmcore.errors import CheckpointError
from rmcore.generate import draw, generate, sample_next
from rmcore.interop.hf_checkpoint import load_pretrained, save_pretrained
from rmcore.model import last_real_index, one_query_attention

PAD, BOS, EOS, VOCAB = 0, 1, 2, 128


def hf_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=160, max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.1, num_labels=1,
                attn_implementation="eager")
    base.update(kw)
    return LlamaConfig(**base)


def hf_model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(hf_config(**kw)).eval()
    if cls is LlamaForSequenceClassification:
        torch.nn.init.normal_(model.score.weight, std=0.3)  # make rewards far from 0 so a wrong read shows
    return model


def padded_batch(lengths, side, seed=1):
    """Random real tokens (never PAD) padded on `side`; returns ids, mask, position_ids."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(3, VOCAB, (n,), generator=g)
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, cols], mask[i, cols] = row, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_lm")
    hf_model(LlamaForCausalLM).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_rm")
    hf_model(LlamaForSequenceClassification).save_pretrained(path)
    return path


@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_logits_match_transformers(lm_dir, side):
    hf = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    ours = load_pretrained(CausalLM, lm_dir).eval()
    ids, mask, pos = padded_batch([9, 5, 7], side)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, attention_mask=mask)  # position ids derived from the mask
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() < 1e-4
    assert ref[real].abs().max() > 0.1  # the comparison is not between two near-zero tensors


def test_unpadded_logits_match_transformers(lm_dir):
    hf = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    ours = load_pretrained(CausalLM, lm_dir).eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
def test_rewards_match_sequence_classification(rm_dir, side):
    hf = LlamaForSequenceClassification.from_pretrained(rm_dir).eval()
    ours = load_pretrained(RewardModel, rm_dir).eval()
    ids, mask, pos = padded_batch([4, 9, 6, 9], side)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
        out = ours(ids, attention_mask=mask)
    assert out.shape == (4,)
    assert (out - ref).abs().max() < 1e-4
    assert ref.std() > 0.05


def test_reward_is_read_at_last_real_token_whatever_padding(rm_dir):
    ours = load_pretrained(RewardModel, rm_dir).eval()
    seqs = [torch.randint(3, VOCAB, (n,)) for n in (3, 8, 5)]
    with torch.no_grad():
        alone = torch.stack([ours(s[None])[0] for s in seqs])
        for side in ("right", "left"):
            T = 8
            ids = torch.full((3, T), PAD)
            mask = torch.zeros((3, T), dtype=torch.long)
            for i, s in enumerate(seqs):
                cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
                ids[i, cols], mask[i, cols] = s, 1
            assert torch.allclose(ours(ids, attention_mask=mask), alone, atol=1e-5), side


def test_row_without_a_real_token_is_an_error_naming_it(rm_dir):
    ours = load_pretrained(RewardModel, rm_dir).eval()
    ids, mask, _ = padded_batch([4, 6, 5], "right")
    mask[1] = 0  # an empty row: there is no last real token to read a reward from
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] .*no real token"):
        ours(ids, attention_mask=mask)


def test_rewards_are_fp32_under_bf16_autocast_and_bf16_weights(rm_dir):
    """The value head computes in fp32 on the (bf16) hidden state: rewards keep 24 significant bits, not 8."""
    ours = load_pretrained(RewardModel, rm_dir).eval()
    ids, mask, _ = padded_batch([4, 6, 5, 8], "right")
    rows = torch.arange(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        r = ours(ids, attention_mask=mask)
        h = ours.model(ids, attention_mask=mask)[rows, mask.sum(-1) - 1]
        plain_head = ours.score(h)  # what a head left to autocast returns
    assert r.dtype == torch.float32 and plain_head.dtype == torch.bfloat16
    # the fp32 head on the autocast trunk's hidden state, which bf16 rounding would not reproduce
    want = h.float() @ ours.score.weight.float()[0]
    assert torch.allclose(r, want, rtol=1e-6, atol=0) and not torch.equal(r, r.bfloat16().float())
    # loaded in bf16, the trunk is bf16 and the head stays fp32
    half = load_pretrained(RewardModel, rm_dir, dtype=torch.bfloat16).eval()
    assert half.score.weight.dtype == torch.float32 and half.model.norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert half(ids, attention_mask=mask).dtype == torch.float32


def test_last_real_index_when_pad_equals_eos():
    # PAD == EOS and the real sequence ends with EOS: a "first pad token" rule would stop at the EOS inside
    # the sequence or at column 0; the mask says where the sequence ends.
    _ids = torch.tensor([[5, EOS, 7, EOS, EOS, EOS], [EOS, EOS, 4, 9, 8, EOS]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    assert last_real_index(mask).tolist() == [3, 5]


def test_rmcore_save_loads_in_transformers(tmp_path, rm_dir, lm_dir):
    ids, mask, pos = padded_batch([7, 4], "right")
    rm = load_pretrained(RewardModel, rm_dir).eval()
    save_pretrained(rm, tmp_path / "rm")
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1), rm(ids, mask), atol=1e-5)
    # a random rmcore model (not a round trip of an HF file) and a sharded save
    torch.manual_seed(3)
    lm = CausalLM(ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)).eval()
    lm.init_weights(std=0.1)
    save_pretrained(lm, tmp_path / "lm", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "lm" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    hf_lm = LlamaForCausalLM.from_pretrained(tmp_path / "lm").eval()
    with torch.no_grad():
        assert (hf_lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                - lm(ids, mask))[mask.bool()].abs().max() < 1e-4


def test_transformers_saves_load_in_rmcore(tmp_path):
    hf = hf_model(LlamaForCausalLM, seed=5)
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # a .bin checkpoint as older LLaMA releases ship, with the per-layer rotary tables they carried
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(sd, bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    for d in ("sharded", "bin"):
        ours = load_pretrained(CausalLM, tmp_path / d).eval()
        with torch.no_grad():
            assert (ours(ids) - ref).abs().max() < 1e-4, d


def test_bf16_load_and_dtype(lm_dir):
    ours = load_pretrained(CausalLM, lm_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.model.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32


def test_tied_embeddings_round_trip(tmp_path):
    hf = hf_model(LlamaForCausalLM, seed=7, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "tied")
    ours = load_pretrained(CausalLM, tmp_path / "tied").eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4
    save_pretrained(ours, tmp_path / "again")
    assert "lm_head.weight" not in load_file(tmp_path / "again" / "model.safetensors")
    again = load_pretrained(CausalLM, tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_wrong_missing_and_head_keys_are_named(tmp_path, lm_dir, rm_dir):
    sd = load_file(lm_dir / "model.safetensors")
    sd["model.layers.0.mlp.gate_proj.wieght"] = sd.pop("model.layers.0.mlp.gate_proj.weight")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((lm_dir / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_pretrained(CausalLM, bad)
    assert "model.layers.0.mlp.gate_proj.weight" in str(err.value)  # missing
    assert "model.layers.0.mlp.gate_proj.wieght" in str(err.value)  # unexpected

    # a language model is not a reward model: no silent random head
    with pytest.raises(CheckpointError, match="score.weight"):
        load_pretrained(RewardModel, lm_dir)
    rm = load_pretrained(RewardModel, lm_dir, new_head=True)
    lm = load_pretrained(CausalLM, lm_dir)
    assert torch.equal(rm.model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    assert abs(rm.score.weight.std().item() - 1 / (64 + 1) ** 0.5) < 0.04
    # and a reward model's head is unexpected in a language model
    with pytest.raises(CheckpointError, match="score.weight"):
        load_pretrained(CausalLM, rm_dir)


def test_activation_checkpointing_same_gradients(lm_dir):
    ids, mask, _ = padded_batch([8, 6], "right")
    grads = []
    for ckpt in (False, True):
        model = load_pretrained(CausalLM, lm_dir)
        model.cfg.activation_checkpointing = ckpt
        model(ids, mask)[mask.bool()].logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------------------------------------- generation
def greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_kv_cache_equals_recomputation_and_transformers(lm_dir):
    ours = load_pretrained(CausalLM, lm_dir).eval()
    hf = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    prompts = [[BOS, 5, 9, 33, 17, 4], [BOS, 70], [BOS, 11, 12, 13]]
    n = 12
    got = generate(ours, prompts, max_new_tokens=n, eos_id=-1, pad_id=PAD, temperature=0)  # eos -1: never stop early
    for p, g in zip(prompts, got):
        assert g == greedy_by_recomputation(ours, p, n)
    ids, mask = pad(prompts, PAD, side="left")
    hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None)
    assert hf_out[:, ids.shape[1]:].tolist() == got


def test_generation_stops_at_eos_per_row(lm_dir):
    ours = load_pretrained(CausalLM, lm_dir).eval()
    prompts = [[BOS, 5, 9, 33], [BOS, 70, 71]]
    free = generate(ours, prompts, max_new_tokens=8, eos_id=-1, pad_id=PAD, temperature=0)
    stop = free[0][2]  # make row 0's third token the EOS
    if stop in free[1]:
        pytest.fail("pick prompts whose continuations differ")  # keeps the test's premise explicit
    got = generate(ours, prompts, max_new_tokens=8, eos_id=stop, pad_id=PAD, temperature=0)
    assert got[0] == free[0][:3]
    assert got[1] == free[1]


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample_next(logits, temperature=1.0, top_p=1e-6, generator=g).tolist() == [1, 0]
    # top_k=2 only ever samples the two largest
    draws = {int(sample_next(logits[:1], top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 3}
    # top_p=0.5 on p = softmax([0, 3, 1, 2.9]) ~ (.02, .50, .07, .41): token 1 alone reaches 0.5? it keeps 1 and 3
    p = logits[:1].softmax(-1)[0]
    keep = {1} if p[1] >= 0.5 else {1, 3}
    draws = {int(sample_next(logits[:1], top_p=0.5, generator=g)) for _ in range(200)}
    assert draws == keep


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    """200,000 draws per row against the probabilities (a chi-square test against the binomial counts, each cell
    within 5 standard deviations); zero-probability entries, even between others and at the ends, never come."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9],
                          [1e-3, 0.25, 0.25, 0.25, 0.249, 0.0]]) * torch.tensor([[1.0], [3.0], [0.5]])  # unnormalised
    n = 200_000
    counts = torch.stack([torch.bincount(draw(row.expand(n, -1), g), minlength=6) for row in probs])
    p = probs / probs.sum(-1, keepdim=True)
    assert (counts[p == 0] == 0).all()
    expected, sd = n * p, (n * p * (1 - p)).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 1e-9).all(), (counts, expected)
    chi2 = ((counts - expected) ** 2 / expected.clamp(min=1e-12))[p > 0].sum()
    assert chi2 < 40  # 8 degrees of freedom: p(chi2 > 40) < 1e-5


def small_reward_model() -> RewardModel:
    torch.manual_seed(0)
    model = RewardModel(ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96))
    model.init_weights()
    return model


def assert_same_rewards_loss_grads(model, forward_a, forward_b):
    """Two ways of computing the same 2B rewards: equal rewards, pairwise loss and gradients (fp32, 1e-5)."""
    from rmcore.losses import pairwise_loss
    results = []
    for forward in (forward_a, forward_b):
        model.zero_grad()
        r = forward()
        loss = pairwise_loss(*r.chunk(2), reduction="sum")
        loss.backward()
        results.append((r.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (r0, l0, g0), (r1, l1, g1) = results
    assert torch.allclose(r0, r1, atol=1e-5) and torch.allclose(l0, l1, atol=1e-5)
    assert all(torch.allclose(g0[n], g1[n], atol=1e-5) for n in g0)
    return r1


def test_right_padded_fast_path_equals_the_masked_path():
    """right_padded=True (causal attention, no dense mask) gives the same rewards, pairwise loss and gradients as
    the (B, 1, T, T) padding mask, in fp32."""
    from rmcore.data.batching import pad
    model = small_reward_model()
    seqs = [torch.randint(3, VOCAB, (n,)).tolist() for n in (5, 17, 9, 12, 3, 17)]
    ids, mask = pad(seqs, 0)
    r = assert_same_rewards_loss_grads(model, lambda: model(ids, attention_mask=mask),
                                       lambda: model(ids, attention_mask=mask, right_padded=True))
    for i, s in enumerate(seqs):  # and each row equals that sequence alone, without padding
        assert torch.allclose(r[i], model(torch.tensor([s]))[0], atol=1e-5)


def test_packed_pairs_equal_the_padded_path():
    """collate_pairs(packed=True): one row, position ids restarting, attention within each sequence; the same
    rewards, pairwise loss and gradients as right-padded rows with the dense mask (fp32, 1e-5)."""
    import numpy as np

    from rmcore.data.batching import collate_pairs
    from rmcore.data.datasets import PairDataset
    model = small_reward_model()
    lens = [(5, 9), (17, 3), (11, 11), (2, 14)]
    pairs = PairDataset(chosen=[np.random.randint(3, VOCAB, a) for a, _ in lens],
                        rejected=[np.random.randint(3, VOCAB, b) for _, b in lens],
                        margin=np.full(len(lens), np.nan), ids=[str(i) for i in range(len(lens))])
    padded, packed = (collate_pairs(pairs, [0, 1, 2, 3], pad_id=0, packed=p) for p in (False, True))
    assert packed["input_ids"].shape == (1, sum(a + b for a, b in lens))
    assert_same_rewards_loss_grads(
        model, lambda: model(padded["input_ids"], attention_mask=padded["attention_mask"]),
        lambda: model(packed["input_ids"], position_ids=packed["position_ids"], seq_lens=packed["seq_lens"]))


def test_a_shared_prompt_gives_each_sequence_alone_its_reward_and_gradients():
    """collate_pairs(packed=True, share_prompt=True) runs each pair's common first tokens once; every reward, the
    pairwise loss and every gradient equal those of the 2B sequences run one by one, unpacked (fp32, 1e-5). The
    pairs: a long shared prompt, none shared, identical sequences, one a prefix of the other, GQA on."""
    import numpy as np

    from rmcore.data.batching import collate_pairs
    from rmcore.data.datasets import PairDataset
    model = small_reward_model()
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, VOCAB, 13)
    chosen = [np.concatenate([prompt, rng.integers(3, VOCAB, 4)]), np.array([5, 6, 7, 8]), prompt.copy(),
              prompt[:6].copy()]
    rejected = [np.concatenate([prompt, rng.integers(3, VOCAB, 9)]), np.array([9, 6, 7]), prompt.copy(), prompt.copy()]
    pairs = PairDataset(chosen=chosen, rejected=rejected, margin=np.full(4, np.nan), ids=list("abcd"))
    batch = collate_pairs(pairs, [0, 1, 2, 3], pad_id=0, packed=True, share_prompt=True)
    # prompts of pairs a (13 tokens), c (12: all but the last) and d (5), none for b; then 4 chosen, 4 rejected
    assert batch["seq_lens"] == (13, 12, 5, 4, 4, 1, 1, 9, 3, 1, 8)
    assert batch["continues"] == (-1, -1, -1, 0, -1, 1, 2, 0, -1, 1, 2)
    assert batch["input_ids"].numel() == 61 and batch["tokens"] == sum(len(s) for s in chosen + rejected) == 91

    def one_by_one():
        return torch.cat([model(torch.from_numpy(s.astype(np.int64))[None]) for s in chosen + rejected])
    assert_same_rewards_loss_grads(
        model, one_by_one, lambda: model(batch["input_ids"], position_ids=batch["position_ids"],
                                         seq_lens=batch["seq_lens"], continues=batch["continues"]))


def test_one_query_attention_equals_sdpa_with_grouped_heads_and_padding():
    """The decoding step's attention (rmcore.model.one_query_attention, used on CPU in bf16) against torch's SDPA,
    in fp32: 9 query heads over 3 key heads, rows with left padding masked out."""
    g = torch.Generator().manual_seed(0)
    B, H, kv_heads, S, D = 4, 9, 3, 11, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, 1), (kv_heads, S), (kv_heads, S)))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :4] = False
    mask[3, ..., :10] = False
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(one_query_attention(q, k, v, mask), want, atol=1e-6, rtol=0)
    no_mask = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(one_query_attention(q, k, v), no_mask, atol=1e-6, rtol=0)
