"""Induction (repeated two-token names and random word sequences) as an appbench task."""

from appbench_tasks.induction.generate import InductionTask

__all__ = ["InductionTask"]
