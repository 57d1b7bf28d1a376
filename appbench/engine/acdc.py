"""ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery", arXiv:2304.14997) on the
head-level edge graph, fast and plain.

The graph is the one path patching measures: every head -> later head's q, k or v input, and
every head -> logits. ACDC starts from the whole graph and visits the receivers in reverse
topological order (the logits, then the heads from the last layer down); for each incoming
edge in turn it *removes* the edge, i.e. the receiver's input sees the sender's corrupted
output instead of its output in the current graph, and keeps it removed when the distance
between the full model's output and the current graph's grows by less than ``tau``. The
distance is the KL divergence of the next-token distributions at the target position, or the
loss of the task metric as a fraction of the clean-corrupted gap. A head none of whose
outgoing edges survives is dead: its own inputs are not tested (its output reaches nothing).
Edges into or out of heads outside the search space are never tested and stay in the graph
(clean), and are not part of the circuit.

Removing an edge u -> v<i> subtracts ``(z_u - z_u(corrupt)) W_O[u]`` from v's own copy of its
input i (TransformerLens's split-qkv-input mode), where z_u is u's activation in the current
graph's run. For grouped-query attention a k or v input is the key-value head's, shared by its
group (as in :func:`appbench.engine.reference.input_head_index`): one edge, tested once.

Two drivers, same decisions:

- :func:`acdc_reference`: one full forward pass per tested edge, in order. Obviously ACDC.
- :func:`acdc`: for each receiver, the candidate edges run in batches, variant k removing
  candidates 1..k on top of the current graph (speculating that each is removed, as most are;
  batches double while they are), starting at the receiver's layer from the clean run's
  cached residual stream (nothing below the receiver has been removed yet). Variant k's
  decision is exact while candidates 1..k-1 were indeed removed; at the first kept one the
  rest are run again from there. Tests compare the two edge sets exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from appbench.circuit import QKV, Edge, Head, connected_to_logits
from appbench.engine.attribution import split_qkv_inputs
from appbench.engine.reference import input_head_index, metric_gap

if TYPE_CHECKING:
    from appbench.tasks import Task, TaskData

Distance = Literal["kl", "metric"]
#: A receiver input: (layer, "q" | "k" | "v", index into that hook's head axis), or the logits.
Slot = tuple[int, str, int] | None
#: An edge as ACDC tests it: (sender, receiver input).
Candidate = tuple[Head, Slot]
#: Candidates in a receiver's first speculative batch, and again after each kept edge.
FIRST_BATCH = 4


@dataclass
class AcdcResult:
    """What ACDC kept, and what it did to get there."""

    edges: frozenset[Edge]
    tested: int
    removed: int
    distance: float
    forward_runs: int
    trace: list[tuple[str, float, bool]] = field(default_factory=list)


class _Graph:
    """The model with a set of removed edges, run on a split's clean prompts."""

    def __init__(self, model: Any, task: Task, data: TaskData, distance: Distance) -> None:
        self.model, self.task, self.data, self.distance = model, task, data, distance
        cfg = model.cfg
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.w_o = model.W_O.detach()
        self.rows = torch.arange(len(data), device=data.clean.device)

        def wanted(name: str) -> bool:
            return name.endswith("attn.hook_z") or name.endswith("hook_resid_pre")

        with torch.no_grad():
            corrupt_logits, cache = model.run_with_cache(data.corrupt, names_filter=wanted)
            self.z_corrupt = [cache[f"blocks.{i}.attn.hook_z"] for i in range(self.n_layers)]
            full_logits, cache = model.run_with_cache(data.clean, names_filter=wanted)
            # ACDC decides the receivers from the last layer down, so while it decides those of
            # layer l no edge into an earlier layer has been removed: the residual stream before
            # l and the activations of the layers below are the clean run's.
            self.z_clean = [cache[f"blocks.{i}.attn.hook_z"] for i in range(self.n_layers)]
            self.resid_clean = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(self.n_layers)]
            full = self._at_target(full_logits)
            corrupt = self._at_target(corrupt_logits)
        self.full_logprobs = full.log_softmax(-1)
        self.m_full = task.metric(full.float(), data).mean().item()
        self.m_corrupt = task.metric(corrupt.float(), data).mean().item()
        self.forward_runs = 0
        #: Heads whose own activation is replaced by the patch source in every run.
        self.ablated: frozenset[Head] = frozenset()

    @property
    def gap(self) -> float:
        return metric_gap(self.m_full, self.m_corrupt)

    def _at_target(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[self.rows, self.data.target_pos]

    def distances(self, logits: torch.Tensor) -> list[float]:
        """Distance of each variant's target logits [K, N, V] from the full model's."""
        if self.distance == "kl":
            logprobs = logits.log_softmax(-1)
            full = self.full_logprobs[None]
            return (full.exp() * (full - logprobs)).sum(-1).mean(-1).tolist()
        return [
            (self.m_full - self.task.metric(v.float(), self.data).mean().item()) / self.gap
            for v in logits
        ]

    def run(
        self,
        variants: Sequence[frozenset[Candidate]],
        start: int = 0,
        resid: torch.Tensor | None = None,
        z_before: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Target logits [K, N, V] of each variant (a set of removed edges).

        Starts at layer ``start`` from the residual stream ``resid`` [N, T, d] (and the earlier
        layers' activations ``z_before``), shared by every variant.
        """
        k, n = len(variants), len(self.data)
        z_now: dict[int, torch.Tensor] = {i: z.repeat(k, 1, 1, 1) for i, z in enumerate(z_before)}

        ablated = {
            layer: [h.head for h in self.ablated if h.layer == layer]
            for layer in range(self.n_layers)
        }

        def keep_z(z: torch.Tensor, hook: Any) -> torch.Tensor:
            layer = hook.layer()
            if ablated[layer]:
                z = z.clone()
                source = self.z_corrupt[layer].repeat(k, 1, 1, 1)
                z[:, :, ablated[layer]] = source[:, :, ablated[layer]]
            z_now[layer] = z
            return z

        def correct(slot_kind: str | None, layer: int) -> Callable[..., torch.Tensor]:
            # Per sender, which variant removes it from which index of this hook.
            by_sender: dict[Head, torch.Tensor] = {}
            for v, removed in enumerate(variants):
                for sender, slot in removed:
                    if (slot is None) != (slot_kind is None):
                        continue
                    if slot is not None and (slot[0] != layer or slot[1] != slot_kind):
                        continue
                    index = 0 if slot is None else slot[2]
                    if sender not in by_sender:
                        by_sender[sender] = torch.zeros(k, self.n_heads, dtype=torch.bool)
                    by_sender[sender][v, index] = True

            def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
                if not by_sender:
                    return x
                x = x.clone()
                for sender, mask in by_sender.items():
                    current = z_now[sender.layer][:, :, sender.head]
                    corrupt = self.z_corrupt[sender.layer][:, :, sender.head].repeat(k, 1, 1)
                    diff = (current - corrupt) @ self.w_o[sender.layer, sender.head]
                    diff = diff.view(k, n, *diff.shape[1:])
                    if slot_kind is None:
                        weights = mask[:, 0].to(x.device, x.dtype).view(k, 1, 1, 1)
                        x = x - (diff * weights).view_as(x)
                    else:
                        mask = mask[:, : x.shape[2]].to(x.device)
                        weights = mask.to(x.dtype).view(k, 1, 1, -1, 1)
                        x = x - (diff[:, :, :, None] * weights).view_as(x)
                return x

            return hook

        hooks: list[tuple[str, Any]] = []
        for layer in range(start, self.n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_z", keep_z))
            for kind in ("q", "k", "v"):
                hooks.append((f"blocks.{layer}.hook_{kind}_input", correct(kind, layer)))
        hooks.append((f"blocks.{self.n_layers - 1}.hook_resid_post", correct(None, -1)))
        with torch.no_grad(), split_qkv_inputs(self.model), self.model.hooks(fwd_hooks=hooks):
            if start == 0:
                logits = self.model(self.data.clean.repeat(k, 1))
            else:
                assert resid is not None
                logits = self.model(resid.repeat(k, 1, 1), start_at_layer=start)
        self.forward_runs += 1
        rows = torch.arange(k * n, device=logits.device)
        at_target = logits[rows, self.data.target_pos.repeat(k)]
        return at_target.view(k, n, -1)


def _slots_of(cfg: Any, receiver: Head) -> list[Slot]:
    return [(receiver.layer, kind, input_head_index(cfg, receiver, kind)) for kind in "qkv"]


def _receivers(cfg: Any, space: frozenset[Head]) -> list[tuple[Slot, list[Head]]]:
    """Receiver inputs in ACDC's order (logits, then layers from the last down), each with the
    query heads that read it (a k or v input of a GQA model is read by its whole group)."""
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    order: list[tuple[Slot, list[Head]]] = [(None, [])]
    for layer in range(n_layers - 1, 0, -1):
        readers: dict[Slot, list[Head]] = {}
        for h in range(n_heads):
            for slot in _slots_of(cfg, Head(layer, h)):
                readers.setdefault(slot, []).append(Head(layer, h))
        order += [(slot, heads) for slot, heads in readers.items() if set(heads) & space]
    return order


def _candidates(slot: Slot, space: frozenset[Head], n_layers: int) -> list[Candidate]:
    """Senders into ``slot`` from the search space, the latest layer first."""
    below = n_layers if slot is None else slot[0]
    return sorted(
        ((h, slot) for h in space if h.layer < below),
        key=lambda c: (-c[0].layer, c[0].head),
    )


def _edge_ids(candidate: Candidate, readers: list[Head], space: frozenset[Head]) -> list[Edge]:
    sender, slot = candidate
    if slot is None:
        return [Edge(sender, None)]
    return [Edge(sender, r, slot[1]) for r in readers if r in space]


def _run_acdc(
    model: Any,
    task: Task,
    data: TaskData,
    space: Iterable[Head],
    tau: float,
    distance: Distance,
    batched: bool,
    log: Callable[[str], None],
    max_rows: int = 1024,
) -> AcdcResult:
    if tau < 0 or tau != tau:
        raise ValueError(f"tau must be a non-negative number, got {tau}")
    heads = frozenset(space)
    graph = _Graph(model, task, data, distance)
    cfg = model.cfg
    removed: set[Candidate] = set()
    kept: set[Candidate] = set()
    dead: set[Head] = set()
    readers_of: dict[Slot, list[Head]] = {}
    trace: list[tuple[str, float, bool]] = []
    current = graph.distances(graph.run([frozenset()]))[0]
    tested = 0
    receivers = _receivers(cfg, heads)
    per_run = max(1, max_rows // len(data))
    for number, (slot, readers) in enumerate(receivers):
        readers_of[slot] = readers
        if slot is not None:
            for reader in readers:
                if reader not in dead and not _alive(reader, removed, dead, cfg):
                    dead.add(reader)
            # A receiver input matters only while one of its heads still sends somewhere.
            if set(readers) <= dead:
                continue
        candidates = _candidates(slot, heads, graph.n_layers)
        # Rerunning from the receiver's layer: the logits' "layer" is the last one.
        start = graph.n_layers - 1 if slot is None else slot[0]
        done = 0
        # Speculation pays while edges are removed and wastes the rest of a batch at each kept
        # one: the batch doubles after every all-removed batch and falls back after a kept edge.
        size = FIRST_BATCH
        while done < len(candidates):
            rest = candidates[done : done + (min(size, per_run) if batched else 1)]
            size *= 2
            base = frozenset(removed)
            if batched:
                prefix: list[frozenset[Candidate]] = []
                for candidate in rest:
                    prefix.append((prefix[-1] if prefix else base) | {candidate})
                logits = graph.run(
                    prefix,
                    start=start,
                    resid=graph.resid_clean[start],
                    z_before=graph.z_clean[:start],
                )
                values = graph.distances(logits)
            else:
                values = graph.distances(graph.run([base | {rest[0]}]))
            for candidate, value in zip(rest, values, strict=True):
                tested += 1
                done += 1
                remove = value - current < tau
                ids = ", ".join(e.id for e in _edge_ids(candidate, readers, heads))
                trace.append((ids, value, remove))
                if remove:
                    removed.add(candidate)
                    current = value
                else:
                    kept.add(candidate)
                    size = FIRST_BATCH
                    break  # the later variants assumed this one removed: run them again
        log(
            f"acdc: receiver {number + 1}/{len(receivers)}, {len(kept)} edges kept, "
            f"{len(removed)} removed"
        )
    edges = {e for c in kept for e in _edge_ids(c, readers_of[c[1]], heads)}
    return AcdcResult(
        edges=connected_to_logits(edges),
        tested=tested,
        removed=len(removed),
        distance=current,
        forward_runs=graph.forward_runs,
        trace=trace,
    )


def _alive(head: Head, removed: set[Candidate], dead: set[Head], cfg: Any) -> bool:
    """Whether ``head`` still sends into the logits or into an input of a later live head that
    was not removed (edges into heads outside the space are never tested: present)."""
    if (head, None) not in removed:
        return True
    for layer in range(head.layer + 1, int(cfg.n_layers)):
        for h in range(int(cfg.n_heads)):
            receiver = Head(layer, h)
            if receiver in dead:
                continue
            if any((head, slot) not in removed for slot in _slots_of(cfg, receiver)):
                return True
    return False


def acdc(
    model: Any,
    task: Task,
    data: TaskData,
    space: Iterable[Head],
    tau: float = 0.01,
    distance: Distance = "kl",
    log: Callable[[str], None] = lambda line: None,
    max_rows: int = 1024,
) -> AcdcResult:
    """ACDC, the candidates of a receiver batched (``max_rows`` prompt rows per run) and run
    from the receiver's layer."""
    return _run_acdc(model, task, data, space, tau, distance, True, log, max_rows)


def acdc_reference(
    model: Any,
    task: Task,
    data: TaskData,
    space: Iterable[Head],
    tau: float = 0.01,
    distance: Distance = "kl",
) -> AcdcResult:
    """ACDC done plainly: one full forward pass per tested edge."""
    return _run_acdc(model, task, data, space, tau, distance, False, lambda line: None)


def edge_circuit_metric(
    model: Any,
    task: Task,
    data: TaskData,
    edges: Iterable[Edge],
    source_z: Sequence[torch.Tensor],
) -> float:
    """Mean metric of an edge circuit: every head outside it takes its ``source_z``
    activation ([N, T, H, d_head] per layer, e.g. per-template corrupted means), and every edge
    between its heads that is not in it is patched to the sender's source activation, as ACDC
    removes edges. With every edge between its heads present it equals the node circuit."""
    edge_set = set(edges)
    heads = {e.sender for e in edge_set} | {e.receiver for e in edge_set if e.receiver}
    graph = _Graph(model, task, data, "metric")
    graph.z_corrupt = list(source_z)
    every = {Head(layer, h) for layer in range(graph.n_layers) for h in range(graph.n_heads)}
    graph.ablated = frozenset(every - heads)
    cfg = model.cfg
    removed: set[Candidate] = set()
    for sender in heads:
        if Edge(sender, None) not in edge_set:
            removed.add((sender, None))
        for receiver in heads:
            if receiver.layer <= sender.layer:
                continue
            for kind in QKV:
                index = input_head_index(cfg, receiver, kind)
                # A k or v input of a GQA model is shared by its group: present when any
                # circuit head of the group has the edge.
                readers = [
                    r
                    for r in heads
                    if r.layer == receiver.layer and input_head_index(cfg, r, kind) == index
                ]
                if not any(Edge(sender, r, kind) in edge_set for r in readers):
                    removed.add((sender, (receiver.layer, kind, index)))
    logits = graph.run([frozenset(removed)])
    return task.metric(logits[0].float(), data).mean().item()
