"""Edge attribution patching (EAP; Syed et al. 2023) and EAP with integrated gradients (EAP-IG;
Hanna et al. 2024): every edge scored at once from gradients, as discoverers and as pruners.

Each edge of the graph (``graph=full``, the default: the EAP-IG / MIB graph with the input,
heads' q/k/v inputs, MLPs and logits; ``graph=heads``: head -> head and head -> logits only)
gets the first-order estimate of what patching it to its corrupted value would do to the
metric, as a fraction of the clean-corrupted gap (:func:`appbench.edge_scores`): one forward
pass on each prompt set and one backward pass (EAP), or ``steps`` backward passes along the
line from the corrupted to the clean input embeddings (EAP-IG, ``ig=inputs``), or ``steps`` per
sender site along the line from its corrupted to its clean output (``ig=activations``).

- **Discoverers** ``eap`` and ``eap-ig``: the circuit is the edges whose head ends lie in the
  search space (MLPs and the input are never pruned) with |score| >= ``threshold``, or the
  ``top_n`` largest, keeping only edges on a path into the logits; its heads are the heads its
  edges join.
- **Pruners** ``eap`` and ``eap-ig``: a head's score is the sum of |score| over the edges it
  sends, into later heads, MLPs and the logits (the HAP pipeline of Gu et al. 2025 prunes with
  EAP before path patching); the top ``fraction`` of heads, or ``keep_k`` heads, are kept.

A gradient sees what a small change does: a head whose attention is saturated (a softmax that
switches completely between the clean and the corrupted prompt) has a near-zero gradient through
its query and key, so EAP misses such q and k edges; EAP-IG's interpolation recovers part of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from appbench import (
    Circuit,
    Discoverer,
    Head,
    Params,
    Pruner,
    RunError,
    SearchSpace,
    connected_to_logits,
    heads_of,
    hookimpl,
)


class _Attribution(Params):
    batch_size: int = Field(
        default=16, ge=1, description="prompts per forward/backward pass (bounds memory)"
    )
    graph: Literal["full", "heads"] = Field(
        default="full",
        description="'full' = the EAP-IG/MIB graph (input, heads' q/k/v, MLPs, logits); "
        "'heads' = head -> head and head -> logits edges only",
    )


class EapDiscoverParams(_Attribution):
    threshold: float = Field(
        default=0.01,
        gt=0.0,
        allow_inf_nan=False,
        description="keep edges whose |score| is at least this fraction of the clean-corrupted gap",
    )
    top_n: int | None = Field(
        default=None,
        ge=1,
        description="keep the top_n edges by |score| instead of a threshold",
    )


class _Integrated(Params):
    steps: int = Field(default=5, ge=1, description="integration points (1 is EAP)")
    ig: Literal["inputs", "activations"] = Field(
        default="inputs",
        description="'inputs' = interpolate the input embeddings (EAP-IG-inputs); "
        "'activations' = interpolate each sender's own output (input, attention layer, MLP) "
        "in turn, steps runs per site",
    )


class EapIgDiscoverParams(EapDiscoverParams, _Integrated):
    pass


class EapPruneParams(_Attribution):
    fraction: float = Field(
        default=0.4, gt=0.0, le=1.0, description="fraction of all heads to keep"
    )
    keep_k: int | None = Field(
        default=None, ge=1, description="number of heads to keep (instead of fraction)"
    )

    @model_validator(mode="after")
    def _one_size(self) -> EapPruneParams:
        if self.keep_k is not None and "fraction" in self.model_fields_set:
            raise ValueError("give fraction or keep_k, not both")
        return self


class EapIgPruneParams(EapPruneParams, _Integrated):
    pass


def _scores(ctx, params):
    from appbench import edge_scores  # imports torch: not when the plugin is listed

    steps = getattr(params, "steps", 1)
    ig = getattr(params, "ig", "inputs")
    what = "EAP" if steps == 1 else f"EAP-IG on {ig}, {steps} steps"
    ctx.log(f"attributing every edge of the {params.graph} graph ({what})")
    return edge_scores(
        ctx.model,
        ctx.task,
        ctx.search,
        steps=steps,
        batch_size=params.batch_size,
        full=params.graph == "full",
        ig=ig,
    )


class Eap(Discoverer):
    """Keep the edges whose EAP score passes a threshold (or the top n)."""

    name = "eap"
    summary = "Edge attribution patching: every edge scored by one backward pass; keep the top."
    Params = EapDiscoverParams

    def discover(self, ctx, space, params):
        from appbench import head_scores

        scores = _scores(ctx, params)
        inside = {
            e: s
            for e, s in scores.items()
            if all(end in space for end in (e.sender, e.receiver) if isinstance(end, Head))
        }
        ranked = sorted(inside, key=lambda e: (-abs(inside[e]), e.id))
        if params.top_n is not None:
            chosen = set(ranked[: params.top_n])
        else:
            chosen = {e for e in ranked if abs(inside[e]) >= params.threshold}
        edges = connected_to_logits(chosen)
        return Circuit(
            ctx.n_layers,
            ctx.n_heads,
            heads_of(edges),
            scores={h.id: s for h, s in sorted(head_scores(inside, space.heads).items())},
            edges=frozenset(edges),
            details={"edges_scored": len(inside), "edges_selected": len(chosen)},
            edge_scores={e.id: round(inside[e], 6) for e in sorted(inside, key=lambda e: e.id)},
            graph=params.graph,
        )


class EapIg(Eap):
    """EAP with integrated gradients over the input embeddings."""

    name = "eap-ig"
    summary = "EAP with integrated gradients (steps points from corrupted to clean inputs)."
    Params = EapIgDiscoverParams


class EapPruner(Pruner):
    """Keep the heads whose outgoing edges carry the most EAP score."""

    name = "eap"
    summary = "Keep the heads with the largest summed |EAP edge score| (HAP-style pruning)."
    Params = EapPruneParams

    def prune(self, ctx, params):
        from appbench import head_scores

        every = [Head(layer, h) for layer in range(ctx.n_layers) for h in range(ctx.n_heads)]
        if params.keep_k is not None and params.keep_k > len(every):
            raise RunError(f"keep_k={params.keep_k} exceeds the model's {len(every)} heads")
        totals = head_scores(_scores(ctx, params))
        if params.keep_k is not None:
            n_keep = params.keep_k
        else:
            n_keep = round(params.fraction * len(every))
            if n_keep < 1:
                raise RunError(
                    f"fraction {params.fraction} keeps no head of {len(every)} (at least "
                    f"{0.5 / len(every):.4f} keeps one)"
                )
        ranked = sorted(every, key=lambda h: (-totals.get(h, 0.0), h))
        return SearchSpace(
            ctx.n_layers,
            ctx.n_heads,
            frozenset(ranked[:n_keep]),
            {h.id: totals.get(h, 0.0) for h in every},
            {"n_keep": n_keep},
        )


class EapIgPruner(EapPruner):
    """EAP-IG head scores."""

    name = "eap-ig"
    summary = "Keep the heads with the largest summed |EAP-IG edge score|."
    Params = EapIgPruneParams


@hookimpl
def appbench_register_discoverers(register):
    register(Eap)
    register(EapIg)


@hookimpl
def appbench_register_pruners(register):
    register(EapPruner)
    register(EapIgPruner)
