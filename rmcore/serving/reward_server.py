"""eval.py serve: a reward model over HTTP, for loops whose reward lives on another machine (OpenRLHF's serve_rm).

    POST /score  {"prompts": [...], "responses": [...]}  or  {"texts": [...]}   ->  {"rewards": [...]}
    GET  /health                                                               ->  the model, template, limits

A request is scored exactly as `eval.py score` scores a file (RewardScorer.score: the model's recorded template,
BOS/EOS, its length limit and truncation, the stored normalisation when asked), its texts in batches of
`batch_size`. Requests take turns on the one model (a lock), so a reward never depends on what else arrived and
equals the in-process reward bit for bit. A request of more than `max_texts` texts is refused (413, the limit
named); a malformed one gets a 400 naming the field.
"""
from __future__ import annotations

import threading

from rmcore.errors import DataError
from rmcore.eval.scorer import RewardScorer
from rmcore.serving.json_http import JSONHandler, RequestError, field


class RewardService:
    """The scorer behind the server: request bodies in, rewards out, one request at a time."""

    def __init__(self, scorer: RewardScorer, *, normalize: bool = False, max_texts: int = 512):
        self.scorer, self.normalize, self.max_texts = scorer, normalize, max_texts
        if normalize:
            scorer.normalization()  # missing statistics fail at start, not at the first request
        self.lock = threading.Lock()

    def health(self) -> dict:
        s = self.scorer
        return {"status": "ok", "model": str(s.dir), "template": s.template.to_dict(),
                "template_source": s.template_source, "head": s.head, "heads": list(s.head_names),
                "normalize": self.normalize, "max_length": s.max_length, "truncate": s.truncate,
                "batch_size": s.batch_size, "max_texts": self.max_texts}

    def items(self, body: dict) -> list:
        """The texts of a /score body: `texts`, or `prompts` + `responses` of one length (strings, non-empty)."""
        if "texts" in body:
            if "prompts" in body or "responses" in body:
                raise RequestError(400, "give either `texts` or `prompts` + `responses`, not both", "texts")
            items = _strings(body, "texts")
        elif "prompts" in body or "responses" in body:
            prompts, responses = _strings(body, "prompts"), _strings(body, "responses")
            if len(prompts) != len(responses):
                raise RequestError(400, f"{len(prompts)} prompts but {len(responses)} responses; expected one "
                                        f"response per prompt", "responses")
            items = list(zip(prompts, responses))
        else:
            raise RequestError(400, "missing field 'texts' (whole transcripts), or 'prompts' and 'responses'",
                               "texts")
        if len(items) > self.max_texts:
            raise RequestError(413, f"{len(items)} texts in one request; this server scores at most "
                                    f"{self.max_texts} per request (eval.py serve --max-texts): split it",
                               "texts" if "texts" in body else "prompts")
        return items

    def score(self, body: dict) -> dict:
        items = self.items(body)
        with self.lock:
            try:
                rewards = self.scorer.score(items, normalize=self.normalize)
            except DataError as e:  # e.g. a text over the length limit with truncate=error
                raise RequestError(422, str(e), "texts" if "texts" in body else "responses") from None
        return {"rewards": rewards}


def _strings(body: dict, name: str) -> list[str]:
    values = field(body, name, list, "a list of strings")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise RequestError(400, f"{name}[{i}] must be a string, got {type(v).__name__}", name)
        if name == "texts" and not v.strip():  # an empty *response* is scored: a policy may stop at once
            raise RequestError(400, f"{name}[{i}] is empty; there is nothing to score", name)
    return values


def reward_handler(service: RewardService) -> type[JSONHandler]:
    """A request handler class bound to `service`."""

    class RewardHandler(JSONHandler):
        routes = {("GET", "/health"): "get_health", ("POST", "/score"): "post_score"}

        def get_health(self, query, body):
            return 200, service.health()

        def post_score(self, query, body):
            return 200, service.score(body)

    return RewardHandler
