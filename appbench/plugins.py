"""The plugin manager: hook specs, built-in and third-party plugins through entry points, and the
registries filled from the registration hooks.

Built-ins are declared as entry points of the ``appbench`` distribution in our own
pyproject, exactly like a third-party package. ``APPBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips
third-party entry points; ``APPBENCH_LOAD_PLUGINS=dist-a,dist-b`` then loads just those
distributions. The built-in distribution is always loaded.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from appbench import hookspecs
from appbench.interfaces import Discoverer, Pruner
from appbench.registry import ModelEntry, PluginError, Registry, check_plugin_class

GROUP = "appbench"
BUILTIN_DIST = "appbench"


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin module and the distribution that ships it."""

    name: str
    module: str
    dist: str
    version: str


@dataclass
class Registries:
    """Everything the registration hooks registered."""

    pruners: Registry[type[Pruner]]
    discoverers: Registry[type[Discoverer]]
    tasks: Registry[Any]
    models: Registry[ModelEntry]


class PluginLoadError(PluginError):
    """An entry point could not be imported."""


def _wanted(dist: str) -> bool:
    if dist == BUILTIN_DIST:
        return True
    if os.environ.get("APPBENCH_DISABLE_PLUGIN_AUTOLOAD"):
        allowed = {d.strip() for d in os.environ.get("APPBENCH_LOAD_PLUGINS", "").split(",")}
        return dist in allowed
    return True


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded once (lazily and idempotently)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if not _wanted(dist) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            module = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"plugin '{ep.name}' from {dist} failed to import ({ep.value}): {exc}"
            ) from exc
        pm.register(module, name=ep.name)
        version = ep.dist.version if ep.dist is not None else "?"
        _INFO[ep.name] = PluginInfo(ep.name, ep.value, dist, version)
    if os.environ.get("APPBENCH_DISABLE_PLUGIN_AUTOLOAD"):
        installed = {ep.dist.name for ep in importlib.metadata.entry_points(group=GROUP) if ep.dist}
        asked = {d.strip() for d in os.environ.get("APPBENCH_LOAD_PLUGINS", "").split(",")}
        unknown = sorted(asked - installed - {""})
        if unknown:
            raise PluginError(
                f"APPBENCH_LOAD_PLUGINS names {', '.join(unknown)}: no installed distribution "
                f"provides appbench plugins under that name (installed: {', '.join(sorted(installed))})"
            )
    return pm


_INFO: dict[str, PluginInfo] = {}


def plugin_infos() -> list[PluginInfo]:
    """The loaded plugins, with distributions and versions (plugins registered by hand too)."""
    pm = get_plugin_manager()
    infos = []
    for name, plugin in pm.list_name_plugin():
        info = _INFO.get(name) or PluginInfo(
            name, getattr(plugin, "__name__", repr(plugin)), "(local)", ""
        )
        infos.append(info)
    return sorted(infos, key=lambda i: i.name)


def _owner(plugin_name: str) -> str:
    info = _INFO.get(plugin_name)
    return (
        f"plugin '{plugin_name}' ({info.dist} {info.version})"
        if info
        else f"plugin '{plugin_name}'"
    )


def _call_each(hook: Any, make_register: Callable[[str], Callable[..., None]]) -> None:
    """Call every implementation of a registration hook with a register bound to its owner."""
    for impl in hook.get_hookimpls():
        impl.function(make_register(_owner(impl.plugin_name)))


@functools.cache
def get_registries() -> Registries:
    """Fill the registries from every plugin's registration hooks (once per process)."""
    pm = get_plugin_manager()
    regs = Registries(
        Registry("pruner"), Registry("discoverer"), Registry("task"), Registry("model")
    )

    def class_register(
        registry: Registry[Any], base: type
    ) -> Callable[[str], Callable[[type], None]]:
        def make(owner: str) -> Callable[[type], None]:
            def register(cls: type) -> None:
                check_plugin_class(cls, base, owner)
                registry.add(cls.name, cls, owner)  # type: ignore[attr-defined]

            return register

        return make

    def task_register(owner: str) -> Callable[[Any], None]:
        from appbench.tasks import Task

        def register(task: Any) -> None:
            if not isinstance(task, Task):
                raise PluginError(f"{owner}: register() takes a Task instance, got {task!r}")
            regs.tasks.add(task.name, task, owner)

        return register

    def model_register(owner: str) -> Callable[[str, Callable[..., Any], str], None]:
        def register(name: str, loader: Callable[..., Any], description: str) -> None:
            if not callable(loader):
                raise PluginError(f"{owner}: the loader of model {name!r} is not callable")
            regs.models.add(name, ModelEntry(name, loader, description), owner)

        return register

    _call_each(pm.hook.appbench_register_pruners, class_register(regs.pruners, Pruner))
    _call_each(pm.hook.appbench_register_discoverers, class_register(regs.discoverers, Discoverer))
    _call_each(pm.hook.appbench_register_tasks, task_register)
    _call_each(pm.hook.appbench_register_models, model_register)
    return regs


def reset() -> None:
    """Forget the loaded plugins and registries (tests, or after installing a plugin)."""
    get_registries.cache_clear()
    get_plugin_manager.cache_clear()
    _INFO.clear()


def register_plugin(module: object, name: str) -> None:
    """Register a plugin object by hand (tests, notebooks) and rebuild the registries."""
    get_plugin_manager().register(module, name=name)
    get_registries.cache_clear()
