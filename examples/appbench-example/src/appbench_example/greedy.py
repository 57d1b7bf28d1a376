"""Discoverer ``greedy-ablation``: a node-level cousin of ACDC (Conmy et al. 2023).

Start from the whole model. Visit the heads of the search space from the last layer to the
first; mean-ablate each in turn (its ``hook_z`` replaced by the per-template mean over the
corrupted prompts) on top of the heads already ablated, and keep it ablated when the metric
stays within ``tau`` of the clean-vs-ablated gap. The heads left standing form the circuit.
Heads outside the search space are never ablated: pruning decided they are not candidates.
"""

from pydantic import Field

from appbench import Circuit, Discoverer, Params


class GreedyParams(Params):
    tau: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="largest loss, as a share of the full-minus-ablated metric gap, a removal may cost",
    )


class GreedyAblation(Discoverer):
    name = "greedy-ablation"
    summary = "Mean-ablate heads last layer first; keep ablated those the metric does not miss."
    Params = GreedyParams

    def discover(self, ctx, space, params):
        import torch

        engine, data = ctx.engine, ctx.search
        z_corrupt = engine.cache_z(data.corrupt)
        means = engine.per_prompt(engine.group_means(z_corrupt, data), data)
        keep = torch.ones(ctx.n_layers, ctx.n_heads, dtype=torch.bool)
        full = engine.ablated_metric(data, keep, means).mean().item()
        if not space.heads:
            return Circuit(ctx.n_layers, ctx.n_heads, frozenset())
        none_left = keep.clone()
        for head in space.heads:
            none_left[head.layer, head.head] = False
        floor = engine.ablated_metric(data, none_left, means).mean().item()
        if abs(full - floor) < 1e-6 * max(1.0, abs(full)):
            # Ablating the whole space changes nothing: no head in it matters (the runner
            # flags the empty circuit). metric_gap would blame the prompts instead.
            return Circuit(
                ctx.n_layers, ctx.n_heads, frozenset(), details={"full": full, "floor": floor}
            )
        gap = full - floor
        for head in sorted(space.heads, key=lambda h: (-h.layer, h.head)):
            keep[head.layer, head.head] = False
            value = engine.ablated_metric(data, keep, means).mean().item()
            if full - value > params.tau * gap:
                keep[head.layer, head.head] = True  # the metric misses it: part of the circuit
        found = frozenset(h for h in space.heads if keep[h.layer, h.head])
        return Circuit(ctx.n_layers, ctx.n_heads, found, details={"full": full, "floor": floor})
