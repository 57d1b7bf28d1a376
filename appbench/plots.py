"""Plots of results: performance against sparsity, discovery cost, circuit diagrams.

Each plot is made in two steps, so that a leaderboard can tell whether a committed plot is
stale without drawing it:

1. a pure function turns RunResults into the plot's *data*, a plain JSON-able dict
   (:func:`sparsity_data`, :func:`cost_data`, :func:`circuit_data`);
2. :func:`draw` turns data into SVG text, with the SHA-256 of the data (and of
   :data:`PLOT_VERSION`) in a comment at the top (:func:`embedded_hash`).

SVG is written deterministically for one matplotlib version (fixed ``svg.hashsalt``, no date,
no creator, text kept as text). Another matplotlib version may draw the same data into other
bytes, so drift checks compare the embedded data hash, not the bytes.

matplotlib is imported inside :func:`draw` only (Agg, no pyplot state), so that importing this
module, and ``appbench --help``, stays fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from appbench.circuit import Edge, Head
from appbench.results import RunResult

#: Bump when the drawing code changes what a plot shows: every plot's hash changes with it, so
#: the leaderboard redraws them all and its drift check asks for a rebuild.
PLOT_VERSION = 2

_HASH_COMMENT = re.compile(r"<!-- appbench-plot sha256=([0-9a-f]{64}) -->")

#: Circuit-diagram cell categories, in legend order: (key, label, colour).
CATEGORIES: tuple[tuple[str, str, str], ...] = (
    ("found", "found (in circuit and reference)", "#2ca02c"),
    ("extra", "extra (in circuit, not in reference)", "#ff7f0e"),
    ("missed", "missed (in reference, searched)", "#d62728"),
    ("missed_pruned", "missed (in reference, pruned away)", "#9467bd"),
    ("circuit", "in circuit (no reference)", "#1f77b4"),
    ("searched", "searched, not chosen", "#d9d9d9"),
    ("pruned", "pruned away (outside the search space)", "#ffffff"),
)


# ------------------------------------------------------------------------- data
def sparsity_data(results: Sequence[RunResult]) -> dict[str, Any] | None:
    """Performance-against-sparsity curves of a FLAP-family pruner's runs (one task, model
    and pruner setting), one curve per seed and branch, with the sparsity each run chose.

    The curve is in ``search_space["details"]``: ``curve`` (points with ``sparsity``, ``k``
    and ``performance``, 100·m(C)/m(M) on the selection prompts), ``cliff_index`` (-1: no
    cliff, the ``sparsity`` is the fallback); the ``merged`` pruner has one such dict per
    branch (``flap``, ``cflap``). Runs of one seed with several discoverers prune alike: a
    curve is drawn once.

    Returns:
        None when no run has a curve (a pruner without a sweep, or a fixed sparsity).
    """
    curves: list[dict[str, Any]] = []
    seen: set[str] = set()
    for result in sorted(results, key=lambda r: (r.seed, r.discoverer)):
        for branch, details in _branches(result):
            points = [
                [float(p["sparsity"]), float(p["performance"])]
                for p in details.get("curve") or []
                if p.get("performance") is not None
            ]
            if not points:
                continue
            cliff = int(details.get("cliff_index", -1))
            chosen = details.get("sparsity")
            entry = {
                "seed": result.seed,
                "branch": branch,
                "n_search": result.n_search,
                "points": points,
                "cliff": points[cliff] if 0 <= cliff < len(points) else None,
                "fallback": None if 0 <= cliff < len(points) or chosen is None else float(chosen),
                "k": details.get("k"),
            }
            fingerprint = json.dumps(entry, sort_keys=True)
            if fingerprint not in seen:
                seen.add(fingerprint)
                curves.append(entry)
    if not curves:
        return None
    first = results[0]
    return {
        "kind": "sparsity",
        "title": f"{first.task} / {first.model}: {first.pruner}, performance against sparsity",
        "curves": curves,
    }


def _branches(result: RunResult) -> list[tuple[str, Mapping[str, Any]]]:
    details = result.search_space.get("details") or {}
    if "curve" in details:
        return [(result.pruner, details)]
    return [
        (name, value)
        for name, value in sorted(details.items())
        if isinstance(value, Mapping) and "curve" in value
    ]


def cost_data(
    title: str, groups: Sequence[tuple[str, str, Sequence[RunResult]]]
) -> dict[str, Any] | None:
    """Dense against pruned discovery cost (like the APP paper's GFLOPs figure): for each
    discoverer, one bar per pruner (label), the mean prune and discover FLOPs over its runs,
    the spread of their sum over seeds (from 3 runs on), and the mean FLOPs speedup against
    the dense run of the same discoverer where the runs have one.

    Args:
        title: the plot's title (task and model).
        groups: (discoverer, bar label, runs) for each bar.

    Returns:
        None without any run.
    """
    bars = []
    for discoverer, label, runs in groups:
        if not runs:
            continue
        prune = [r.cost["prune"].flops for r in runs]
        discover = [r.cost["discover"].flops for r in runs]
        totals = [p + d for p, d in zip(prune, discover, strict=True)]
        ratios = [r.speedup.flops_ratio for r in runs if r.speedup is not None]
        bars.append(
            {
                "discoverer": discoverer,
                "label": label,
                "dense": all(r.pruner == "none" for r in runs),
                "prune_gflop": sum(prune) / len(prune) / 1e9,
                "discover_gflop": sum(discover) / len(discover) / 1e9,
                "sd_gflop": _sd(totals) / 1e9 if len(totals) >= 3 else None,
                "n": len(runs),
                "speedup": sum(ratios) / len(ratios) if ratios else None,
            }
        )
    if not bars:
        return None
    return {"kind": "cost", "title": title, "bars": bars}


def _sd(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return float((sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5)


def circuit_data(result: RunResult) -> dict[str, Any]:
    """The circuit on a layer x head grid: each head found (in circuit and reference),
    extra, missed (searched, or pruned away), searched but not chosen, or pruned away; the
    circuit's edges between heads and into the logits (q/k/v of one pair drawn once), and a
    count of the edges through MLPs or the input, which the grid has no place for."""
    circuit = set(result.circuit.get("heads", []))
    space = set(result.search_space.get("heads", []))
    reference = set(result.reference.heads) if result.reference is not None else None
    cells = []
    for layer in range(result.n_layers):
        row = []
        for h in range(result.n_heads):
            head = Head(layer, h).id
            if reference is None:
                category = (
                    "circuit" if head in circuit else "searched" if head in space else "pruned"
                )
            elif head in circuit:
                category = "found" if head in reference else "extra"
            elif head in reference:
                category = "missed" if head in space else "missed_pruned"
            else:
                category = "searched" if head in space else "pruned"
            row.append(category)
        cells.append(row)
    pairs: set[tuple[str, str]] = set()
    other = 0
    for edge_id in result.circuit.get("edges", []):
        edge = Edge.parse(edge_id)
        if edge.between_heads:
            pairs.add((edge.sender.id, "logits" if edge.receiver is None else edge.receiver.id))
        else:
            other += 1
    reference_label = (
        "no reference" if result.reference is None else f"{result.reference.kind} reference"
    )
    return {
        "kind": "circuit",
        "title": f"{result.task} / {result.model}: {result.pruner} -> {result.discoverer}, "
        f"seed {result.seed}",
        "subtitle": f"{len(circuit)} heads, search space {len(space)}/{result.total_heads}, "
        f"against the {reference_label}"
        + (f"; {other} edges through MLPs or the input not drawn" if other else ""),
        "n_layers": result.n_layers,
        "n_heads": result.n_heads,
        "cells": cells,
        "edges": sorted(pairs, key=lambda p: (_node_order(p[0]), _node_order(p[1]))),
    }


def _node_order(node: str) -> tuple[int, int]:
    if node == "logits":
        return (1 << 30, 0)
    head = Head.parse(node)
    return (head.layer, head.head)


def result_plots(result: RunResult, dense: RunResult | None = None) -> dict[str, dict[str, Any]]:
    """Every plot of one result (``appbench plot``), by file stem: ``circuit``; ``sparsity``
    when its pruner swept sparsities; ``cost`` against ``dense``, the dense run of the same
    discoverer, when given."""
    plots = {"circuit": circuit_data(result)}
    curves = sparsity_data([result])
    if curves is not None:
        plots["sparsity"] = curves
    if dense is not None:
        cost = cost_data(
            f"{result.task} / {result.model}: discovery cost, seed {result.seed}",
            [
                (dense.discoverer, dense.pruner, [dense]),
                (result.discoverer, result.pruner, [result]),
            ],
        )
        if cost is not None:
            plots["cost"] = cost
    return plots


# ---------------------------------------------------------------------- drawing
def data_hash(data: Mapping[str, Any]) -> str:
    """SHA-256 of a plot's data and :data:`PLOT_VERSION`: what a drawn plot shows."""
    text = json.dumps({"plot_version": PLOT_VERSION, "data": data}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embedded_hash(svg: str) -> str | None:
    """The data hash :func:`draw` wrote into an SVG (None for a file it did not write)."""
    match = _HASH_COMMENT.search(svg[:1000])
    return match.group(1) if match else None


def draw(data: Mapping[str, Any]) -> str:
    """Draw plot data (from the functions above) as SVG text, the data's hash at the top."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    drawers = {"sparsity": _draw_sparsity, "cost": _draw_cost, "circuit": _draw_circuit}
    kind = data.get("kind")
    if kind not in drawers:
        raise ValueError(f"unknown plot kind {kind!r}")
    with matplotlib.rc_context(
        {"svg.hashsalt": "appbench", "svg.fonttype": "none", "font.size": 9}
    ):
        figure = Figure(figsize=_size(data), layout="constrained")
        drawers[kind](figure, data)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    first, _, rest = buffer.getvalue().partition("\n")
    return f"{first}\n<!-- appbench-plot sha256={data_hash(data)} -->\n{rest}"


def _size(data: Mapping[str, Any]) -> tuple[float, float]:
    if data["kind"] == "circuit":
        return (
            min(16.0, max(6.4, 1.5 + 0.45 * data["n_heads"])),
            min(20.0, 3.4 + 0.4 * (data["n_layers"] + 1)),
        )
    if data["kind"] == "cost":
        n = len({bar["discoverer"] for bar in data["bars"]})
        return (min(16.0, 1.5 + 3.0 * n), 4.0)
    return (6.4, 4.0)


def _draw_sparsity(figure: Any, data: Mapping[str, Any]) -> None:
    ax = figure.subplots()
    branches = sorted({c["branch"] for c in data["curves"]})
    colours = {b: f"C{i}" for i, b in enumerate(branches)}
    labelled: set[str] = set()
    for curve in data["curves"]:
        xs = [p[0] for p in curve["points"]]
        ys = [p[1] for p in curve["points"]]
        colour = colours[curve["branch"]]
        label = None if curve["branch"] in labelled else f"{curve['branch']} (one line per seed)"
        labelled.add(curve["branch"])
        ax.plot(xs, ys, color=colour, linewidth=1.0, alpha=0.8, label=label)
        if curve["cliff"] is not None:
            x, y = curve["cliff"]
            ax.plot([x], [y], marker="v", markersize=8, color=colour, linestyle="none")
            ax.annotate(f"seed {curve['seed']}", (x, y), textcoords="offset points", xytext=(4, 6))
        elif curve["fallback"] is not None:
            ax.axvline(curve["fallback"], color=colour, linestyle=":", linewidth=1.0)
    ax.plot([], [], marker="v", color="black", linestyle="none", label="chosen cliff")
    if any(c["cliff"] is None and c["fallback"] is not None for c in data["curves"]):
        ax.plot([], [], color="black", linestyle=":", label="no cliff: fallback sparsity")
    ax.set_xlabel("sparsity (fraction of heads removed)")
    ax.set_ylabel("performance 100·m(C)/m(M), selection prompts (%)")
    ax.set_title(data["title"])
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="best", fontsize=8)


def _draw_cost(figure: Any, data: Mapping[str, Any]) -> None:
    discoverers = sorted({bar["discoverer"] for bar in data["bars"]})
    axes = figure.subplots(1, len(discoverers), squeeze=False)[0]
    for ax, discoverer in zip(axes, discoverers, strict=True):
        bars = [b for b in data["bars"] if b["discoverer"] == discoverer]
        xs = list(range(len(bars)))
        prune = [b["prune_gflop"] for b in bars]
        discover = [b["discover_gflop"] for b in bars]
        ax.bar(xs, discover, color="C0", label="discover")
        ax.bar(xs, prune, bottom=discover, color="C1", hatch="//", label="prune")
        for x, bar, d, p in zip(xs, bars, discover, prune, strict=True):
            top = d + p
            if bar["sd_gflop"] is not None:
                ax.errorbar([x], [top], yerr=[bar["sd_gflop"]], color="black", capsize=3)
                top += bar["sd_gflop"]
            if bar["speedup"] is not None:
                ratio = bar["speedup"]
                text = f"{ratio:.2f}× FLOPs" + ("" if ratio >= 1 else "\n(slower)")
                ax.annotate(text, (x, top), textcoords="offset points", xytext=(0, 4), ha="center")
        ax.set_xticks(xs, [f"{b['label']}\nn={b['n']}" for b in bars])
        ax.set_title(discoverer)
        ax.set_ylabel("prune + discover GFLOP (mean over seeds)")
        ax.margins(y=0.2)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    figure.suptitle(data["title"])


def _draw_circuit(figure: Any, data: Mapping[str, Any]) -> None:
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax = figure.subplots()
    keys = [key for key, _, _ in CATEGORIES]
    colours = [colour for _, _, colour in CATEGORIES]
    n_layers, n_heads = data["n_layers"], data["n_heads"]
    codes = [[keys.index(c) for c in row] for row in data["cells"]]
    ax.pcolormesh(
        [h - 0.5 for h in range(n_heads + 1)],
        [layer - 0.5 for layer in range(n_layers + 1)],
        codes,
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=len(keys) - 0.5,
        edgecolors="#808080",
        linewidth=0.5,
    )
    segments, senders, into_logits = [], [], []
    for sender, receiver in data["edges"]:
        s = Head.parse(sender)
        if receiver == "logits":
            into_logits.append((s.head, s.layer))
            continue
        r = Head.parse(receiver)
        segments.append([(s.head, s.layer), (r.head, r.layer)])
        senders.append((s.head, s.layer))
    # Edges between heads run forward, from a lower layer up: lines without arrowheads say it
    # (a dot marks the sender), and stay one path each however many edges a circuit has.
    ax.add_collection(LineCollection(segments, colors="black", linewidths=0.7, alpha=0.7))
    ax.plot([x for x, _ in senders], [y for _, y in senders], "k.", markersize=3)
    ax.plot(
        [x for x, _ in into_logits],
        [y for _, y in into_logits],
        linestyle="none",
        marker="^",
        markersize=7,
        markerfacecolor="black",
        markeredgecolor="white",
    )
    ax.set_xlim(-0.5, n_heads - 0.5)
    ax.set_ylim(-0.5, n_layers - 0.5)
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{data['title']}\n{data['subtitle']}", fontsize=9)
    used = {c for row in data["cells"] for c in row}
    handles: list[Any] = [
        Patch(facecolor=colour, edgecolor="#808080", label=label)
        for key, label, colour in CATEGORIES
        if key in used
    ]
    if segments:
        handles.append(Line2D([], [], color="black", linewidth=0.7, label="edge (from the dot up)"))
    if into_logits:
        handles.append(
            Line2D(
                [], [], linestyle="none", marker="^", color="black", label="edge into the logits"
            )
        )
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8)


__all__ = [
    "CATEGORIES",
    "PLOT_VERSION",
    "circuit_data",
    "cost_data",
    "data_hash",
    "draw",
    "embedded_hash",
    "result_plots",
    "sparsity_data",
]
