"""Evaluating reward models (eval.py's evaluate, score and normalize): scorer.py (a reward model scoring text,
normalisation), report.py (the evaluation report; a ranked set's: ranked_report.py), metrics.py (its pure
metrics), plots.py (the report's and an alignment run's history's PNGs). Two policies judged head to head by
sampling from them: rmcore/align/compare.py."""
