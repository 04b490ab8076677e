"""What several test modules share that is not a fixture: run arguments and readers of a run's files (runs.py),
rewards that are known functions of the text (rewards.py), and a script run under torchrun (fsdp_generate.py).
Fixtures live in tests/conftest.py."""
