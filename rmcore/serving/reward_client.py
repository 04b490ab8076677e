"""A reward served over HTTP (`eval.py serve`) as a reward function: raft.reward=http://host:port, --judge URL.

The server's /health is read once, at start: an unreachable server, or one that reads another head or
normalisation than the loop asks for, fails before the first rollout. Each call POSTs the (prompt, response)
pairs to /score in requests of at most the server's max_texts. A request that times out, a dropped connection or
a 5xx is retried (`retries` times, backing off 1, 2, 4 ... s); a 4xx is not (the request itself is wrong). When
the tries run out, the error is one line naming the URL.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from rmcore.errors import ConfigError, RewardError


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


class HTTPReward:
    """reward(prompts, responses) -> rewards, computed by a reward server."""

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3, head: str = "quality",
                 normalize: bool = False):
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.server = self.request("GET", "/health")
        if len(self.server.get("heads", [])) > 1 and self.server.get("head") != head:
            raise ConfigError(f"reward server {self.url} reads the head {self.server.get('head')!r}, the loop asks "
                              f"for {head!r}: start it with --head {head}")
        if normalize != bool(self.server.get("normalize")):
            raise ConfigError(f"reward server {self.url} {'does not normalise' if normalize else 'normalises'} its "
                              f"rewards and the loop asks {'for' if normalize else 'against'} normalisation: "
                              f"{'add' if normalize else 'drop'} --normalize on the server")
        self.max_texts = int(self.server.get("max_texts", 512))

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        rewards = []
        for i in range(0, len(prompts), self.max_texts):
            body = {"prompts": prompts[i:i + self.max_texts], "responses": responses[i:i + self.max_texts]}
            rewards += self.request("POST", "/score", body)["rewards"]
        return rewards

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 30))
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code < 500:  # the request is wrong: asking again will not help
                    raise RewardError(f"reward server {self.url}{path} refused the request ({e.code}): "
                                      f"{message}") from None
                last = f"{e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e))
        raise RewardError(f"reward server {self.url}{path}: no answer after {self.retries + 1} tries "
                          f"(timeout {self.timeout:g} s each; last: {last})")


def _error_message(e) -> str:
    try:
        return json.loads(e.read()).get("error", "")
    except (ValueError, AttributeError, OSError):
        return e.reason
