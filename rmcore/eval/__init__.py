"""Evaluating reward models (eval.py's evaluate, score and normalize): scorer.py (a reward model scoring text,
normalisation), report.py (the evaluation report; a ranked set's: ranked_report.py), metrics.py (its pure
metrics), plots.py (the report's and an alignment run's history's PNGs). Two policies judged head to head by
sampling from them: rmcore/align/compare.py; judged by people (eval.py label): labeling.py (the task folder, the
judgments as comparison records) and human_report.py (win rates with Wilson intervals, kappas, a judge's accuracy)."""
