"""Sweeps: a grid of pruners x discoverers x tasks x models x seeds, run resumably.

``appbench sweep`` expands the grid into runs (:func:`plan`), looks at what the results
folder already holds (:func:`inspect`: a run whose result records the same settings is
finished and skipped; a result of other settings is refused unless overwriting), and hands
the rest to an :class:`Executor`: :class:`LocalExecutor`, a process pool on this machine, or
:class:`appbench.sweep_ray.RayExecutor` on a Ray cluster.

The driver, :class:`Sweep`, owns the order, the progress bar and every file. The dense run
(pruner ``none``) of each task x model x seed x discoverer is scheduled first, and a pruned
run starts only once its dense run is over, so that its speedup has a baseline. Workers
compute a run (:func:`appbench.runner.execute`) and return its result; the driver writes it
atomically (:func:`appbench.runner.save_result`). A crash, SIGKILL or Ctrl-C therefore loses at
most the runs in flight, and the same command run again resumes.

Layout: ``<out>/seed-<N>/<task>/<model folder>/<pruner>__<discoverer>.json``. Each run is
``RunConfig(..., seed=N, out=<out>/seed-<N>)``, so a pruned run's speedup is measured against
``none__<discoverer>.json`` beside it, exactly as ``appbench run`` measures it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appbench.checkpoint import DEFAULT_EVERY, checkpoint_path
from appbench.errors import RunError
from appbench.results import (
    ResultFileError,
    RunResult,
    ensure_writable,
    load_result,
    result_path,
)
from appbench.runner import (
    DEFAULT_TASK,
    DEVICE_PATTERN,
    MAX_SEED,
    Baseline,
    RunConfig,
    check_device,
    default_model,
    parse_params,
    shipped_reference,
)

#: Where a sweep writes when no --out is given (``appbench run`` writes to appbench-results).
DEFAULT_OUT = "appbench-sweep"
#: The dense baseline pruner: always part of a sweep, scheduled before the pruned runs.
DENSE = "none"
#: Models a worker keeps loaded (least recently used first out): a sweep visits its runs model
#: by model, so two cover the switch from one model to the next.
CACHED_MODELS = 2


class SweepError(RunError):
    """A sweep cannot start: bad names, parameters, config file or results folder."""


def default_jobs() -> int:
    """Worker processes of the local executor: ``min(2, CPUs)``."""
    return max(1, min(2, available_cpus()))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# ------------------------------------------------------------------------ the spec
def _words(value: Any) -> Any:
    """``"a, b"`` -> ``["a", "b"]``; a single number -> a list of it; a list as it is."""
    if isinstance(value, str):
        return [word.strip() for word in value.split(",") if word.strip()]
    if isinstance(value, int):
        return [value]
    return value


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _default_seeds() -> list[Seed | Literal["default"]]:
    return ["default"]


class SweepSpec(BaseModel):
    """What a sweep runs: the keys of a ``--config`` YAML file, which command-line options
    override one by one."""

    model_config = ConfigDict(extra="forbid")

    pruners: list[str] = Field(
        default_factory=list,
        description="pruner names, or 'all'; 'none' (the dense baseline) always runs too",
    )
    discoverers: list[str] = Field(default_factory=list, description="discoverer names, or 'all'")
    tasks: list[str] = Field(
        default_factory=lambda: [DEFAULT_TASK], description="task names, or 'all'"
    )
    models: list[str] = Field(
        default_factory=lambda: ["default"],
        description="model names; 'default' is each task's default model, 'all' every "
        "registered model",
    )
    seeds: list[Seed | Literal["default"]] = Field(
        default_factory=_default_seeds,
        description="prompt seeds (a list, or 'A-B' for a range); 'default' is each task's own",
    )
    pruner_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="parameters per pruner: {name: {key: value}}"
    )
    discoverer_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="parameters per discoverer: {name: {key: value}}"
    )
    n_search: int | None = Field(default=None, gt=0, description="search prompts per run")
    n_eval: int | None = Field(default=None, gt=0, description="evaluation prompts per run")
    device: str = Field(default="cpu", pattern=DEVICE_PATTERN, description="torch device")
    out: str = Field(default=DEFAULT_OUT, min_length=1, description="results folder")
    jobs: int | None = Field(default=None, ge=1, description="runs at once (workers)")
    executor: Literal["local", "ray"] = Field(default="local", description="where runs compute")
    address: str | None = Field(default=None, description="Ray cluster address (executor ray)")
    cpus_per_run: float | None = Field(
        default=None, gt=0, description="CPUs each Ray task declares (default: by model size)"
    )
    gpus_per_run: float | None = Field(
        default=None, ge=0, description="GPUs each Ray task declares (default: by device and size)"
    )
    ray_runtime_env: dict[str, Any] | None = Field(
        default=None,
        description="Ray runtime environment of the workers (pip, env_vars, working_dir, ...)",
    )
    retries: int = Field(
        default=1,
        ge=0,
        description="resubmissions of a run whose worker died or that failed "
        "in a way that may not recur",
    )
    checkpoint_every: float = Field(
        default=DEFAULT_EVERY,
        ge=0,
        allow_inf_nan=False,
        description="seconds between two checkpoints of a run in flight (local executor; "
        "a run stopped in flight goes on from its last one)",
    )

    @field_validator("pruners", "discoverers", "tasks", "models", mode="before")
    @classmethod
    def _name_list(cls, value: Any) -> Any:
        return _words(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, value: Any) -> Any:
        seeds: list[Any] = []
        for word in _words(value) if isinstance(value, str | int) else value:
            low, dash, high = str(word).partition("-") if isinstance(word, str) else ("", "", "")
            if dash and low.strip().isdigit() and high.strip().isdigit():
                if int(high) < int(low):
                    raise ValueError(f"seed range {word!r} runs backwards")
                seeds.extend(range(int(low), int(high) + 1))
            else:
                seeds.append(word)
        return seeds


def read_spec_file(path: Path) -> dict[str, Any]:
    """The mapping in a sweep's YAML file; anything else is one SweepError line."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SweepError(f"--config {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SweepError(f"--config {path}: not a YAML file ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SweepError(
            f"--config {path}: a sweep file is a mapping of keys ({', '.join(SweepSpec.model_fields)})"
        )
    return data


def make_spec(file: dict[str, Any], options: dict[str, Any], source: str = "--config") -> SweepSpec:
    """The sweep's spec: the file's keys, overridden by the options given on the command line
    (``None`` = not given). A bad value is one SweepError line naming the key and where it
    came from."""
    given = {key: value for key, value in options.items() if value is not None}
    try:
        return SweepSpec.model_validate({**file, **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        where = f"--{key.replace('_', '-')}" if key in given else source
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(SweepSpec.model_fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise SweepError(
                f"{where}: unknown key '{key}'.{hint} Known: {', '.join(SweepSpec.model_fields)}"
            ) from None
        at = ".".join(str(part) for part in err["loc"])
        raise SweepError(f"{where}: {at}: {err['msg']}") from None


# ------------------------------------------------------------------------ the plan
def settings_hash(settings: dict[str, Any]) -> str:
    """SHA-256 of a run's settings as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def result_settings(result: RunResult) -> dict[str, Any]:
    """The settings a finished run records: what a planned run must share to be that run."""
    return {
        "appbench_version": result.provenance.appbench_version,
        "task": result.task,
        "model": result.model,
        "pruner": result.pruner,
        "discoverer": result.discoverer,
        "pruner_params": result.pruner_params,
        "discoverer_params": result.discoverer_params,
        "seed": result.seed,
        "n_search": result.n_search,
        "n_eval": result.n_eval,
        "device": result.device,
    }


@dataclass(frozen=True)
class Job:
    """One run of a sweep.

    Attributes:
        config: the run, as ``appbench run`` would make it (``out`` = ``<out>/seed-<N>``).
        settings: its validated settings (:func:`result_settings` of its result, ahead of time).
        path: where its result goes.
    """

    config: RunConfig
    settings: dict[str, Any]
    path: Path

    @property
    def key(self) -> str:
        """``seed-<N>/<task>/<model folder>/<pruner>__<discoverer>``: unique in a sweep."""
        return "/".join([*self.path.parent.parts[-3:], self.path.stem])

    @property
    def hash(self) -> str:
        """The configuration hash: :func:`settings_hash` of the settings."""
        return settings_hash(self.settings)

    @property
    def dense(self) -> bool:
        return self.config.pruner == DENSE

    @property
    def dense_path(self) -> Path:
        """The result of this run's dense baseline (itself for a dense run)."""
        return self.path.with_name(f"{DENSE}__{self.config.discoverer}.json")


@dataclass(frozen=True)
class Plan:
    """A sweep's runs in the order they are scheduled: per model, task and seed, the dense run
    of every discoverer, then the pruned runs."""

    jobs: list[Job]
    out: Path
    spec: SweepSpec
    dense_added: bool = False

    def baseline_of(self, job: Job) -> Job | None:
        """The dense run of the plan that ``job``'s speedup needs (None for a dense run)."""
        if job.dense:
            return None
        return self._by_path.get(job.dense_path)

    @cached_property
    def _by_path(self) -> dict[Path, Job]:
        return {job.path: job for job in self.jobs}


def _expand(names: list[str], available: list[str], kind: str, option: str) -> list[str]:
    """``all`` -> every registered name; otherwise each name checked (did-you-mean errors);
    duplicates dropped, order kept."""
    from appbench.registry import UnknownNameError

    if not names:
        raise SweepError(f"no {kind}s given ({option} NAME,... or all; or {kind}s: in --config)")
    found: list[str] = []
    for name in names:
        if name == "all":
            found.extend(available)
        elif name not in available:
            raise UnknownNameError(kind, name, available)
        else:
            found.append(name)
    return list(dict.fromkeys(found))


def _plugin_params(
    names: list[str],
    per_plugin: dict[str, dict[str, Any]],
    common: dict[str, Any],
    registry: Any,
    skip: Sequence[str] = (),
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Each plugin's raw parameters (its own from the file, then the command line's common
    ones) and their validated form, each plugin's Params checked once. Parameters of a
    registered plugin that this sweep does not run are ignored (``--pruners`` may narrow a
    file's list); a name that no plugin has is an error."""
    for name in per_plugin:
        registry.get(name)  # UnknownNameError, with did-you-mean
    params = {}
    for name in names:
        raw = {**per_plugin.get(name, {}), **({} if name in skip else common)}
        params[name] = (raw, parse_params(registry.get(name), raw).model_dump(mode="json"))
    return params


def plan(
    spec: SweepSpec,
    pruner_params: dict[str, Any] | None = None,
    discoverer_params: dict[str, Any] | None = None,
    command: str = "",
) -> Plan:
    """Expand ``spec`` into its runs, validating everything before any work: names (``all``
    and ``default`` expanded), every plugin's parameters, models, the device, and the
    shipped reference files. Raises one-line errors (SweepError, UnknownNameError,
    ModelLoadError, TaskError, RunError).

    Args:
        spec: the sweep.
        pruner_params: raw parameters for every pruner but ``none`` (``-p KEY VALUE``), after
            each pruner's own from ``spec``.
        discoverer_params: the same for every discoverer (``-d KEY VALUE``).
        command: the command line, recorded in each result's provenance.
    """
    from appbench.models import check_model_name
    from appbench.plugins import get_registries

    regs = get_registries()
    pruners = _expand(spec.pruners, regs.pruners.names(), "pruner", "--pruners")
    dense_added = DENSE not in pruners
    pruners = [DENSE, *(p for p in pruners if p != DENSE)]
    discoverers = _expand(spec.discoverers, regs.discoverers.names(), "discoverer", "--discoverers")
    tasks = _expand(spec.tasks, regs.tasks.names(), "task", "--tasks")
    if not spec.models:
        raise SweepError("no models given (--models NAME,..., default or all)")
    if not spec.seeds:
        raise SweepError("no seeds given (--seeds N,..., A-B or default)")
    p_params = _plugin_params(
        pruners, spec.pruner_params, pruner_params or {}, regs.pruners, skip=[DENSE]
    )
    d_params = _plugin_params(
        discoverers, spec.discoverer_params, discoverer_params or {}, regs.discoverers
    )
    check_device(spec.device)
    version = metadata.version("appbench")
    out = Path(spec.out)
    jobs: list[Job] = []
    models_of: dict[str, list[str]] = {}
    for task in tasks:
        names: list[str] = []
        for model in spec.models:
            if model == "default":
                names.append(default_model(task))
            elif model == "all":
                names.extend(regs.models.names())
            else:
                names.append(model)
        models_of[task] = list(dict.fromkeys(names))
    for model in dict.fromkeys(m for names in models_of.values() for m in names):
        check_model_name(model)
    order = [(m, t) for m in dict.fromkeys(m for n in models_of.values() for m in n) for t in tasks]
    for model, task_name in order:
        if model not in models_of[task_name]:
            continue
        task = regs.tasks.get(task_name)
        shipped_reference(task, model)  # a broken shipped reference fails before any work
        seeds = list(dict.fromkeys(task.spec.seed if s == "default" else s for s in spec.seeds))
        n_search = spec.n_search or task.spec.n_search
        n_eval = spec.n_eval or task.spec.n_eval
        for seed in seeds:
            folder = out / f"seed-{seed}"
            for dense_first in (True, False):
                for discoverer in discoverers:
                    for pruner in pruners:
                        if (pruner == DENSE) != dense_first:
                            continue
                        config = RunConfig(
                            pruner=pruner,
                            discoverer=discoverer,
                            task=task_name,
                            model=model,
                            seed=seed,
                            device=spec.device,
                            pruner_params=p_params[pruner][0],
                            discoverer_params=d_params[discoverer][0],
                            n_search=n_search,
                            n_eval=n_eval,
                            out=folder,
                            command=command,
                            checkpoint_every=spec.checkpoint_every,
                        )
                        settings = {
                            "appbench_version": version,
                            "task": task_name,
                            "model": model,
                            "pruner": pruner,
                            "discoverer": discoverer,
                            "pruner_params": p_params[pruner][1],
                            "discoverer_params": d_params[discoverer][1],
                            "seed": seed,
                            "n_search": n_search,
                            "n_eval": n_eval,
                            "device": spec.device,
                        }
                        path = result_path(folder, task_name, model, pruner, discoverer)
                        jobs.append(Job(config, settings, path))
    return Plan(jobs, out, spec, dense_added)


# ------------------------------------------------------------- what the folder holds
#: A planned run's state before the sweep: to run, finished (same settings: skipped), a
#: result of other settings there (refused without overwrite, replaced with it), or a file
#: there that is no readable result (replaced: it holds nothing to lose).
State = Literal["run", "finished", "conflict", "replace", "unreadable"]


@dataclass(frozen=True)
class Found:
    """What the results folder holds at a planned run's path."""

    state: State
    result: RunResult | None = None
    differences: tuple[str, ...] = ()


def inspect(plan: Plan, overwrite: bool = False) -> dict[str, Found]:
    """Each planned run's state, by job key (see :data:`State`)."""
    found: dict[str, Found] = {}
    for job in plan.jobs:
        if not job.path.exists():
            found[job.key] = Found("run")
            continue
        try:
            earlier = load_result(job.path)
        except ResultFileError:
            found[job.key] = Found("unreadable")
            continue
        theirs = result_settings(earlier)
        if settings_hash(theirs) == job.hash:
            found[job.key] = Found("finished", earlier)
            continue
        differences = tuple(
            f"{key} {theirs.get(key)!r} there, {value!r} now"
            for key, value in job.settings.items()
            if theirs.get(key) != value
        )
        found[job.key] = Found("replace" if overwrite else "conflict", earlier, differences)
    return found


def check_conflicts(plan: Plan, found: dict[str, Found]) -> None:
    """Refuse the sweep, before any work, when runs of it would replace results of other
    settings (without ``--overwrite``): one line naming how many and the first."""
    conflicts = [job for job in plan.jobs if found[job.key].state == "conflict"]
    if not conflicts:
        return
    first = conflicts[0]
    more = f" and {len(conflicts) - 1} more" if len(conflicts) > 1 else ""
    raise SweepError(
        f"{first.path}{more} hold{'s' if not more else ''} a run with other settings "
        f"({'; '.join(found[first.key].differences)}): pass --overwrite to replace "
        f"{'it' if not more else 'them'}, or give another --out"
    )


def check_writable(out: Path) -> None:
    """The results folder can be created and written, before any work."""
    try:
        ensure_writable(out)
    except OSError as exc:
        raise SweepError(
            f"--out {out}: cannot write results there ({exc.strerror or exc})"
        ) from None


# ------------------------------------------------------------------ the workers' side
@dataclass(frozen=True)
class WorkItem:
    """What a worker gets for one run: the run, its dense baseline (read by the driver), and
    the checkpoint file its discovery saves to and resumes from (None: no checkpoints)."""

    key: str
    config: RunConfig
    baseline: Baseline | None
    checkpoint: Path | None = None


@dataclass(frozen=True)
class Outcome:
    """What a worker returns for one run.

    Attributes:
        key: the job's key.
        result: the RunResult as JSON, or None when the run failed.
        error: one line saying why it failed.
        retryable: the failure may not recur (the worker died, or an unexpected exception
            such as running out of memory), so the driver may resubmit the run; a run
            refused for its input (RunError and the other user errors) would fail again.
        worker: ``host:pid`` of the worker process.
        loaded: whether this run loaded its model (False: the worker had it cached).
        seconds: wall time of the run in the worker.
        model_bytes: the size of the run's model (parameters and buffers), once loaded: an
            executor that declares resources per run sizes later runs of the model by it.
    """

    key: str
    result: str | None = None
    error: str | None = None
    retryable: bool = False
    worker: str = ""
    loaded: bool = False
    seconds: float = 0.0
    model_bytes: int | None = None


class ModelCache:
    """The models a worker process has loaded, so that a model is loaded once per worker,
    not once per run. Runs never change a model (the runner removes its hooks and nothing
    trains), so the next run gets it as loaded."""

    def __init__(self, size: int = CACHED_MODELS) -> None:
        self.size = size
        self.loads = 0
        #: Bytes of parameters and buffers of each model loaded, by (name, device).
        self.sizes: dict[tuple[str, str], int] = {}
        self._models: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def load(self, name: str, device: str) -> Any:
        """The model ``name`` on ``device``: cached, else loaded (evicting the oldest)."""
        from appbench.models import load_model

        key = (name, device)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        while len(self._models) >= self.size:
            self._models.popitem(last=False)
        model = load_model(name, device)
        self.loads += 1
        self._models[key] = model
        self.sizes[key] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return model


#: This process's models, when it is a sweep's worker.
WORKER_MODELS = ModelCache()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_item(item: WorkItem, cache: ModelCache | None = None) -> Outcome:
    """Compute one run in this process (a worker) and return its result, writing nothing.
    Progress lines of the run are dropped; what plugins print goes to stderr."""
    import socket
    from contextlib import redirect_stdout

    from appbench.models import ModelLoadError
    from appbench.registry import PluginError, UnknownNameError
    from appbench.runner import execute
    from appbench.tasks import TaskError

    cache = cache or WORKER_MODELS
    loads = cache.loads
    started = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def done(**fields: Any) -> Outcome:
        return Outcome(
            key=item.key,
            worker=worker,
            loaded=cache.loads > loads,
            seconds=time.perf_counter() - started,
            model_bytes=cache.sizes.get((item.config.model, item.config.device)),
            **fields,
        )

    try:
        with redirect_stdout(sys.stderr):
            result = execute(
                item.config, load=cache.load, baseline=item.baseline, checkpoint=item.checkpoint
            )
    except (RunError, ModelLoadError, TaskError, UnknownNameError, PluginError) as exc:
        return done(error=f"{type(exc).__name__}: {_one_line(exc)}")
    except Exception as exc:
        return done(error=f"{type(exc).__name__}: {_one_line(exc)}", retryable=True)
    return done(result=result.model_dump_json())


# ------------------------------------------------------------------------ executors
class Executor(ABC):
    """Where a sweep's runs compute. Executors never write results: they return them.

    The driver calls :meth:`start` once, :meth:`submit` at most :attr:`slots` items at a time,
    collects finished runs with :meth:`wait`, calls :meth:`stop` to abandon the runs in flight
    (Ctrl-C) and :meth:`close` at the end. An executor turns a worker that died into an
    Outcome with ``retryable`` set; the driver decides whether to resubmit.
    """

    #: The ``--executor`` name.
    name: ClassVar[str]
    #: Whether workers write to the driver's files: then their discoveries keep checkpoints
    #: beside the results, and a run stopped in flight resumes from its last one.
    shares_files: ClassVar[bool] = False
    #: Runs in flight at once.
    slots: int

    @abstractmethod
    def start(self) -> None:
        """Bring the workers up (called only when there is something to run)."""

    @abstractmethod
    def submit(self, item: WorkItem) -> None:
        """Start computing ``item``."""

    @abstractmethod
    def wait(self, timeout: float) -> list[Outcome]:
        """The runs that finished, waiting up to ``timeout`` seconds for one."""

    @abstractmethod
    def stop(self) -> int:
        """Abandon every run in flight (kill their workers); returns how many."""

    @abstractmethod
    def close(self) -> None:
        """Release the workers."""

    def describe(self) -> str:
        """One line for the sweep's header."""
        return f"{self.name}, {self.slots} at once"


def _init_local_worker(threads: int) -> None:
    """A local worker: ``threads`` torch threads, Ctrl-C left to the driver (which stops the
    pool), plugins' prints to stderr, and an exit when the driver dies (a SIGKILLed sweep
    leaves no workers behind)."""
    import multiprocessing
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    parent = multiprocessing.parent_process()
    if parent is not None:

        def orphaned() -> None:
            parent.join()
            os._exit(1)

        threading.Thread(target=orphaned, daemon=True, name="appbench-parent-watch").start()


class LocalExecutor(Executor):
    """A pool of worker processes on this machine (``concurrent.futures.ProcessPoolExecutor``
    with the spawn start method, so that each worker starts torch afresh with its own thread
    count: ``max(1, CPUs // jobs)``). Each worker keeps its models loaded between runs
    (:data:`WORKER_MODELS`). A worker that dies breaks the pool: its runs come back
    retryable and the next submission starts a new pool."""

    name = "local"
    shares_files = True

    def __init__(self, jobs: int | None = None, threads: int | None = None) -> None:
        self.slots = jobs or default_jobs()
        self.threads = threads or max(1, available_cpus() // self.slots)
        self._pool: Any = None
        self._futures: dict[Any, str] = {}

    def describe(self) -> str:
        return f"local, {self.slots} worker process(es) x {self.threads} torch thread(s)"

    def _new_pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(
            max_workers=self.slots,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_local_worker,
            initargs=(self.threads,),
        )

    def start(self) -> None:
        if self._pool is None:
            self._pool = self._new_pool()

    def submit(self, item: WorkItem) -> None:
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None or getattr(self._pool, "_broken", False):
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        try:
            future = self._pool.submit(run_item, item)
        except BrokenProcessPool:
            self._pool = self._new_pool()
            future = self._pool.submit(run_item, item)
        self._futures[future] = item.key

    def wait(self, timeout: float) -> list[Outcome]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures
        from concurrent.futures.process import BrokenProcessPool

        if not self._futures:
            return []
        done, _ = wait_futures(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
        outcomes = []
        for future in done:
            key = self._futures.pop(future)
            try:
                outcomes.append(future.result())
            except BrokenProcessPool:
                outcomes.append(
                    Outcome(key, error="its worker process died (killed?)", retryable=True)
                )
            except Exception as exc:  # e.g. a result that cannot be sent back
                outcomes.append(
                    Outcome(key, error=f"{type(exc).__name__}: {_one_line(exc)}", retryable=True)
                )
        return outcomes

    def stop(self) -> int:
        abandoned = len(self._futures)
        for future in self._futures:
            future.cancel()
        self._futures.clear()
        if self._pool is not None:
            # Runs in flight are killed, not awaited: their results would be lost anyway
            # (the driver stops writing), and a long run would hold the Ctrl-C for minutes.
            processes = getattr(self._pool, "_processes", None) or {}
            for process in list(processes.values()):
                process.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        return abandoned

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ------------------------------------------------------------------------ the driver
Status = Literal["done", "skipped", "failed", "cancelled"]


@dataclass
class Record:
    """How one planned run of a sweep ended.

    Attributes:
        job: the run.
        status: ``done`` (ran now), ``skipped`` (finished before: same settings), ``failed``,
            ``cancelled`` (interrupted before it finished).
        result: its result (done or skipped).
        error: why it failed.
        attempts: submissions (2 after a retry).
        worker: the worker that computed it.
        loaded: whether its worker loaded the model for it.
        seconds: its wall time in the worker.
        notes: what the summary says beside it (a dense run that failed, a retry, ...).
    """

    job: Job
    status: Status = "cancelled"
    result: RunResult | None = None
    error: str | None = None
    attempts: int = 0
    worker: str = ""
    loaded: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """A sweep's outcome: one record per planned run, in plan order."""

    plan: Plan
    records: list[Record]
    executor: str
    wall_seconds: float = 0.0
    interrupted: bool = False

    def count(self, status: Status) -> int:
        return sum(1 for record in self.records if record.status == status)

    @property
    def model_loads(self) -> int:
        return sum(1 for record in self.records if record.loaded)

    @property
    def workers(self) -> int:
        return len({record.worker for record in self.records if record.worker})

    def counts(self) -> dict[str, int]:
        return {
            status: self.count(status)  # type: ignore[arg-type]
            for status in ("done", "skipped", "failed", "cancelled")
        }

    def line(self) -> str:
        """One line: what happened to how many runs, and where the results are."""
        c = self.counts()
        return (
            f"{len(self.records)} runs: {c['done']} done, {c['skipped']} skipped (finished "
            f"before), {c['failed']} failed, {c['cancelled']} cancelled in "
            f"{self.wall_seconds:.1f} s ({self.executor}; {self.model_loads} model load(s) in "
            f"{self.workers} worker(s)); results in {self.plan.out}"
        )


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM during a sweep, taken at a safe point: the first one sets
    ``requested``, which the driver reads between steps, so that a result being written is
    also recorded as done; a second one interrupts at once. SIGTERM counts too because a sweep
    started in the background from a script ignores SIGINT (the shell sets it so), leaving
    ``kill`` the way to stop it. Only in the main thread (signals go there); elsewhere
    KeyboardInterrupt stays as it is."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}


class Sweep:
    """The driver: schedules a plan's runs on an executor and writes their results.

    Args:
        plan: the runs.
        found: :func:`inspect` of the plan (finished runs are skipped).
        executor: where runs compute.
        progress: show a tqdm bar with ETA on stderr.
        report: where one-line reports go (failures, retries); default: above the bar.
    """

    def __init__(
        self,
        plan: Plan,
        found: dict[str, Found],
        executor: Executor,
        *,
        progress: bool = True,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.plan, self.found, self.executor = plan, found, executor
        self.progress = progress
        self._report = report

    def run(self) -> Summary:
        """Run every planned run that is not finished; Ctrl-C stops the sweep cleanly (the
        summary then says ``interrupted``)."""
        from tqdm import tqdm

        from appbench.runner import save_result

        started = time.perf_counter()
        records = {job.key: Record(job) for job in self.plan.jobs}
        for job in self.plan.jobs:
            if self.found[job.key].state == "finished":
                records[job.key].status = "skipped"
                records[job.key].result = self.found[job.key].result
        todo = [job for job in self.plan.jobs if records[job.key].status != "skipped"]
        pending = list(todo)  # plan order: dense runs come first within their group
        waiting = {job.key for job in todo}  # not finished yet: their dependants wait
        in_flight: set[str] = set()
        retries = self.plan.spec.retries
        summary = Summary(
            self.plan, [records[job.key] for job in self.plan.jobs], self.executor.describe()
        )
        bar = tqdm(
            total=len(todo),
            desc="sweep",
            unit="run",
            file=sys.stderr,
            disable=not self.progress or not todo,
            dynamic_ncols=True,
        )

        def report(line: str) -> None:
            if self._report is not None:
                self._report(line)
            else:
                bar.write(line, file=sys.stderr)

        def ready(job: Job) -> bool:
            base = self.plan.baseline_of(job)
            return base is None or base.key not in waiting

        def submit(job: Job) -> None:
            record = records[job.key]
            record.attempts += 1
            baseline = None
            if not job.dense and job.dense_path.is_file():
                baseline = Baseline.read(job.dense_path)
            saves = checkpoint_path(job.path) if self.executor.shares_files else None
            self.executor.submit(WorkItem(job.key, job.config, baseline, saves))
            in_flight.add(job.key)

        def finish(outcome: Outcome) -> None:
            record = records[outcome.key]
            job = record.job
            in_flight.discard(job.key)
            record.worker = outcome.worker or record.worker
            record.loaded = record.loaded or outcome.loaded
            record.seconds = outcome.seconds
            result = None
            error = outcome.error
            if outcome.result is not None:
                try:
                    result = RunResult.model_validate_json(outcome.result)
                    theirs = result_settings(result)
                    if settings_hash(theirs) != job.hash:
                        error = (
                            "its result records other settings than planned ("
                            + "; ".join(
                                f"{key} {theirs.get(key)!r} there, {value!r} here"
                                for key, value in job.settings.items()
                                if theirs.get(key) != value
                            )
                            + "): does the worker run this appbench and these plugins?"
                        )
                        result = None
                    else:
                        save_result(result, job.path)
                        checkpoint_path(job.path).unlink(missing_ok=True)
                except (ValidationError, OSError) as exc:
                    error = f"{type(exc).__name__}: {_one_line(exc)}"
                    result = None
            if result is not None:
                record.status, record.result, record.error = "done", result, None
            elif outcome.retryable and record.attempts <= retries:
                record.notes.append(f"retried after: {error}")
                report(f"retrying {job.key}: {error}")
                pending.insert(0, job)
                return
            else:
                record.status, record.error = "failed", error
                report(f"failed: {job.key}: {error}")
                if job.dense:
                    for other in self.plan.jobs:
                        if self.plan.baseline_of(other) is job:
                            records[other.key].notes.append(
                                "no speedup: its dense run failed"
                                if not other.dense_path.is_file()
                                else "its dense run failed: speedup against an earlier one"
                            )
            waiting.discard(job.key)
            bar.update(1)
            failed = sum(1 for r in records.values() if r.status == "failed")
            if failed:
                bar.set_postfix(failed=failed, refresh=False)

        interrupt = _DeferredInterrupt()
        try:
            with interrupt:
                if todo:
                    self.executor.start()
                    summary.executor = self.executor.describe()
                while (pending or in_flight) and not interrupt.requested:
                    for job in list(pending):
                        if len(in_flight) >= self.executor.slots:
                            break
                        if ready(job):
                            pending.remove(job)
                            submit(job)
                    for outcome in self.executor.wait(timeout=0.5):
                        finish(outcome)
        except KeyboardInterrupt:
            interrupt.requested = True
        finally:
            if interrupt.requested:
                summary.interrupted = True
                self.executor.stop()
            bar.close()
            self.executor.close()
        summary.wall_seconds = time.perf_counter() - started
        return summary


# ----------------------------------------------------------------------- reporting
def plan_rows(plan: Plan, found: dict[str, Found]) -> list[dict[str, Any]]:
    """The plan as rows (``--dry-run``): each run, its path, hash and what the sweep does."""
    action = {
        "run": "run",
        "finished": "skip (finished)",
        "conflict": "refused: other settings there (--overwrite)",
        "replace": "run, replacing other settings",
        "unreadable": "run, replacing an unreadable file",
    }

    def what(job: Job) -> str:
        state = found[job.key].state
        resumable = plan.spec.executor == "local" and state in ("run", "replace", "unreadable")
        if resumable and checkpoint_path(job.path).exists():
            return f"{action[state]} (from its checkpoint, if of these settings)"
        return action[state]

    return [
        {
            "seed": job.config.seed,
            "task": job.config.task,
            "model": job.config.model,
            "pruner": job.config.pruner,
            "discoverer": job.config.discoverer,
            "after": plan.baseline_of(job).key if plan.baseline_of(job) else None,  # type: ignore[union-attr]
            "action": what(job),
            "path": str(job.path),
            "config_hash": job.hash,
        }
        for job in plan.jobs
    ]


def record_row(record: Record) -> dict[str, Any]:
    """One run of a summary, as ``--json`` prints it."""
    job, result = record.job, record.result
    row: dict[str, Any] = {
        "seed": job.config.seed,
        "task": job.config.task,
        "model": job.config.model,
        "pruner": job.config.pruner,
        "discoverer": job.config.discoverer,
        "status": record.status,
        "path": str(job.path),
        "config_hash": job.hash,
        "error": record.error,
        "attempts": record.attempts,
        "worker": record.worker or None,
        "seconds": round(record.seconds, 3) if record.status == "done" else None,
        "notes": record.notes,
    }
    if result is not None:
        row.update(
            search_space_size=result.search_space_size,
            circuit_size=result.circuit_size,
            faithfulness=result.faithfulness.normalised,
            f1=result.overlap.f1 if result.overlap else None,
            speedup_wall=result.speedup.wall_ratio if result.speedup else None,
            speedup_flops=result.speedup.flops_ratio if result.speedup else None,
            flags=[flag.code for flag in result.flags],
        )
    return row


def summary_json(summary: Summary) -> dict[str, Any]:
    """The ``--json`` summary."""
    return {
        "out": str(summary.plan.out),
        "executor": summary.executor,
        "interrupted": summary.interrupted,
        "counts": summary.counts(),
        "wall_seconds": round(summary.wall_seconds, 3),
        "model_loads": summary.model_loads,
        "workers": summary.workers,
        "runs": [record_row(record) for record in summary.records],
    }


def summary_table(summary: Summary) -> str:
    """The summary as a table (one row per run) and its closing line."""
    from tabulate import tabulate

    def number(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    rows = []
    for record in summary.records:
        row = record_row(record)
        note = record.error or "; ".join(record.notes)
        rows.append(
            [
                row["task"],
                row["model"],
                row["seed"],
                row["pruner"],
                row["discoverer"],
                row["status"],
                f"{row['search_space_size']} -> {row['circuit_size']}"
                if "circuit_size" in row
                else "",
                number(row.get("faithfulness"), ".3f"),
                number(row.get("f1"), ".2f"),
                number(row.get("speedup_wall"), ".2f") + ("x" if row.get("speedup_wall") else ""),
                note,
            ]
        )
    headers = ["task", "model", "seed", "pruner", "discoverer", "status", "heads"]
    headers += ["faith.", "F1", "speedup", "note"]
    return tabulate(rows, headers=headers, tablefmt="simple") + "\n\n" + summary.line()


def describe_plan(plan: Plan, found: dict[str, Found]) -> str:
    """``--dry-run``: the plan as a table and a closing line."""
    from tabulate import tabulate

    rows = plan_rows(plan, found)
    table = tabulate(
        [
            [r["seed"], r["task"], r["model"], r["pruner"], r["discoverer"], r["action"]]
            for r in rows
        ],
        headers=["seed", "task", "model", "pruner", "discoverer", "action"],
        tablefmt="simple",
    )
    runs = sum(1 for r in rows if r["action"].startswith("run"))
    skips = sum(1 for r in rows if r["action"].startswith("skip"))
    added = " (pruner none added: the dense baseline of every speedup)" if plan.dense_added else ""
    return (
        f"{table}\n\n{len(rows)} runs: {runs} to run, {skips} finished before; results in "
        f"{plan.out}{added}"
    )
