"""Blind pairwise judgments by people (eval.py label): a task folder that a labeling page reads and writes.

    task.json         the items (id, prompt, answer a, answer b) and, per item, which answer is shown on the left
                      (drawn from a generator seeded by (seed, item id), so a re-created task shows the same sides)
    judgments.json    every judgment: annotator, item, the shown sides, the choice, the comment; rewritten atomically
                      (temporary file, fsync, rename) after each one, so a killed server loses nothing
    comparisons.jsonl the judgments as `comparison` records (instruction, response-1 = a, response-2 = b, votes), the
                      format train.py reads: human labels train a reward model with no conversion

An annotator chooses left, right, tie or skip; a vote's value is the answer it prefers, 1 (a) or 2 (b), with status
"submitted"; a tie (value 0, status "tie") and a skip (status "skipped") are kept but cast no vote. Each annotator sees
every item once, in order; reopening the page resumes at their first unjudged item.
"""
from __future__ import annotations

import json
import os
import random
import re
import threading
from pathlib import Path

from rmcore.data.formats import read_examples
from rmcore.data.template import ASSISTANT, HUMAN
from rmcore.errors import DataError, UserError

CHOICES = ("left", "right", "tie", "skip")


def items_from_compare(path: str | Path) -> tuple[list[dict], dict]:
    """The samples of `eval.py compare`'s compare.json as items; names: which policy is a and which b."""
    r = json.loads(Path(path).read_text())
    if "samples" not in r or "policy_a" not in r:
        raise DataError(f"{path}: not an `eval.py compare` output (expected `samples`, `policy_a`, `policy_b`)")
    items = [{"id": s["id"], "prompt": s["prompt"], "a": s["a"], "b": s["b"]} for s in r["samples"]]
    return items, {"a": r["policy_a"], "b": r["policy_b"]}


def items_from_pairs(spec: str) -> tuple[list[dict], dict]:
    """Any preference file (pairs, comparison, ...) to be (re)labeled: a = the dataset's chosen answer, b = its
    rejected one; the page never says which."""
    examples, _ = read_examples([spec], name="pairs to label")
    items = [{"id": e.id, "prompt": e.prompt, "a": e.chosen, "b": e.rejected} for e in examples]
    return items, {"a": "dataset chosen", "b": "dataset rejected"}


def turns(prompt: str) -> list[dict]:
    """An HH-form prompt as its turns [{role: human|assistant, text}], the final empty assistant turn left out."""
    out = []
    for part in re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", prompt):
        if part in (HUMAN, ASSISTANT):
            out.append({"role": "human" if part == HUMAN else "assistant", "text": ""})
        elif part.strip():
            if not out:  # text before any marker is the human's
                out.append({"role": "human", "text": ""})
            out[-1]["text"] = part.strip()
    if out and out[-1]["role"] == "assistant" and not out[-1]["text"]:
        out.pop()
    return out


def instruction_of(prompt: str) -> str:
    """A comparison record's instruction: the human turn of a one-turn prompt, else the whole HH transcript (which
    parse_comparison takes as the prompt as it is)."""
    t = turns(prompt)
    return t[0]["text"] if len(t) == 1 and t[0]["role"] == "human" else prompt


class LabelTask:
    """A task folder: its items, and the judgments written so far (one lock: several annotators at once)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        task = json.loads((self.folder / "task.json").read_text())
        self.items, self.names, self.source = task["items"], task["names"], task["source"]
        path = self.folder / "judgments.json"
        self.judgments = json.loads(path.read_text()) if path.exists() else []
        self.lock = threading.Lock()

    @classmethod
    def create(cls, folder: str | Path, items: list[dict], *, names: dict, source: str, seed: int = 0) -> LabelTask:
        """A new task folder, or the one already there when it was made from the same source (resume); another
        source there is an error, never overwritten."""
        folder = Path(folder)
        if (folder / "task.json").exists():
            existing = json.loads((folder / "task.json").read_text())
            if existing["source"] != source or len(existing["items"]) != len(items):
                raise UserError(f"{folder}/task.json is a labeling task of {existing['source']} "
                                f"({len(existing['items'])} items), not of {source}: pass another --out")
            return cls(folder)
        if not items:
            raise DataError(f"{source}: no items to label")
        for item in items:
            item["left"] = random.Random(f"{seed}:{item['id']}").choice("ab")  # per item: stable under reordering
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / "task.json", {"source": source, "seed": seed, "names": names, "items": items})
        task = cls(folder)
        task.write_comparisons()
        return task

    def judged_by(self, annotator: str) -> set[int]:
        return {j["item"] for j in self.judgments if j["annotator"] == annotator}

    def next_item(self, annotator: str) -> int | None:
        """The annotator's first unjudged item, or None when they have judged them all."""
        done = self.judged_by(annotator)
        return next((i for i in range(len(self.items)) if i not in done), None)

    def shown(self, index: int) -> dict:
        """Item `index` as the page shows it: turns, and the answers as left/right (never which is a or b)."""
        item = self.items[index]
        right = "b" if item["left"] == "a" else "a"
        # stripped: HH answers start with the space after "Assistant:", which would show as an indent on one side
        return {"index": index, "id": item["id"], "turns": turns(item["prompt"]), "left": item[item["left"]].strip(),
                "right": item[right].strip()}

    def record(self, annotator: str, index: int, choice: str, comment: str = "") -> dict:
        """Store one judgment (written to disk before this returns); one per annotator and item."""
        if choice not in CHOICES:
            raise ValueError(f"choice {choice!r}; expected one of {', '.join(CHOICES)}")
        with self.lock:
            if not 0 <= index < len(self.items):
                raise IndexError(f"item {index}: the task has items 0..{len(self.items) - 1}")
            if index in self.judged_by(annotator):
                raise KeyError(f"{annotator} has already judged item {index}")
            left = self.items[index]["left"]
            preferred = {"left": left, "right": "b" if left == "a" else "a"}.get(choice)
            judgment = {"annotator": annotator, "item": index, "id": self.items[index]["id"], "shown_left": left,
                        "choice": choice, "preferred": preferred or choice, "comment": comment}
            self.judgments.append(judgment)
            _write_atomically(self.folder / "judgments.json", self.judgments)
            self.write_comparisons()
        return judgment

    def write_comparisons(self):
        """comparisons.jsonl: one `comparison` record per item with every annotator's vote on it."""
        votes = {}
        for j in self.judgments:
            value = {"a": 1, "b": 2}.get(j["preferred"], 0)
            status = {"tie": "tie", "skip": "skipped"}.get(j["preferred"], "submitted")
            votes.setdefault(j["item"], []).append({"annotator": j["annotator"], "value": value, "status": status,
                                                    "shown_left": j["shown_left"], "comment": j["comment"]})
        lines = [json.dumps({"id": item["id"], "instruction": instruction_of(item["prompt"]),
                             "response-1": item["a"].lstrip(), "response-2": item["b"].lstrip(),
                             "votes": votes.get(i, [])}) for i, item in enumerate(self.items)]
        _write_atomically(self.folder / "comparisons.jsonl", "".join(line + "\n" for line in lines))


def _write_atomically(path: Path, content):
    """Write a temporary file beside `path`, fsync it, rename it over `path`: a reader sees the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
