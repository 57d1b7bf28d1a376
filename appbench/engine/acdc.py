"""ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery", arXiv:2304.14997) on an
edge graph, fast and plain.

The graph (:func:`appbench.circuit.model_graph`) is the EAP-IG / MIB one (``full``): the input,
every head with separate q/k/v inputs, every MLP and the logits, each node reading every earlier
one directly through the residual stream; or (``full=False``) only head -> later head q/k/v
and head -> logits, the paths path patching measures, with MLPs and the input left whole.
ACDC starts from the whole graph and visits the receivers in reverse topological order (the
logits, then per layer from the last down its MLP and its heads); for each incoming edge in
turn it *removes* the edge, i.e. the receiver's input sees the sender's corrupted output
instead of its output in the current graph, and keeps it removed when the distance between the
full model's output and the current graph's grows by less than ``tau``. The distance is the KL
divergence of the next-token distributions at the target position, or the loss of the task
metric as a fraction of the clean-corrupted gap. A node none of whose outgoing edges survives
is dead: its own inputs are not tested (its output reaches nothing). Edges into or out of heads
outside the search space are never tested and stay in the graph (clean), and are not part of
the circuit; MLPs and the input are never pruned away by a head-level search space.

Removing an edge u -> v subtracts ``out_u - out_u(corrupt)`` from v's own copy of its input
(TransformerLens's split-qkv-input mode for heads, ``hook_mlp_in`` for MLPs), where out_u is
what u writes into the residual stream in the current graph's run (``z W_O`` for a head). For
grouped-query attention a k or v input is the key-value head's, shared by its group (as in
:func:`appbench.engine.reference.input_head_index`): one edge, tested once.

Two drivers, same decisions:

- :func:`acdc_reference`: one full forward pass per tested edge, in order, each removed edge
  subtracted from its receiver's input one sender at a time. Obviously ACDC.
- :func:`acdc`: for each receiver, the candidate edges run in batches, variant k removing
  candidates 1..k on top of the current graph (speculating that each is removed, as most are;
  batches double while they are), starting at the receiver's layer from the clean run's
  cached residual stream (nothing below the receiver has been removed yet). Variant k's
  decision is exact while candidates 1..k-1 were indeed removed; at the first kept one the
  rest are run again from there. A receiver input with more edges removed than kept is
  rebuilt from the source residual stream plus its kept senders (the same sum, far fewer
  terms late in the run), and logits are made at the target positions only. Tests compare
  the two edge sets exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from appbench.checkpoint import Checkpoint
from appbench.circuit import (
    INPUT,
    QKV,
    Edge,
    Head,
    Mlp,
    Sender,
    connected_to_logits,
    model_graph,
    parse_node,
)
from appbench.engine.attribution import has_mlps, mlp_inputs, receiver_inputs, split_qkv_inputs
from appbench.engine.fused import POST_NORM_ARCHITECTURES, input_weights
from appbench.engine.patching import unembedded
from appbench.engine.reference import input_head_index, metric_gap

if TYPE_CHECKING:
    from appbench.tasks import Task, TaskData

Distance = Literal["kl", "metric"]
#: A receiver input: (layer, "q" | "k" | "v" | "mlp", index into that hook's head axis), or
#: the logits.
Slot = tuple[int, str, int] | None
#: An edge as ACDC tests it: (sender, receiver input).
Candidate = tuple[Sender, Slot]
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
    #: FLOPs done outside the model's modules (input corrections), for the runner's count.
    extra_flops: float = 0.0
    trace: list[tuple[str, float, bool]] = field(default_factory=list)


@dataclass
class AcdcProgress:
    """Where ACDC stands after a receiver: enough to go on from the next one with the same
    decisions (a checkpoint's state, :meth:`to_json`). The counters are those of the segments
    run so far."""

    settings: dict[str, Any]
    next_receiver: int
    removed: set[Candidate]
    kept: set[Candidate]
    dead: set[Sender]
    current: float
    tested: int
    forward_runs: int
    trace: list[tuple[str, float, bool]]

    def to_json(self) -> dict[str, Any]:
        def candidates(found: set[Candidate]) -> list[list[Any]]:
            rows = [[sender.id, None if slot is None else list(slot)] for sender, slot in found]
            return sorted(rows, key=lambda row: (row[0], row[1] or []))

        return {
            "settings": self.settings,
            "next_receiver": self.next_receiver,
            "removed": candidates(self.removed),
            "kept": candidates(self.kept),
            "dead": sorted(node.id for node in self.dead),
            "current": self.current,
            "tested": self.tested,
            "forward_runs": self.forward_runs,
            "trace": [list(step) for step in self.trace],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AcdcProgress:
        """The progress :meth:`to_json` wrote; ValueError on anything else."""

        def candidates(rows: list[list[Any]]) -> set[Candidate]:
            found: set[Candidate] = set()
            for sender, slot in rows:
                if slot is not None:
                    layer, kind, index = slot
                    if kind not in (*QKV, "mlp"):
                        raise ValueError(f"not a receiver input: {slot!r}")
                    slot = (int(layer), str(kind), int(index))
                found.add((parse_node(sender), slot))
            return found

        try:
            return cls(
                settings=dict(data["settings"]),
                next_receiver=int(data["next_receiver"]),
                removed=candidates(data["removed"]),
                kept=candidates(data["kept"]),
                dead={parse_node(node) for node in data["dead"]},
                current=float(data["current"]),
                tested=int(data["tested"]),
                forward_runs=int(data["forward_runs"]),
                trace=[(str(ids), float(value), bool(kept)) for ids, value, kept in data["trace"]],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an ACDC checkpoint: {exc!r}") from None


class _Graph:
    """The model with a set of removed edges, run on a split's clean prompts."""

    def __init__(
        self, model: Any, task: Task, data: TaskData, distance: Distance, plain: bool = False
    ) -> None:
        self.model, self.task, self.data, self.distance = model, task, data, distance
        #: Run every variant as the definition reads (the reference) instead of the fast way,
        #: which needs blocks whose q/k/v it can recompute from a corrected input.
        self.plain = plain or not _recomputable_inputs(model.cfg)
        #: FLOPs of the input corrections done outside the model's modules (W_O projections and
        #: the weighted sums of the speculative variants), for the runner's count.
        self.extra_flops = 0.0
        cfg = model.cfg
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self._points: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._upstream: dict[Slot, list[Sender]] = {}
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.mlps = has_mlps(cfg)
        self.w_o = model.W_O.detach()
        self.rows = torch.arange(len(data), device=data.clean.device)

        def wanted(name: str) -> bool:
            return name.endswith(("attn.hook_z", "hook_resid_pre", "hook_mlp_out"))

        with torch.no_grad():
            corrupt_logits, cache = model.run_with_cache(data.corrupt, names_filter=wanted)
            #: What a removed edge's sender sends instead: its corrupted output.
            self.z_source = [cache[f"blocks.{i}.attn.hook_z"] for i in range(self.n_layers)]
            self.mlp_source = self._mlp_outs(cache)
            self.embed_source = cache["blocks.0.hook_resid_pre"]
            full_logits, cache = model.run_with_cache(data.clean, names_filter=wanted)
            # ACDC decides the receivers from the last layer down, so while it decides those of
            # layer l no edge into an earlier layer has been removed: the residual stream before
            # l and the activations of the layers below are the clean run's.
            self.z_clean = [cache[f"blocks.{i}.attn.hook_z"] for i in range(self.n_layers)]
            self.mlp_clean = self._mlp_outs(cache)
            self.resid_clean = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(self.n_layers)]
            full = self._at_target(full_logits)
            corrupt = self._at_target(corrupt_logits)
        self.full_logprobs = full.log_softmax(-1)
        self.m_full = task.metric(full.float(), data).mean().item()
        self.m_corrupt = task.metric(corrupt.float(), data).mean().item()
        self.forward_runs = 0
        #: Nodes whose own output is replaced by the patch source in every run.
        self.ablated: frozenset[Sender] = frozenset()

    def _mlp_outs(self, cache: Any) -> list[torch.Tensor]:
        if not self.mlps:
            return []
        return [cache[f"blocks.{i}.hook_mlp_out"] for i in range(self.n_layers)]

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

    def values(
        self, variants: Sequence[frozenset[Candidate]], start: int | None = None
    ) -> list[float]:
        """Distance of each variant from the full model: a whole run, or (``start``) a run from
        that layer on the clean caches (no edge below it is removed yet)."""
        if start is None:
            return self.distances(self.run(variants))
        logits = self.run(
            variants,
            start=start,
            resid=self.resid_clean[start],
            z_before=self.z_clean[:start],
            mlp_before=self.mlp_clean[:start],
        )
        return self.distances(logits)

    def run(
        self,
        variants: Sequence[frozenset[Candidate]],
        start: int = 0,
        resid: torch.Tensor | None = None,
        z_before: Sequence[torch.Tensor] = (),
        mlp_before: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Target logits [K, N, V] of each variant (a set of removed edges).

        Starts at layer ``start`` from the residual stream ``resid`` [N, T, d] (and the earlier
        layers' head activations ``z_before`` and MLP outputs ``mlp_before``), shared by every
        variant.
        """
        runner = self._run_plain if self.plain else self._run_fast
        logits = runner(variants, start, resid, z_before, mlp_before)
        self.forward_runs += 1
        return logits

    def _run_fast(
        self,
        variants: Sequence[frozenset[Candidate]],
        start: int,
        resid: torch.Tensor | None,
        z_before: Sequence[torch.Tensor],
        mlp_before: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """:meth:`run`'s values at a fraction of :meth:`_run_plain`'s cost.

        The edges every variant removes (all but the candidates being speculated on) are
        applied once per receiver input, in whichever of two equal forms touches fewer senders:
        the input minus the removed senders' ``current - source`` outputs, or the source
        residual stream at that point plus the other senders' ``current - source`` outputs
        (the residual stream is the sum of what its writers wrote, so the two are equal; late
        in ACDC almost every edge is removed and the second form sums a handful). A sender
        below ``start`` has the same output in every variant and is projected once, not K
        times; the variants' own candidates are summed with one matmul; logits are made at
        the target positions only.
        """
        k, n = len(variants), len(self.data)
        common = frozenset.intersection(*variants) if variants else frozenset()
        by_slot: dict[Slot, list[Sender]] = {}
        for sender, slot in common:
            by_slot.setdefault(slot, []).append(sender)
        speculated: dict[Slot, dict[Sender, torch.Tensor]] = {}
        for v, removed in enumerate(variants):
            for sender, slot in removed - common:
                masks = speculated.setdefault(slot, {})
                if sender not in masks:
                    masks[sender] = torch.zeros(k, dtype=torch.bool)
                masks[sender][v] = True
        pre, mid = self._source_points()
        # Current outputs, [1, N, ...] below ``start`` (alike in every variant) and [K, N, ...]
        # from ``start`` on, recorded by the hooks as the run reaches them.
        z_now: dict[int, torch.Tensor] = {i: z[None] for i, z in enumerate(z_before)}
        mlp_now: dict[int, torch.Tensor] = {i: m[None] for i, m in enumerate(mlp_before)}
        embed = (self.embed_source if INPUT in self.ablated else self.resid_clean[0])[None]
        ablated_heads = self._ablated_heads()

        def keep_z(z: torch.Tensor, hook: Any) -> torch.Tensor:
            layer = hook.layer()
            if ablated_heads[layer]:
                z = z.clone()
                heads = ablated_heads[layer]
                z.view(k, n, *z.shape[1:])[:, :, :, heads] = self.z_source[layer][:, :, heads]
            z_now[layer] = z.view(k, n, *z.shape[1:])
            return z

        def keep_mlp(out: torch.Tensor, hook: Any) -> torch.Tensor:
            layer = hook.layer()
            if Mlp(layer) in self.ablated:
                out = self.mlp_source[layer].repeat(k, 1, 1)
            mlp_now[layer] = out.view(k, n, *out.shape[1:])
            return out

        def ablate_input(resid: torch.Tensor, hook: Any) -> torch.Tensor:
            return self.embed_source.repeat(k, 1, 1)

        def sent(senders: Sequence[Sender]) -> torch.Tensor | None:
            """Sum of ``current - source`` outputs over ``senders``: [1 or K, N, T, d]."""
            total: torch.Tensor | None = None
            heads: dict[int, list[int]] = {}
            others: list[Sender] = []
            for sender in sorted(senders, key=lambda s: s.sort_key):
                if isinstance(sender, Head):
                    heads.setdefault(sender.layer, []).append(sender.head)
                else:
                    others.append(sender)
            terms: list[tuple[tuple[int, int], torch.Tensor]] = []
            for layer, hs in heads.items():
                diff = (
                    z_now[layer][:, :, :, hs] - self.z_source[layer][None][:, :, :, hs]
                ).flatten(-2)
                w_o = self.w_o[layer, hs].flatten(0, 1)
                self.extra_flops += 2 * diff.numel() * w_o.shape[-1]
                terms.append(((layer, 0), diff @ w_o))
            for sender in others:
                if isinstance(sender, Mlp):
                    out = mlp_now[sender.layer] - self.mlp_source[sender.layer][None]
                    terms.append(((sender.layer, 1), out))
                else:
                    terms.append(((-1, 0), embed - self.embed_source[None]))
            for _, term in sorted(terms, key=lambda t: t[0]):
                total = term if total is None else total + term
            return total

        def speculative(masks: dict[Sender, torch.Tensor]) -> torch.Tensor:
            """Per variant, the sum of ``current - source`` over the candidates it removes."""
            senders = sorted(masks, key=lambda s: s.sort_key)
            outs = [sent([s]) for s in senders]
            weights = torch.stack([masks[s] for s in senders], 1)  # [K, S]
            if all(o is not None and o.shape[0] == 1 for o in outs):
                shape = outs[0].shape[1:]  # type: ignore[union-attr]
                stacked = torch.stack([o[0] for o in outs if o is not None]).flatten(1)
                weights = weights.to(stacked.device, stacked.dtype)
                self.extra_flops += 2 * k * stacked.numel()
                return (weights @ stacked).view(k, *shape)
            acc: torch.Tensor | None = None
            for i, out in enumerate(outs):
                assert out is not None
                w = weights[:, i].to(out.device, out.dtype).view(k, 1, 1, 1)
                acc = out * w if acc is None else acc + out * w
            assert acc is not None
            return acc

        resid_now: dict[int, torch.Tensor] = {}

        def keep_resid(resid: torch.Tensor, hook: Any) -> torch.Tensor:
            resid_now[hook.layer()] = resid.view(k, n, *resid.shape[1:])
            return resid

        def rebuilt(kind: str | None, layer: int) -> list[tuple[Slot, Any]]:
            """Per receiver input read at this hook, a function of the residual stream it
            would read [K', N, T, d] giving what it reads with its edges removed."""
            point = mid[layer] if kind == "mlp" and not self.parallel else pre[layer]
            out: list[tuple[Slot, Any]] = []
            slots = {sl for sl in by_slot if _at_hook(sl, kind, layer)}
            slots |= {sl for sl in speculated if _at_hook(sl, kind, layer)}
            for slot in sorted(slots, key=_slot_order):
                removed = by_slot.get(slot, [])
                gone = set(removed)
                others = [s for s in self.upstream(slot) if s not in gone]
                # Add the senders kept to the source stream, or subtract those removed.
                add = len(others) + 1 < len(removed)
                senders = others if add else removed
                masks = speculated.get(slot)

                def value(
                    stream: torch.Tensor,
                    add: bool = add,
                    senders: list[Sender] = senders,
                    masks: dict[Sender, torch.Tensor] | None = masks,
                ) -> torch.Tensor:
                    total = sent(senders)
                    if add:
                        stream = point[None] if total is None else point + total
                    elif total is not None:
                        stream = stream - total
                    if masks:
                        stream = stream - speculative(masks)
                    return stream.expand(k, n, *point.shape[1:])

                out.append((slot, value))
            return out

        def correct_stream(kind: str | None, layer: int) -> Callable[..., torch.Tensor] | None:
            """Hook on an MLP's input or the final residual stream."""
            plan = rebuilt(kind, layer)
            if not plan:
                return None
            ((_, value),) = plan

            def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
                return value(x.view(k, n, *x.shape[1:])).reshape(x.shape)

            return hook

        def correct_qkv(kind: str, layer: int) -> Callable[..., torch.Tensor] | None:
            """Hook on ``hook_{kind}``: the slices of receiver inputs with removed edges
            recomputed from their own residual stream (the rest read the shared one)."""
            from transformer_lens.utilities.attention import simple_attn_linear

            plan = rebuilt(kind, layer)
            if not plan:
                return None
            block = self.model.blocks[layer]
            w, b = input_weights(block.attn, self.model.cfg, kind)

            def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
                x = x.clone()
                for slot, value in plan:
                    assert slot is not None
                    stream = value(resid_now[layer]).reshape(k * n, *x.shape[1:2], -1)
                    normed = block.ln1(stream)
                    index = slot[2]
                    part = simple_attn_linear(normed, w[index : index + 1], b[index : index + 1])
                    self.extra_flops += (
                        2 * normed.shape[:-1].numel() * normed.shape[-1] * w.shape[-1]
                    )
                    x[:, :, index] = part[:, :, 0]
                return x

            return hook

        hooks: list[tuple[str, Any]] = []
        if start == 0 and INPUT in self.ablated:
            hooks.append(("blocks.0.hook_resid_pre", ablate_input))
        corrections: list[tuple[str, Any]] = []
        for layer in range(start, self.n_layers):
            hooks.append((f"blocks.{layer}.hook_resid_pre", keep_resid))
            hooks.append((f"blocks.{layer}.attn.hook_z", keep_z))
            for kind in QKV:
                corrections.append((f"blocks.{layer}.attn.hook_{kind}", correct_qkv(kind, layer)))
            if self.mlps:
                corrections.append((f"blocks.{layer}.hook_mlp_in", correct_stream("mlp", layer)))
                hooks.append((f"blocks.{layer}.hook_mlp_out", keep_mlp))
        last = self.n_layers - 1
        corrections.append((f"blocks.{last}.hook_resid_post", correct_stream(None, self.n_layers)))
        hooks += [(name, hook) for name, hook in corrections if hook is not None]
        with (
            torch.no_grad(),
            split_qkv_inputs(self.model, False),
            mlp_inputs(self.model),
            self.model.hooks(fwd_hooks=hooks),
        ):
            if start == 0:
                final = self.model(self.data.clean.repeat(k, 1), stop_at_layer=self.n_layers)
            else:
                assert resid is not None
                final = self.model(
                    resid.repeat(k, 1, 1), start_at_layer=start, stop_at_layer=self.n_layers
                )
        rows = torch.arange(k * n, device=final.device)
        at_target = final[rows, self.data.target_pos.repeat(k)]
        logits = unembedded(self.model, at_target)
        self.extra_flops += 2 * logits.numel() * at_target.shape[-1]
        return logits.view(k, n, -1)

    def _ablated_heads(self) -> dict[int, list[int]]:
        """Per layer, the heads whose output is replaced by their source in every run."""
        return {
            layer: [n.head for n in self.ablated if isinstance(n, Head) and n.layer == layer]
            for layer in range(self.n_layers)
        }

    def _source_points(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The residual stream [N, T, d] before each layer (and after the last) and between
        each layer's attention and MLP, summed from the sources: what a receiver input reads
        when every edge into it is removed. Made at the first run, so sources are set before."""
        if self._points is None:
            pre: list[torch.Tensor] = []
            mid: list[torch.Tensor] = []
            x = self.embed_source
            b_o = self.model.b_O.detach()
            with torch.no_grad():
                for layer in range(self.n_layers):
                    pre.append(x)
                    z = self.z_source[layer]
                    attn = torch.einsum("nthe,hed->ntd", z, self.w_o[layer]) + b_o[layer]
                    mid.append(x + attn)
                    x = (x + attn + self.mlp_source[layer]) if self.mlps else (x + attn)
                pre.append(x)
            self._points = (pre, mid)
        return self._points

    def upstream(self, slot: Slot) -> list[Sender]:
        """Every node that writes into the residual stream a receiver input reads."""
        if slot not in self._upstream:
            layer = self.n_layers if slot is None else slot[0]
            same_layer = slot is None or (slot[1] == "mlp" and not self.parallel)
            nodes: list[Sender] = [INPUT]
            for below in range(layer + 1 if same_layer and slot is not None else layer):
                nodes += [Head(below, h) for h in range(self.n_heads)]
                if self.mlps and below < layer:
                    nodes.append(Mlp(below))
            self._upstream[slot] = nodes
        return self._upstream[slot]

    def _run_plain(
        self,
        variants: Sequence[frozenset[Candidate]],
        start: int,
        resid: torch.Tensor | None,
        z_before: Sequence[torch.Tensor],
        mlp_before: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """:meth:`run` as the definition reads: every removed edge subtracted from its
        receiver's input, one sender at a time."""
        k, n = len(variants), len(self.data)
        z_now: dict[int, torch.Tensor] = {i: z.repeat(k, 1, 1, 1) for i, z in enumerate(z_before)}
        mlp_now: dict[int, torch.Tensor] = {i: m.repeat(k, 1, 1) for i, m in enumerate(mlp_before)}
        embed = self.embed_source if INPUT in self.ablated else self.resid_clean[0]
        ablated_heads = self._ablated_heads()

        def keep_z(z: torch.Tensor, hook: Any) -> torch.Tensor:
            layer = hook.layer()
            if ablated_heads[layer]:
                z = z.clone()
                source = self.z_source[layer].repeat(k, 1, 1, 1)
                z[:, :, ablated_heads[layer]] = source[:, :, ablated_heads[layer]]
            z_now[layer] = z
            return z

        def keep_mlp(out: torch.Tensor, hook: Any) -> torch.Tensor:
            layer = hook.layer()
            if Mlp(layer) in self.ablated:
                out = self.mlp_source[layer].repeat(k, 1, 1)
            mlp_now[layer] = out
            return out

        def ablate_input(resid: torch.Tensor, hook: Any) -> torch.Tensor:
            return self.embed_source.repeat(k, 1, 1)

        def sent(sender: Sender) -> torch.Tensor:
            """What removing an edge from ``sender`` subtracts: current minus source output."""
            if isinstance(sender, Head):
                current = z_now[sender.layer][:, :, sender.head]
                source = self.z_source[sender.layer][:, :, sender.head].repeat(k, 1, 1)
                self.extra_flops += 2 * current.numel() * self.w_o.shape[-1]
                return (current - source) @ self.w_o[sender.layer, sender.head]
            if isinstance(sender, Mlp):
                return mlp_now[sender.layer] - self.mlp_source[sender.layer].repeat(k, 1, 1)
            return (embed - self.embed_source).repeat(k, 1, 1)

        def correct(slot_kind: str | None, layer: int) -> Callable[..., torch.Tensor]:
            # Per sender, which variant removes it from which index of this hook.
            by_sender: dict[Sender, torch.Tensor] = {}
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
                # In node order: set order follows string hashes, which differ between
                # processes, and float sums must not.
                for sender, mask in sorted(by_sender.items(), key=lambda kv: kv[0].sort_key):
                    diff = sent(sender)
                    diff = diff.view(k, n, *diff.shape[1:])
                    if slot_kind is None or slot_kind == "mlp":
                        weights = mask[:, 0].to(x.device, x.dtype).view(k, 1, 1, 1)
                        x = x - (diff * weights).view_as(x)
                    else:
                        mask = mask[:, : x.shape[2]].to(x.device)
                        weights = mask.to(x.dtype).view(k, 1, 1, -1, 1)
                        x = x - (diff[:, :, :, None] * weights).view_as(x)
                return x

            return hook

        hooks: list[tuple[str, Any]] = []
        if start == 0 and INPUT in self.ablated:
            hooks.append(("blocks.0.hook_resid_pre", ablate_input))
        for layer in range(start, self.n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_z", keep_z))
            for kind in QKV:
                hooks.append((f"blocks.{layer}.hook_{kind}_input", correct(kind, layer)))
            if self.mlps:
                hooks.append((f"blocks.{layer}.hook_mlp_in", correct("mlp", layer)))
                hooks.append((f"blocks.{layer}.hook_mlp_out", keep_mlp))
        hooks.append((f"blocks.{self.n_layers - 1}.hook_resid_post", correct(None, -1)))
        with torch.no_grad(), receiver_inputs(self.model), self.model.hooks(fwd_hooks=hooks):
            if start == 0:
                logits = self.model(self.data.clean.repeat(k, 1))
            else:
                assert resid is not None
                logits = self.model(resid.repeat(k, 1, 1), start_at_layer=start)
        rows = torch.arange(k * n, device=logits.device)
        at_target = logits[rows, self.data.target_pos.repeat(k)]
        return at_target.view(k, n, -1)


class _ChunkedGraph:
    """:class:`_Graph` over a split too large for one pass: every evaluation runs each chunk of
    prompts on a graph built for it (its caches made, used and dropped, so one chunk is held
    at a time) and combines the chunks exactly, since both distances are means over prompts
    (the metric one through the split's mean metric)."""

    def __init__(
        self,
        model: Any,
        task: Task,
        data: TaskData,
        distance: Distance,
        batch_size: int,
        plain: bool = False,
    ) -> None:
        from appbench.engine.chunks import prompt_chunks

        self.model, self.task, self.distance, self.plain = model, task, distance, plain
        self.extra_flops = 0.0
        self.chunks = list(prompt_chunks(data, batch_size))
        self.n = len(data)
        self.n_layers = int(model.cfg.n_layers)
        full = corrupt = 0.0
        for chunk in self.chunks:
            graph = _Graph(model, task, chunk, distance, plain)
            full += graph.m_full * len(chunk)
            corrupt += graph.m_corrupt * len(chunk)
        self.m_full, self.m_corrupt = full / self.n, corrupt / self.n
        self.forward_runs = 0

    @property
    def gap(self) -> float:
        return metric_gap(self.m_full, self.m_corrupt)

    def values(
        self, variants: Sequence[frozenset[Candidate]], start: int | None = None
    ) -> list[float]:
        """As :meth:`_Graph.values`, chunk by chunk."""
        totals = [0.0] * len(variants)
        for chunk in self.chunks:
            graph = _Graph(self.model, self.task, chunk, self.distance, self.plain)
            if self.distance == "kl":
                per = graph.values(variants, start)
            else:
                # Back from the chunk's distance to its mean metric: m = m_full - d * gap.
                per = [graph.m_full - d * graph.gap for d in graph.values(variants, start)]
            self.forward_runs += graph.forward_runs
            self.extra_flops += graph.extra_flops
            totals = [t + v * len(chunk) for t, v in zip(totals, per, strict=True)]
        means = [t / self.n for t in totals]
        if self.distance == "kl":
            return means
        return [(self.m_full - m) / self.gap for m in means]


def _recomputable_inputs(cfg: Any) -> bool:
    """Whether a head's q, k and v are ``ln1(input) @ W + b`` of its residual-stream input
    (pre-norm blocks with full-precision weights; not with shortformer position embeddings,
    added after the norm), as :meth:`_Graph._run_fast` recomputes them."""
    return (
        cfg.original_architecture not in POST_NORM_ARCHITECTURES
        and cfg.positional_embedding_type != "shortformer"
        and not getattr(cfg, "load_in_4bit", False)
        and not getattr(cfg, "use_attn_in", False)
    )


def _at_hook(slot: Slot, kind: str | None, layer: int) -> bool:
    """Whether ``slot`` is read at the hook of ``kind`` ("q", "k", "v", "mlp"; None: the
    final residual stream, ``layer`` n_layers) in ``layer``."""
    if slot is None:
        return kind is None
    return kind is not None and slot[0] == layer and slot[1] == kind


def _slot_order(slot: Slot) -> tuple[int, int]:
    """The order receiver inputs of one hook are corrected in (fixed, for stable float sums)."""
    return (0, 0) if slot is None else (slot[0], slot[2])


def _slot(cfg: Any, edge: Edge) -> Slot:
    """The receiver input an edge enters."""
    if edge.receiver is None:
        return None
    if isinstance(edge.receiver, Mlp):
        return (edge.receiver.layer, "mlp", 0)
    return (edge.receiver.layer, edge.input, input_head_index(cfg, edge.receiver, edge.input))


def _receivers(
    cfg: Any, graph: list[Edge], space: frozenset[Head]
) -> list[tuple[Slot, list[Head], list[Sender]]]:
    """Receiver inputs in ACDC's order (logits, then per layer from the last down its MLP and
    its heads), each with the query heads that read it (a k or v input of a GQA model is read
    by its whole group) and its candidate senders from the search space, the latest first."""
    readers: dict[Slot, list[Head]] = {}
    senders: dict[Slot, set[Sender]] = {}
    for edge in graph:
        if isinstance(edge.sender, Head) and edge.sender not in space:
            continue
        slot = _slot(cfg, edge)
        senders.setdefault(slot, set()).add(edge.sender)
        if isinstance(edge.receiver, Head):
            group = readers.setdefault(slot, [])
            if edge.receiver not in group:
                group.append(edge.receiver)

    def order(slot: Slot) -> tuple[int, ...]:
        if slot is None:
            return (0,)
        if slot[1] == "mlp":
            return (1, -slot[0], 0)
        # Head by head, each one's q, k, v (a shared GQA input where its first reader is).
        return (1, -slot[0], 1, min(h.head for h in readers[slot]), QKV.index(slot[1]))

    def latest_first(sender: Sender) -> tuple[int, int, int]:
        layer, rank, index = sender.sort_key
        return (-layer, -rank, index)

    out = []
    for slot in sorted(senders, key=order):
        heads = readers.get(slot, [])
        if heads and not set(heads) & space:
            continue
        out.append((slot, heads, sorted(senders[slot], key=latest_first)))
    return out


def _edge_ids(candidate: Candidate, readers: list[Head], space: frozenset[Head]) -> list[Edge]:
    sender, slot = candidate
    if slot is None:
        return [Edge(sender, None)]
    if slot[1] == "mlp":
        return [Edge(sender, Mlp(slot[0]))]
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
    full: bool = True,
    batch_size: int | None = None,
    checkpoint: Checkpoint | None = None,
) -> AcdcResult:
    if tau < 0 or tau != tau:
        raise ValueError(f"tau must be a non-negative number, got {tau}")
    heads = frozenset(space)
    graph: _Graph | _ChunkedGraph
    if batch_size is not None and batch_size < len(data):
        graph = _ChunkedGraph(model, task, data, distance, batch_size, plain=not batched)
    else:
        graph = _Graph(model, task, data, distance, plain=not batched)
    cfg = model.cfg
    edges_of_graph = model_graph(cfg, full)
    out_slots: dict[Sender, list[tuple[Slot, Sender | None]]] = {}
    for edge in edges_of_graph:
        out_slots.setdefault(edge.sender, []).append((_slot(cfg, edge), edge.receiver))
    removed: set[Candidate] = set()
    kept: set[Candidate] = set()
    dead: set[Sender] = set()
    readers_of: dict[Slot, list[Head]] = {}
    trace: list[tuple[str, float, bool]] = []
    receivers = _receivers(cfg, edges_of_graph, heads)
    settings = {
        "tau": tau,
        "distance": distance,
        "full": full,
        "receivers": len(receivers),
        "heads": sorted(h.id for h in heads),
    }
    state = checkpoint.load() if checkpoint is not None else None
    first, earlier_runs = 0, 0
    if state is not None:
        progress = AcdcProgress.from_json(state)
        if progress.settings != settings:
            raise ValueError(
                f"the checkpoint is of another ACDC run ({progress.settings}), not {settings}"
            )
        first, removed, kept, dead = (
            progress.next_receiver,
            progress.removed,
            progress.kept,
            progress.dead,
        )
        current, tested, trace = progress.current, progress.tested, progress.trace
        earlier_runs = progress.forward_runs
        log(f"acdc: going on from receiver {first + 1}/{len(receivers)}")
    else:
        current = graph.values([frozenset()])[0]
        tested = 0

    def save(next_receiver: int) -> None:
        if checkpoint is None:
            return
        progress = AcdcProgress(
            settings,
            next_receiver,
            removed,
            kept,
            dead,
            current,
            tested,
            earlier_runs + graph.forward_runs,
            trace,
        )
        checkpoint.save(progress.to_json(), uncounted_flops=graph.extra_flops)

    per_run = max(1, max_rows // min(len(data), batch_size or len(data)))
    for number, (slot, readers, senders) in enumerate(receivers):
        readers_of[slot] = readers
        if number < first:
            continue  # decided in an earlier segment
        if checkpoint is not None and number > first and checkpoint.due():
            save(number)
        if slot is not None:
            owners: list[Sender] = list(readers) if slot[1] != "mlp" else [Mlp(slot[0])]
            for owner in owners:
                if owner not in dead and not _alive(owner, removed, dead, out_slots):
                    dead.add(owner)
            # A receiver input matters only while one of its nodes still sends somewhere.
            if set(owners) <= dead:
                continue
        candidates = [(sender, slot) for sender in senders]
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
                values = graph.values(prefix, start)
            else:
                values = graph.values([base | {rest[0]}])
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
    if checkpoint is not None and first < len(receivers):
        save(len(receivers))  # an interruption after this point need not search again
    edges = {e for c in kept for e in _edge_ids(c, readers_of[c[1]], heads)}
    return AcdcResult(
        edges=connected_to_logits(edges),
        tested=tested,
        removed=len(removed),
        distance=current,
        forward_runs=earlier_runs + graph.forward_runs,
        extra_flops=graph.extra_flops,
        trace=trace,
    )


def _alive(
    node: Sender,
    removed: set[Candidate],
    dead: set[Sender],
    out_slots: dict[Sender, list[tuple[Slot, Sender | None]]],
) -> bool:
    """Whether ``node`` still sends into the logits or into an input of a later live node that
    was not removed (edges into heads outside the space are never tested: present)."""
    return any(
        (receiver is None or receiver not in dead) and (node, slot) not in removed
        for slot, receiver in out_slots.get(node, [])
    )


def acdc(
    model: Any,
    task: Task,
    data: TaskData,
    space: Iterable[Head],
    tau: float = 0.01,
    distance: Distance = "kl",
    log: Callable[[str], None] = lambda line: None,
    max_rows: int = 1024,
    full: bool = True,
    batch_size: int | None = None,
    checkpoint: Checkpoint | None = None,
) -> AcdcResult:
    """ACDC on ``model_graph(cfg, full)``, the candidates of a receiver batched (``max_rows``
    prompt rows per run) and run from the receiver's layer; a split larger than
    ``batch_size`` prompts runs a chunk at a time (same decisions, caches rebuilt per run).

    With a ``checkpoint``, ACDC goes on from the :class:`AcdcProgress` it holds (ValueError if
    that is of other settings) and saves its progress between receivers when it is due, and
    once at the end; the result's counters (``tested``, ``forward_runs``) then cover every
    segment, ``extra_flops`` this one (the checkpoint carries the earlier ones' cost)."""
    return _run_acdc(
        model,
        task,
        data,
        space,
        tau,
        distance,
        True,
        log,
        max_rows,
        full,
        batch_size,
        checkpoint,
    )


def acdc_reference(
    model: Any,
    task: Task,
    data: TaskData,
    space: Iterable[Head],
    tau: float = 0.01,
    distance: Distance = "kl",
    full: bool = True,
    batch_size: int | None = None,
) -> AcdcResult:
    """ACDC done plainly: one full forward pass per tested edge."""
    return _run_acdc(
        model,
        task,
        data,
        space,
        tau,
        distance,
        False,
        lambda line: None,
        full=full,
        batch_size=batch_size,
    )


def edge_circuit_metric(
    model: Any,
    task: Task,
    data: TaskData,
    edges: Iterable[Edge],
    source_z: Sequence[torch.Tensor],
    full: bool = False,
    source_mlp: Sequence[torch.Tensor] = (),
    source_embed: torch.Tensor | None = None,
) -> float:
    """Mean metric of an edge circuit on ``model_graph(cfg, full)``: every node outside it
    takes its source activation (``source_z`` [N, T, H, d_head] per layer for heads; in the
    full graph ``source_mlp`` [N, T, d] per layer for MLPs and ``source_embed`` [N, T, d] for
    the input, e.g. per-template corrupted means), and every edge between its nodes that is not
    in it is patched to the sender's source output, as ACDC removes edges. On the head graph
    MLPs and the input stay whole. With every edge between its nodes present it equals the
    node circuit."""
    edge_set = set(edges)
    cfg = model.cfg
    nodes: set[Sender] = set()
    for edge in edge_set:
        nodes.add(edge.sender)
        if edge.receiver is not None:
            nodes.add(edge.receiver)
    graph = _Graph(model, task, data, "metric")
    graph.z_source = list(source_z)
    if full:
        if graph.mlps and len(source_mlp) != graph.n_layers:
            raise ValueError("the full graph needs every MLP's source output")
        if source_embed is None:
            raise ValueError("the full graph needs the input's source embedding")
        graph.mlp_source = list(source_mlp)
        graph.embed_source = source_embed
    every = model_graph(cfg, full)
    graph.ablated = frozenset({e.sender for e in every} - nodes)
    present = {(e.sender, _slot(cfg, e)) for e in edge_set}
    removed: set[Candidate] = set()
    for edge in every:
        if edge.sender not in nodes or (edge.receiver is not None and edge.receiver not in nodes):
            continue  # an ablated end: its node's source stands in for the whole node
        # A k or v input of a GQA model is shared by its group: present when any circuit head
        # of the group has the edge.
        candidate = (edge.sender, _slot(cfg, edge))
        if candidate not in present:
            removed.add(candidate)
    logits = graph.run([frozenset(removed)])
    return task.metric(logits[0].float(), data).mean().item()
