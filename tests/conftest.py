"""Shared fixtures. The planted model, toy task and contract checks come from appbench.testing,
which pytest loads as a plugin through the ``pytest11`` entry point."""

from __future__ import annotations

import pytest

from appbench import plugins

pytest_plugins = ["pytester"]


@pytest.fixture
def fresh_plugins():
    """Plugin manager and registries rebuilt from scratch, and again after the test."""
    plugins.reset()
    yield plugins
    plugins.reset()
