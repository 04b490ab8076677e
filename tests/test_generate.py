"""Generation for alignment loops: log-probs of the sampled tokens, response masks, stop strings, cache dtype."""
import pytest
import torch

from rmcore import CausalLM, ModelConfig
from rmcore.errors import NonFiniteOutputs
from rmcore.generate import _check_finite, cut_at_stop, rollout, token_logprobs

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CausalLM(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64))
    m.init_weights(0.5)  # peaked distributions: sampled rows differ and some end at EOS
    return m.eval()


PROMPTS = [[BOS, 5, 9, 33, 4], [BOS, 7], [BOS, 11, 12]]


def assert_logprobs_equal_a_forward_pass(model, r, *, temperature: float):
    """The rollout's log-probs of its sampled tokens equal those of one forward pass over the finished sequences
    (1e-5), and are 0 on padding."""
    with torch.no_grad():
        logits = model(r.sequences, attention_mask=r.attention_mask)
    P = r.prompt_width
    # the token at column P + t was sampled from the logits at column P + t - 1
    again = token_logprobs(logits[:, P - 1:-1], r.sequences[:, P:], temperature=temperature)
    m = r.response_mask.bool()
    assert (again[m] - r.logprobs[m]).abs().max() < 1e-5
    assert (r.logprobs[~m] == 0).all()


def test_logprobs_equal_a_forward_pass_over_the_finished_sequences(model):
    g = torch.Generator().manual_seed(0)
    r = rollout(model, PROMPTS, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.7, generator=g,
                with_logprobs=True)
    assert_logprobs_equal_a_forward_pass(model, r, temperature=0.7)


def test_samples_of_one_prompt_share_its_prefill_and_match_a_forward_pass(model):
    """K samples per prompt, in a group's order (a, a, a, b, b, b, ...): each distinct prompt is prefilled once and
    its cache rows copied; the sampled tokens' log-probs still equal a forward pass over the finished sequences,
    and greedy rows equal each prompt decoded alone."""
    grouped = [p for p in PROMPTS for _ in range(3)]
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    r = rollout(model, grouped, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.7,
                generator=torch.Generator().manual_seed(0), with_logprobs=True)
    hook.remove()
    assert shapes[0] == (len(PROMPTS), r.prompt_width) and shapes[1] == (len(grouped), 1)  # prefill, then decoding
    assert_logprobs_equal_a_forward_pass(model, r, temperature=0.7)
    assert len({tuple(x) for x in r.responses()}) > len(PROMPTS)  # the samples of a prompt differ
    greedy = rollout(model, grouped, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0).responses()
    alone = [rollout(model, [p], max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0).responses()[0]
             for p in PROMPTS]
    assert greedy == [a for a in alone for _ in range(3)]


def test_response_mask_covers_up_to_and_including_the_stop(model):
    free = rollout(model, PROMPTS, max_new_tokens=10, eos_id=-1, pad_id=PAD, temperature=0)
    assert free.response_mask.all() and not free.stopped.any()
    eos = free.sequences[0, free.prompt_width + 3].item()  # row 0 stops at its 4th token
    r = rollout(model, PROMPTS, max_new_tokens=10, eos_id=eos, pad_id=PAD, temperature=0)
    for row, (resp, full) in enumerate(zip(r.responses(), free.responses())):
        n = full.index(eos) + 1 if eos in full else len(full)
        assert resp == full[:n]
        assert r.response_mask[row].tolist() == [1] * n + [0] * (10 - n)
        assert r.sequences[row, r.prompt_width + n:].eq(PAD).all()  # after the stop: padding, never EOS
        assert bool(r.stopped[row]) == (eos in full)
    assert r.stopped[0]


class Letters:
    """A tokenizer stand-in: token i reads as one letter."""
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_end_a_row_and_cut_the_same_way_everywhere(model):
    free = rollout(model, PROMPTS, max_new_tokens=10, eos_id=-1, pad_id=PAD, temperature=0)
    text = Letters().decode(free.responses()[1])
    stop = text[4:6]  # a string that first completes at or before the 6th token of row 1
    first = text.find(stop)
    r = rollout(model, PROMPTS, max_new_tokens=10, eos_id=-1, pad_id=PAD, temperature=0, stop_strings=(stop,),
                tokenizer=Letters())
    assert r.responses()[1] == free.responses()[1][:first + len(stop)] and r.stopped[1]
    cut, found = cut_at_stop(Letters().decode(r.responses()[1]), (stop,))
    assert found and cut == text[:first]
    assert cut_at_stop("no stop here", ("###Human:",)) == ("no stop here", False)


def test_kv_cache_takes_the_compute_dtype(model):
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append(k.dtype)
        return real(q, k, v, *a, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rollout(model, PROMPTS[:1], max_new_tokens=2, eos_id=EOS, pad_id=PAD, temperature=0)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert seen and set(seen) == {torch.bfloat16}


def test_a_compiled_decoding_step_samples_what_the_eager_one_does_and_compiles_once(model):
    """compile_decoding: the same tokens as eager decoding from the same generator (fp32), log-probs equal to a
    forward pass (1e-5); a second call with another batch size and prompt width reuses the compiled graph."""
    def sampled(prompts, compile_decoding):
        return rollout(model, prompts, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.7,
                       generator=torch.Generator().manual_seed(0), with_logprobs=True,
                       compile_decoding=compile_decoding)

    compiled, eager = sampled(PROMPTS, True), sampled(PROMPTS, False)
    assert compiled.responses() == eager.responses()
    assert_logprobs_equal_a_forward_pass(model, compiled, temperature=0.7)
    wider = [[BOS, 3, 4, 5, 6, 7, 8, 9], *PROMPTS, [BOS, 21]]
    with torch.compiler.set_stance("fail_on_recompile"):
        again = sampled(wider, True)
    assert again.responses() == sampled(wider, False).responses()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_finite_check_refuses_exactly_the_live_rows_with_a_nan_or_inf_logit(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(6, 1000) * 30).to(dtype)
    for row, value in ((1, float("nan")), (2, float("inf")), (3, float("-inf")), (5, float("nan"))):
        logits[row, 17 * row] = value
    logits[4] = float("-inf")  # a whole row of -inf: its sum is -inf, caught as well
    logits[0, :4] = 3e38  # finite logits whose sum overflows: checked entry by entry, not refused
    live = torch.tensor([True, True, True, True, True, False])  # row 5 is done: its NaN is not sampled from
    reference = int((~torch.isfinite(logits).all(-1) & live).sum())  # the check this one replaced, brute force
    assert reference == 4
    with pytest.raises(NonFiniteOutputs, match="NaN or inf for 4 row"):
        _check_finite(logits, live, 0, "cpu")
    assert not bool(torch.isfinite(logits[0].sum()))
    _check_finite(logits[[0, 5]], live[[0, 5]], 0, "cpu")  # finite live rows and a dead broken one pass
