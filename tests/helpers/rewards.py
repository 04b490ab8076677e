"""Rewards that are known functions of the text, named in configs as helpers.rewards:<function> (tests/ is on
sys.path: pytest puts conftest.py's folder there, and the torchrun tests set PYTHONPATH to it)."""


def count_e(prompts, responses):
    """The number of letters "e" in the response."""
    return [float(r.count("e")) for r in responses]
