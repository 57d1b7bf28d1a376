"""FLAP head pruning (An et al., "Fluctuation-based Adaptive Structured Pruning for Large
Language Models", AAAI 2024) as APP uses it (Andersen et al. 2025, spec sections 1 and 2.3-2.4).

FLAP scores the input channels of the attention output projection W_O by how much they
fluctuate over calibration data; APP turns those scores into a head-level search space.

- **Channels.** Channel ``j = h*d_head + e`` of layer l is component e of head h's ``hook_z``;
  its outgoing weight is ``w_j = W_O[l, h, e, :]`` (unprocessed weights, as loaded).
- **Statistics** come from one cached ``hook_z`` pass over the calibration prompts. By default
  they are true per-token statistics over non-pad positions: mean, unbiased variance V_j and
  second moment E2_j. With ``compat`` they are FLAP's per-prompt running statistics, padding
  included: each prompt contributes its sum over all T positions, the mean is updated first
  and then used for both factors of the variance update (the "old mean" alias), and the first
  prompt contributes no fluctuation; E2_j is the mean over prompts of the position-summed
  squares. The two differ by about a factor T, which standardisation removes, plus the quirks.
- **Metric** ``M_j``: ``ifv`` = V_j; ``wifv`` = V_j ||w_j||^2 (default); ``wifn`` =
  sqrt(E2_j) mean_i |w_ji|.
- **Head score.** ``r_j = M_j^2``, standardised per layer over its channels (unbiased std; a
  layer whose channels all score alike gets 0 everywhere instead of a division by zero), then
  averaged over the head's d_head channels: ``s[l, h]``. Heads are ranked globally (AL-AM).
- **Size** of the search space: the top-K(p) heads, p chosen by a performance sweep and a
  cliff rule, or given as ``sparsity``, or K given as ``keep_k`` (see
  :mod:`appbench_plugins.sparsity`).

The whole method is a pruner; the kept heads are the search space handed to a discoverer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field

from appbench import Pruner, RunError, hookimpl
from appbench_plugins.sparsity import Branch, SingleBranchParams, prune_single

Metric = Literal["ifv", "wifv", "wifn"]


class FlapParams(SingleBranchParams):
    metric: Metric = Field(
        default="wifv",
        description="channel metric: ifv = variance, wifv = variance x ||w||^2, "
        "wifn = sqrt(second moment) x mean|w|",
    )


# ----------------------------------------------------------------------- statistics
def _flat(z: Any) -> Any:
    """[L, N, T, H, d] -> [L, N, T, H*d] channels, accumulated in float64 where possible."""
    import torch

    dtype = torch.float32 if z.device.type == "mps" else torch.float64
    return z.flatten(-2).to(dtype)


class ChannelStats:
    """Fluctuation and second moment of every channel ([L, H*d]), accumulated chunk by chunk
    of prompts so that no more than one chunk of ``hook_z`` is ever held. With one chunk the
    arithmetic is exactly that of the whole split at once; later chunks merge by Chan et al.'s
    pairwise update (count, mean, sum of squared deviations)."""

    def __init__(self, compat: bool = False) -> None:
        self.compat = compat
        self.count: Any = None  # non-pad tokens (compat: prompts) per layer, [L, 1]
        self.mean: Any = None
        self.m2: Any = None  # sum of squared deviations (compat: the running fluctuation)
        self.square: Any = None  # sum of x^2 over tokens (compat: over prompts of per-prompt sums)

    def add(self, z: Any, mask: Any) -> None:
        """One chunk: ``z`` [L, n, T, H, d] with its [n, T] non-pad mask."""
        x = _flat(z)
        if self.compat:
            self._add_compat(x)
            return
        weights = mask.to(x.dtype).to(x.device)[None, :, :, None]
        count = weights.sum(dim=(1, 2))
        square = ((x**2) * weights).sum(dim=(1, 2))
        if self.count is None:
            if float(count.min()) < 1:
                raise RunError("FLAP statistics need at least one non-pad calibration token")
            mean = (x * weights).sum(dim=(1, 2)) / count
            self.count, self.mean, self.square = count, mean, square
            self.m2 = (((x - mean[:, None, None]) ** 2) * weights).sum(dim=(1, 2))
            return
        if float(count.min()) < 1:
            return
        mean = (x * weights).sum(dim=(1, 2)) / count
        m2 = (((x - mean[:, None, None]) ** 2) * weights).sum(dim=(1, 2))
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / total
        self.count, self.square = total, self.square + square

    def _add_compat(self, x: Any) -> None:
        # FLAP's own running update, prompt by prompt over all positions, continued across
        # chunks (see the module doc).
        square = (x**2).sum(dim=2).sum(dim=1)
        first = 0
        if self.count is None:
            self.mean = x[:, 0].mean(dim=1)
            self.m2 = x.new_zeros(self.mean.shape)
            self.square = square
            self.count = 1
            first = 1
        else:
            self.square = self.square + square
        for i in range(first, x.shape[1]):
            n = self.count
            prompt = x[:, i]  # [L, T, C]
            self.mean = self.mean * n / (n + 1) + prompt.mean(dim=1) / (n + 1)
            self.m2 = self.m2 * (n - 1) / n + ((prompt - self.mean[:, None]) ** 2).sum(dim=1) / (
                n + 1
            )
            self.count = n + 1

    def variance(self) -> Any:
        """V_j: the unbiased token variance (compat: FLAP's running fluctuation)."""
        if self.compat:
            return self.m2
        if float(self.count.min()) < 2:
            raise RunError("FLAP statistics need at least two non-pad calibration tokens")
        return self.m2 / (self.count - 1)

    def second_moment(self) -> Any:
        """E2_j: the per-token mean of x^2 (compat: the mean over prompts of summed x^2)."""
        return self.square / self.count


def channel_stats(chunks: Iterable[tuple[Any, Any]], compat: bool = False) -> ChannelStats:
    """Accumulate :class:`ChannelStats` over ``(z, mask)`` chunks."""
    stats = ChannelStats(compat)
    for z, mask in chunks:
        stats.add(z, mask)
    if stats.count is None:
        raise RunError("FLAP statistics need at least one calibration prompt")
    return stats


def channel_variance(z: Any, mask: Any, compat: bool = False) -> Any:
    """Fluctuation V_j of every channel: [L, N, T, H, d] -> [L, H*d].

    Args:
        z: cached ``hook_z``.
        mask: [N, T] True on real tokens (ignored with ``compat``).
        compat: FLAP's per-prompt running update over all positions (see the module doc).
    """
    return channel_stats([(z, mask)], compat).variance()


def channel_second_moment(z: Any, mask: Any, compat: bool = False) -> Any:
    """E2_j of every channel: per-token mean of x^2 over non-pad positions, or with ``compat``
    the mean over prompts of the sum of x^2 over all positions. [L, N, T, H, d] -> [L, H*d]."""
    return channel_stats([(z, mask)], compat).second_moment()


def channel_metric(z: Any, mask: Any, w_o: Any, metric: str, compat: bool = False) -> Any:
    """The per-channel metric M_j ([L, H*d]) of spec 1.3 for ``hook_z`` ``z`` and weights ``w_o``.

    Args:
        z: [L, N, T, H, d] cached ``hook_z``.
        mask: [N, T] non-pad positions.
        w_o: [L, H, d, d_model] output weights; channel j's row is ``w_o[l, h, e]``.
        metric: ``ifv``, ``wifv`` or ``wifn``.
        compat: the authors' statistics.
    """
    return channel_metric_of(channel_stats([(z, mask)], compat), w_o, metric)


def channel_metric_of(stats: ChannelStats, w_o: Any, metric: str) -> Any:
    """M_j from accumulated statistics (see :func:`channel_metric`)."""
    import torch

    with torch.no_grad():
        if metric == "wifn":
            e2 = stats.second_moment()
            w = w_o.detach().flatten(1, 2).to(e2.device)  # [L, H*d, d_model]
            return e2.sqrt() * w.abs().mean(dim=-1).to(e2.dtype)
        variance = stats.variance()
        w = w_o.detach().flatten(1, 2).to(variance.device)
        if metric == "ifv":
            return variance
        if metric == "wifv":
            return variance * (w**2).sum(dim=-1).to(variance.dtype)
    raise ValueError(f"unknown FLAP metric {metric!r}; choose ifv, wifv or wifn")


def standardise(r: Any) -> Any:
    """Per-layer z-scores of channel scores [L, C] (unbiased std); a layer with no spread -> 0."""
    import torch

    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, correction=1, keepdim=True)
    # A spread that is only rounding noise relative to the scores carries no ranking.
    flat = std <= 1e-9 * r.abs().mean(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(r), (r - mean) / torch.where(flat, 1.0, std))


def head_scores(r: Any, n_heads: int) -> Any:
    """Raw channel scores r [L, H*d] -> head scores [L, H]: standardise, mean over d_head."""
    standard = standardise(r)
    return standard.view(r.shape[0], n_heads, -1).mean(dim=-1)


def flap_scores(z: Any, mask: Any, w_o: Any, metric: str = "wifv", compat: bool = False) -> Any:
    """FLAP head scores [L, H] from clean ``hook_z``: ``r = M^2``, standardised, head means."""
    m = channel_metric(z, mask, w_o, metric, compat)
    return head_scores(m**2, int(w_o.shape[1]))


# -------------------------------------------------------------------------- pruner
def flap_branch(ctx: Any, metric: str, rule: str, sparsity, keep_k, compat: bool) -> Branch:
    """The vanilla-FLAP branch for :func:`prune_branches` (shared with ``merged``)."""
    w_o = ctx.model.W_O

    def score(prompts):
        # Chunk by chunk of prompts: only one chunk's hook_z is held at a time.
        stats = channel_stats(prompts.z_chunks("clean"), compat)
        return head_scores(channel_metric_of(stats, w_o, metric) ** 2, int(w_o.shape[1]))

    return Branch("flap", score, rule, sparsity, keep_k, {"metric": metric})


class FlapPruner(Pruner):
    """Keep the heads whose output-projection inputs fluctuate most on the task's prompts."""

    name = "flap"
    summary = "FLAP (An et al. 2024) head scores on clean prompts; size by APP's sparsity sweep."
    Params = FlapParams

    def prune(self, ctx, params):
        branch = flap_branch(
            ctx, params.metric, params.rule, params.sparsity, params.keep_k, params.compat
        )
        return prune_single(ctx, params, branch)


@hookimpl
def appbench_register_pruners(register):
    register(FlapPruner)
