"""What raft.py and ppo.py share: rollouts.py (prompt pool, K samples per prompt, samples packed and scored),
selection.py (discard rules, best-of-K), rewards.py (the reward interface), iteration.py (the iteration cycle,
AlignRun)."""
