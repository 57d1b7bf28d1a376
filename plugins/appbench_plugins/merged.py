"""APP's search space (Andersen et al. 2025, spec 2.2): the union of the FLAP and the
contrastive-FLAP circuits, each at its own selected sparsity (the paper's "Merged" row, the
code's "hybrid").

Vanilla FLAP (WIFV on clean prompts, :mod:`appbench_plugins.flap`) keeps heads that are busy
on the task; contrastive FLAP (WIFN, ``|M_clean^2 - M_corr^2|``, :mod:`appbench_plugins.cflap`)
keeps heads whose activations change under corruption. Each branch is sized separately by
APP's sparsity sweep and its own cliff rule (``flap_rule``, ``cflap_rule``; the authors do not
record which pair produced each result, so all nine are reachable), or by ``flap_sparsity`` /
``flap_keep_k`` and the ``cflap_`` equivalents. Both sweeps share the calibration prompts, the
corrupted means and one batched evaluation.

A pruner: the union is the search space handed to a discoverer (path patching in APP).
Reported ``scores`` are each head's larger branch score (both are per-layer z-scores averaged
over d_head, so they share a scale); membership is decided per branch, not by that maximum.
"""

from __future__ import annotations

from pydantic import Field

from appbench import Pruner, SearchSpace, hookimpl
from appbench_plugins.cflap import cflap_branch
from appbench_plugins.flap import Metric, flap_branch
from appbench_plugins.sparsity import Rule, SweepParams, prune_branches, scores_by_id


class MergedParams(SweepParams):
    flap_metric: Metric = Field(default="wifv", description="metric of the FLAP branch")
    flap_rule: Rule = Field(default="first", description="cliff rule of the FLAP branch")
    flap_sparsity: float | None = Field(
        default=None, ge=0.0, le=1.0, description="fixed sparsity of the FLAP branch"
    )
    flap_keep_k: int | None = Field(
        default=None, ge=1, description="fixed number of heads of the FLAP branch"
    )
    cflap_metric: Metric = Field(
        default="wifn", description="metric of the contrastive-FLAP branch"
    )
    cflap_rule: Rule = Field(
        default="first", description="cliff rule of the contrastive-FLAP branch"
    )
    cflap_sparsity: float | None = Field(
        default=None, ge=0.0, le=1.0, description="fixed sparsity of the contrastive-FLAP branch"
    )
    cflap_keep_k: int | None = Field(
        default=None, ge=1, description="fixed number of heads of the contrastive-FLAP branch"
    )


class MergedPruner(Pruner):
    """Keep the union of the FLAP and contrastive-FLAP head sets."""

    name = "merged"
    summary = "APP's search space: union of FLAP and contrastive-FLAP heads, each at its cliff."
    Params = MergedParams

    def prune(self, ctx, params):
        branches = [
            flap_branch(
                ctx,
                params.flap_metric,
                params.flap_rule,
                params.flap_sparsity,
                params.flap_keep_k,
                params.compat,
            ),
            cflap_branch(
                ctx,
                params.cflap_metric,
                params.cflap_rule,
                params.cflap_sparsity,
                params.cflap_keep_k,
                params.compat,
            ),
        ]
        (flap, cflap), common = prune_branches(ctx, params, branches)
        heads = flap.heads | cflap.heads
        return SearchSpace(
            ctx.n_layers,
            ctx.n_heads,
            heads,
            scores_by_id(flap.scores.maximum(cflap.scores)),
            {
                **common,
                "union_size": len(heads),
                "overlap_size": len(flap.heads & cflap.heads),
                "flap": {**flap.details, "heads": [h.id for h in sorted(flap.heads)]},
                "cflap": {**cflap.details, "heads": [h.id for h in sorted(cflap.heads)]},
            },
        )


@hookimpl
def appbench_register_pruners(register):
    register(MergedPruner)
