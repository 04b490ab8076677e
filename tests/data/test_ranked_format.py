"""Rankings of K responses: the ranked and UltraFeedback formats (auto-detected), ties kept and counted, removals
and drops counted, bad records as DataError("path:line: ..."), the length filter, and the packed micro-batch."""
import json

import numpy as np
import pytest
import torch

from rmcore.data.datasets import DataConfig
from rmcore.data.formats import FORMATS, read_examples
from rmcore.data.ranked import as_ranking, collate_ranked, is_ranked, load_ranked, tokenize_ranked
from rmcore.data.records import Example
from rmcore.data.template import Template
from rmcore.errors import DataError

from helpers.ranked import rankings_from_pairs

P = "\n\nHuman: Name a colour.\n\nAssistant:"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


class CharTokenizer:
    """One token per character (+ BOS and EOS): lengths anyone can count."""
    bos_id, eos_id, pad_id, add_bos = 1, 2, 0, True

    def encode_batch(self, texts, bos=False, eos=False, specials=False):
        return [[self.bos_id] * bos + [3 + ord(c) % 50 for c in t] + [self.eos_id] * eos for t in texts]


# ----------------------------------------------------------------------------------------------------------------
# The ranked format


def test_ranking_and_scores_read_alike_and_are_detected(tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": P, "responses": [" red", " blue", " 7", " green"], "ranking": [1, [0, 3], 2]},
        {"prompt": P, "responses": [" red", " blue", " 7", " green"], "scores": [2, 3.5, -1, 2]},
    ])
    (a, b), report = read_examples([f])  # format auto
    assert a.scores == [2.0, 3.0, 1.0, 2.0] and a.responses == [" red", " blue", " 7", " green"]
    assert b.scores == [2.0, 3.5, -1.0, 2.0]
    assert a.chosen == b.chosen == " blue" and a.rejected is None  # the best response is what SFT reads
    assert report.read == report.kept == 2 and report.dropped == {} and report.removed == {}
    assert is_ranked([f]) and not is_ranked([f], "pairs") and is_ranked(["any.jsonl"], "ranked")
    assert FORMATS["ranked"].ranked and not FORMATS["pairs"].ranked


def test_ties_are_kept_and_counted(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": P, "responses": [" a", " b", " c", " d"], "scores": [1, 1, 2, 1]},   # 3 tied pairs
        {"prompt": P, "responses": [" a", " b", " c"], "ranking": [[0, 1], 2]},          # 1 tied pair
        {"prompt": P, "responses": [" a", " b"], "scores": [5, 4]},                      # none
    ])
    examples, report = read_examples([f])
    data = tokenize_ranked(examples, CharTokenizer(), Template(), max_length=None, report=report)
    scores = [s.tolist() for s in data.scores]
    brute_tied = sum(s[i] == s[j] for s in scores for i in range(len(s)) for j in range(i + 1, len(s)))
    brute_pairs = sum(s[i] > s[j] for s in scores for i in range(len(s)) for j in range(len(s)))
    stats = data.stats()
    assert (stats["tied_pairs"], stats["prompts_with_ties"], stats["pairs"]) == (brute_tied, 2, brute_pairs) == (
        4, 2, 6)
    assert "4 tied pairs in 2 prompts" in report.summary()


def test_what_the_data_makes_unusable_is_removed_or_dropped_and_counted(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": P, "responses": [" a", "  ", " b", " c"], "scores": [3, 2, 1, 0]},       # 1 empty: removed
        {"prompt": P, "responses": [" a", " a", " b"], "scores": [2, 2, 1]},                 # a repeat: one kept
        {"prompt": P, "responses": [" a", " b", " a", " c"], "scores": [2, 1, 0, 0]},        # a contradiction
        {"prompt": P, "responses": [" a", ""], "scores": [1, 0]},                            # 1 left: dropped
        {"prompt": P, "responses": [" a", " b", " c"], "ranking": [[2, 0, 1]]},             # all tied: dropped
    ])
    examples, report = read_examples([f])
    assert [e.responses for e in examples] == [[" a", " b", " c"], [" a", " b"], [" b", " c"]]
    assert [e.scores for e in examples] == [[3.0, 1.0, 0.0], [2.0, 1.0], [1.0, 0.0]]
    assert report.removed == {"empty response": 2, "the same response twice with one score (one copy kept)": 1,
                              "the same response twice with different scores (every copy removed)": 2}
    assert report.dropped == {"fewer than 2 responses": 1, "all responses tied": 1}
    assert report.read == report.kept + sum(report.dropped.values()) == 5
    assert report.examples["empty response"] == [f"{f}:1", f"{f}:4"]
    assert "removed 2 response(s) from their rankings: empty response" in report.summary()
    assert report.to_dict()["removed"] == report.removed
    assert "removed" not in read_examples([write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": P, "chosen": " a", "rejected": " b"}])])[1].to_dict()  # the pairs report is unchanged


def test_length_filter_removes_responses_and_drops_what_is_left_too_small(tmp_path):
    long = " " + "x" * 40
    f = write_jsonl(tmp_path / "l.jsonl", [
        {"prompt": P, "responses": [" a", long, " b"], "scores": [3, 2, 1]},  # the long one removed, 2 left
        {"prompt": P, "responses": [long, " b"], "scores": [2, 1]},           # 1 left: dropped
        {"prompt": P, "responses": [long, " b", " c"], "scores": [2, 1, 1]},  # 2 left, tied: dropped
        {"prompt": P, "responses": [" a", " b"], "scores": [1, 0]},
    ])
    template = Template()
    limit = len(template.render(P, " a")) + 2  # BOS + text + EOS of a short answer, one token per character
    examples, report = read_examples([f])
    data = tokenize_ranked(examples, CharTokenizer(), template, max_length=limit, report=report, keep_examples=True)
    assert data.ids == [f"{f}:1", f"{f}:4"] and report.kept == 2
    assert report.removed == {f"longer than max_length={limit} tokens": 3}
    assert report.dropped == {f"fewer than 2 responses within max_length={limit} tokens": 1,
                              f"all responses tied within max_length={limit} tokens": 1}
    assert data.examples[0].responses == [" a", " b"] and data.scores[0].tolist() == [3.0, 1.0]
    assert [len(s) for s in data.seqs[0]] == [len(template.render(P, r)) + 2 for r in (" a", " b")]
    assert data.lengths().tolist() == [sum(len(s) for s in g) for g in data.seqs]


def test_pairs_beside_rankings_are_rankings_of_two():
    pair = Example("f:1", P, " yes", " no")
    assert as_ranking(pair) == ([" yes", " no"], [1.0, 0.0])
    with pytest.raises(DataError, match=r"^f:2: a ranking needs K >= 2 responses"):
        as_ranking(Example("f:2", "", "just text"))


# ----------------------------------------------------------------------------------------------------------------
# UltraFeedback


def completion(text, overall, fine):
    return {"response": text, "overall_score": overall, "fine-grained_score": fine, "model": "m",
            "annotations": {"helpfulness": {"Rating": "4"}}, "critique": "..."}


def test_ultrafeedback_by_overall_or_fine_grained_score(tmp_path):
    f = write_jsonl(tmp_path / "uf.jsonl", [
        {"source": "s", "instruction": "Name a colour.", "models": ["m"] * 4,
         "completions": [completion("red", 7, 4.5), completion("blue", 9, 3.25), completion("7", 2, None),
                         completion("teal", None, 4.0)]},
        '{"instruction": "Hi.", "completions": [{"response": "a", "overall_score": NaN, "fine-grained_score": NaN}, '
        '{"response": "b", "overall_score": "N/A", "fine-grained_score": 1}]}',
    ])
    (e,), report = read_examples([f])  # auto: overall_score
    assert e.prompt == P and e.responses == [" red", " blue", " 7"] and e.scores == [7.0, 9.0, 2.0]
    assert report.removed == {"no overall_score": 3} and report.dropped == {"fewer than 2 responses": 1}
    (e,), report = read_examples([f], fmt="ultrafeedback_fine_grained")
    assert e.responses == [" red", " blue", " teal"] and e.scores == [4.5, 3.25, 4.0] and e.chosen == " red"
    assert report.removed == {"no fine-grained_score": 2} and report.dropped == {"fewer than 2 responses": 1}
    assert is_ranked([f]) and is_ranked([f], "ultrafeedback_fine_grained")


# ----------------------------------------------------------------------------------------------------------------
# Bad records


GOOD = {"prompt": P, "responses": [" a", " b"], "scores": [1, 0]}
BAD = [
    ({"prompt": P, "responses": [" a", " b"], "ranking": [0, 2]}, "ranking[1] holds 2; expected indices"),
    ({"prompt": P, "responses": [" a", " b"], "ranking": [1, 1]}, "ranking names response 1 twice"),
    ({"prompt": P, "responses": [" a", " b", " c"], "ranking": [2, 0]}, "ranking leaves out response(s) [1]"),
    ({"prompt": P, "responses": [" a", " b"], "ranking": [[], 0, 1]}, "ranking[0] is an empty list"),
    ({"prompt": P, "responses": [" a", " b"], "ranking": [1, True]}, "ranking[1] holds True"),
    ({"prompt": P, "responses": [" a", " b"], "ranking": [1, 0], "scores": [1, 0]}, "got both"),
    ({"prompt": P, "responses": [" a", " b"]}, "expected one of 'ranking'"),
    ({"prompt": P, "responses": [" a", " b"], "scores": [1]}, "1 scores for 2 responses"),
    ({"prompt": P, "responses": [" a", " b"], "scores": [1, "high"]}, "scores[1] is 'high'; expected a finite"),
    ({"prompt": P, "responses": [" a", 3], "scores": [1, 0]}, "responses[1] must be str, got int"),
    ({"prompt": P, "responses": " a", "scores": [1, 0]}, "field 'responses' must be list"),
    ({"prompt": P, "responses": [], "scores": []}, "field 'responses' is empty"),
    ({"responses": [" a", " b"], "scores": [1, 0], "prompt_id": 1}, "missing field 'prompt'"),
    ({"instruction": "q", "completions": ["a", "b"]}, "completions[0] must be an object with a string 'response'"),
    ({"instruction": "q", "completions": [{"response": "a", "overall_score": "9"}]},
     "completions[0].overall_score is '9'; expected a number"),
    ({"instruction": "", "completions": []}, "field 'instruction' is empty"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_record_names_file_line_and_expectation(tmp_path, record, message):
    fmt = "ultrafeedback" if "instruction" in record else "ranked"
    good = GOOD if fmt == "ranked" else {"instruction": "q", "completions": [completion("a", 1, 1)] * 0}
    f = write_jsonl(tmp_path / "bad.jsonl", [good, good, record])
    with pytest.raises(DataError) as err:
        read_examples([f], fmt=fmt)
    assert str(err.value).startswith(f"{f}:3: ") and message in str(err.value), str(err.value)


def test_skip_mode_counts_bad_rankings(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, BAD[0][0], GOOD, BAD[7][0], GOOD])
    examples, report = read_examples([f], skip_bad_lines=True)
    assert len(examples) == 3 and report.dropped == {"bad record skipped": 2}
    assert report.examples["bad record skipped"] == [f"{f}:2", f"{f}:4"]


# ----------------------------------------------------------------------------------------------------------------
# Loading and batching


def test_synthetic_rankings_from_the_shipped_pairs_load_with_their_ties(hh_file, tmp_path):
    records = rankings_from_pairs(f"{hh_file}[:30]")
    f = write_jsonl(tmp_path / "syn.jsonl", records)
    data, report = load_ranked([f], CharTokenizer(), DataConfig(max_length=10_000), "syn")
    assert len(data) == report.kept == len(records) == 30 and not report.dropped and not report.removed
    ks = [len(s) for s in data.scores]
    assert ks == [len(r["responses"]) for r in records] and set(ks) <= {2, 3, 4} and ks.count(4) >= 8

    def tied_pairs(r):  # read off the raw record: equal scores, or the members of an inner list of the ranking
        if "scores" in r:
            return sum(a == b for i, a in enumerate(r["scores"]) for b in r["scores"][i + 1:])
        return sum(len(g) * (len(g) - 1) // 2 for g in r["ranking"] if isinstance(g, list))

    assert data.stats()["tied_pairs"] == sum(map(tied_pairs, records)) >= 8
    examples, _ = read_examples([f"{hh_file}[:30]"])
    assert [e.responses[int(np.argmax(s))] for e, s in zip(read_examples([f])[0], data.scores)] == [
        e.chosen for e in examples]


def test_collate_keeps_each_prompts_responses_together_in_one_packed_row():
    from rmcore.data.ranked import RankedDataset
    seqs = [[np.array([1, 5, 2]), np.array([1, 6, 6, 2])], [np.array([1, 7, 2]), np.array([1, 2]), np.array([1, 9, 2])]]
    data = RankedDataset(["a", "b"], seqs, [np.array([1.0, 0.0]), np.array([0.0, 2.0, 1.0])])
    batch = collate_ranked(data, [1, 0], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 7, 2, 1, 2, 1, 9, 2, 1, 5, 2, 1, 6, 6, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    assert batch["seq_lens"] == (3, 2, 3, 3, 4) and batch["group_sizes"] == (3, 2) and batch["ids"] == ["b", "a"]
    assert batch["scores"].tolist() == [0.0, 2.0, 1.0, 1.0, 0.0]
    empty = collate_ranked(data, [], pad_id=0)  # a rank's empty share of a short last batch
    assert empty["input_ids"].shape == (0, 1) and empty["group_sizes"] == () and empty["scores"].numel() == 0
    assert torch.equal(empty["attention_mask"], torch.zeros(0, 1, dtype=torch.long))


def test_a_ranking_where_pairs_are_needed_says_so(tmp_path):
    from rmcore.data.datasets import load_pairs
    f = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    with pytest.raises(DataError, match=rf"^{f}:1: pairs are needed here, and this record is a ranking of K"):
        load_pairs([f], CharTokenizer(), DataConfig(), "x")
