"""RunResult: the record of one run, written as JSON; the path convention of result folders."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 2


class StageCost(BaseModel):
    """What one stage of a run cost, measured by the runner (never by plugins)."""

    model_config = ConfigDict(extra="forbid")

    wall_seconds: float = Field(description="wall-clock time of the stage")
    forward_calls: int = Field(description="calls into the model's forward (full or partial runs)")
    prompt_passes: float = Field(
        description="full-forward-pass equivalents over single prompts: attention-layer evaluations "
        "(batch rows summed over layers run) divided by the number of layers"
    )
    tokens: float = Field(description="token positions processed, in full-pass equivalents")
    flops: float = Field(
        description="analytic FLOPs of what actually ran (2 per multiply-add; attention projections, "
        "all T² attention scores and weighted sums, MLPs and unembedding; layer norms, softmax and "
        "other elementwise operations excluded), the count torch.utils.flop_counter makes; "
        "backward passes included (see backward_prompt_passes)"
    )
    backward_prompt_passes: float = Field(
        default=0.0,
        description="backward-pass equivalents over single prompts (gradient methods), counted "
        "like prompt_passes; their FLOPs, twice the forward FLOPs of what they flowed through, "
        "are included in flops",
    )
    peak_rss_bytes: int = Field(
        description="peak resident memory of the process at the end of the stage"
    )
    peak_gpu_bytes: int | None = Field(
        default=None, description="peak CUDA memory allocated during the stage"
    )


class Reference(BaseModel):
    """The circuit overlap is measured against, and where it comes from."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="shipped reference file, or how it was computed in this run")
    heads: list[str] = Field(description="head ids of the reference circuit")
    edges: list[str] = Field(
        default_factory=list, description="edges of the reference circuit, when it has them"
    )
    kind: str = Field(
        default="method-derived",
        description="'ground-truth' (built into the model, verified by ablation) or "
        "'method-derived' (the output of a discovery method)",
    )
    faithfulness: float | None = Field(
        default=None,
        description="normalised faithfulness (m(R)−m(∅))/(m(M)−m(∅)) of the reference itself on "
        "this run's evaluation split, with the same ablation as the circuit's",
    )


class Faithfulness(BaseModel):
    """Faithfulness on the evaluation split with non-circuit heads mean-ablated (METRICS.md 4.1, 4.2)."""

    model_config = ConfigDict(extra="forbid")

    m_model: float = Field(description="m(M): mean metric of the full model on clean prompts")
    m_empty: float = Field(description="m(∅): mean metric with every head mean-ablated")
    m_circuit: float = Field(
        description="m(C): mean metric with heads outside the circuit mean-ablated"
    )
    percent: float | None = Field(description="100·m(C)/m(M) (APP's 'performance')")
    normalised: float | None = Field(
        description="(m(C)−m(∅))/(m(M)−m(∅)), raw, unclamped (ratio of means)"
    )
    degenerate: bool = Field(description="|m(M)−m(∅)| < 1e-6: the normalised score is meaningless")
    inverted: bool = Field(description="m(M) < m(∅)")
    ablation: str = Field(description="how non-circuit heads were ablated")
    per_prompt_model: list[float] | None = Field(
        default=None,
        description="the metric of the full model on each evaluation prompt, in the split's "
        "order; m_model is their mean. None in results written before appbench recorded them, "
        "and for edge faithfulness (computed a chunk of prompts at a time)",
    )
    per_prompt_empty: list[float] | None = Field(
        default=None,
        description="the metric with every head mean-ablated, per evaluation prompt (mean: m_empty)",
    )
    per_prompt_circuit: list[float] | None = Field(
        default=None,
        description="the metric with the heads outside the circuit mean-ablated, per evaluation "
        "prompt (mean: m_circuit). With the other two lists it gives bootstrap intervals over "
        "prompts of both faithfulness scores, resampling the same prompts for all three",
    )


class Overlap(BaseModel):
    """Overlap of the circuit with the reference (head sets)."""

    model_config = ConfigDict(extra="forbid")

    precision: float = Field(description="|C∩R|/|C|")
    recall: float = Field(description="|C∩R|/|R| (APP's TPR)")
    f1: float = Field(description="harmonic mean of precision and recall")
    iou: float = Field(description="|C∩R|/|C∪R|")
    intersection: int = Field(description="|C∩R|")
    circuit_size: int = Field(description="|C|")
    reference_size: int = Field(description="|R|")
    edge_precision: float | None = Field(
        default=None,
        description="edge level, |C∩R|/|C| over edges; None unless both the circuit and the "
        "reference have edges. Against a reference on the head graph only the circuit's edges "
        "between heads (and into the logits) are compared",
    )
    edge_recall: float | None = Field(default=None, description="edge level, |C∩R|/|R|")
    edge_f1: float | None = Field(default=None, description="edge level, F1")
    head_auroc: float | None = Field(
        default=None,
        description="score-sweep AUROC of the circuit's per-head |scores| against the reference "
        "heads, every head of the model ranked (unscored heads score 0); None without scores",
    )
    edge_auroc: float | None = Field(
        default=None,
        description="score-sweep AUROC of the circuit's per-edge |scores| against the reference "
        "edges; None unless both exist. Not ACDC's threshold-sweep AUC (METRICS.md 4.4)",
    )
    head_sweep_auc: float | None = Field(
        default=None,
        description="ACDC's threshold-sweep pessimistic step AUC (METRICS.md 4.4) of the "
        "circuit's per-tau head sets against the reference heads, every head of the model "
        "counted; None without a threshold sweep. Not the score-sweep AUROC: not comparable",
    )
    edge_sweep_auc: float | None = Field(
        default=None,
        description="ACDC's threshold-sweep pessimistic step AUC (METRICS.md 4.4) of the "
        "circuit's per-tau edge sets against the reference edges, every head -> later head q/k/v "
        "and head -> logits edge counted; None unless both exist. Not the score-sweep AUROC",
    )


class Flag(BaseModel):
    """A reason not to take a result at face value (an empty circuit, an unfaithful reference,
    a refused speedup, ...). Printed with the table and kept in the result file."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="stable identifier, e.g. 'empty-circuit'")
    message: str = Field(description="one line saying what is wrong, with the numbers")


class Speedup(BaseModel):
    """Cost of this run against the matching dense (`--pruner none`) run of the same discoverer.

    Ratios below 1 mean this run was slower than the dense one.
    """

    model_config = ConfigDict(extra="forbid")

    baseline: str = Field(description="the dense run's result file")
    wall_ratio: float = Field(description="baseline prune+discover wall time / this run's")
    wall_percent: float = Field(description="APP's speed-up %: 100·(1 − new/base), wall time")
    prompt_passes_ratio: float = Field(
        description="baseline prune+discover prompt passes / this run's"
    )
    flops_ratio: float = Field(description="baseline prune+discover FLOPs / this run's")
    discover_wall_ratio: float = Field(description="discovery stage alone, wall time ratio")
    discover_flops_ratio: float = Field(description="discovery stage alone, FLOPs ratio")
    prune_wall_seconds: float = Field(description="this run's pruning wall time (what it paid)")
    prune_flops: float = Field(description="this run's pruning FLOPs (what it paid)")
    saved_discover_wall_seconds: float = Field(
        description="dense discovery wall time minus this run's (what pruning saved)"
    )
    saved_discover_flops: float = Field(
        description="dense discovery FLOPs minus this run's (what pruning saved)"
    )


class Provenance(BaseModel):
    """Everything needed to trace a number back to code, data and settings."""

    model_config = ConfigDict(extra="forbid")

    appbench_version: str = Field(description="appbench package version")
    git_commit: str | None = Field(description="git commit of the appbench checkout, if any")
    created_at: str = Field(description="UTC time the run finished (ISO 8601)")
    command: str = Field(description="the command line that produced the run")
    python: str = Field(description="Python version")
    libraries: dict[str, str] = Field(description="versions of torch, transformer-lens and friends")
    plugins: list[dict[str, str]] = Field(
        description="loaded plugins: name, module, distribution, version"
    )
    task_version: str = Field(description="version from the task's task.yaml")
    model_source: str = Field(description="how the model was loaded")
    hardware: str | None = Field(
        default=None,
        description="the machine the run ran on: CPU model and logical core count, and the GPU "
        "for a CUDA run (None in results written before appbench recorded it)",
    )


class RunResult(BaseModel):
    """One pruner x discoverer run on a task and a model."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(default=SCHEMA_VERSION, description="version of this JSON layout")
    task: str = Field(description="task name")
    model: str = Field(description="model name as given to --model")
    pruner: str = Field(description="pruner name")
    discoverer: str = Field(description="discoverer name")
    pruner_params: dict[str, Any] = Field(
        description="validated pruner parameters, defaults included"
    )
    discoverer_params: dict[str, Any] = Field(description="validated discoverer parameters")
    seed: int = Field(description="seed of the run (prompt generation and plugins)")
    device: str = Field(description="torch device")
    n_search: int = Field(description="prompts in the search split")
    n_eval: int = Field(description="prompts in the evaluation split")
    search_sha256: str = Field(
        description="SHA-256 of the search split's clean and corrupted token ids, targets and "
        "answers: two runs searched the same prompts exactly when these agree"
    )
    n_layers: int = Field(description="layers of the model")
    n_heads: int = Field(description="query heads per layer")
    total_heads: int = Field(description="n_layers × n_heads")
    graph_config: dict[str, Any] | None = Field(
        default=None,
        description="the model's shape as the EAP-IG / MIB graph needs it (n_layers, n_heads, "
        "d_model, attn_only, parallel_attn_mlp), for `appbench circuit export`",
    )
    search_space: dict[str, Any] = Field(
        description="the pruner's search space (heads, scores, details)"
    )
    circuit: dict[str, Any] = Field(
        description="the discovered circuit (heads, per-head scores, edges)"
    )
    search_space_size: int = Field(description="|search space|")
    circuit_size: int = Field(description="|circuit|")
    reduction: float = Field(description="1 − |search space| / total heads")
    faithfulness: Faithfulness = Field(description="faithfulness on the evaluation split")
    edge_faithfulness: Faithfulness | None = Field(
        default=None,
        description="for a circuit with edges: the same, with every edge between circuit nodes "
        "that is not in the circuit also patched to its sender's ablated output (in the full "
        "graph, MLPs and the input outside the circuit ablated too)",
    )
    reference: Reference | None = Field(description="circuit used for overlap, with its source")
    overlap: Overlap | None = Field(description="overlap with the reference")
    cost: dict[str, StageCost] = Field(
        description="per stage: load, prune, discover, evaluate; a key '<stage>.<part>' (such "
        "as prune.sweep, the sparsity sweep) is a part of that stage, already counted in it"
    )
    speedup: Speedup | None = Field(
        description="against the dense run of the same discoverer, if found"
    )
    flags: list[Flag] = Field(
        default_factory=list,
        description="reasons not to take this result at face value (empty circuit, circuit "
        "worse than empty, few evaluation prompts, unfaithful reference, fallback sparsity, "
        "refused speedup, ...)",
    )
    provenance: Provenance = Field(description="versions, commit, plugins, command")

    def save(self, path: Path) -> Path:
        """Write atomically, so that a crash never leaves half a result (:func:`write_atomically`)."""
        write_atomically(path, self.model_dump_json(indent=2) + "\n")
        return path


def write_atomically(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` so that readers see the old file or the whole new one: a
    temporary file unique to this process in the same folder, flushed to disk, then renamed
    over ``path``. Temporary files of this name left by dead processes (a run killed while
    saving) are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    handle, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
    )
    try:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there (a probe file, removed at
    once), so that a run or a sweep fails before any work rather than when saving.

    Raises:
        OSError: the folder cannot be created or written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    handle, probe = tempfile.mkstemp(dir=folder, prefix=".appbench-probe.", suffix=".tmp")
    os.close(handle)
    os.unlink(probe)


def remove_orphans(path: Path) -> list[Path]:
    """Remove the temporary files that dead processes left while writing ``path``
    (``.<name>.<pid>.*.tmp``), and the fixed-name ``<name>.tmp`` of appbench before 0.4."""
    removed = []
    for tmp in [*path.parent.glob(f".{path.name}.*.tmp"), path.with_suffix(path.suffix + ".tmp")]:
        if not tmp.exists():
            continue
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if tmp.name.startswith(".") and parts and parts[0].isdigit() and _alive(int(parts[0])):
            continue  # another process is writing it now
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def model_folder_name(model: str) -> str:
    """A model name as one path component: ``Qwen/Qwen2.5-0.5B`` -> ``Qwen__Qwen2.5-0.5B``;
    a local directory (``./my-model``, ``/abs/my-model``) -> ``local__my-model``."""
    if model.startswith((".", "/", "~")) or Path(model).expanduser().is_dir():
        return "local__" + Path(model).expanduser().resolve().name
    return model.replace("/", "__")


def result_path(out: Path, task: str, model: str, pruner: str, discoverer: str) -> Path:
    """``<out>/<task>/<model folder>/<pruner>__<discoverer>.json`` (see model_folder_name)."""
    return out / task / model_folder_name(model) / f"{pruner}__{discoverer}.json"


class ResultFileError(ValueError):
    """A result file is missing, unreadable or not a RunResult."""


def load_result(path: Path) -> RunResult:
    """Read a result file; a missing, unreadable, foreign or other-schema file is one
    ResultFileError line."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        first = str(exc).splitlines()[0]
        raise ResultFileError(f"{path}: not a valid appbench result ({first})") from exc
    return parse_result(text, str(path))


def parse_result(text: str | bytes, source: str) -> RunResult:
    """A result from its JSON text (bytes are read as UTF-8), as :func:`load_result` reads a
    file; ``source`` names where the text came from in the one-line ResultFileError."""
    try:
        data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version is not None and version != SCHEMA_VERSION:
            raise ResultFileError(
                f"{source}: result schema {version}, this appbench reads schema {SCHEMA_VERSION} "
                "(run it again with this version)"
            )
        return RunResult.model_validate(data)
    except (UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise ResultFileError(f"{source}: not a valid appbench result ({first})") from exc
