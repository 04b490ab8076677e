"""eval.py label: the labeling page (label_page.html, plain HTML/JS) and its JSON API over a LabelTask.

    GET  /                                  the page
    GET  /api/state?annotator=NAME          progress, and the annotator's first unjudged item (null when done)
    POST /api/judgments {annotator, item, choice: left|right|tie|skip, comment}   -> the next state

A judgment is on disk before the answer leaves (LabelTask.record), so closing the tab or killing the server loses
nothing; the page asks for the state again after each one, so a reload resumes where the annotator was.
"""
from __future__ import annotations

from pathlib import Path

from rmcore.eval.labeling import CHOICES, LabelTask
from rmcore.serving.json_http import JSONHandler, RequestError, field

PAGE = Path(__file__).with_name("label_page.html")


def state(task: LabelTask, annotator: str) -> dict:
    index = task.next_item(annotator)
    return {"annotator": annotator, "total": len(task.items), "done": len(task.judged_by(annotator)),
            "item": None if index is None else task.shown(index)}


def label_handler(task: LabelTask) -> type[JSONHandler]:
    class LabelHandler(JSONHandler):
        routes = {("GET", "/"): "get_page", ("GET", "/api/state"): "get_state",
                  ("POST", "/api/judgments"): "post_judgment"}

        def get_page(self, query, body):
            return 200, PAGE.read_bytes(), "text/html; charset=utf-8"

        def get_state(self, query, body):
            return 200, state(task, _annotator(query.get("annotator", "")))

        def post_judgment(self, query, body):
            annotator = _annotator(field(body, "annotator", str, "the annotator's name"))
            index = field(body, "item", int, "the item's index")
            choice = field(body, "choice", str, f"one of {', '.join(CHOICES)}")
            comment = body.get("comment", "")
            if choice not in CHOICES:
                raise RequestError(400, f"choice {choice!r}: expected one of {', '.join(CHOICES)}", "choice")
            if not isinstance(comment, str):
                raise RequestError(400, "field 'comment' must be a string", "comment")
            try:
                task.record(annotator, index, choice, comment.strip())
            except IndexError as e:
                raise RequestError(400, str(e), "item") from None
            except KeyError as e:  # a second tab, or a double click: the first judgment stands
                raise RequestError(409, e.args[0], "item") from None
            return 200, state(task, annotator)

    return LabelHandler


def _annotator(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64:
        raise RequestError(400, "give the annotator's name (1 to 64 characters)", "annotator")
    return name
