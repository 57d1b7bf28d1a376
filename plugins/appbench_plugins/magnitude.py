"""Magnitude pruning of attention heads: keep the heads with the largest weights.

A task-agnostic baseline. Each head is scored by the Frobenius norm of its OV circuit
W_V·W_O (d_model x d_model), the linear map by which the head writes what it reads into the
residual stream; ``norm=o`` scores by ||W_O|| alone. The top ``fraction`` of all heads is kept.
Weights are read unprocessed, as loaded. For grouped-query attention W_V is the head's shared
key-value head.
"""

from typing import Literal

from pydantic import Field

from appbench import Head, Params, Pruner, RunError, SearchSpace, hookimpl


class MagnitudeParams(Params):
    fraction: float = Field(
        default=0.5, gt=0.0, le=1.0, description="fraction of all heads to keep"
    )
    norm: Literal["ov", "o"] = Field(
        default="ov", description="score: 'ov' = ||W_V W_O||_F per head, 'o' = ||W_O||_F per head"
    )


def head_norms(model, norm: str):
    """[L, H] weight-norm score of every head."""
    import torch

    with torch.no_grad():
        w_o = model.W_O  # [L, H, d_head, d_model]
        if norm == "o":
            return w_o.flatten(2).norm(dim=-1)
        w_v = model.W_V  # [L, H, d_model, d_head]
        return torch.linalg.matrix_norm(w_v @ w_o)


class MagnitudePruner(Pruner):
    """Keep the heads with the largest OV (or O) weight norms."""

    name = "magnitude"
    summary = "Task-agnostic baseline: keep the top fraction of heads by ||W_V W_O||_F."
    Params = MagnitudeParams

    def prune(self, ctx, params):
        scores = head_norms(ctx.model, params.norm).float().cpu()
        n_keep = round(params.fraction * scores.numel())
        if n_keep < 1:
            raise RunError(
                f"fraction {params.fraction} keeps no head of {scores.numel()} (at least "
                f"{0.5 / scores.numel():.4f} keeps one)"
            )
        order = scores.flatten().argsort(descending=True, stable=True)[:n_keep].tolist()
        heads = frozenset(Head(i // ctx.n_heads, i % ctx.n_heads) for i in order)
        by_id = {
            Head(layer, h).id: float(scores[layer, h])
            for layer in range(ctx.n_layers)
            for h in range(ctx.n_heads)
        }
        return SearchSpace(ctx.n_layers, ctx.n_heads, heads, by_id, {"n_keep": n_keep})


@hookimpl
def appbench_register_pruners(register):
    register(MagnitudePruner)
