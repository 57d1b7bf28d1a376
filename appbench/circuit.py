"""Heads, circuits and search spaces: the values every pruner and discoverer exchanges.

Node ids follow the EAP-IG / MIB convention (``input``, ``a{L}.h{H}`` for attention heads, ``m{L}``
for MLPs, ``logits``; edges ``src->dst<q|k|v>`` into heads, ``src->dst`` otherwise) so that
circuits convert to and from those files (:mod:`appbench.interchange`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HEAD_ID = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP_ID = re.compile(r"^m(\d+)$")

#: The q/k/v inputs of a receiver head through which path patching reaches it.
QKV = ("q", "k", "v")
#: The edge graphs a circuit can live in (:func:`model_graph`).
GRAPHS = ("heads", "full")


class _Ordered:
    """Nodes sort in the order the residual stream sees them: the input, then per layer the
    heads and after them the MLP (``sort_key``), so mixed sets of nodes sort too."""

    @property
    def sort_key(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, _Ordered):
            return NotImplemented
        return self.sort_key < other.sort_key

    def __le__(self, other: object) -> bool:
        if not isinstance(other, _Ordered):
            return NotImplemented
        return self.sort_key <= other.sort_key

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, _Ordered):
            return NotImplemented
        return self.sort_key > other.sort_key

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, _Ordered):
            return NotImplemented
        return self.sort_key >= other.sort_key


@dataclass(frozen=True)
class Head(_Ordered):
    """One attention head, ordered by (layer, head)."""

    layer: int
    head: int

    def __post_init__(self) -> None:
        if self.layer < 0 or self.head < 0:
            raise ValueError(
                f"head indices must be non-negative, got layer={self.layer} head={self.head}"
            )

    @property
    def id(self) -> str:
        """The EAP-IG/MIB node name, e.g. ``a9.h6``."""
        return f"a{self.layer}.h{self.head}"

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.layer, 0, self.head)

    @classmethod
    def parse(cls, head_id: str) -> Head:
        """Parse ``a{L}.h{H}``; raises ValueError with the offending text otherwise."""
        match = _HEAD_ID.match(head_id.strip())
        if not match:
            raise ValueError(
                f"not a head id: {head_id!r} (expected 'a<layer>.h<head>', e.g. 'a9.h6')"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    def hook_name(self, hook: str = "z") -> str:
        """The TransformerLens hook of this head's layer, e.g. ``blocks.9.attn.hook_z``."""
        return f"blocks.{self.layer}.attn.hook_{hook}"

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True)
class Mlp(_Ordered):
    """The MLP of one layer: a node of the edge graph (it reads the residual stream after its
    layer's attention and writes into it), never a member of a head-level search space."""

    layer: int

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"MLP layer must be non-negative, got {self.layer}")

    @property
    def id(self) -> str:
        """The EAP-IG/MIB node name, e.g. ``m3``."""
        return f"m{self.layer}"

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.layer, 1, 0)

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True)
class InputNode(_Ordered):
    """The token and position embeddings: the first sender of the edge graph."""

    @property
    def id(self) -> str:
        return "input"

    @property
    def layer(self) -> int:
        """Before every layer."""
        return -1

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (-1, 0, 0)

    def __str__(self) -> str:
        return self.id


INPUT = InputNode()

#: What an edge can leave from, and what it can enter (None: the logits).
Sender = Head | Mlp | InputNode
Receiver = Head | Mlp | None


def parse_node(node_id: str) -> Sender:
    """``input``, ``m{L}`` or ``a{L}.h{H}``; ValueError otherwise."""
    text = node_id.strip()
    if text == "input":
        return INPUT
    match = _MLP_ID.match(text)
    if match:
        return Mlp(int(match.group(1)))
    try:
        return Head.parse(text)
    except ValueError:
        raise ValueError(
            f"not a node id: {node_id!r} (expected 'input', 'm<layer>' or 'a<layer>.h<head>')"
        ) from None


@dataclass(frozen=True)
class Edge:
    """A direct path through the residual stream from a sender (the input, a head, an MLP) into
    one input (q, k or v) of a receiver head, into an MLP, or into the logits.

    ``input`` names the receiver head's q/k/v input; it is empty for MLP and logits receivers.
    """

    sender: Sender
    receiver: Receiver
    input: str = "v"

    def __post_init__(self) -> None:
        if isinstance(self.receiver, Head):
            if self.input not in QKV:
                raise ValueError(f"edge input must be one of {QKV}, got {self.input!r}")
        else:
            object.__setattr__(self, "input", "")
        if self.receiver is not None and not self.sender.sort_key < self.receiver.sort_key:
            raise ValueError(
                f"{self.sender.id} cannot send into {self.receiver.id}: edges run forward"
            )

    @property
    def id(self) -> str:
        """``a0.h1->a1.h0<v>``, ``input->m0``, ``m2->a3.h1<q>`` or ``a1.h0->logits``."""
        if self.receiver is None:
            return f"{self.sender.id}->logits"
        if isinstance(self.receiver, Head):
            return f"{self.sender.id}->{self.receiver.id}<{self.input}>"
        return f"{self.sender.id}->{self.receiver.id}"

    @property
    def between_heads(self) -> bool:
        """Whether both ends are heads or the logits: the graph path patching measures."""
        return isinstance(self.sender, Head) and (
            self.receiver is None or isinstance(self.receiver, Head)
        )

    @property
    def sort_key(self) -> tuple[tuple[int, int, int], tuple[int, int, int], str]:
        receiver = (1 << 30, 0, 0) if self.receiver is None else self.receiver.sort_key
        return (self.sender.sort_key, receiver, self.input)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Edge):
            return NotImplemented
        return self.sort_key < other.sort_key

    @classmethod
    def parse(cls, edge_id: str) -> Edge:
        """Inverse of :attr:`id`."""
        src, _, dst = edge_id.partition("->")
        if not dst:
            raise ValueError(f"not an edge id: {edge_id!r}")
        try:
            sender = parse_node(src)
            if dst == "logits":
                return cls(sender, None)
            match = re.match(r"^(a\d+\.h\d+)<([qkv])>$", dst)
            if match:
                return cls(sender, Head.parse(match.group(1)), match.group(2))
            receiver = parse_node(dst)
        except ValueError as exc:
            raise ValueError(f"not an edge id: {edge_id!r} ({exc})") from None
        if not isinstance(receiver, Mlp):
            raise ValueError(
                f"not an edge id: {edge_id!r} (a head receiver needs its input: 'a0.h1->a1.h0<v>')"
            )
        return cls(sender, receiver)


def graph_edges(
    n_layers: int, n_heads: int, mlps: bool = True, parallel: bool = False
) -> list[Edge]:
    """Every edge of the EAP-IG / MIB graph, in that library's order: each earlier node into
    every head's q, k and v input, into each MLP and into the logits. An MLP reads its own
    layer's heads unless attention and MLP run in ``parallel`` (GPT-J, Pythia). 32,491 edges
    for GPT-2 small (12 x 12)."""
    stream: list[Sender] = [INPUT]
    edges: list[Edge] = []
    for layer in range(n_layers):
        heads = [Head(layer, h) for h in range(n_heads)]
        edges += [Edge(s, head, kind) for s in stream for head in heads for kind in QKV]
        if mlps and parallel:
            edges += [Edge(s, Mlp(layer)) for s in stream]
        stream += heads
        if mlps and not parallel:
            edges += [Edge(s, Mlp(layer)) for s in stream]
        if mlps:
            stream.append(Mlp(layer))
    edges += [Edge(s, None) for s in stream]
    return edges


def model_graph(cfg: Any, full: bool = True) -> list[Edge]:
    """The edge graph of a TransformerLens config: the EAP-IG/MIB graph (``full``), or only
    the edges between heads and into the logits, the graph path patching measures."""
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    if not full:
        return [e for e in graph_edges(n_layers, n_heads, mlps=False) if e.between_heads]
    mlps = not bool(getattr(cfg, "attn_only", False))
    return graph_edges(n_layers, n_heads, mlps, bool(getattr(cfg, "parallel_attn_mlp", False)))


def connected_to_logits(edges: Iterable[Edge]) -> frozenset[Edge]:
    """The edges that lie on a path into the logits: an edge-level circuit's edges minus the
    dangling ones (edges run forward, so one pass from the last node back finds them)."""
    live: set[Sender] = set()
    kept: set[Edge] = set()
    for edge in sorted(edges, key=lambda e: (e.sender.sort_key, e.id), reverse=True):
        if edge.receiver is None or edge.receiver in live:
            kept.add(edge)
            live.add(edge.sender)
    return frozenset(kept)


def heads_of(edges: Iterable[Edge]) -> frozenset[Head]:
    """The heads an edge circuit joins (its MLPs and the input aside)."""
    ends = {e.sender for e in edges} | {e.receiver for e in edges if e.receiver is not None}
    return frozenset(n for n in ends if isinstance(n, Head))


def _as_heads(heads: Iterable[Head | str]) -> frozenset[Head]:
    return frozenset(h if isinstance(h, Head) else Head.parse(h) for h in heads)


@dataclass(frozen=True)
class SearchSpace:
    """The heads a discoverer may evaluate: the output of a pruner.

    Attributes:
        n_layers: layers of the model.
        n_heads: query heads per layer.
        heads: the kept heads.
        scores: optional per-head pruning scores (all heads, kept or not), by head id.
        details: pruner-specific record (sweep curve, chosen sparsity, ...), JSON-serialisable.
    """

    n_layers: int
    n_heads: int
    heads: frozenset[Head]
    scores: Mapping[str, float] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _as_heads(self.heads))
        for head in self.heads:
            if head.layer >= self.n_layers or head.head >= self.n_heads:
                raise ValueError(
                    f"{head.id} lies outside a model of {self.n_layers} layers x {self.n_heads} heads"
                )

    @classmethod
    def dense(cls, n_layers: int, n_heads: int) -> SearchSpace:
        """Every head of the model: the `none` pruner's space."""
        heads = frozenset(Head(layer, h) for layer in range(n_layers) for h in range(n_heads))
        return cls(n_layers, n_heads, heads)

    @property
    def total_heads(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def reduction(self) -> float:
        """APP's search-space reduction, 1 - |space| / |heads|."""
        return 1.0 - len(self.heads) / self.total_heads

    def __contains__(self, head: object) -> bool:
        return head in self.heads

    def __len__(self) -> int:
        return len(self.heads)

    def sorted_heads(self) -> list[Head]:
        return sorted(self.heads)

    def mask(self) -> list[list[bool]]:
        """A [layer][head] membership grid."""
        return [
            [Head(layer, h) in self.heads for h in range(self.n_heads)]
            for layer in range(self.n_layers)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "heads": [h.id for h in self.sorted_heads()],
            "scores": dict(self.scores),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        return cls(
            int(data["n_layers"]),
            int(data["n_heads"]),
            _as_heads(data["heads"]),
            dict(data.get("scores", {})),
            dict(data.get("details", {})),
        )


@dataclass(frozen=True)
class Circuit:
    """A set of heads (and optionally the edges that justified them) found by a discoverer.

    Head-level discoverers give heads; edge-level ones give edges, and their heads are the
    heads those edges join (MLPs and the input appear as edge ends only: :attr:`nodes`).

    Attributes:
        n_layers: layers of the model.
        n_heads: query heads per layer.
        heads: the circuit's heads.
        scores: per-head scores the discoverer computed, by head id (evaluated heads only).
        edges: the sender -> receiver paths found, when the discoverer works on paths.
        details: discoverer-specific record, JSON-serialisable.
        edge_scores: per-edge scores by edge id, when the discoverer scores every edge it
            could select (EAP): the score vector a score-sweep ROC ranks.
        graph: the edge graph the circuit lives in: ``heads`` (heads and logits; MLPs and the
            input are left whole, never part of a circuit) or ``full`` (the EAP-IG / MIB graph
            with the input and the MLPs as nodes; :func:`model_graph`).
    """

    n_layers: int
    n_heads: int
    heads: frozenset[Head]
    scores: Mapping[str, float] = field(default_factory=dict)
    edges: frozenset[Edge] = frozenset()
    details: Mapping[str, Any] = field(default_factory=dict)
    edge_scores: Mapping[str, float] = field(default_factory=dict)
    graph: str = "heads"

    def __post_init__(self) -> None:
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        object.__setattr__(self, "heads", _as_heads(self.heads))
        object.__setattr__(
            self,
            "edges",
            frozenset(e if isinstance(e, Edge) else Edge.parse(e) for e in self.edges),
        )
        for head in self.heads:
            if head.layer >= self.n_layers or head.head >= self.n_heads:
                raise ValueError(
                    f"{head.id} lies outside a model of {self.n_layers} layers x {self.n_heads} heads"
                )
        for edge in self.edges:
            for end in (edge.sender, edge.receiver):
                if end is None or isinstance(end, InputNode):
                    continue
                if end.layer >= self.n_layers or (
                    isinstance(end, Head) and end.head >= self.n_heads
                ):
                    raise ValueError(
                        f"edge {edge.id} leaves a model of {self.n_layers} layers x "
                        f"{self.n_heads} heads"
                    )

    def __contains__(self, head: object) -> bool:
        return head in self.heads

    def __len__(self) -> int:
        return len(self.heads)

    def sorted_heads(self) -> list[Head]:
        return sorted(self.heads)

    @property
    def nodes(self) -> frozenset[Sender]:
        """The circuit's nodes (the logits aside): its heads, and the other ends of its edges
        (MLPs, the input) when it works on the full edge graph."""
        ends: set[Sender] = set(self.heads)
        for edge in self.edges:
            ends.add(edge.sender)
            if edge.receiver is not None:
                ends.add(edge.receiver)
        return frozenset(ends)

    @property
    def mlps(self) -> frozenset[Mlp]:
        """The MLPs its edges touch (none for a head-level circuit)."""
        return frozenset(n for n in self.nodes if isinstance(n, Mlp))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "heads": [h.id for h in self.sorted_heads()],
            "scores": dict(self.scores),
            "edges": sorted(e.id for e in self.edges),
            "details": dict(self.details),
            "edge_scores": dict(self.edge_scores),
            "graph": self.graph,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Circuit:
        return cls(
            int(data["n_layers"]),
            int(data["n_heads"]),
            _as_heads(data["heads"]),
            dict(data.get("scores", {})),
            frozenset(Edge.parse(e) for e in data.get("edges", [])),
            dict(data.get("details", {})),
            dict(data.get("edge_scores", {})),
            str(data.get("graph", "heads")),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a circuit JSON file; raises ValueError naming the file when it is malformed."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a circuit file ({exc})") from exc
