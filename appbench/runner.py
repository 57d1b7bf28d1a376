"""The run: RunConfig -> load -> prune -> discover -> evaluate -> RunResult.

The runner owns measurement. It times each stage and counts what the model actually computed
through module hooks on the transformer blocks and the unembedding, so that partial passes
(runs that start or stop mid-network) are counted at their true cost and no plugin can
misreport its own.
"""

from __future__ import annotations

import datetime
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appbench import metrics
from appbench.checkpoint import DEFAULT_EVERY, Checkpoint, add_costs, checkpoint_path
from appbench.circuit import Circuit, Edge, Head, SearchSpace, graph_edges
from appbench.errors import RunError
from appbench.flags import baseline_differences, circuit_flags, edge_flags, reference_flags
from appbench.interfaces import Discoverer, Params, Pruner, RunContext
from appbench.results import (
    Faithfulness,
    Flag,
    Overlap,
    Provenance,
    Reference,
    ResultFileError,
    RunResult,
    Speedup,
    StageCost,
    ensure_writable,
    load_result,
    result_path,
)

#: The model `appbench run` uses when --model is not given and the task has no ground-truth
#: zoo model (see default_model).
DEFAULT_MODEL = "zoo-multitask"
DEFAULT_TASK = "ioi"
DEFAULT_OUT = Path("appbench-results")


def default_model(task: str) -> str:
    """The model a run of ``task`` uses when none is named: the one its task.yaml names
    (``default_model``, how a plugin task points at its own model), else the task's
    ground-truth zoo model ``zoo-gt-<task>`` where one is registered (its circuit is known, so
    overlap means something), otherwise the multitask zoo model, which runs every built-in task."""
    from appbench.plugins import get_registries

    regs = get_registries()
    if task in regs.tasks.names():
        declared = regs.tasks.get(task).spec.default_model
        if declared:
            return str(declared)
    ground_truth = f"zoo-gt-{task}"
    return ground_truth if ground_truth in regs.models.names() else DEFAULT_MODEL


#: Seeds a run accepts (the range of torch's and numpy's generators).
MAX_SEED = 2**32 - 1
#: Devices a run accepts: the ones a model can compute on (not "meta").
DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]+)?|mps)$"


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any model loads."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(f"device '{device}' is not available: torch sees no CUDA GPU here")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise RunError(
                f"device '{device}' is not available: torch sees {torch.cuda.device_count()} "
                "CUDA GPU(s)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise RunError("device 'mps' is not available on this machine")


class RunConfig(BaseModel):
    """Everything that defines a run."""

    model_config = ConfigDict(extra="forbid")

    pruner: str = Field(description="pruner name (`none` for the dense baseline)")
    discoverer: str = Field(description="discoverer name")
    task: str = Field(default=DEFAULT_TASK, description="task name")
    model: str = Field(
        description="registered model or TransformerLens name; default: default_model(task)"
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="prompt seed (0 to 2**32 - 1); default: the task's own",
    )
    device: str = Field(
        default="cpu",
        pattern=DEVICE_PATTERN,
        description="torch device: cpu, cuda, cuda:N or mps",
    )
    pruner_params: dict[str, Any] = Field(default_factory=dict, description="raw pruner parameters")
    discoverer_params: dict[str, Any] = Field(
        default_factory=dict, description="raw discoverer parameters"
    )
    n_search: int | None = Field(
        default=None, gt=0, description="search prompts; default: the task's"
    )
    n_eval: int | None = Field(
        default=None, gt=0, description="evaluation prompts; default: the task's"
    )
    out: Path = Field(default=DEFAULT_OUT, description="results folder")
    command: str = Field(default="", description="command line recorded in the provenance")
    overwrite: bool = Field(
        default=False,
        description="replace an earlier result of other parameters at the same path (without "
        "it such a run is refused before any work)",
    )
    checkpoint_every: float = Field(
        default=DEFAULT_EVERY,
        ge=0,
        allow_inf_nan=False,
        description="seconds between two checkpoints of a discoverer that saves them (ACDC)",
    )
    fresh: bool = Field(
        default=False,
        description="ignore the checkpoint an interrupted discovery left beside the result "
        "(without it the run goes on from there; see appbench.checkpoint)",
    )
    compute_reference: bool = Field(
        default=True,
        description="without a shipped reference circuit, compute the dense actpatch circuit "
        "(one activation-patching pass per head) to measure overlap against; false skips overlap",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_model(cls, data: Any) -> Any:
        """No model named (absent or None): the task's default model."""
        if isinstance(data, dict) and data.get("model") is None:
            data = {**data, "model": default_model(data.get("task") or DEFAULT_TASK)}
        return data


# ------------------------------------------------------------------ cost counting
@dataclass
class _Tally:
    calls: int = 0
    layer_rows: int = 0
    layer_tokens: int = 0
    flops: float = 0.0
    backward_prompt_passes: float = 0.0
    backward_flops: float = 0.0


class CostCounter:
    """Counts what a model actually computes, through module hooks (never through plugins).

    - ``calls``: calls into ``HookedTransformer.forward`` (full or partial runs);
    - ``layer_rows`` / ``layer_tokens``: attention-layer evaluations (batch rows, and rows x
      positions), so a run that starts or stops mid-network counts only the layers it ran;
    - ``flops``: analytic FLOPs (2 per multiply-add) of every attention layer, MLP and
      unembedding call, including MLPs run on their own by the patching engine;
    - backward passes (gradient methods such as EAP): when a gradient flows back through an
      attention layer, MLP or unembedding that ran with gradients, twice its forward FLOPs
      (the gradients with respect to its inputs and to its weights, the usual estimate), and
      the attention-layer rows it flowed through, as for forward passes.
    """

    def __init__(self, model: Any) -> None:
        from appbench.engine.fused import mlp_flops_per_token  # imports torch: not at CLI start

        cfg = model.cfg
        self.n_layers = int(cfg.n_layers)
        self.tally = _Tally()
        d_model, n_heads, d_head = int(cfg.d_model), int(cfg.n_heads), int(cfg.d_head)
        n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
        self._proj_per_token = 2 * d_model * d_head * (2 * n_heads + 2 * n_kv)
        self._mlp_per_token = mlp_flops_per_token(cfg)
        self._attn_per_pair = 2 * 2 * n_heads * d_head
        self._unembed_per_token = 2 * d_model * int(cfg.d_vocab_out)
        self._handles = [model.register_forward_pre_hook(self._on_call)]
        for block in model.blocks:
            self._handles.append(block.attn.hook_z.register_forward_hook(self._on_attention))
            if hasattr(block, "mlp"):
                self._handles.append(block.mlp.register_forward_pre_hook(self._on_mlp))
        self._handles.append(model.unembed.register_forward_pre_hook(self._on_unembed))

    def _on_call(self, module: Any, args: tuple[Any, ...]) -> None:
        self.tally.calls += 1

    def _on_attention(self, module: Any, args: tuple[Any, ...], z: Any) -> None:
        rows, length = int(z.shape[0]), int(z.shape[1])
        self.tally.layer_rows += rows
        self.tally.layer_tokens += rows * length
        # TransformerLens computes every query-key pair and masks afterwards, so T² pairs ran.
        flops = rows * length * (self._proj_per_token + length * self._attn_per_pair)
        self.tally.flops += flops
        self._on_backward(z, flops, rows)

    def _on_mlp(self, module: Any, args: tuple[Any, ...]) -> None:
        flops = args[0].shape[:-1].numel() * self._mlp_per_token
        self.tally.flops += flops
        self._on_backward(args[0], flops)

    def _on_unembed(self, module: Any, args: tuple[Any, ...]) -> None:
        flops = args[0].shape[:-1].numel() * self._unembed_per_token
        self.tally.flops += flops
        self._on_backward(args[0], flops)

    def _on_backward(self, tensor: Any, forward_flops: float, rows: int = 0) -> None:
        """Count the backward pass through a module when a gradient reaches ``tensor``."""
        if not getattr(tensor, "requires_grad", False):
            return

        def counted(grad: Any) -> None:
            self.tally.backward_flops += 2 * forward_flops
            self.tally.backward_prompt_passes += rows / self.n_layers

        tensor.register_hook(counted)

    def snapshot(self) -> _Tally:
        t = self.tally
        return _Tally(
            t.calls,
            t.layer_rows,
            t.layer_tokens,
            t.flops,
            t.backward_prompt_passes,
            t.backward_flops,
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class StageMeter:
    """The counters of a stage from its start: :meth:`cost` reads them at any time (a
    checkpoint saves the cost so far; :func:`measure` records it at the end)."""

    def __init__(
        self,
        counter: CostCounter | None,
        device: str,
        extra_flops: Callable[[], float] = lambda: 0.0,
        nested: bool = False,
    ) -> None:
        import torch

        self._counter, self._extra_flops = counter, extra_flops
        self._cuda = device.startswith("cuda") and torch.cuda.is_available()
        if self._cuda:
            torch.cuda.synchronize()
            if not nested:
                torch.cuda.reset_peak_memory_stats()
        self._before = counter.snapshot() if counter else _Tally()
        self._extra_before = extra_flops()
        self._started = time.perf_counter()

    def cost(self) -> StageCost:
        """What the stage cost up to now."""
        import torch

        if self._cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._started
        counter, before = self._counter, self._before
        after = counter.snapshot() if counter else _Tally()
        n_layers = counter.n_layers if counter else 1
        return StageCost(
            wall_seconds=wall,
            forward_calls=after.calls - before.calls,
            prompt_passes=(after.layer_rows - before.layer_rows) / n_layers,
            tokens=(after.layer_tokens - before.layer_tokens) / n_layers,
            flops=after.flops
            - before.flops
            + after.backward_flops
            - before.backward_flops
            + self._extra_flops()
            - self._extra_before,
            backward_prompt_passes=after.backward_prompt_passes - before.backward_prompt_passes,
            peak_rss_bytes=_peak_rss_bytes(),
            peak_gpu_bytes=int(torch.cuda.max_memory_allocated()) if self._cuda else None,
        )


@contextmanager
def measure(
    counter: CostCounter | None,
    device: str,
    sink: dict[str, StageCost],
    stage: str,
    extra_flops: Callable[[], float] = lambda: 0.0,
    nested: bool = False,
) -> Iterator[StageMeter]:
    """Time a stage and record its counters into ``sink[stage]``.

    ``nested`` measures a part inside a stage being measured: the CUDA peak is then left alone
    (resetting it would lose the enclosing stage's peak).
    """
    meter = StageMeter(counter, device, extra_flops, nested)
    yield meter
    sink[stage] = meter.cost()


# ---------------------------------------------------------------------- the run
def parse_params(cls: type[Pruner] | type[Discoverer], raw: dict[str, Any]) -> Params:
    """Validate raw (string) parameters against a plugin's Params; one-line RunError otherwise."""
    try:
        return cls.Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
            for err in exc.errors()
        )
        known = ", ".join(cls.Params.model_fields) or "(none)"
        raise RunError(f"bad parameters for {cls.name}: {problems} (known: {known})") from None


def evaluate_circuits(ctx: RunContext, circuits: Sequence[frozenset[Head]]) -> list[Faithfulness]:
    """Faithfulness of each head set on the evaluation split (per-template corrupted means),
    all in one batched pass together with the full model and the empty circuit."""
    import torch

    from appbench.engine.chunks import auto_batch_size, chunked_ablated_metric, corrupt_group_means

    engine, data = ctx.engine, ctx.evaluation
    batch = auto_batch_size(ctx.model, data, 4)  # a chunk of prompts at a time
    means = corrupt_group_means(engine, data, batch)
    keep = torch.zeros(2 + len(circuits), ctx.n_layers, ctx.n_heads, dtype=torch.bool)
    keep[0] = True  # the full model: nothing ablated
    for row, heads in enumerate(circuits, start=2):
        for head in heads:
            keep[row, head.layer, head.head] = True
    per_prompt = chunked_ablated_metric(engine, data, keep, means, batch).double()
    values = per_prompt.mean(dim=1).tolist()
    rows = per_prompt.tolist()  # kept per prompt: bootstrap intervals over prompts need them
    return [
        Faithfulness(
            **metrics.faithfulness(values[0], values[1], value).to_dict(),  # type: ignore[arg-type]
            ablation="hook_z of every head outside the circuit replaced, at all positions, by "
            "its per-template, per-position mean over the evaluation split's corrupted prompts",
            per_prompt_model=rows[0],
            per_prompt_empty=rows[1],
            per_prompt_circuit=row,
        )
        for value, row in zip(values[2:], rows[2:], strict=True)
    ]


def evaluate_edge_circuit(ctx: RunContext, circuit: Circuit, node: Faithfulness) -> Faithfulness:
    """Faithfulness of ``circuit``'s edges: as the node circuit's (same m(M) and m(∅)), with the
    edges between its nodes that it leaves out patched too; in the full graph MLPs and the input
    outside the circuit are ablated as heads are. Run a chunk of prompts at a time."""
    from appbench.engine.acdc import edge_circuit_metric
    from appbench.engine.chunks import auto_batch_size, corrupt_hook_means, prompt_chunks

    data, n_layers = ctx.evaluation, ctx.n_layers
    full = circuit.graph == "full"
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    other = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)
    ]
    if not full or getattr(ctx.model.cfg, "attn_only", False):
        other = other[:1] if full else []
    batch = auto_batch_size(ctx.model, data, 4)
    means = corrupt_hook_means(ctx.model, data, z_names + other, batch)
    total = 0.0
    for chunk in prompt_chunks(data, batch):
        groups = chunk.groups.to(means[z_names[0]].device)
        value = edge_circuit_metric(
            ctx.model,
            ctx.task,
            chunk,
            circuit.edges,
            [means[name][groups] for name in z_names],
            full=full,
            source_mlp=[means[name][groups] for name in other[1:]],
            source_embed=means[other[0]][groups] if full else None,
        )
        total += value * len(chunk)
    value = total / len(data)
    what = "node" if full else "head"
    return Faithfulness(
        **metrics.faithfulness(node.m_model, node.m_empty, value).to_dict(),  # type: ignore[arg-type]
        ablation=f"every {what} outside the circuit replaced by its per-template, per-position "
        f"mean over the corrupted prompts, and every edge between circuit {what}s that is not in "
        "the circuit patched to its sender's ablated output (the receiver's own input)",
    )


def graph_config(cfg: Any) -> dict[str, Any]:
    """A model's shape as the EAP-IG / MIB graph file records it."""
    return {
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "d_model": int(cfg.d_model),
        "attn_only": bool(getattr(cfg, "attn_only", False)),
        "parallel_attn_mlp": bool(getattr(cfg, "parallel_attn_mlp", False)),
    }


def evaluate_circuit(ctx: RunContext, heads: frozenset[Head]) -> Faithfulness:
    """Faithfulness of ``heads`` on the evaluation split (per-template corrupted means)."""
    return evaluate_circuits(ctx, [heads])[0]


def shipped_reference(task: Any, model_name: str) -> Reference | None:
    """The task's shipped default reference circuit for the model (or its TransformerLens
    official name), checked against nothing but its own file; None when there is none."""
    shipped = task.reference(model_name)
    if shipped is None:
        official = _official_name(model_name)
        shipped = task.reference(official) if official else None
    if shipped is None:
        return None
    key, ref = shipped
    return Reference(
        source=f"{task.name}/reference/{model_name}.json#{key} v{ref.version}: {ref.source} ({ref.method})",
        heads=sorted(ref.heads, key=Head.parse),
        edges=sorted(ref.edges),
        kind=ref.kind,
    )


def _sweep_auc(
    runs: Sequence[Sequence[str]], reference: Sequence[str], universe: Sequence[str]
) -> float | None:
    """ACDC's pessimistic AUC of a threshold sweep's found sets; None when no ROC exists (the
    reference empty or everything)."""
    if not reference or set(reference) == set(universe):
        return None
    return metrics.pessimistic_auc(metrics.roc_point(run, reference, universe) for run in runs)


def _edge_and_score_overlap(circuit: Circuit, reference: Reference) -> dict[str, Any]:
    """Edge-level overlap, score-sweep AUROCs and threshold-sweep AUCs, where the circuit and
    reference allow them."""
    every_head = [
        Head(layer, h).id for layer in range(circuit.n_layers) for h in range(circuit.n_heads)
    ]
    found: dict[str, Any] = {
        "head_auroc": metrics.score_auroc(circuit.scores, reference.heads, every_head)
        if circuit.scores
        else None
    }
    # A reference on the head graph (every edge between heads, as path patching and the
    # ground-truth cards give them) is compared with the circuit's edges on that graph: a
    # full-graph circuit's input and MLP edges have no counterpart in it.
    on_heads = all(Edge.parse(e).between_heads for e in reference.edges)
    edge_ids = {e.id for e in circuit.edges if e.between_heads or not on_heads}
    if circuit.edges and reference.edges:
        edges = metrics.overlap_sets(edge_ids, set(reference.edges))
        found |= {"edge_precision": edges[0], "edge_recall": edges[1], "edge_f1": edges[2]}
    if circuit.edge_scores and reference.edges:
        scored = {
            e: s
            for e, s in circuit.edge_scores.items()
            if not on_heads or Edge.parse(e).between_heads
        }
        found["edge_auroc"] = metrics.score_auroc(scored, reference.edges, scored)
    sweep = circuit.details.get("threshold_sweep")
    if sweep:
        found["head_sweep_auc"] = _sweep_auc(
            [run["heads"] for run in sweep], reference.heads, every_head
        )
        if reference.edges:
            universe = [
                e.id
                for e in graph_edges(circuit.n_layers, circuit.n_heads)
                if e.between_heads or not on_heads
            ]
            found["edge_sweep_auc"] = _sweep_auc(
                [[e for e in run["edges"] if e in set(universe)] for run in sweep],
                reference.edges,
                universe,
            )
    return found


def _reference(
    ctx: RunContext, cfg: RunConfig, circuit: Circuit, log: Callable[[str], None] = lambda _: None
) -> Reference | None:
    """The shipped reference circuit, else the dense `actpatch` circuit computed here."""
    shipped = shipped_reference(ctx.task, cfg.model)
    if shipped is not None:
        return shipped
    if not cfg.compute_reference:
        log("no shipped reference circuit for this model; overlap skipped (--no-reference)")
        return None
    from appbench.plugins import get_registries

    log("no shipped reference circuit: computing the dense actpatch circuit")
    discoverers = get_registries().discoverers
    if "actpatch" not in discoverers:
        return None
    source = "dense actpatch circuit (default parameters) on the search split, computed in this run"
    if cfg.pruner == "none" and cfg.discoverer == "actpatch" and not cfg.discoverer_params:
        return Reference(source=source, heads=[h.id for h in circuit.sorted_heads()])
    actpatch = discoverers.get("actpatch")
    dense = SearchSpace.dense(ctx.n_layers, ctx.n_heads)
    reference = actpatch().discover(ctx, dense, actpatch.Params())
    return Reference(source=source, heads=[h.id for h in reference.sorted_heads()])


def _official_name(name: str) -> str | None:
    """TransformerLens's official name for an alias (gpt2-small -> gpt2), if it has one."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        return str(get_official_model_name(name))
    except (ValueError, ImportError):
        return None


@dataclass(frozen=True)
class Baseline:
    """The dense run (``none__<discoverer>.json``) a pruned run's speedup is measured against.

    :func:`run` reads it beside its own result file when the run ends; a sweep's driver reads
    it and hands it to a worker, which may be on a machine without the results folder.

    Attributes:
        path: the dense run's result file, as the speedup records it.
        result: the dense run, or None when the file is not a readable result.
        problem: why it is not (one line), flagged as ``speedup-refused``.
    """

    path: str
    result: RunResult | None
    problem: str | None = None

    @classmethod
    def read(cls, path: Path) -> Baseline:
        """The dense run in ``path`` (unreadable: ``result`` None and the reason)."""
        try:
            return cls(str(path), load_result(path))
        except ResultFileError as exc:
            return cls(str(path), None, str(exc))

    @classmethod
    def beside(cls, path: Path, discoverer: str) -> Baseline | None:
        """The dense run of ``discoverer`` in the folder of result ``path``, if it has one."""
        base = path.with_name(f"none__{discoverer}.json")
        return cls.read(base) if base.is_file() else None


def _speedup(
    run: dict[str, Any],
    cost: dict[str, StageCost],
    baseline: Baseline | None,
    flag: Callable[[str, str], None],
) -> Speedup | None:
    """Compare with the dense run ``baseline``; refused, with a flag naming every difference,
    when that run is not the same search without pruning (other prompts, seed, discoverer
    parameters, task or code version)."""
    if run["pruner"] == "none" or baseline is None:
        return None
    base_path, base = baseline.path, baseline.result
    if base is None:
        flag("speedup-refused", f"no speedup: {baseline.problem}")
        return None
    differences = baseline_differences(run, base)
    if differences:
        flag(
            "speedup-refused",
            f"no speedup: the dense run {base_path} differs in " + "; ".join(differences),
        )
        return None

    def total(c: dict[str, StageCost], field: str) -> float:
        return float(getattr(c["prune"], field) + getattr(c["discover"], field))

    wall = metrics.speedup(total(base.cost, "wall_seconds"), total(cost, "wall_seconds"))
    return Speedup(
        baseline=base_path,
        wall_ratio=wall.ratio,
        wall_percent=wall.percent,
        prompt_passes_ratio=metrics.speedup(
            total(base.cost, "prompt_passes"), total(cost, "prompt_passes")
        ).ratio,
        flops_ratio=metrics.speedup(total(base.cost, "flops"), total(cost, "flops")).ratio,
        discover_wall_ratio=metrics.speedup(
            base.cost["discover"].wall_seconds, cost["discover"].wall_seconds
        ).ratio,
        discover_flops_ratio=metrics.speedup(
            base.cost["discover"].flops, cost["discover"].flops
        ).ratio,
        prune_wall_seconds=cost["prune"].wall_seconds,
        prune_flops=cost["prune"].flops,
        saved_discover_wall_seconds=base.cost["discover"].wall_seconds
        - cost["discover"].wall_seconds,
        saved_discover_flops=base.cost["discover"].flops - cost["discover"].flops,
    )


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _hardware(device: str) -> str:
    """The machine in words, for the leaderboard's statement of what the numbers ran on:
    "<CPU model>, <n> logical cores" and, for a CUDA run, the GPU's name."""
    import os

    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    described = f"{cpu}, {os.cpu_count() or '?'} logical cores"
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = int(device.partition(":")[2] or 0)
            described += f"; GPU {torch.cuda.get_device_name(index)}"
    return described


def _library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "transformer-lens", "transformers", "pluggy", "pydantic", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class Resolved:
    """A run's plugins, validated parameters, task and seed: everything checked before any
    model loads (see :func:`resolve`)."""

    pruner: type[Pruner]
    pruner_params: Params
    discoverer: type[Discoverer]
    discoverer_params: Params
    task: Any
    seed: int

    def settings(self, cfg: RunConfig) -> dict[str, Any]:
        """The settings a rerun at the same path must share (see :func:`check_output`)."""
        return {
            "pruner_params": self.pruner_params.model_dump(mode="json"),
            "discoverer_params": self.discoverer_params.model_dump(mode="json"),
            "seed": self.seed,
            "device": cfg.device,
            **({"n_search": cfg.n_search} if cfg.n_search is not None else {}),
            **({"n_eval": cfg.n_eval} if cfg.n_eval is not None else {}),
        }


def resolve(cfg: RunConfig) -> Resolved:
    """Validate a run before any work: plugin and task names, parameters, the device, and the
    task's shipped reference file for the model (a broken one fails here)."""
    from appbench.plugins import get_registries

    regs = get_registries()
    pruner_cls = regs.pruners.get(cfg.pruner)
    discoverer_cls = regs.discoverers.get(cfg.discoverer)
    task = regs.tasks.get(cfg.task)
    resolved = Resolved(
        pruner_cls,
        parse_params(pruner_cls, cfg.pruner_params),
        discoverer_cls,
        parse_params(discoverer_cls, cfg.discoverer_params),
        task,
        task.spec.seed if cfg.seed is None else cfg.seed,
    )
    check_device(cfg.device)
    shipped_reference(task, cfg.model)
    return resolved


def check_output(cfg: RunConfig, path: Path, settings: dict[str, Any]) -> None:
    """Before any work: the result's folder can be written, and a result already at ``path``
    is of the same ``settings`` (a rerun), unless ``cfg.overwrite``. A file there that is not
    a readable result holds nothing to lose and is replaced."""
    folder = path.parent
    try:
        ensure_writable(folder)
    except OSError as exc:
        raise RunError(
            f"--out {cfg.out}: cannot write results in {folder} ({exc.strerror or exc})"
        ) from None
    if cfg.overwrite or not path.exists():
        return
    try:
        earlier = load_result(path)
    except ResultFileError:
        return
    differ = [
        f"{key} {getattr(earlier, key)!r} there, {value!r} now"
        for key, value in settings.items()
        if getattr(earlier, key) != value
    ]
    if differ:
        raise RunError(
            f"{path} holds a run with other settings ({'; '.join(differ)}): pass --overwrite "
            "to replace it, or give another --out"
        )


#: Loads a model by name onto a device, as :func:`appbench.models.load_model` does; a sweep's
#: worker passes one that keeps the models it loaded before.
ModelLoader = Callable[[str, str], Any]


def run(
    cfg: RunConfig,
    log: Callable[[str], None] = lambda _: None,
    *,
    load: ModelLoader | None = None,
) -> tuple[RunResult, Path]:
    """Run one pruner x discoverer combination end to end; returns the result and its file.

    Names and parameters are validated, and the output checked (:func:`check_output`), before
    the model is loaded, so bad input fails fast. The work is :func:`execute`; the result is
    written by :func:`save_result`, the speedup measured against the dense run beside it. A
    discoverer that saves checkpoints keeps them beside the result until it is written, and a
    run interrupted before that goes on from the last one (unless ``cfg.fresh``).

    Args:
        cfg: the run.
        log: progress lines.
        load: loads the model (default :func:`appbench.models.load_model`); it must return a
            model no earlier run changed (runs remove their hooks and never train).
    """
    resolved = resolve(cfg)
    path = result_path(cfg.out, cfg.task, cfg.model, cfg.pruner, cfg.discoverer)
    check_output(cfg, path, resolved.settings(cfg))
    result = execute(
        cfg,
        log,
        resolved=resolved,
        load=load,
        baseline=lambda: Baseline.beside(path, cfg.discoverer),
        checkpoint=checkpoint_path(path),
    )
    save_result(result, path, log)
    checkpoint_path(path).unlink(missing_ok=True)
    return result, path


def _checkpoint_key(
    cfg: RunConfig, resolved: Resolved, search_sha256: str, space: SearchSpace
) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it: the run's settings, the
    search split and space it searched, and the versions whose decisions it holds."""
    return {
        "task": cfg.task,
        "task_version": resolved.task.spec.version,
        "model": cfg.model,
        "pruner": cfg.pruner,
        "discoverer": cfg.discoverer,
        **resolved.settings(cfg),
        "search_sha256": search_sha256,
        "search_space": sorted(h.id for h in space.heads),
        "appbench_version": metadata.version("appbench"),
    }


def save_result(result: RunResult, path: Path, log: Callable[[str], None] = lambda _: None) -> None:
    """Write ``result`` to ``path`` atomically, then call the ``appbench_run_finished`` hooks
    (a hook that fails is logged: it never loses the saved result)."""
    from appbench.plugins import get_plugin_manager

    result.save(path)
    for impl in get_plugin_manager().hook.appbench_run_finished.get_hookimpls():
        try:
            impl.function(result=result)
        except Exception as exc:  # a logger must never lose a saved result
            log(f"warning: appbench_run_finished hook of {impl.plugin_name} failed: {exc}")


def execute(
    cfg: RunConfig,
    log: Callable[[str], None] = lambda _: None,
    *,
    resolved: Resolved | None = None,
    load: ModelLoader | None = None,
    baseline: Baseline | Callable[[], Baseline | None] | None = None,
    checkpoint: Path | None = None,
) -> RunResult:
    """The work of a run, writing nothing but the discoverer's checkpoints: load, prune,
    discover, evaluate.

    Conditions that make a number meaningless (an empty circuit, an unfaithful reference, a
    refused speedup, ...) are recorded as flags in the result and logged as warnings.

    Args:
        cfg: the run (``out`` and ``overwrite`` are not read: writing is the caller's).
        log: progress lines.
        resolved: ``resolve(cfg)``, when the caller has it already.
        load: loads the model (default :func:`appbench.models.load_model`).
        baseline: the dense run to measure the speedup against, or a function called when
            the run ends that returns it; none: no speedup.
        checkpoint: the file a discoverer that supports it saves its progress to (and resumes
            from, unless ``cfg.fresh``; the caller removes it once the result is saved); none:
            no checkpoints (``cfg.checkpoint_every`` apart).
    """
    import torch

    from appbench.engine.patching import PatchingEngine
    from appbench.models import load_model
    from appbench.plugins import plugin_infos

    # The commit of the code that runs, read now: a long run can outlive a checkout of its tree.
    git_commit = _git_commit()
    resolved = resolved or resolve(cfg)
    pruner_cls, pruner_params = resolved.pruner, resolved.pruner_params
    discoverer_cls, discoverer_params = resolved.discoverer, resolved.discoverer_params
    task, seed = resolved.task, resolved.seed
    load = load or load_model
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {cfg.device!r} requested but CUDA is not available")
    cost: dict[str, StageCost] = {}
    flags: list[Flag] = []

    def flag(code: str, message: str) -> None:
        flags.append(Flag(code=code, message=message))
        log(f"warning: {message}")

    log(f"loading model {cfg.model} on {cfg.device}")
    with measure(None, cfg.device, cost, "load"):
        model = load(cfg.model, cfg.device)
        if getattr(model, "tokenizer", None) is None:
            raise RunError(f"model {cfg.model!r} has no tokenizer; tasks need one to build prompts")
        search, evaluation = task.splits(model.tokenizer, cfg.n_search, cfg.n_eval, seed)
        search, evaluation = search.to(cfg.device), evaluation.to(cfg.device)
    torch.manual_seed(seed)
    engine = PatchingEngine(model, task)
    counter = CostCounter(model)
    stage = {"name": ""}

    @contextmanager
    def part(name: str) -> Iterator[None]:
        with measure(
            counter,
            cfg.device,
            cost,
            f"{stage['name']}.{name}",
            lambda: engine.extra_flops,
            nested=True,
        ):
            yield

    ctx = RunContext(
        model, cfg.model, task, search, evaluation, cfg.device, seed, engine, log, flag, part
    )

    def timed(name: str) -> Any:
        stage["name"] = name
        return measure(counter, cfg.device, cost, name, lambda: engine.extra_flops)

    try:
        log(f"pruning with {cfg.pruner}")
        with timed("prune"):
            space = pruner_cls().prune(ctx, pruner_params)
        if not isinstance(space, SearchSpace) or (space.n_layers, space.n_heads) != (
            ctx.n_layers,
            ctx.n_heads,
        ):
            raise RunError(
                f"pruner {cfg.pruner} returned {type(space).__name__}, not a SearchSpace of this model"
            )
        log(
            f"search space: {len(space)}/{space.total_heads} heads; discovering with {cfg.discoverer}"
        )
        with timed("discover") as meter:
            saver = Checkpoint(
                checkpoint,
                _checkpoint_key(cfg, resolved, search.fingerprint(), space),
                meter.cost,
                log,
                cfg.checkpoint_every,
                cfg.fresh,
            )
            circuit = discoverer_cls().discover(
                replace(ctx, checkpoint=saver), space, discoverer_params
            )
        if saver.prior is not None:
            cost["discover"] = add_costs(saver.prior, cost["discover"])
        if not isinstance(circuit, Circuit):
            raise RunError(
                f"discoverer {cfg.discoverer} returned {type(circuit).__name__}, not a Circuit"
            )
        outside = sorted(circuit.heads - space.heads)
        if outside:
            raise RunError(
                f"discoverer {cfg.discoverer} returned heads outside the search space: "
                + ", ".join(h.id for h in outside[:5])
            )
        stage["name"] = "reference"
        reference = _reference(ctx, cfg, circuit, log)
        reference_heads = (
            frozenset(Head.parse(h) for h in reference.heads) if reference is not None else None
        )
        log(f"circuit: {len(circuit)} heads; evaluating on {len(evaluation)} held-out prompts")
        with timed("evaluate"):
            evaluated = [circuit.heads] + ([reference_heads] if reference_heads is not None else [])
            faith, *reference_faith = evaluate_circuits(ctx, evaluated)
            edge_faith = evaluate_edge_circuit(ctx, circuit, faith) if circuit.edges else None
    finally:
        counter.remove()
    ov = None
    if reference is not None and reference_heads is not None:
        reference = reference.model_copy(update={"faithfulness": reference_faith[0].normalised})
        ov = Overlap.model_validate(
            metrics.overlap(circuit.heads, reference_heads).to_dict()
            | _edge_and_score_overlap(circuit, reference)
        )
    if saver.prior is not None:
        flag(
            "resumed",
            f"discovery resumed from a checkpoint after {saver.segments} interruption(s): its "
            f"cost is summed over {saver.segments + 1} segments ({cost['discover'].wall_seconds:.0f} s "
            "in all, which may have run under different loads; the pruner ran again in each "
            "and is counted once)",
        )
    for found in [
        *circuit_flags(len(circuit), faith, len(evaluation)),
        *edge_flags(len(circuit.edges), edge_faith),
        *reference_flags(reference),
    ]:
        flag(found.code, found.message)

    provenance = Provenance(
        appbench_version=metadata.version("appbench"),
        git_commit=git_commit,
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=cfg.command,
        python=platform.python_version(),
        libraries=_library_versions(),
        plugins=[info.__dict__ for info in plugin_infos()],
        task_version=task.spec.version,
        model_source=str(getattr(model.cfg, "model_name", cfg.model)),
        hardware=_hardware(cfg.device),
    )
    fields: dict[str, Any] = {
        "task": cfg.task,
        "model": cfg.model,
        "pruner": cfg.pruner,
        "discoverer": cfg.discoverer,
        "pruner_params": pruner_params.model_dump(mode="json"),
        "discoverer_params": discoverer_params.model_dump(mode="json"),
        "seed": seed,
        "device": cfg.device,
        "n_search": len(search),
        "n_eval": len(evaluation),
        "search_sha256": search.fingerprint(),
    }
    speedup = _speedup(
        {
            **fields,
            "task_version": provenance.task_version,
            "appbench_version": provenance.appbench_version,
            "git_commit": provenance.git_commit,
        },
        cost,
        baseline() if callable(baseline) else baseline,
        flag,
    )
    return RunResult(
        **fields,
        graph_config=graph_config(ctx.model.cfg),
        n_layers=ctx.n_layers,
        n_heads=ctx.n_heads,
        total_heads=space.total_heads,
        search_space=space.to_dict(),
        circuit=circuit.to_dict(),
        search_space_size=len(space),
        circuit_size=len(circuit),
        reduction=metrics.reduction(len(space), space.total_heads),
        faithfulness=faith,
        edge_faithfulness=edge_faith,
        reference=reference,
        overlap=ov,
        cost=cost,
        speedup=speedup,
        flags=flags,
        provenance=provenance,
    )
