"""Contrastive FLAP (APP, Andersen et al. 2025, spec 2.1): FLAP scores of what changes between
clean and corrupted prompts.

The channel metric M_j of FLAP (An et al., AAAI 2024; see :mod:`appbench_plugins.flap`) is
computed twice with the same W_O: on the clean calibration prompts and on their corrupted
counterparts, run through the unmodified model. The channel score is the absolute difference
of the squares, ``r_j = |M_clean_j^2 - M_corr_j^2|``, not normalised; then the same per-layer
standardisation, mean over d_head and global top-K as FLAP. With the default ``wifn`` metric
this is ``|E2_clean_j - E2_corr_j| (mean_i |w_ji|)^2``: the change in each ``hook_z``
channel's second moment, weighted by its output weights.

Because every FLAP metric is an even function of the activations, a corruption that only
flips the sign of a channel (e.g. a signal read as +1 on clean and -1 on corrupted prompts)
leaves its score at zero: contrastive FLAP sees changes of magnitude, not of direction.

A pruner: the kept heads (size chosen by APP's sparsity sweep, see
:mod:`appbench_plugins.sparsity`) are the search space handed to a discoverer.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from appbench import Pruner, hookimpl
from appbench_plugins.flap import (
    Metric,
    channel_metric,
    channel_metric_of,
    channel_stats,
    head_scores,
)
from appbench_plugins.sparsity import Branch, SingleBranchParams, prune_single


class CflapParams(SingleBranchParams):
    metric: Metric = Field(
        default="wifn",
        description="channel metric compared between clean and corrupted prompts: ifv, wifv "
        "or wifn",
    )


def contrastive_channel_scores(
    z_clean: Any, z_corrupt: Any, mask: Any, w_o: Any, metric: str = "wifn", compat: bool = False
) -> Any:
    """``r_j = |M_clean_j^2 - M_corr_j^2|`` for every channel: [L, H*d].

    Args:
        z_clean: [L, N, T, H, d] ``hook_z`` on the clean prompts.
        z_corrupt: the same on the corrupted prompts (aligned, so one pad mask serves both).
        mask: [N, T] non-pad positions.
        w_o: [L, H, d, d_model] output weights.
        metric: ``ifv``, ``wifv`` or ``wifn``.
        compat: the authors' statistics.
    """
    clean = channel_metric(z_clean, mask, w_o, metric, compat)
    corrupt = channel_metric(z_corrupt, mask, w_o, metric, compat)
    return (clean**2 - corrupt**2).abs()


def contrastive_scores(
    z_clean: Any, z_corrupt: Any, mask: Any, w_o: Any, metric: str = "wifn", compat: bool = False
) -> Any:
    """Contrastive-FLAP head scores [L, H]."""
    r = contrastive_channel_scores(z_clean, z_corrupt, mask, w_o, metric, compat)
    return head_scores(r, int(w_o.shape[1]))


def cflap_branch(ctx: Any, metric: str, rule: str, sparsity, keep_k, compat: bool) -> Branch:
    """The contrastive-FLAP branch for :func:`prune_branches` (shared with ``merged``)."""
    w_o = ctx.model.W_O

    def score(prompts):
        # Chunk by chunk of prompts: only one chunk's hook_z is held at a time.
        clean = channel_metric_of(channel_stats(prompts.z_chunks("clean"), compat), w_o, metric)
        corrupt = channel_metric_of(channel_stats(prompts.z_chunks("corrupt"), compat), w_o, metric)
        return head_scores((clean**2 - corrupt**2).abs(), int(w_o.shape[1]))

    return Branch("cflap", score, rule, sparsity, keep_k, {"metric": metric})


class CflapPruner(Pruner):
    """Keep the heads whose output-projection inputs change most under corruption."""

    name = "cflap"
    summary = "Contrastive FLAP (APP): |M_clean^2 - M_corr^2| head scores; size by sparsity sweep."
    Params = CflapParams

    def prune(self, ctx, params):
        branch = cflap_branch(
            ctx, params.metric, params.rule, params.sparsity, params.keep_k, params.compat
        )
        return prune_single(ctx, params, branch)


@hookimpl
def appbench_register_pruners(register):
    register(CflapPruner)
