"""Name -> plugin registries: duplicate names are rejected naming both owners; unknown names
get a did-you-mean answer."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")

T = TypeVar("T")


class PluginError(ValueError):
    """A plugin is malformed, or registers a name that is already taken."""


class UnknownNameError(LookupError):
    """A name that no registered plugin has."""

    def __init__(self, kind: str, name: str, available: list[str]) -> None:
        close = difflib.get_close_matches(name, available, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(available) if available else "(none)"
        super().__init__(f"Unknown {kind} '{name}'.{hint} Available: {listing}")
        self.kind, self.name, self.available = kind, name, available

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object with the plugin (module or distribution) that registered it."""

    name: str
    obj: T
    owner: str


class Registry(Generic[T]):
    """Objects of one kind (pruners, discoverers, tasks, models) keyed by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def check(self, name: str, owner: str) -> None:
        """Raise the error :meth:`add` would raise for ``name``: a malformed or taken name."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise PluginError(
                f"{owner}: {self.kind} name {name!r} must match {NAME_PATTERN.pattern}"
            )
        if name in self._entries:
            first = self._entries[name].owner
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by {first} and by {owner}"
            )

    def add(self, name: str, obj: T, owner: str) -> None:
        self.check(name, owner)
        self._entries[name] = Entry(name, obj, owner)

    def remove_owner(self, owner: str) -> None:
        """Forget everything ``owner`` registered (a plugin withdrawn after loading)."""
        self._entries = {n: e for n, e in self._entries.items() if e.owner != owner}

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


def check_plugin_class(cls: Any, base: type, owner: str) -> None:
    """Validate a Pruner/Discoverer class: subclass, name, summary, Params with described fields."""
    from appbench.interfaces import Params

    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{owner}: {cls!r} is not a subclass of {base.__name__}")
    for attr in ("name", "summary"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise PluginError(f"{owner}: {cls.__name__} needs a non-empty string `{attr}`")
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise PluginError(f"{owner}: {cls.__name__}.Params must be a pydantic model")
    if not issubclass(params, Params) and params.model_config.get("extra") != "forbid":
        raise PluginError(f"{owner}: {cls.__name__}.Params must forbid extra keys")
    undocumented = [f for f, info in params.model_fields.items() if not info.description]
    if undocumented:
        raise PluginError(
            f"{owner}: {cls.__name__}.Params fields lack a description: {undocumented}"
        )


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to load it and what it is."""

    name: str
    loader: Callable[..., Any]
    description: str
