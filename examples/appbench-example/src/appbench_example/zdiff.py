"""Pruner ``zdiff``: a contrastive activation-difference score.

Each head is scored by the mean distance between its ``hook_z`` on a clean prompt and on that
prompt's corruption, ||z_clean - z_corrupt||, over prompts and positions of the search split.
A head whose output does not change with the corruption cannot carry the task's signal; the
top ``fraction`` of heads by score are kept. One forward pass per split, no gradients.
"""

import math

from pydantic import Field

from appbench import Params, Pruner, RunError, SearchSpace


class ZDiffParams(Params):
    fraction: float = Field(
        default=0.5, gt=0.0, le=1.0, description="share of heads to keep, by score"
    )


class ZDiff(Pruner):
    name = "zdiff"
    summary = "Keep the heads whose hook_z moves most between clean and corrupted prompts."
    Params = ZDiffParams

    def prune(self, ctx, params):
        data = ctx.search
        z_clean = ctx.engine.cache_z(data.clean)  # [L, N, T, H, d]
        z_corrupt = ctx.engine.cache_z(data.corrupt)
        mask = data.pad_mask().to(z_clean.dtype)  # [N, T]: 1 on real tokens
        distance = (z_clean - z_corrupt).norm(dim=-1)  # [L, N, T, H]
        score = (distance * mask[None, :, :, None]).sum(dim=(1, 2)) / mask.sum()  # [L, H]
        keep = math.ceil(params.fraction * score.numel())
        if keep < 1:
            raise RunError(f"fraction {params.fraction} keeps no head of {score.numel()}")
        every = SearchSpace.dense(ctx.n_layers, ctx.n_heads).sorted_heads()
        ranked = sorted(every, key=lambda h: -float(score[h.layer, h.head]))
        return SearchSpace(
            ctx.n_layers,
            ctx.n_heads,
            frozenset(ranked[:keep]),
            scores={h.id: float(score[h.layer, h.head]) for h in ranked},
            details={"fraction": params.fraction, "kept": keep},
        )
