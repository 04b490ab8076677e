"""Data: counts on the real HH file against an independent count, packing, template, bad input, sharding, resume."""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rmcore.data.batching import block_positions, collate_blocks, collate_pairs, document_attn_mask
from rmcore.data.datasets import DataConfig, document_tokens, load_blocks, load_pairs, pack_blocks
from rmcore.data.files import iter_records
from rmcore.data.formats import read_examples
from rmcore.data.records import Example, Report
from rmcore.data.sampler import ShardedSampler
from rmcore.data.template import ASSISTANT, HUMAN, Template
from rmcore.data.tokenizer_training import train_tokenizer
from rmcore.errors import DataError
from rmcore.losses import shift_targets
from rmcore.model import CausalLM, ModelConfig


@pytest.fixture(scope="module")
def hh_rows(hh_file):
    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok(hh_rows, tmp_path_factory):
    texts = [r["chosen"] for r in hh_rows[:500]]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=1000)


def independent_hh_count(rows):
    """The drop reasons of rmcore.data's HH parser, recomputed here from the raw strings."""
    kept, reasons = [], {}
    for n, r in enumerate(rows):
        c, j = r["chosen"], r["rejected"]
        ic, ij = c.rfind("\n\nAssistant:") + 12, j.rfind("\n\nAssistant:") + 12
        if c[:ic] != j[:ij]:
            reasons["prompts differ"] = reasons.get("prompts differ", 0) + 1
        elif c[ic:].strip() == "" or j[ij:].strip() == "":
            reasons["empty"] = reasons.get("empty", 0) + 1
        elif c[ic:] == j[ij:]:
            reasons["identical"] = reasons.get("identical", 0) + 1
        else:
            kept.append(n)
    return kept, reasons


# ----------------------------------------------------------------------------------------------------------------
# The real file


def test_hh_counts_match_independent_count(hh_file, hh_rows):
    examples, report = read_examples([str(hh_file)])
    kept, reasons = independent_hh_count(hh_rows)
    assert report.read == len(hh_rows) == 2312
    assert report.kept == len(examples) == len(kept)
    assert report.dropped == {
        "chosen and rejected transcripts have different prompts": reasons["prompts differ"],
        "empty response": reasons["empty"],
    }
    assert "identical" not in reasons and sum(report.dropped.values()) + report.kept == report.read
    # kept records are the right ones, with the right line numbers (line n+1 holds row n)
    assert [e.id for e in examples] == [f"{hh_file}:{n + 1}" for n in kept]
    e = examples[0]
    assert e.prompt + e.chosen == hh_rows[kept[0]]["chosen"] and e.prompt + e.rejected == hh_rows[kept[0]]["rejected"]
    assert e.prompt.endswith(ASSISTANT)


def test_slices_partition_the_file(hh_file):
    a, ra = read_examples([f"{hh_file}[:1000]"])
    b, rb = read_examples([f"{hh_file}[1000:]"])
    whole, rw = read_examples([str(hh_file)])
    assert ra.read == 1000 and rb.read == 1312
    assert [e.id for e in a + b] == [e.id for e in whole]
    mid, rm = read_examples([f"{hh_file}[10:20]"])
    assert rm.read == 10 and mid[0].id.endswith(":11")


def test_length_filter_counts_match_independent_tokenization(hh_file, hh_rows, tok):
    cfg = DataConfig(max_length=256)
    data, report = load_pairs([f"{hh_file}[:600]"], tok, cfg, "train")
    kept, _ = independent_hh_count(hh_rows[:600])
    template = Template()
    too_long = [n for n in kept
                if max(len(tok.encode(template.apply(hh_rows[n][k]), bos=True, eos=True))
                       for k in ("chosen", "rejected")) > 256]
    assert report.dropped["longer than max_length=256 tokens"] == len(too_long) > 0
    assert len(data) == report.kept == len(kept) - len(too_long)
    assert max(data.lengths()) <= 256
    # what the model sees is BOS + the templated transcript + EOS
    first = next(n for n in kept if n not in too_long)
    assert data.chosen[0].tolist() == tok.encode(template.apply(hh_rows[first]["chosen"]), bos=True, eos=True)
    assert data.rejected[0].tolist() == tok.encode(template.apply(hh_rows[first]["rejected"]), bos=True, eos=True)


# ----------------------------------------------------------------------------------------------------------------
# The template


def test_template_round_trips_on_real_records(hh_rows):
    t = Template()
    for r in hh_rows:
        for text in (r["chosen"], r["rejected"]):
            out = t.apply(text)
            assert HUMAN not in out and ASSISTANT not in out
            assert t.invert(out) == text
    raw = Template(HUMAN, ASSISTANT, separator="")
    assert raw.apply(hh_rows[0]["chosen"]) == hh_rows[0]["chosen"]


# The first example of the reference model card (weqweasdas/hh_rlhf_rm_open_llama_3b), as the card writes it
CARD_TEXT = ("###Human: My daughter wants to know how to convert fractions to decimals, but I'm not sure how to "
             "explain it. Can you help? ###Assistant: Sure. So one way of converting fractions to decimals is to ask "
             "“how many halves are there?” and then write this as a decimal number. But that's a little tricky. "
             "Here's a simpler way:  if a fraction is expressed as a/b, then it's decimal equivalent is just "
             "a/b * 1.0  So, for example, the decimal equivalent of 1/2 is 1/2 * 1.0 = 0.5.")


def test_recipe_template_renders_the_model_cards_text():
    question, answer = CARD_TEXT.removeprefix("###Human: ").split(" ###Assistant: ")
    hh = f"\n\nHuman: {question}\n\nAssistant: {answer}"
    assert Template().apply(hh) == CARD_TEXT
    prompt, response = hh.split("\n\nAssistant:")
    assert Template().render(prompt + "\n\nAssistant:", response) == CARD_TEXT
    # every later turn's tag gets one space too, and the recipe's configs use that template
    assert Template().apply("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d") == \
        "###Human: a ###Assistant: b ###Human: c ###Assistant: d"
    assert DataConfig().build_template() == Template("###Human:", "###Assistant:", " ")
    # other templates stay expressible: tags and separator are config
    chat = DataConfig(human_tag="<|user|>", assistant_tag="<|bot|>", tag_separator="\n").build_template()
    assert chat.apply("\n\nHuman: a\n\nAssistant: b") == "<|user|> a\n<|bot|> b"
    # exports written before the separator existed were trained without one, and are scored that way
    assert Template.from_dict({"human": "###Human:", "assistant": "###Assistant:"}).apply(hh).count("? ###") == 0


def test_template_is_the_same_in_pairs_and_sft(hh_file, tok):
    """RM pairs and SFT documents are both BOS + Template.render(prompt, chosen) + EOS."""
    cfg = DataConfig(human_tag="<|user|>", assistant_tag="<|bot|>", max_length=None, block_size=64)
    examples, _ = read_examples([f"{hh_file}[:20]"])
    pairs, _ = load_pairs([f"{hh_file}[:20]"], tok, cfg, "rm")
    blocks, _ = load_blocks([f"{hh_file}[:20]"], tok, cfg, "sft")
    t = Template("<|user|>", "<|bot|>")
    expected = [tok.encode(t.render(e.prompt, e.chosen), bos=True, eos=True) for e in examples]
    assert [c.tolist() for c in pairs.chosen] == expected
    stream = [x for ids in expected for x in ids]
    assert blocks.tokens.reshape(-1).tolist() == stream[:blocks.tokens.size]


def test_template_segments_join_and_mark_assistant_text():
    t = Template()
    prompt = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    segs = t.segments(prompt, " fine")
    assert "".join(s for s, _ in segs) == t.render(prompt, " fine")
    assert [s for s, a in segs if a] == [" hello", " fine"]


# ----------------------------------------------------------------------------------------------------------------
# Packing


def test_packing_reproduces_the_stream_and_reports_the_tail(hh_file, tok):
    cfg = DataConfig(block_size=128)
    blocks, report = load_blocks([f"{hh_file}[:200]"], tok, cfg, "sft")
    examples, _ = read_examples([f"{hh_file}[:200]"])
    stream = [x for e in examples for x in tok.encode(Template().render(e.prompt, e.chosen), bos=True, eos=True)]
    n = len(stream) // 128
    assert blocks.tokens.shape == (n, 128)
    assert blocks.tokens.reshape(-1).tolist() == stream[:n * 128]
    assert blocks.dropped_tail == len(stream) - n * 128
    assert f"last partial block's {blocks.dropped_tail:,} tokens are dropped" in report.summary()
    assert blocks.loss_mask.all()  # the recipe: loss on every token


def test_packing_never_repeats_or_reorders_a_token():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=50)
    start = np.concatenate([[0], np.cumsum(sizes)])
    docs = [(list(range(start[i], start[i + 1])), [True] * int(sizes[i])) for i in range(50)]  # every token unique
    blocks = pack_blocks(docs, 32)
    flat = blocks.tokens.reshape(-1)
    assert (np.diff(flat) == 1).all() and flat[0] == 0  # in order, each once
    assert blocks.dropped_tail == start[-1] % 32 and flat.size + blocks.dropped_tail == start[-1]
    assert (blocks.doc_index.reshape(-1) == np.searchsorted(start, flat, side="right") - 1).all()


def test_document_mask_never_crosses_a_boundary():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [5, 6, 6, 6, 6, 6, 7, 7, 8, 8]])
    mask = document_attn_mask(doc)
    pos = block_positions(doc)
    B, T = doc.shape
    for b in range(B):
        for t in range(T):
            start = max(s for s in range(t + 1) if s == 0 or doc[b, s] != doc[b, s - 1])
            assert pos[b, t] == t - start
            for s in range(T):
                assert mask[b, 0, t, s] == (s <= t and doc[b, s] == doc[b, t])


def test_document_mask_learns_no_target_across_documents():
    docs = [([1, 10 + i, 20 + i, 2], [True] * 4) for i in range(7)]  # BOS x y EOS, every token learned
    blocks = pack_blocks(docs, 6)
    batch = collate_blocks(blocks, list(range(len(blocks))), document_mask=True)
    doc = torch.from_numpy(blocks.doc_index)
    targets, target_mask = shift_targets(batch["input_ids"], batch["loss_mask"])
    B, T = doc.shape
    for b in range(B):
        for t in range(T - 1):
            # a target is learned iff it is the next token of the same document
            assert bool(target_mask[b, t]) == bool(doc[b, t] == doc[b, t + 1]), (b, t)
    # without document masks (the recipe) every next token is learned, EOS -> BOS included
    plain = collate_blocks(blocks, list(range(len(blocks))), document_mask=False)
    assert shift_targets(plain["input_ids"], plain["loss_mask"])[1][:, :-1].all()


def test_document_masked_block_equals_documents_run_alone():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)).eval()
    docs = [(torch.randint(3, 64, (n,)).tolist(), [True] * n) for n in (5, 9, 4, 7)]
    blocks = pack_blocks(docs, 25)
    batch = collate_blocks(blocks, [0], document_mask=True)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch["attn_mask"])[0]
        at = 0
        for ids, _ in docs:
            alone = model(torch.tensor([ids]))[0]
            assert torch.allclose(packed[at:at + len(ids)], alone, atol=1e-5)
            at += len(ids)


def test_assistant_only_loss_mask(tok, hh_file):
    t = Template()
    e = Example("x:1", "\n\nHuman: what is up\n\nAssistant: not much\n\nHuman: ok\n\nAssistant:", " bye now")
    ids, mask = document_tokens(e, tok, t, "assistant")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] and not mask[0]
    assert tok.decode([i for i, m in zip(ids, mask) if m]).split() == ["not", "much", "bye", "now"]
    # the tokens are those of the whole text, exactly as with the loss on every token
    for e in read_examples([f"{hh_file}[:50]"])[0]:
        ids, mask = document_tokens(e, tok, t, "assistant")
        assert ids == document_tokens(e, tok, t, "all")[0]
        runs, run = [], []  # consecutive learned tokens, decoded run by run
        for i, m in zip(ids[1:-1] + [None], mask[1:-1] + [False]):
            if m:
                run.append(i)
            elif run:
                runs.append(tok.decode(run).strip())
                run = []
        responses = [s.strip() for s, a in t.segments(e.prompt, e.chosen) if a]
        assert runs == [r for r in responses if r]


# ----------------------------------------------------------------------------------------------------------------
# Formats


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_pairs_format_with_margin_and_scores(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": " yes", "rejected": " no", "response": " yes"},
        {"prompt": "\n\nHuman: b\n\nAssistant:", "chosen": " 1", "rejected": " 2", "margin": 1.5},
        {"prompt": "\n\nHuman: c\n\nAssistant:", "chosen": " 3", "rejected": " 4", "score_chosen": 8,
         "score_rejected": 5.5},
        {"prompt": "\n\nHuman: d\n\nAssistant:", "chosen": " same", "rejected": " same"},
    ])
    examples, report = read_examples([f])
    assert [e.margin for e in examples] == [None, 1.5, 2.5]
    assert report.dropped == {"identical responses": 1}


def test_conversation_format(tmp_path):
    user = {"role": "user", "content": "hi"}
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"chosen": [user, {"role": "assistant", "content": "hello"}],
         "rejected": [user, {"role": "assistant", "content": "go away"}]},
        {"prompt": [{"role": "system", "content": "Be nice."}, user],
         "chosen": [{"role": "assistant", "content": "hey"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ])
    (a, b), _ = read_examples([f])
    assert (a.prompt, a.chosen, a.rejected) == ("\n\nHuman: hi\n\nAssistant:", " hello", " go away")
    assert (b.prompt, b.chosen, b.rejected) == ("Be nice.\n\nHuman: hi\n\nAssistant:", " hey", " no")


def test_comparison_votes(tmp_path):
    base = {"instruction": "Name a colour.", "response-1": "red", "response-2": "a number"}
    f = write_jsonl(tmp_path / "v.jsonl", [
        {**base, "votes": [1, 1, 2]},
        {**base, "votes": ["2", {"value": 2, "status": "submitted"}, {"value": 1, "status": "discarded"}, 1]},
        {**base, "votes": [1, 2]},
        {**base, "votes": []},
        {**base, "votes": [{"value": 1, "status": "pending"}]},
    ])
    examples, report = read_examples([f])
    assert [(e.chosen, e.rejected) for e in examples] == [(" red", " a number"), (" a number", " red")]
    assert examples[0].prompt == "\n\nHuman: Name a colour.\n\nAssistant:"
    assert report.dropped == {"tied votes": 1, "no submitted vote": 2} and report.read == 5


def test_json_and_parquet_read_like_jsonl(tmp_path, hh_rows):
    rows = hh_rows[:30]
    jl, _ = read_examples([write_jsonl(tmp_path / "a.jsonl", rows)])
    (tmp_path / "a.json").write_text(json.dumps(rows))
    js, _ = read_examples([str(tmp_path / "a.json")])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    pa_, _ = read_examples([str(tmp_path / "a.parquet[5:]")])
    def key(es):
        return [(e.prompt, e.chosen, e.rejected) for e in es]
    assert key(js) == key(jl) and key(pa_) == key(jl)[5:] and pa_[0].id.endswith(":row 5")


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"rmcore\[parquet\]"):
        read_examples([str(tmp_path / "a.parquet")])


def test_missing_shared_file_says_what_it_is_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("RMCORE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as err:
        read_examples(["${RMCORE_DATA}/hh-rlhf/harmless-base/test.jsonl.gz[:10]"])
    msg = str(err.value)
    for part in ("RMCORE_DATA", "harmless-base/test.jsonl.gz", "MIT", "github.com/anthropics/hh-rlhf",
                 str(tmp_path / "nowhere" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")):
        assert part in msg, part
    with pytest.raises(DataError, match=r"^elsewhere\.jsonl: no such file$"):  # not a shared file: plain message
        read_examples(["elsewhere.jsonl"])


def test_the_data_ships_in_the_repository_and_rmcore_data_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RMCORE_DATA", raising=False)
    repo_file = Path(__file__).resolve().parents[2] / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    examples, report = read_examples(["${RMCORE_DATA}/hh-rlhf/harmless-base/test.jsonl.gz[:5]"])
    assert report.read == 5 and examples[0].id.startswith(f"{repo_file}:")
    assert (repo_file.parent.parent / "LICENSE").read_text().startswith("MIT License")
    other = tmp_path / "hh-rlhf" / "harmless-base"
    other.mkdir(parents=True)
    (other / "test.jsonl.gz").write_bytes(repo_file.read_bytes())
    monkeypatch.setenv("RMCORE_DATA", str(tmp_path))
    examples, _ = read_examples(["${RMCORE_DATA}/hh-rlhf/harmless-base/test.jsonl.gz[:5]"])
    assert examples[0].id.startswith(f"{other / 'test.jsonl.gz'}:")


def test_hub_name_is_a_clear_error():
    with pytest.raises(DataError, match="(?s)a Hugging Face dataset name.*hf://datasets/Dahoas/full-hh-rlhf/"):
        read_examples(["Dahoas/full-hh-rlhf"])
    with pytest.raises(DataError, match="no such file"):
        read_examples(["missing/file.jsonl"])


# ----------------------------------------------------------------------------------------------------------------
# Bad input


GOOD = {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " a", "rejected": " b"}
BAD_CASES = [
    (b"{\"prompt\": \"x\", \"chosen\": \n", "malformed JSON"),
    (b"[1, 2]\n", "expected a JSON object, got list"),
    (json.dumps({"prompt": "q", "chosen": " a"}).encode() + b"\n", "missing field 'rejected'"),
    (json.dumps({"prompt": "q", "chosen": 3, "rejected": " b"}).encode() + b"\n",
     "field 'chosen' must be str, got int"),
    (json.dumps({"prompt": "q", "chosen": "  ", "rejected": " b"}).encode() + b"\n", "field 'chosen' is empty"),
    (b"{\"prompt\": \"q\", \"chosen\": \"\xff\xfe\", \"rejected\": \" b\"}\n", "invalid UTF-8"),
]


@pytest.mark.parametrize("line,message", BAD_CASES)
def test_bad_line_names_file_line_and_expectation(tmp_path, line, message):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write((json.dumps(GOOD) + "\n").encode() * 2 + line + (json.dumps(GOOD) + "\n").encode())
    with pytest.raises(DataError) as err:
        read_examples([str(path)], fmt="pairs")
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_skip_mode_counts_exactly_what_it_skips(tmp_path):
    lines = [json.dumps(GOOD).encode() + b"\n"] * 10
    bad = [c[0] for c in BAD_CASES]
    for i, line in zip((1, 4, 5, 8, 9, 10), bad):
        lines.insert(i, line)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(lines) + b"\n\n")  # trailing blank lines are not records
    examples, report = read_examples([str(path)], fmt="pairs", skip_bad_lines=True)
    assert len(examples) == 10 and report.read == 16 and report.dropped == {"bad record skipped": 6}
    assert report.examples["bad record skipped"] == [f"{path}:{n}" for n in (2, 5, 6)]
    with pytest.raises(DataError, match=f"{path}:2: "):
        read_examples([str(path)], fmt="pairs")


def test_iter_records_yields_errors_in_place(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"{}\nnot json\n{}\n")
    got = list(iter_records(str(path)))
    assert [w for w, _ in got] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert isinstance(got[1][1], DataError) and got[0][1] == {}


# ----------------------------------------------------------------------------------------------------------------
# Batching, sharding, resume


def test_collate_pairs_chosen_first_right_padded():
    from rmcore.data.datasets import PairDataset
    data = PairDataset(["a", "b", "c"], [np.array([1, 5, 2]), np.array([1, 6, 6, 6, 2]), np.array([1, 2])],
                       [np.array([1, 7, 2]), np.array([1, 2]), np.array([1, 8, 8, 2])],
                       np.array([np.nan, 2.0, np.nan], np.float32))
    batch = collate_pairs(data, [2, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0, 0], [1, 6, 6, 6, 2], [1, 8, 8, 2, 0], [1, 2, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 5, 4, 2]
    assert batch["margin"].tolist() == [0.0, 2.0] and batch["has_margin"] and batch["ids"] == ["c", "b"]


@pytest.mark.parametrize("n,lengths", [(103, False), (103, True), (96, False), (5, False)])
def test_two_ranks_get_disjoint_shards_covering_the_split(n, lengths):
    lens = np.random.default_rng(1).integers(1, 500, n) if lengths else None
    epochs = []
    for epoch in range(2):
        shards = []
        for rank in range(2):
            s = ShardedSampler(n, batch_size=4, rank=rank, world_size=2, seed=7, lengths=lens)
            s.epoch = epoch
            batches = list(s)
            assert len(batches) == len(s)  # every rank takes the same number of steps
            shards.append([i for b in batches for i in b])
        assert set(shards[0]).isdisjoint(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(n))
        epochs.append(shards[0])
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_group_by_length_cuts_padding():
    lens = np.random.default_rng(0).integers(10, 500, 2000)
    def padding(sampler):
        return sum(len(b) * lens[b].max() - lens[b].sum() for b in map(np.array, sampler))
    assert padding(ShardedSampler(2000, 8, seed=0, lengths=lens)) < 0.2 * padding(ShardedSampler(2000, 8, seed=0))


def test_resumed_sampler_yields_the_uninterrupted_batches():
    def run(stop_after=None):
        s = ShardedSampler(50, batch_size=3, rank=1, world_size=2, seed=3, lengths=np.arange(50))
        out = []
        for _ in range(3):  # epochs
            for b in s:
                out.append(b)
                if stop_after is not None and len(out) == stop_after:
                    return out, s.state_dict()
        return out, s.state_dict()

    full, _ = run()
    for k in (1, 5, 9, 20):
        head, state = run(stop_after=k)
        s = ShardedSampler(50, batch_size=3, rank=1, world_size=2, seed=3, lengths=np.arange(50))
        s.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip (trainer.json)
        tail = []
        while len(head) + len(tail) < len(full):
            tail += list(s)
        assert head + tail == full
    with pytest.raises(ValueError, match="batch_size"):
        ShardedSampler(50, batch_size=4, rank=1, world_size=2, seed=3).load_state_dict(state)


def test_report_summary_counts():
    r = Report("x", read=5, kept=3)
    r.drop("too long", "f:1")
    r.drop("too long", "f:4")
    assert "dropped 2: too long (e.g. f:1, f:4)" in r.summary() and r.to_dict()["dropped"] == {"too long": 2}


def test_realtoxicityprompts_rows_are_prompts_and_the_toxic_format_keeps_those_above_0_3(tmp_path):
    rows = [{"filename": f"{i}.txt", "challenging": False, "prompt": {"text": text, "toxicity": tox},
             "continuation": {"text": " ...", "toxicity": 0.1}}
            for i, (text, tox) in enumerate([("So I said", 0.9), ("The weather", None), ("He was a", 0.3),
                                              ("She is", 0.31)])]
    f = write_jsonl(tmp_path / "rtp.jsonl", rows)
    every, report = read_examples([f])  # detected from the first row
    assert [e.prompt for e in every] == [f"{HUMAN} {r['prompt']['text']}{ASSISTANT}" for r in rows]
    assert report.kept == 4 and every[0].id == f"{f}:1"
    toxic, report = read_examples([f], fmt="realtoxicityprompts_toxic")
    # by hand: scores strictly above 0.3; a row without a score is not above it
    assert [e.id for e in toxic] == [f"{f}:1", f"{f}:4"]
    assert report.dropped == {"prompt toxicity not above 0.3": 2}
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": {"text": 7}}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' must be str"):
        read_examples([bad])
