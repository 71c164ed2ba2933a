"""Knob study: accuracy x latency x compute across runtime knobs, with Pareto fronts (`python -m molmo_fast.study`).

grid.py (settings), runner.py (eval + latency probe per setting -> study.jsonl), pareto.py, report.py (table,
study.png, TensorBoard HParams), oracle.py (post-hoc oracle k), cli.py (the command line).
Imports eval, runtime, model and data only -- never train.
"""
