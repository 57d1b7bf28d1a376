"""Error types any layer of appbench may raise, kept apart so that raising one never imports a
higher layer."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot proceed (bad parameters, a plugin that broke its contract, ...)."""


class NotCausalError(RunError):
    """A model's attention is not causal, so an engine that relies on causality cannot run it."""


class PluginSkippedWarning(UserWarning):
    """A third-party plugin could not be loaded (import error, malformed class, duplicate name,
    a registration hook that raised) and was skipped; the rest of appbench works without it.

    Filter it like any warning, e.g. ``-W ignore::appbench.PluginSkippedWarning``.
    """
