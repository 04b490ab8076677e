"""Rewards that are known functions of the text, named in configs as helpers.rewards:<function> (tests/ is on
sys.path: pytest puts conftest.py's folder there, and the torchrun tests set PYTHONPATH to it)."""


def count_e(prompts, responses):
    """The number of letters "e" in the response."""
    return [float(r.count("e")) for r in responses]


# Broken rewards, each a way a user's function can fail (tests/end_to_end/test_failures.py)
def raises(prompts, responses):
    return [1.0 / 0 for _ in responses]


def returns_nan(prompts, responses):
    return [float("nan")] * len(responses)


def one_short(prompts, responses):
    return [0.0] * (len(responses) - 1)


def strings(prompts, responses):
    return ["good"] * len(responses)


def returns_none(prompts, responses):
    return None


def count_words(prompts, responses):
    """The number of whitespace-separated words in the response (an ensemble's second member)."""
    return [float(len(r.split())) for r in responses]


def min_e_words(prompts, responses):
    """min(count_e, count_words), written out: what an ensemble of the two with aggregation=min must give."""
    return [min(e, w) for e, w in zip(count_e(prompts, responses), count_words(prompts, responses))]


# Gold judges (tests/end_to_end/test_reward_hacking.py)
def noise(prompts, responses):
    """Random numbers from every global generator a judge could use: python's, numpy's and torch's."""
    import random

    import numpy as np
    import torch
    return [random.random() + float(np.random.rand()) + float(torch.rand(())) for _ in responses]


SEEN = {"proxy": [], "gold": []}  # (prompt, response, reward) of every call, per role


def recorded_count_e(prompts, responses):
    """count_e, recording what it scored."""
    out = count_e(prompts, responses)
    SEEN["proxy"] += list(zip(prompts, responses, out))
    return out


def recorded_words(prompts, responses):
    """count_words, recording what it scored."""
    out = count_words(prompts, responses)
    SEEN["gold"] += list(zip(prompts, responses, out))
    return out
