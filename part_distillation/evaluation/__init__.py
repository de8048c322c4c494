"""Evaluators (metrics, and the writer that turns inference into pseudo-labels)."""
from .build import build_evaluator  # noqa: F401
