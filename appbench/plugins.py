"""The plugin manager: hook specs, built-in and third-party plugins through entry points, and the
registries filled from the registration hooks.

Built-ins are declared as entry points of the ``appbench`` distribution in our own
pyproject, exactly like a third-party package. ``APPBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips
third-party entry points; ``APPBENCH_LOAD_PLUGINS=dist-a,dist-b`` then loads just those
distributions. The built-in distribution is always loaded.

A plugin is admitted whole or not at all: it is imported, registered with pluggy, and its
registration hooks run into a staging area that is validated (well-formed classes, tasks and
loaders, names not taken) before anything reaches the registries. A third-party plugin that
fails any of these steps is skipped with one :class:`~appbench.errors.PluginSkippedWarning`
naming its distribution, and the rest of appbench works without it; ``appbench plugins``
lists it with its error. The built-in distribution failing is a bug in appbench and raises, as
does :func:`register_plugin` (whoever calls it wants that plugin, and now).

Load order is deterministic, so is the winner of a name clash: the built-in distribution
first, then third-party distributions in alphabetical order of their normalised names, each
distribution's entry points alphabetically. The first to register a name keeps it; a later
plugin that registers it again is skipped, and the warning names both.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from appbench import hookspecs
from appbench.errors import PluginSkippedWarning
from appbench.interfaces import Discoverer, Pruner
from appbench.registry import ModelEntry, PluginError, Registry, check_plugin_class

GROUP = "appbench"
BUILTIN_DIST = "appbench"
#: The registration hooks, in the order a plugin's are run.
REGISTRATION_HOOKS = (
    "appbench_register_pruners",
    "appbench_register_discoverers",
    "appbench_register_tasks",
    "appbench_register_models",
)


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin module and the distribution that ships it."""

    name: str
    module: str
    dist: str
    version: str


@dataclass(frozen=True)
class SkippedPlugin:
    """A third-party plugin that could not be loaded, and why."""

    name: str
    module: str
    dist: str
    version: str
    error: str


@dataclass
class Registries:
    """Everything the registration hooks registered."""

    pruners: Registry[type[Pruner]]
    discoverers: Registry[type[Discoverer]]
    tasks: Registry[Any]
    models: Registry[ModelEntry]

    @classmethod
    def empty(cls) -> Registries:
        return cls(Registry("pruner"), Registry("discoverer"), Registry("task"), Registry("model"))

    def all(self) -> list[Registry[Any]]:
        return [self.pruners, self.discoverers, self.tasks, self.models]


class PluginLoadError(PluginError):
    """An entry point of the built-in distribution could not be imported."""


@dataclass
class _State:
    """What loading found: the manager, the registries, who was loaded and who was skipped."""

    pm: pluggy.PluginManager
    regs: Registries = field(default_factory=Registries.empty)
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    skipped: dict[str, SkippedPlugin] = field(default_factory=dict)
    #: Warnings not yet issued: issued after loading has finished, so that a warnings filter
    #: that turns them into errors (pytest's ``-W error``) cannot leave loading half done.
    pending: list[str] = field(default_factory=list)


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Appbench_Foo`` is ``appbench-foo``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _named() -> list[str]:
    """The distributions APPBENCH_LOAD_PLUGINS names (checked whether autoload is on or not:
    with it on every plugin loads anyway, but a misspelt name is still a mistake to say)."""
    names = [d.strip() for d in os.environ.get("APPBENCH_LOAD_PLUGINS", "").split(",")]
    return list(dict.fromkeys(n for n in names if n))


def _requested() -> list[str] | None:
    """The distributions APPBENCH_LOAD_PLUGINS names, or None when autoload is on."""
    if not os.environ.get("APPBENCH_DISABLE_PLUGIN_AUTOLOAD"):
        return None
    return _named()


def _wanted(dist: str) -> bool:
    if normalize(dist) == BUILTIN_DIST:
        return True
    requested = _requested()
    return requested is None or normalize(dist) in {normalize(n) for n in requested}


def _dist(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    if ep.dist is None:
        return "?", "?"
    return ep.dist.name, ep.dist.version


def _load_order(ep: importlib.metadata.EntryPoint) -> tuple[bool, str, str]:
    dist = normalize(_dist(ep)[0])
    return (dist != BUILTIN_DIST, dist, ep.name)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """Every ``appbench`` entry point, built-ins first, then by distribution and name."""
    return sorted(importlib.metadata.entry_points(group=GROUP), key=_load_order)


def _unknown_requested(unknown: list[str], eps: list[importlib.metadata.EntryPoint]) -> str:
    """The error for APPBENCH_LOAD_PLUGINS names that match no distribution: for each, the
    distribution whose module or entry point it is, else the closest distribution name."""
    installed = {normalize(_dist(ep)[0]): _dist(ep)[0] for ep in eps}
    hints = []
    for name in unknown:
        key = normalize(name)
        owner = next(
            (
                (what, _dist(ep)[0])
                for ep in eps
                for what, candidate in (
                    ("module", ep.module),
                    ("module", ep.module.split(".")[0]),
                    ("entry point", ep.name),
                )
                if normalize(candidate) == key
            ),
            None,
        )
        if owner is not None:
            hints.append(
                f"'{name}' is the {owner[0]} of distribution {owner[1]}; "
                "APPBENCH_LOAD_PLUGINS takes distribution names."
            )
            continue
        close = difflib.get_close_matches(key, list(installed), n=1, cutoff=0.6)
        if close:
            suggestion = f"did you mean '{installed[close[0]]}'?"
            hints.append(
                f"Did you mean '{installed[close[0]]}'?"
                if len(unknown) == 1
                else f"For '{name}', {suggestion}"
            )
    noun = "that name" if len(unknown) == 1 else "those names"
    return " ".join(
        [
            f"APPBENCH_LOAD_PLUGINS names {', '.join(unknown)}: no installed distribution "
            f"provides appbench plugins under {noun}.",
            *hints,
            f"Installed: {', '.join(sorted(installed.values()))}.",
        ]
    )


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (pluggy's validation errors span several)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _owner(state: _State, plugin_name: str) -> str:
    info = state.infos.get(plugin_name)
    return (
        f"plugin '{plugin_name}' ({info.dist} {info.version})"
        if info
        else f"plugin '{plugin_name}'"
    )


def _call(impl: Any, **kwargs: Any) -> Any:
    """Call one hook implementation as pluggy would: with the arguments it asks for."""
    return impl.function(*[kwargs[name] for name in impl.argnames])


def _stage(state: _State, name: str, owner: str) -> Registries:
    """Run one plugin's registration hooks into a fresh staging area, validating every object
    and checking its name against both the staging area and the registries.

    Raises:
        PluginError: a malformed class, task or loader, or a name already taken.
        Exception: whatever the plugin's own hook code raises.
    """
    stage = Registries.empty()
    regs = state.regs

    def classes(target: Registry[Any], committed: Registry[Any], base: type) -> Callable[..., None]:
        def register(cls: type) -> None:
            check_plugin_class(cls, base, owner)
            committed.check(cls.name, owner)  # type: ignore[attr-defined]
            target.add(cls.name, cls, owner)  # type: ignore[attr-defined]

        return register

    def task_register(task: Any) -> None:
        from appbench.tasks import Task

        if not isinstance(task, Task):
            raise PluginError(f"{owner}: register() takes a Task instance, got {task!r}")
        regs.tasks.check(task.name, owner)
        stage.tasks.add(task.name, task, owner)

    def model_register(model: str, loader: Callable[..., Any], description: str) -> None:
        if not callable(loader):
            raise PluginError(f"{owner}: the loader of model {model!r} is not callable")
        regs.models.check(model, owner)
        stage.models.add(model, ModelEntry(model, loader, description), owner)

    registers: dict[str, Callable[..., None]] = {
        "appbench_register_pruners": classes(stage.pruners, regs.pruners, Pruner),
        "appbench_register_discoverers": classes(stage.discoverers, regs.discoverers, Discoverer),
        "appbench_register_tasks": task_register,
        "appbench_register_models": model_register,
    }
    for hook_name in REGISTRATION_HOOKS:
        hook = getattr(state.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                _call(impl, register=registers[hook_name])
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"{hook_name} raised {_one_line(exc)}") from exc
    return stage


def _admit(state: _State, plugin: object, name: str, info: PluginInfo | None) -> str | None:
    """Register a plugin and everything it registers, or nothing at all.

    Returns:
        None when the plugin is in; else why not, in one line (the state is then unchanged).
    """
    pm = state.pm
    if pm.has_plugin(name):
        return f"the plugin name '{name}' is taken by {_owner(state, name)}"
    if info is not None:
        state.infos[name] = info
    owner = _owner(state, name)
    try:
        pm.register(plugin, name=name)
        for caller in pm.get_hookcallers(plugin) or []:
            own = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            if not caller.has_spec() and not all(i.optionalhook for i in own):
                raise PluginError(
                    f"implements {caller.name}, which is not an appbench hook "
                    "(mark a hook of a newer appbench with optionalhook=True)"
                )
        stage = _stage(state, name, owner)
    except Exception as exc:
        state.infos.pop(name, None)
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        reason = str(exc) if isinstance(exc, PluginError) else f"invalid plugin ({_one_line(exc)})"
        return reason.removeprefix(f"{owner}: ")
    for staged, registry in zip(stage.all(), state.regs.all(), strict=True):
        for entry in staged:
            registry.add(entry.name, entry.obj, entry.owner)
    return None


def _skip(state: _State, name: str, module: str, dist: str, version: str, reason: str) -> None:
    state.skipped[name] = SkippedPlugin(name, module, dist, version, reason)
    state.pending.append(f"appbench: plugin '{name}' from {dist} {version} skipped: {reason}")


@functools.cache
def _state() -> _State:
    """Load every wanted entry point, once per process (until :func:`reset`)."""
    eps = _entry_points()
    installed = {normalize(_dist(ep)[0]) for ep in eps}
    unknown = [name for name in _named() if normalize(name) not in installed]
    if unknown:
        raise PluginError(_unknown_requested(unknown, eps))
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    state = _State(pm)
    for ep in eps:
        dist, version = _dist(ep)
        if not _wanted(dist):
            continue
        builtin = normalize(dist) == BUILTIN_DIST
        try:
            module = ep.load()
        except Exception as exc:
            if builtin:
                raise PluginLoadError(
                    f"plugin '{ep.name}' from {dist} failed to import ({ep.value}): {exc}"
                ) from exc
            _skip(state, ep.name, ep.value, dist, version, f"import failed ({_one_line(exc)})")
            continue
        reason = _admit(state, module, ep.name, PluginInfo(ep.name, ep.value, dist, version))
        if reason is not None:
            if builtin:
                raise PluginError(f"plugin '{ep.name}' ({dist} {version}): {reason}")
            _skip(state, ep.name, ep.value, dist, version, reason)
    return state


def _loaded() -> _State:
    """The loaded state, after issuing the warnings loading left (each once)."""
    state = _state()
    while state.pending:
        warnings.warn(state.pending.pop(0), PluginSkippedWarning, stacklevel=3)
    return state


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded once (lazily and idempotently)."""
    return _loaded().pm


def get_registries() -> Registries:
    """Everything the loaded plugins registered (filled once per process, as plugins load)."""
    return _loaded().regs


def plugin_infos() -> list[PluginInfo]:
    """The loaded plugins, with distributions and versions (plugins registered by hand too)."""
    state = _loaded()
    infos = []
    for name, plugin in state.pm.list_name_plugin():
        info = state.infos.get(name) or PluginInfo(
            name, getattr(plugin, "__name__", repr(plugin)), "(local)", ""
        )
        infos.append(info)
    return sorted(infos, key=lambda i: i.name)


def skipped_plugins() -> list[SkippedPlugin]:
    """The third-party plugins that could not be loaded, with their errors."""
    return sorted(_loaded().skipped.values(), key=lambda s: s.name)


def register_commands(cli: Any) -> None:
    """Call every plugin's ``appbench_register_commands(cli)``. A third-party plugin whose hook
    raises is skipped like one that failed to load: its commands and registrations are
    withdrawn, with a warning."""
    state = _loaded()
    hook = state.pm.hook.appbench_register_commands
    for impl in hook.get_hookimpls():
        before = dict(cli.commands)
        try:
            _call(impl, cli=cli)
        except Exception as exc:
            cli.commands.clear()
            cli.commands.update(before)
            info = state.infos.get(impl.plugin_name)
            if info is None or normalize(info.dist) == BUILTIN_DIST:
                raise
            _withdraw(state, impl.plugin_name)
            reason = f"appbench_register_commands raised {_one_line(exc)}"
            _skip(state, info.name, info.module, info.dist, info.version, reason)
    _loaded()


def _withdraw(state: _State, name: str) -> None:
    """Take an admitted plugin out again: its hooks and everything it registered."""
    owner = _owner(state, name)
    for registry in state.regs.all():
        registry.remove_owner(owner)
    state.pm.unregister(name=name)
    state.infos.pop(name, None)


def reset() -> None:
    """Forget the loaded plugins and registries (tests, or after installing a plugin)."""
    _state.cache_clear()


def register_plugin(module: object, name: str) -> None:
    """Register a plugin object by hand (tests, notebooks) with everything it registers.

    Raises:
        PluginError: the plugin is malformed, raises in a registration hook, or registers a
            name that is taken (nothing of it is registered then).
    """
    reason = _admit(_loaded(), module, name, None)
    if reason is not None:
        raise PluginError(f"plugin '{name}' not registered: {reason}")
