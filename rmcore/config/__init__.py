"""Configs as plain dataclasses: loader.py reads YAML and `section.key=value` overrides into them (generic),
sections.py holds the sections train.py, raft.py and ppo.py read with their checks, sweep.py runs a W&B sweep's grid
locally."""
