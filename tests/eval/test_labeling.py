"""eval.py label's task folder: sides drawn per item and kept, judgments on disk at once, resume, the comparison
records train.py reads, and the report's counts."""
import json

import pytest

from rmcore.data.formats import read_examples
from rmcore.data.template import ASSISTANT, HUMAN
from rmcore.errors import UserError
from rmcore.eval.human_report import human_report
from rmcore.eval.labeling import LabelTask, items_from_pairs, turns

import eval as eval_cli

ONE_TURN = f"{HUMAN} What is 2 + 2?{ASSISTANT}"
TWO_TURNS = f"{HUMAN} Hi there{ASSISTANT} Hello! How can I help?{HUMAN} Name a colour.{ASSISTANT}"


def make_task(tmp_path, n=6):
    items = [{"id": f"p{i}", "prompt": TWO_TURNS if i % 2 else ONE_TURN, "a": f" answer A{i}", "b": f" answer B{i}"}
             for i in range(n)]
    return LabelTask.create(tmp_path / "task", items, names={"a": "sft", "b": "rlhf"}, source="compare.json", seed=3)


def test_turns_of_an_hh_prompt():
    assert turns(TWO_TURNS) == [{"role": "human", "text": "Hi there"},
                                {"role": "assistant", "text": "Hello! How can I help?"},
                                {"role": "human", "text": "Name a colour."}]
    assert turns(ONE_TURN) == [{"role": "human", "text": "What is 2 + 2?"}]


def test_sides_are_drawn_per_item_and_survive_reordering(tmp_path):
    task = make_task(tmp_path, 40)
    lefts = {item["id"]: item["left"] for item in task.items}
    assert 10 < sum(v == "a" for v in lefts.values()) < 30  # both sides occur
    reordered = [{k: item[k] for k in ("id", "prompt", "a", "b")} for item in reversed(task.items)]
    again = LabelTask.create(tmp_path / "other", reordered, names={}, source="x", seed=3)
    assert {item["id"]: item["left"] for item in again.items} == lefts
    shown = task.shown(0)
    assert {shown["left"], shown["right"]} == {"answer A0", "answer B0"} and "a" not in shown


def test_judgments_are_on_disk_at_once_and_a_new_process_resumes(tmp_path):
    task = make_task(tmp_path)
    task.record("ann", 0, "left", "clear")
    task.record("ann", 1, "tie")
    reopened = LabelTask(tmp_path / "task")  # as a restarted server reads it
    assert reopened.next_item("ann") == 2 and reopened.next_item("bob") == 0
    assert [j["choice"] for j in reopened.judgments] == ["left", "tie"]
    assert reopened.judgments[0]["preferred"] == reopened.items[0]["left"]
    with pytest.raises(KeyError):
        reopened.record("ann", 0, "right")  # each annotator judges an item once
    with pytest.raises(UserError, match="another --out|not of"):
        LabelTask.create(tmp_path / "task", [{"id": "z", "prompt": ONE_TURN, "a": "x", "b": "y"}], names={},
                         source="other.json")


def test_comparison_records_train_as_the_majority_says(tmp_path):
    task = make_task(tmp_path)
    right_of = {0: "b", 1: "a"}  # which answer each annotator prefers on items 0 and 1
    for ann in ("x", "y", "z"):
        for i in (0, 1):
            want = right_of[i] if ann != "z" else ("a" if right_of[i] == "b" else "b")  # z disagrees
            task.record(ann, i, "left" if task.items[i]["left"] == want else "right")
    task.record("x", 2, "tie")
    task.record("x", 3, "skip")
    path = tmp_path / "task" / "comparisons.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [len(r["votes"]) for r in records] == [3, 3, 1, 1, 0, 0]
    assert records[2]["votes"][0]["status"] == "tie" and records[3]["votes"][0]["status"] == "skipped"
    examples, report = read_examples([str(path)], name="labels")
    assert len(examples) == 2 and report.dropped == {"no submitted vote": 4}  # a tie, a skip, 2 unjudged
    assert examples[0].prompt == ONE_TURN and examples[0].chosen == " answer B0"
    assert examples[1].prompt == TWO_TURNS and examples[1].chosen == " answer A1"  # the whole transcript


def test_the_report_counts_per_annotator_and_pooled_and_the_judges_accuracy(tmp_path):
    task = make_task(tmp_path, 4)
    prefer = {"x": ["a", "a", "b", "tie"], "y": ["a", "b", "b", "tie"]}
    for ann, labels in prefer.items():
        for i, want in enumerate(labels):
            choice = want if want == "tie" else ("left" if task.items[i]["left"] == want else "right")
            task.record(ann, i, choice)
    r = human_report(task, {0: "a", 1: "a", 2: "a", 3: "b"}, "rm")
    assert [(r["annotators"][a]["wins"], r["annotators"][a]["ties"], r["annotators"][a]["losses"]) for a in "xy"] \
        == [(2, 1, 1), (1, 1, 2)]
    assert (r["pooled"]["wins"], r["pooled"]["ties"], r["pooled"]["losses"]) == (3, 2, 3)
    assert r["cohen_kappa"]["x vs y"]["items"] == 4 and r["fleiss_kappa"]["items"] == 4
    # judge says a, a, a on items 0-2: x's a, a, b -> 2 of 3; y's a, b, b -> 1 of 3
    assert r["judge"]["annotators"]["x"]["agree"] == 2 and r["judge"]["annotators"]["y"]["agree"] == 1
    assert (r["judge"]["pooled"]["agree"], r["judge"]["pooled"]["judgments"]) == (3, 6)


def test_label_from_a_pairs_file_and_report_with_a_judge(tmp_path, hh_file, rm_dir):
    items, names = items_from_pairs(f"{hh_file}[:5]")
    task = LabelTask.create(tmp_path / "t", items, names=names, source=f"{hh_file}[:5]")
    for i in range(5):
        task.record("ann", i, "left" if task.items[i]["left"] == "a" else "right")  # always the dataset's chosen
    r = eval_cli.main(["label", "--out", str(tmp_path / "t"), "--report", "--judge", str(rm_dir)])
    assert r["pooled"]["wins"] == 5
    from rmcore.eval.scorer import RewardScorer
    scorer = RewardScorer(rm_dir, truncate="left")
    a = scorer.score([(it["prompt"], it["a"]) for it in task.items])
    b = scorer.score([(it["prompt"], it["b"]) for it in task.items])
    assert r["judge"]["pooled"]["agree"] == sum(x > y for x, y in zip(a, b))
    assert (tmp_path / "t" / "human_report.md").is_file() and (tmp_path / "t" / "human_report.png").is_file()
