"""Rankings of K responses made from the shipped HH pairs, since no ranked dataset ships (synthetic: for tests and the
tiny ranking config, not for science).

Each pair (prompt, chosen, rejected) becomes a ranking: the chosen response, its first half (cut at a word), and the
rejected response, ranked in that order: chosen > half of chosen > rejected. Every third prompt also gets the
rejected response's first half, tied with the rejected one (a tie in the data). A half that repeats a response (of
one word) is left out, so K is 2 to 4. The responses are shuffled (the best is not always first) and the ranking is
written as `ranking` (indices, best first, a tie as an inner list) or as `scores`, alternately, so both ways of the
ranked format are read.

    python tests/helpers/ranked.py      # writes runs/tiny/ranking/data/{train,eval}.jsonl for configs/tiny_ranking.yaml
"""
import json
import random
from pathlib import Path

from rmcore.data.formats import read_examples

REPO = Path(__file__).resolve().parents[2]


def half(text: str) -> str:
    """The first half of a response's words, keeping its leading space."""
    words = text.split()
    return " " + " ".join(words[:max(1, len(words) // 2)])


def rankings_from_pairs(spec: str, seed: int = 0) -> list[dict]:
    """One ranked record per HH pair of `spec` (a file spec, sliceable), K = 3, or 4 with a tie."""
    examples, _ = read_examples([spec])
    rng = random.Random(seed)
    records = []
    for n, e in enumerate(examples):
        candidates = [(e.chosen, 3.0), (e.rejected, 1.0), (half(e.chosen), 2.0)]
        if n % 3 == 0:
            candidates.append((half(e.rejected), 1.0))
        scored = []
        for text, score in candidates:  # a half that repeats a response (a one-word answer) is left out
            if text not in [t for t, _ in scored]:
                scored.append((text, score))
        rng.shuffle(scored)
        responses = [r for r, _ in scored]
        if n % 2 == 0:
            records.append({"prompt": e.prompt, "responses": responses, "scores": [s for _, s in scored]})
        else:
            levels = sorted({s for _, s in scored}, reverse=True)
            groups = [[i for i, (_, s) in enumerate(scored) if s == level] for level in levels]
            records.append({"prompt": e.prompt, "responses": responses,
                            "ranking": [g[0] if len(g) == 1 else g for g in groups]})
    return records


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


if __name__ == "__main__":
    hh = REPO / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    out = REPO / "runs" / "tiny" / "ranking" / "data"
    for name, part in (("train", "[:1932]"), ("eval", "[1932:]")):
        path = write_jsonl(rankings_from_pairs(f"{hh}{part}"), out / f"{name}.jsonl")
        print(f"wrote {path}")
