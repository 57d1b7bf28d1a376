"""Flags: results that look fine but cannot be taken at face value, said out loud.

A benchmark's numbers are only as good as the conditions they were measured under. These
pure functions look at a finished run's numbers and return a :class:`~appbench.results.Flag`
for each condition that makes one of them meaningless or misleading; the runner records them
in the result and the CLI prints them beside the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from appbench.results import Faithfulness, Flag, Reference, RunResult

#: Faithfulness from fewer evaluation prompts than this is flagged as too noisy to compare.
MIN_EVAL_PROMPTS = 20
#: A reference circuit whose own normalised faithfulness is below this recovers less than half
#: of the way from the empty circuit to the full model: overlap with it measures agreement
#: with an unfaithful circuit.
MIN_REFERENCE_FAITHFULNESS = 0.5


def circuit_flags(circuit_size: int, faithfulness: Faithfulness, n_eval: int) -> list[Flag]:
    """Flags on the circuit and its faithfulness."""
    flags = []
    f = faithfulness
    if f.degenerate:
        flags.append(
            Flag(
                code="degenerate-metric",
                message=f"the full model and the empty circuit score alike on the evaluation "
                f"split (m(M) {f.m_model:.4g}, m(∅) {f.m_empty:.4g}): faithfulness means nothing",
            )
        )
    elif circuit_size == 0:
        flags.append(
            Flag(
                code="empty-circuit",
                message=f"the circuit is empty although the task's gap is real (m(M) "
                f"{f.m_model:.4g}, m(∅) {f.m_empty:.4g})",
            )
        )
    if f.normalised is not None and f.normalised < 0 and circuit_size > 0:
        flags.append(
            Flag(
                code="worse-than-empty",
                message=f"the circuit is less faithful than the empty circuit (normalised "
                f"faithfulness {f.normalised:.3f})",
            )
        )
    if f.inverted:
        flags.append(
            Flag(
                code="inverted-metric",
                message=f"the empty circuit scores above the full model (m(∅) {f.m_empty:.4g} > "
                f"m(M) {f.m_model:.4g})",
            )
        )
    if n_eval < MIN_EVAL_PROMPTS:
        flags.append(
            Flag(
                code="few-evaluation-prompts",
                message=f"faithfulness comes from {n_eval} evaluation prompts (fewer than "
                f"{MIN_EVAL_PROMPTS})",
            )
        )
    return flags


def edge_flags(n_edges: int, edge_faithfulness: Faithfulness | None) -> list[Flag]:
    """Flags on an edge circuit's own faithfulness (every edge outside it patched): a circuit
    whose heads alone score well can still lose the task once the edges it does not name (to
    and from the MLPs, say) are patched too, and then its edge count means nothing."""
    f = edge_faithfulness
    if f is None or n_edges == 0 or f.degenerate or f.normalised is None or f.normalised >= 0:
        return []
    return [
        Flag(
            code="edges-worse-than-empty",
            message=f"the circuit's {n_edges} edge{'s' if n_edges != 1 else ''}, every other "
            f"edge patched, keep less of the task than the empty circuit (edge faithfulness "
            f"{f.normalised:.3f})",
        )
    ]


def reference_flags(reference: Reference | None) -> list[Flag]:
    """Flags on the reference circuit overlap is measured against."""
    if reference is None:
        return []
    if not reference.heads:
        return [Flag(code="empty-reference", message="the reference circuit is empty")]
    f = reference.faithfulness
    if f is not None and f < MIN_REFERENCE_FAITHFULNESS:
        return [
            Flag(
                code="unfaithful-reference",
                message=f"the {reference.kind} reference circuit ({len(reference.heads)} heads) "
                f"is itself unfaithful: normalised faithfulness {f:.3f} (below "
                f"{MIN_REFERENCE_FAITHFULNESS})",
            )
        ]
    return []


def baseline_differences(run: Mapping[str, Any], base: RunResult) -> list[str]:
    """How a dense baseline run differs from this run in anything that makes their costs
    incomparable: task, model, device, prompts, seed, discoverer parameters, code version.

    Args:
        run: this run's values under the RunResult field names used below, plus
            ``appbench_version`` and ``git_commit``.
        base: the dense run.

    Returns:
        One phrase per difference (empty when the runs are comparable).
    """
    differences = []
    for name in ("task", "model", "discoverer", "device", "seed", "n_search", "search_sha256"):
        if run[name] != getattr(base, name):
            label = "search prompts" if name == "search_sha256" else name
            mine, theirs = run[name], getattr(base, name)
            if name == "search_sha256":
                mine, theirs = mine[:12], theirs[:12]
            differences.append(f"{label} ({theirs} there, {mine} here)")
    if base.pruner != "none":
        differences.append(f"pruner ({base.pruner} there, a dense run needs none)")
    params, base_params = run["discoverer_params"], base.discoverer_params
    changed = sorted(
        k for k in params.keys() | base_params.keys() if params.get(k) != base_params.get(k)
    )
    if changed:
        differences.append(
            "discoverer parameters ("
            + ", ".join(f"{k} {base_params.get(k)} there, {params.get(k)} here" for k in changed)
            + ")"
        )
    if base.provenance.task_version != run["task_version"]:
        differences.append(
            f"task version ({base.provenance.task_version} there, {run['task_version']} here)"
        )
    for name in ("appbench_version", "git_commit"):
        theirs = getattr(base.provenance, name)
        if theirs != run[name]:
            differences.append(f"{name.replace('_', ' ')} ({theirs} there, {run[name]} here)")
    return differences


def reference_problems(result: RunResult) -> list[str]:
    """Why a run's circuit must not become a reference: empty, degenerate or unfaithful."""
    f = result.faithfulness
    problems = []
    if not result.circuit.get("heads"):
        problems.append("the circuit is empty")
    if f.degenerate or f.normalised is None:
        problems.append("its faithfulness is undefined (the metric's gap is degenerate)")
    elif f.normalised < MIN_REFERENCE_FAITHFULNESS:
        problems.append(
            f"its normalised faithfulness is {f.normalised:.3f}, below {MIN_REFERENCE_FAITHFULNESS}"
        )
    if f.inverted:
        problems.append("the empty circuit scores above the full model")
    return problems
