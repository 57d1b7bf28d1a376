"""Hook specifications of appbench.

Every hook is prefixed ``appbench_``. Registration hooks receive a ``register`` callback rather
than returning objects, so that the core owns validation, names and duplicate detection, and
knows which plugin registered what.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from appbench.results import RunResult

hookspec = pluggy.HookspecMarker("appbench")


@hookspec
def appbench_register_pruners(register: Callable[[type], None]) -> None:
    """Register pruner classes.

    Called once, when the plugin is loaded (the first time appbench needs any plugin).

    Args:
        register: call ``register(SomePruner)`` for each :class:`appbench.Pruner` subclass.
            It raises :class:`appbench.PluginError` when the class is malformed (no ``name``,
            ``summary`` or described ``Params``) or its name is already taken; the error names
            both owners. A plugin whose registration hook raises is skipped whole (nothing it
            registered is kept) with one :class:`appbench.PluginSkippedWarning`.
    """


@hookspec
def appbench_register_discoverers(register: Callable[[type], None]) -> None:
    """Register discoverer classes.

    Called once, like :func:`appbench_register_pruners`.

    Args:
        register: call ``register(SomeDiscoverer)`` for each :class:`appbench.Discoverer`
            subclass. Same validation and duplicate rules as pruners.
    """


@hookspec
def appbench_register_tasks(register: Callable[[Any], None]) -> None:
    """Register tasks.

    Args:
        register: call ``register(task)`` with an instance of an :class:`appbench.Task`
            subclass; its name comes from its task.yaml. Built-in tasks register one per
            task folder.
    """


@hookspec
def appbench_register_models(register: Callable[[str, Callable[..., Any], str], None]) -> None:
    """Register loadable models.

    Args:
        register: call ``register(name, loader, description)``. ``loader(device: str)``
            returns a TransformerLens ``HookedTransformer`` with unprocessed weights and a
            tokenizer (``model.tokenizer``); it raises :class:`appbench.ModelLoadError` with
            one clear line when the weights cannot be had. Loading must not download from a
            model hub unless the user asked for that model by name.
    """


@hookspec
def appbench_register_commands(cli: click.Group) -> None:
    """Add click commands to the ``appbench`` group.

    Called when the CLI starts. Import heavy libraries inside the commands, not at module
    level, so that ``appbench --help`` stays fast. A third-party plugin whose implementation
    raises is skipped whole, with one :class:`appbench.PluginSkippedWarning`.

    Args:
        cli: the root click group; use ``@cli.command()`` or ``cli.add_command(...)``.
    """


@hookspec
def appbench_run_finished(result: RunResult) -> None:
    """Side effects after a run has been evaluated and saved (loggers, uploaders).

    Args:
        result: the complete :class:`appbench.RunResult`; treat it as read-only. Exceptions
            raised here are reported as warnings and never lose the saved result.
    """
