"""The labeling page in a real browser: Debian's Chromium driven by Playwright labels by mouse and by keyboard,
reloads mid-way and resumes, and the votes on disk and the report's counts are what was clicked."""
import json
import shutil

import pytest

from rmcore.data.template import ASSISTANT, HUMAN
from rmcore.eval.labeling import LabelTask
from rmcore.serving.json_http import address, start
from rmcore.serving.label_server import label_handler

import eval as eval_cli

# As the machine's own probe starts it: root needs --no-sandbox; the network flags keep a closed network quiet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium not found: install Debian's package (apt-get install chromium), as .ci/run does")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_label_by_mouse_and_keyboard_reload_and_resume(tmp_path, browser):
    items = [{"id": f"p{i}", "prompt": f"{HUMAN} Question {i}?{ASSISTANT} Sure.{HUMAN} And <b>{i}</b>?{ASSISTANT}",
              "a": f" first answer {i}", "b": f" second answer {i}"} for i in range(5)]
    task = LabelTask.create(tmp_path / "t", items, names={"a": "sft", "b": "rlhf"}, source="test", seed=1)
    server, _ = start(label_handler(task), "127.0.0.1", 0)
    url = address(server)
    page = browser.new_page()
    expected = []  # (choice, the answer a/b it prefers) in the order they are made

    def act(choice, how):
        """Make `choice` on the item shown, by `how` (a button or a key), after checking what the page shows."""
        index = len(expected)
        page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{index} of 5')")
        left, right = page.text_content("#left"), page.text_content("#right")
        assert {left, right} == {items[index]["a"].strip(), items[index]["b"].strip()}
        assert page.inner_text("#prompt").count("Human") == 2 and f"<b>{index}</b>" in page.inner_text("#prompt")
        shown = {"left": "a" if left == items[index]["a"].strip() else "b"}
        shown["right"] = "b" if shown["left"] == "a" else "a"
        expected.append((choice, shown.get(choice, choice)))
        how()

    try:
        page.goto(url)
        page.fill("#name", "alice")
        page.click("#start")
        act("left", lambda: page.click("#choose-left"))
        act("right", lambda: page.keyboard.press("2"))
        page.reload()  # the name is remembered; the page resumes at the first unjudged item
        act("tie", lambda: page.keyboard.press("3"))
        # the next item clears the comment box when it shows: type once it is shown (keys typed into the comment
        # are text, not choices)
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 of 5')")
        page.fill("#comment", "both fine 1 2 3")
        act("right", lambda: page.click("#choose-right"))
        act("skip", lambda: page.keyboard.press(" "))
        page.wait_for_selector("#done", state="visible")
        assert page.text_content("#progress").startswith("5 of 5")
        page.reload()
        page.wait_for_selector("#done", state="visible")
    finally:
        server.shutdown()
        server.server_close()
    saved = json.loads((tmp_path / "t" / "judgments.json").read_text())
    assert [(j["choice"], j["preferred"]) for j in saved] == expected
    assert [j["annotator"] for j in saved] == ["alice"] * 5 and saved[3]["comment"] == "both fine 1 2 3"
    r = eval_cli.main(["label", "--out", str(tmp_path / "t"), "--report"])
    wins = sum(p == "a" for _, p in expected)
    losses = sum(p == "b" for _, p in expected)
    assert (r["pooled"]["wins"], r["pooled"]["ties"], r["pooled"]["losses"], r["pooled"]["skipped"]) == \
        (wins, 1, losses, 1)
