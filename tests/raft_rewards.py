"""Rewards that are known functions of the text, for RAFT tests (named as tests.raft_rewards:... is not needed:
pytest puts tests/ on sys.path, so raft.reward=raft_rewards:count_e)."""


def count_e(prompts, responses):
    """The number of letters "e" in the response."""
    return [float(r.count("e")) for r in responses]
