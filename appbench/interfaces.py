"""The classes a plugin subclasses: Pruner, Discoverer and their pydantic Params, plus RunContext.

A pruner shrinks the set of heads worth searching; a discoverer finds a circuit inside what is
left. Neither times itself or counts forward passes: the runner measures both around each
stage, so every plugin is measured the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from appbench.checkpoint import Checkpoint

if TYPE_CHECKING:
    from appbench.circuit import Circuit, SearchSpace
    from appbench.engine.patching import PatchingEngine
    from appbench.tasks import Task, TaskData


class Params(BaseModel):
    """Base of every plugin's parameters: unknown keys are errors, values are validated, and
    no float parameter takes inf or NaN (a threshold of inf is not a threshold)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class RunContext:
    """What a plugin sees of a run.

    Attributes:
        model: the loaded TransformerLens model (weights unprocessed), in eval mode.
        model_name: the name the model was loaded under.
        task: the task object (metric, spec).
        search: the split pruners and discoverers work on.
        evaluation: the held-out split circuits are evaluated on; plugins must not use it.
        device: torch device string of the model.
        seed: the run's seed.
        engine: the patching engine bound to the model and task.
        log: where a plugin reports progress on long work (one line at a time); the CLI
            prints it to stderr, tests and library callers may leave it silent.
        flag: ``flag(code, message)`` marks the result as one not to take at face value
            (e.g. ``fallback-sparsity`` when no cliff was found); the runner records every
            flag in the result and prints it.
        part: ``with ctx.part("sweep"):`` has the runner measure a named part of the current
            stage on its own (recorded as ``<stage>.sweep``, still counted in the stage), so
            that e.g. a pruner's sparsity sweep is reported apart from its scoring.
        checkpoint: where a long discoverer saves its progress (:class:`Checkpoint`): it
            loads the state an interrupted run saved and goes on from there, the runner
            summing the segments' costs. Without a result file it holds nothing.
    """

    model: Any
    model_name: str
    task: Task
    search: TaskData
    evaluation: TaskData
    device: str
    seed: int
    engine: PatchingEngine
    log: Callable[[str], None] = lambda line: None
    flag: Callable[[str, str], None] = lambda code, message: None
    part: Callable[[str], AbstractContextManager[None]] = lambda name: nullcontext()
    checkpoint: Checkpoint = field(default_factory=lambda: Checkpoint(None))

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.model.cfg.n_heads)


class _Plugin:
    """Shared class attributes of pruners and discoverers."""

    #: CLI name, ``[a-z][a-z0-9_-]*``.
    name: ClassVar[str]
    #: One line for ``appbench list``.
    summary: ClassVar[str]
    #: The plugin's parameters; every field carries a description.
    Params: ClassVar[type[Params]] = Params


class Pruner(_Plugin):
    """Chooses the heads a discoverer may search."""

    def prune(self, ctx: RunContext, params: Any) -> SearchSpace:
        """Return the search space for ``ctx``'s model and task (search split only)."""
        raise NotImplementedError


class Discoverer(_Plugin):
    """Finds a circuit inside a search space."""

    def discover(self, ctx: RunContext, space: SearchSpace, params: Any) -> Circuit:
        """Return a circuit whose heads all lie in ``space``, using the search split only."""
        raise NotImplementedError
