"""Heads, circuits and search spaces: the values every pruner and discoverer exchanges.

Head ids follow the EAP-IG / MIB convention (``a{L}.h{H}`` for attention heads, ``m{L}`` for
MLPs, edges ``src->dst<q|k|v>``) so that circuits convert to and from those files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HEAD_ID = re.compile(r"^a(\d+)\.h(\d+)$")

#: The q/k/v inputs of a receiver head through which path patching reaches it.
QKV = ("q", "k", "v")


@dataclass(frozen=True, order=True)
class Head:
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


@dataclass(frozen=True, order=True)
class Edge:
    """A path from a sender head into one input (q, k or v) of a receiver head, or into the logits."""

    sender: Head
    receiver: Head | None
    input: str = "v"

    def __post_init__(self) -> None:
        if self.receiver is not None and self.input not in QKV:
            raise ValueError(f"edge input must be one of {QKV}, got {self.input!r}")

    @property
    def id(self) -> str:
        """``a0.h1->a1.h0<v>`` or ``a1.h0->logits``."""
        if self.receiver is None:
            return f"{self.sender.id}->logits"
        return f"{self.sender.id}->{self.receiver.id}<{self.input}>"

    @classmethod
    def parse(cls, edge_id: str) -> Edge:
        """Inverse of :attr:`id`."""
        src, _, dst = edge_id.partition("->")
        if not dst:
            raise ValueError(f"not an edge id: {edge_id!r}")
        if dst == "logits":
            return cls(Head.parse(src), None, "v")
        match = re.match(r"^(a\d+\.h\d+)<([qkv])>$", dst)
        if not match:
            raise ValueError(f"not an edge id: {edge_id!r} (expected 'a0.h1->a1.h0<v>')")
        return cls(Head.parse(src), Head.parse(match.group(1)), match.group(2))


def all_edges(n_layers: int, n_heads: int) -> frozenset[Edge]:
    """Every edge of a model's head-level graph, as ACDC and path patching measure it: each head
    into each later head's q, k and v input, and each head into the logits. The universe an
    edge ROC counts false positives in."""
    heads = [Head(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    return frozenset(
        [Edge(sender, None) for sender in heads]
        + [
            Edge(sender, receiver, kind)
            for sender in heads
            for receiver in heads
            if receiver.layer > sender.layer
            for kind in QKV
        ]
    )


def connected_to_logits(edges: Iterable[Edge]) -> frozenset[Edge]:
    """The edges that lie on a path into the logits: an edge-level circuit's edges minus the
    dangling ones (edges run from lower to higher layers, so one pass from the last layer down
    finds them)."""
    live: set[Head] = set()
    kept: set[Edge] = set()
    for edge in sorted(edges, key=lambda e: (-e.sender.layer, e.id)):
        if edge.receiver is None or edge.receiver in live:
            kept.add(edge)
            live.add(edge.sender)
    return frozenset(kept)


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

    Attributes:
        n_layers: layers of the model.
        n_heads: query heads per layer.
        heads: the circuit's heads.
        scores: per-head scores the discoverer computed, by head id (evaluated heads only).
        edges: the sender -> receiver paths found, when the discoverer works on paths.
        details: discoverer-specific record, JSON-serialisable.
        edge_scores: per-edge scores by edge id, when the discoverer scores every edge it
            could select (EAP): the score vector a score-sweep ROC ranks.
    """

    n_layers: int
    n_heads: int
    heads: frozenset[Head]
    scores: Mapping[str, float] = field(default_factory=dict)
    edges: frozenset[Edge] = frozenset()
    details: Mapping[str, Any] = field(default_factory=dict)
    edge_scores: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
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

    def __contains__(self, head: object) -> bool:
        return head in self.heads

    def __len__(self) -> int:
        return len(self.heads)

    def sorted_heads(self) -> list[Head]:
        return sorted(self.heads)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "heads": [h.id for h in self.sorted_heads()],
            "scores": dict(self.scores),
            "edges": sorted(e.id for e in self.edges),
            "details": dict(self.details),
            "edge_scores": dict(self.edge_scores),
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
