"""Sweeps on a Ray cluster: ``appbench sweep --executor ray [--address ADDR]``.

Ray is an optional extra (``pip install 'appbench[ray]'``), imported only when a sweep asks
for it. The driver (:class:`appbench.sweep.Sweep`) is the same as for the local executor: it
plans, skips finished runs, keeps the dense-first order, shows the progress bar, and writes
every result itself, atomically, in the results folder on the machine it runs on. Workers on
other machines never see that folder: a run's dense baseline is read by the driver and sent
with the run, and its result comes back as JSON.

Each run is one Ray task declaring what it needs (:func:`run_resources`): a GPU for a run on
``cuda`` (a quarter of one for a model under 256 MiB), CPUs and memory by the model's size.

Why tasks, not actors. A task per run lets Ray place each run by its own resources: a GPU
run and a CPU run, or runs of a small and a big model, go wherever they fit, and a cluster
that scales up gets used without the driver managing a pool. Models are still loaded once per
worker, not once per run: Ray reuses a worker process for task after task (``max_calls=0``,
which GPU tasks need said explicitly), and the worker keeps its models in the module-level
cache :data:`appbench.sweep.WORKER_MODELS`, as a local worker does. Actors would pin that
cache to fixed slots, each with one fixed size of resources for every model. A worker that
dies (killed, out of memory, its node lost) fails its run with a Ray error; Ray's own retries
are off (``max_retries=0``) and the driver resubmits the run once (``--retries``), then
reports it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from appbench.sweep import Executor, Outcome, SweepError, WorkItem, run_item

RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install 'appbench[ray]'"

MiB = 2**20
GiB = 2**30
#: A model smaller than this shares a GPU with three other runs (a quarter of one each).
SMALL_MODEL_BYTES = 256 * MiB
#: Host memory a run needs beyond its model: tokenizer, prompts, caches, Python.
RUN_OVERHEAD_BYTES = 512 * MiB


def import_ray() -> Any:
    """The ``ray`` module, or one SweepError line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SweepError(RAY_MISSING) from None
    return ray


def run_resources(
    device: str,
    model_bytes: int | None,
    cpus: float | None = None,
    gpus: float | None = None,
) -> dict[str, float]:
    """The Ray resources one run declares.

    Args:
        device: the run's torch device; ``cuda`` runs need a GPU, the others none.
        model_bytes: the model's size (parameters and buffers), once a worker has loaded it;
            None before: a run then declares the most a model may need.
        cpus: CPUs per run (``--cpus-per-run``), else by size: 1 below 1 GiB of weights
            (about 250M float32 parameters), 2 below 4 GiB, 4 above (CPU runs only; a GPU run
            takes 1).
        gpus: GPUs per run (``--gpus-per-run``), else 1 for a ``cuda`` run, a quarter for a
            model below 256 MiB.

    Returns:
        ``num_cpus``, ``num_gpus`` and, when the size is known, ``memory`` (bytes: on a CPU
        run three times the model, weights plus activation caches, plus the run's overhead;
        on a GPU run the model once, as it passes through host memory, plus the overhead).
    """
    gpu = device.startswith("cuda")
    if gpus is None:
        gpus = (
            (0.25 if model_bytes is not None and model_bytes < SMALL_MODEL_BYTES else 1.0)
            if gpu
            else 0.0
        )
    if cpus is None:
        if gpu or model_bytes is None or model_bytes < GiB:
            cpus = 1.0
        else:
            cpus = 2.0 if model_bytes < 4 * GiB else 4.0
    found: dict[str, float] = {"num_cpus": float(cpus), "num_gpus": float(gpus)}
    if model_bytes is not None:
        found["memory"] = float((1 if gpu else 3) * model_bytes + RUN_OVERHEAD_BYTES)
    return found


def run_in_ray_worker(item: WorkItem, threads: int) -> Outcome:
    """The Ray task: one run in a Ray worker process with ``threads`` torch threads (its
    CPUs), through the worker's model cache."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return run_item(item)


class RayExecutor(Executor):
    """Runs on a Ray cluster, one Ray task per run (see the module's docstring).

    Args:
        address: the cluster (``ray://head:10001``, ``head:6379`` or ``auto``); None: the
            ``RAY_ADDRESS`` environment variable, else a Ray started here for the sweep. When
            Ray is already initialised in this process, that instance is used.
        jobs: runs in flight at once; default: the cluster's CPUs.
        cpus_per_run, gpus_per_run: override :func:`run_resources`.
        runtime_env: Ray's runtime environment for the workers (``pip``, ``env_vars``, ...).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        jobs: int | None = None,
        cpus_per_run: float | None = None,
        gpus_per_run: float | None = None,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        self.ray = import_ray()
        self.address, self.jobs = address, jobs
        self.cpus_per_run, self.gpus_per_run = cpus_per_run, gpus_per_run
        self.runtime_env = runtime_env
        self.slots = jobs or 1
        self.sizes: dict[tuple[str, str], int] = {}
        self._refs: dict[Any, WorkItem] = {}
        self._started = False
        self._remote: Any = None
        self._where = ""

    def start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    runtime_env=self.runtime_env,
                    include_dashboard=False,
                    log_to_driver=False,
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SweepError(f"--executor ray: cannot start or reach Ray ({first})") from None
            self._started = True
        self._remote = ray.remote(max_calls=0, max_retries=0)(run_in_ray_worker)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), resources.get("GPU", 0)
        self.slots = self.jobs or max(1, cpus)
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        self._where = (
            f"ray, {nodes} node(s) with {cpus} CPU(s) and {gpus:g} GPU(s), "
            f"{self.slots} run(s) in flight"
        )

    def describe(self) -> str:
        return self._where or f"ray, {self.slots} run(s) in flight"

    def submit(self, item: WorkItem) -> None:
        size = self.sizes.get((item.config.model, item.config.device))
        resources = run_resources(item.config.device, size, self.cpus_per_run, self.gpus_per_run)
        threads = max(1, int(resources["num_cpus"]))
        ref = self._remote.options(**resources).remote(item, threads)
        self._refs[ref] = item

    def wait(self, timeout: float) -> list[Outcome]:
        ray = self.ray
        if not self._refs:
            return []
        refs = list(self._refs)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # and every other run that is over by now
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        outcomes = []
        for ref in ready:
            item = self._refs.pop(ref)
            key = item.key
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # raised inside the task itself
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                outcome = Outcome(
                    key, error=f"{type(cause).__name__}: {_first(cause)}", retryable=True
                )
            except ray.exceptions.RayError as exc:  # the worker or its node died
                outcome = Outcome(
                    key,
                    error=f"{type(exc).__name__}: its Ray worker died ({_first(exc)})",
                    retryable=True,
                )
            if outcome.model_bytes is not None:  # later runs of this model declare its size
                self.sizes[(item.config.model, item.config.device)] = outcome.model_bytes
            outcomes.append(outcome)
        return outcomes

    def stop(self) -> int:
        abandoned = len(self._refs)
        for ref in self._refs:
            # A run that finished meanwhile cannot be cancelled: nothing to do then.
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        self._refs.clear()
        return abandoned

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
