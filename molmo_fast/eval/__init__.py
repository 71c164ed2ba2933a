"""Evaluation: `EvalConfig` (molmo_fast/eval/config.py) run by `molmo_fast.eval.runner.run` over the tasks of
molmo_fast/eval/tasks.py. Built on molmo_fast.runtime; never imports molmo_fast.train."""

from molmo_fast.eval.config import EvalConfig

__all__ = ["EvalConfig"]
