"""What eval.py runs: scorer.py (a reward model scoring text, normalisation), report.py (the evaluation report),
metrics.py (its pure metrics), plots.py, compare.py (two policies judged by a reward model)."""
