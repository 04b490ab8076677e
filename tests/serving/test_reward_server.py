"""eval.py serve: a reward model over real HTTP on 127.0.0.1 equals the in-process reward, refuses malformed
requests with a 4xx naming the field, and a loop trained against it is bit-identical to one holding the model."""
import contextlib
import gzip
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rmcore.errors import ConfigError, RewardError
from rmcore.eval.scorer import RewardScorer
from rmcore.serving.json_http import JSONHandler, address, start
from rmcore.serving.reward_client import HTTPReward
from rmcore.serving.reward_server import RewardService, reward_handler

import eval as eval_cli
import raft
from helpers.runs import REPO, raft_args, without_times


@contextlib.contextmanager
def serving(rm_dir, max_texts: int):
    """A server for rm_dir as `eval.py serve` builds it (truncate left, 16 texts a batch); yields its URL."""
    scorer = RewardScorer(rm_dir, batch_size=16, truncate="left")
    server, thread = start(reward_handler(RewardService(scorer, max_texts=max_texts)), "127.0.0.1", 0)
    try:
        yield address(server)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(rm_dir):
    """At most 6 texts a request, so that the client's splitting and the 413 are exercised."""
    with serving(rm_dir, 6) as url:
        yield url


def post(url: str, raw: bytes, headers=None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=raw, method="POST",
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def hh_pairs(hh_file, n):
    with gzip.open(hh_file, "rt") as f:
        records = [json.loads(line) for _, line in zip(range(n), f)]
    prompts = [r["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:" for r in records]
    return prompts, [r["chosen"].rsplit("\n\nAssistant:", 1)[1] for r in records]


def test_served_rewards_equal_eval_py_score(tmp_path, hh_file, rm_dir, served):
    prompts, responses = hh_pairs(hh_file, 5)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                                               for p, r in zip(prompts, responses)))
    eval_cli.main(["score", "--model", str(rm_dir), "--input", str(tmp_path / "in.jsonl"),
                   "--output", str(tmp_path / "out.jsonl"), "--truncate", "left"])
    offline = [json.loads(line)["reward"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    status, answer = post(served + "/score", json.dumps({"prompts": prompts, "responses": responses}).encode())
    assert status == 200
    np.testing.assert_allclose(answer["rewards"], offline, atol=1e-5)
    texts = [p + r for p, r in zip(prompts, responses)]  # whole transcripts score as their (prompt, response)
    assert post(served + "/score", json.dumps({"texts": texts}).encode())[1]["rewards"] == answer["rewards"]
    with urllib.request.urlopen(served + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert (health["status"], health["model"], health["max_texts"], health["truncate"]) == \
        ("ok", str(rm_dir), 6, "left")


def test_two_clients_at_once_get_what_each_would_get_alone(hh_file, served):
    prompts, responses = hh_pairs(hh_file, 12)
    halves = [(prompts[:6], responses[:6]), (prompts[6:], responses[6:])]
    alone = [HTTPReward(served)(p, r) for p, r in halves]
    together = [None, None]

    def client(i):
        reward = HTTPReward(served)
        together[i] = [reward(*halves[i]) for _ in range(3)]

    threads = [threading.Thread(target=client, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == [[alone[0]] * 3, [alone[1]] * 3]


@pytest.mark.parametrize("raw, status, field", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"{}", 400, "texts"),
    (json.dumps({"texts": "one string"}).encode(), 400, "texts"),
    (json.dumps({"texts": ["a", 3]}).encode(), 400, "texts"),
    (json.dumps({"texts": ["  "]}).encode(), 400, "texts"),  # an empty response to a prompt is scored
    (json.dumps({"prompts": ["a", "b"], "responses": ["x"]}).encode(), 400, "responses"),
    (json.dumps({"prompts": ["a"]}).encode(), 400, "responses"),
    (json.dumps({"texts": ["a"], "prompts": ["a"], "responses": ["b"]}).encode(), 400, "texts"),
    (json.dumps({"texts": ["a"] * 7}).encode(), 413, "texts"),
])
def test_a_malformed_request_gets_its_4xx_naming_the_field(served, raw, status, field):
    got, answer = post(served + "/score", raw)
    assert got == status
    assert answer.get("field") == field and answer["error"]
    if status == 413:
        assert "at most 6" in answer["error"]
    # the server goes on answering
    assert post(served + "/score", json.dumps({"texts": ["Human: hi Assistant: hello"]}).encode())[0] == 200


def test_unknown_paths_and_methods_are_404_and_405(served):
    assert post(served + "/nope", b"{}")[0] == 404
    assert post(served + "/health", b"{}")[0] == 405


def test_the_client_splits_a_large_call_into_requests_the_server_accepts(hh_file, rm_dir, served):
    prompts, responses = hh_pairs(hh_file, 14)  # the server takes 6 a request: 6 + 6 + 2
    direct = RewardScorer(rm_dir, truncate="left").score(list(zip(prompts, responses)))
    np.testing.assert_allclose(HTTPReward(served)(prompts, responses), direct, atol=1e-6)


def test_an_unreachable_server_is_one_line_naming_the_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RewardError) as e:
        HTTPReward(f"http://127.0.0.1:{port}", timeout=1, retries=1)
    assert f"127.0.0.1:{port}/health" in str(e.value) and "2 tries" in str(e.value) and "\n" not in str(e.value)


def test_a_5xx_is_retried_and_a_4xx_is_not():
    calls = {"score": 0}

    class Flaky(JSONHandler):
        routes = {("GET", "/health"): "health", ("POST", "/score"): "score"}

        def health(self, query, body):
            return 200, {"status": "ok", "heads": ["quality"], "normalize": False, "max_texts": 8}

        def score(self, query, body):
            calls["score"] += 1
            if body.get("responses") == ["bad"]:
                return 400, {"error": "no", "field": "responses"}
            return (503, {"error": "busy"}) if calls["score"] == 1 else (200, {"rewards": [1.5]})

    server, _ = start(Flaky, "127.0.0.1", 0)
    try:
        reward = HTTPReward(address(server), retries=2)
        assert reward(["p"], ["r"]) == [1.5] and calls["score"] == 2  # one 503, then the answer
        with pytest.raises(RewardError, match=r"refused the request \(400\): no"):
            reward(["p"], ["bad"])
        assert calls["score"] == 3
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_reading_another_normalisation_fails_at_start(served):
    with pytest.raises(ConfigError, match="--normalize"):
        HTTPReward(served, normalize=True)


def test_raft_against_the_server_trains_exactly_as_against_the_model_in_memory(tmp_path, hh_file, policy_dir,
                                                                                rm_dir):
    """An iteration's 64 samples go in one request, batched as the in-process reward batches them: the same floats.
    (Split into smaller requests, the padding within a batch differs and rewards move by ~1e-8.)"""
    local = raft.main(raft_args(tmp_path / "local", hh_file, policy_dir, "raft.iterations=2", f"raft.reward={rm_dir}"))
    with serving(rm_dir, 512) as url:
        remote = raft.main(raft_args(tmp_path / "remote", hh_file, policy_dir, "raft.iterations=2",
                                     f"raft.reward={url}"))
    assert without_times(remote) == without_times(local)
    a = load_file(str(tmp_path / "local" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "remote" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_eval_py_serve_prints_its_address_answers_and_stops_on_ctrl_c_or_sigterm(rm_dir, stop):
    """Also when started with SIGINT ignored, as a background job of a non-interactive shell is."""
    proc = subprocess.Popen([sys.executable, "eval.py", "serve", "--model", str(rm_dir), "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, line
        with urllib.request.urlopen(url.group() + "/health", timeout=30) as r:
            health = json.loads(r.read())
        assert (health["model"], health["truncate"], health["max_texts"]) == (str(rm_dir), "left", 512)
        proc.send_signal(stop)
        assert proc.wait(timeout=30) == 0 and "stopped" in proc.stdout.read()
    finally:
        proc.kill()
