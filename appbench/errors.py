"""Error types any layer of appbench may raise, kept apart so that raising one never imports a
higher layer."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot proceed (bad parameters, a plugin that broke its contract, ...)."""


class NotCausalError(RunError):
    """A model's attention is not causal, so an engine that relies on causality cannot run it."""
