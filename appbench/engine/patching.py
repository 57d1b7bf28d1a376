"""The patching engine shared by pruners, discoverers and the evaluation.

Everything here rests on one primitive: run the model on a split's clean prompts, possibly
several *variants* at once stacked along the batch dimension, where in each variant some heads'
``hook_z`` are replaced by a source value (their corrupted activation, or a mean), and read the
logits only at each prompt's target position. Two choices keep it cheap:

- logits are computed only at the target position (the unembedding of every position is the
  most expensive single matrix product of a small model with a large vocabulary);
- a run whose first replaced layer is ``l`` starts from the cached clean residual stream
  before layer ``l`` instead of recomputing the unchanged prefix.

Per-head outputs are never materialised with ``use_attn_result``; only ``hook_z`` is cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from appbench.circuit import Head
from appbench.engine.fused import (
    POST_NORM_ARCHITECTURES,
    FusedBlocks,
    Past,
    fusable,
    input_weights,
    plain_attention,
)
from appbench.engine.reference import metric_gap
from appbench.errors import NotCausalError

if TYPE_CHECKING:
    from appbench.tasks import Task, TaskData


@dataclass(frozen=True)
class Replacement:
    """Replace some heads' ``hook_z`` at one layer, per variant.

    Attributes:
        mask: [K, H] bool; True where variant k takes head h from ``source``.
        source: [N, T, H, d_head] values to write (shared by all variants).
    """

    mask: torch.Tensor
    source: torch.Tensor


def logits_of_residual(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits [R, V] from final residual vectors [R, d_model], as the model's forward makes
    them after its last block (final norm, unembedding, softcap): for the few positions a
    metric reads instead of every position."""
    return _softcapped(model, model.unembed(_final_norm(model, resid)[:, None, :])[:, 0, :])


def unembedded(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """:func:`logits_of_residual`, the product made here as ``resid @ W_U + b_U``.

    TransformerLens's ``Unembed`` transposes the whole ``W_U`` into a contiguous copy on every
    call (113 MB for SmolLM2's 49k-token vocabulary: about 80 ms of a CPU core, as long as the
    product itself for a few hundred rows). A method that unembeds on every run (ACDC's KL
    distance) calls this instead. The product then passes no module hook, so the runner's
    counter does not see it: the caller adds its ``2 R d_model d_vocab`` FLOPs to its own
    count.
    """
    unembed = model.unembed
    logits = torch.addmm(unembed.b_U, _final_norm(model, resid), unembed.W_U)
    return _softcapped(model, logits)


def _final_norm(model: Any, resid: torch.Tensor) -> torch.Tensor:
    if model.cfg.normalization_type is None:
        return resid
    return model.ln_final(resid[:, None, :])[:, 0, :]


def _softcapped(model: Any, logits: torch.Tensor) -> torch.Tensor:
    softcap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    return softcap * torch.tanh(logits / softcap) if softcap > 0 else logits


def z_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def resid_pre_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


class PatchingEngine:
    """Batched head-level patching on one model and task.

    Args:
        model: a TransformerLens HookedTransformer.
        task: the task whose metric scores runs.
        max_rows: the most prompt rows one forward call may hold; variants are chunked to fit.
    """

    def __init__(self, model: Any, task: Task, max_rows: int = 1024) -> None:
        self.model = model
        self.task = task
        self.max_rows = max_rows
        #: FLOPs of work done outside model modules (e.g. per-head projections); the runner
        #: adds them to its own count.
        self.extra_flops = 0.0
        if getattr(model.cfg, "positional_embedding_type", "") == "shortformer":
            raise ValueError(
                "shortformer positional embeddings are not supported by the patching engine"
            )

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.model.cfg.n_heads)

    # ----------------------------------------------------------------- caching
    @torch.no_grad()
    def cache_z(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every layer's ``hook_z`` on ``tokens``: [L, N, T, H, d_head], one forward pass."""
        names = {z_hook_name(layer) for layer in range(self.n_layers)}
        _, cache = self.model.run_with_cache(
            tokens, names_filter=lambda name: name in names, return_type=None
        )
        return torch.stack([cache[z_hook_name(layer)] for layer in range(self.n_layers)])

    @torch.no_grad()
    def cache_resid_pre(self, tokens: torch.Tensor) -> torch.Tensor:
        """The clean residual stream before every layer: [L, N, T, d_model], one forward pass."""
        names = {resid_pre_name(layer) for layer in range(self.n_layers)}
        _, cache = self.model.run_with_cache(
            tokens, names_filter=lambda name: name in names, return_type=None
        )
        return torch.stack([cache[resid_pre_name(layer)] for layer in range(self.n_layers)])

    @staticmethod
    def group_means(z: torch.Tensor, data: TaskData) -> torch.Tensor:
        """Per-template, per-position means of cached ``z`` ([L, N, T, H, d]) -> [L, G, T, H, d].

        Prompts of one template share their length, so positions are aligned within a group;
        padded positions (after every target) are averaged too but never read by the metric.
        """
        groups = data.groups.to(z.device)
        counts = torch.bincount(groups, minlength=data.n_groups).clamp(min=1).to(z.dtype)
        sums = torch.zeros(
            (z.shape[0], data.n_groups, *z.shape[2:]), dtype=z.dtype, device=z.device
        )
        sums.index_add_(1, groups, z)
        return sums / counts.view(1, -1, 1, 1, 1)

    @staticmethod
    def per_prompt(means: torch.Tensor, data: TaskData) -> torch.Tensor:
        """Expand group means [L, G, T, H, d] to the prompts of ``data``: [L, N, T, H, d]."""
        return means[:, data.groups.to(means.device)]

    # -------------------------------------------------------------- the primitive
    @torch.no_grad()
    def target_logits(
        self,
        data: TaskData,
        replacements: Mapping[int, Replacement] | None = None,
        n_variants: int = 1,
        resid_pre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits at each prompt's target position for ``n_variants`` patched runs: [K, N, V].

        Args:
            data: the split whose clean prompts are run.
            replacements: layer -> which heads each variant replaces, and with what.
            n_variants: K, the number of variants stacked along the batch.
            resid_pre: optional clean cache [L, N, T, d_model]; when given, the run starts at
                the first replaced layer instead of at the embedding.
        """
        replacements = dict(replacements or {})
        n, length = data.clean.shape
        start = min(replacements) if (replacements and resid_pre is not None) else 0
        if start > 0:
            assert resid_pre is not None
            model_input = resid_pre[start].repeat(n_variants, 1, 1)
        else:
            model_input = data.clean.repeat(n_variants, 1)

        def make_hook(rep: Replacement) -> Any:
            def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
                shaped = z.view(n_variants, n, length, *z.shape[2:])
                mask = rep.mask.to(z.device)[:, None, None, :, None]
                return torch.where(mask, rep.source[None].to(z.dtype), shaped).view_as(z)

            return hook

        hooks = [
            (z_hook_name(layer), make_hook(rep)) for layer, rep in sorted(replacements.items())
        ]
        return self.run_to_target(data, model_input, start, hooks, n_variants)

    @torch.no_grad()
    def run_to_target(
        self,
        data: TaskData,
        model_input: torch.Tensor,
        start: int,
        hooks: Sequence[tuple[str, Any]],
        n_variants: int,
    ) -> torch.Tensor:
        """Run from layer ``start`` (tokens if 0, else the residual stream before ``start``) with
        ``hooks``, and return the logits at each prompt's target position: [K, N, V]."""
        model = self.model
        with model.hooks(fwd_hooks=list(hooks)):
            if start > 0:
                final = model(model_input, start_at_layer=start, stop_at_layer=self.n_layers)
            else:
                final = model(model_input, stop_at_layer=self.n_layers)
        rows = torch.arange(final.shape[0], device=final.device)
        at_target = final[rows, data.target_pos.to(final.device).repeat(n_variants)]
        return self.unembed_residual(at_target).view(n_variants, len(data), -1)

    def unembed_residual(
        self, resid: torch.Tensor, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits from final residual vectors [R, d_model] -> [R, V] (final norm, softcap), or
        only the vocabulary ``columns`` given: [R, C]."""
        if columns is None:
            return logits_of_residual(self.model, resid)
        unembed = self.model.unembed
        x = _final_norm(self.model, resid)
        logits = torch.addmm(unembed.b_U[columns], x, unembed.W_U[:, columns])
        self.extra_flops += 2 * logits.numel() * x.shape[-1]
        return _softcapped(self.model, logits)

    def target_metric(self, data: TaskData, final: torch.Tensor) -> torch.Tensor:
        """Task metric per variant and prompt from the final residual at each prompt's target
        position, [K, N, d_model] -> [K, N].

        Only the logits the metric reads are computed (:meth:`Task.metric_columns`): for a
        logit difference that is a handful of the vocabulary's columns.
        """
        k, d = final.shape[0], final.shape[-1]
        columns = self.task.metric_columns(data)
        if columns is None:
            return self.metric(
                data, self.unembed_residual(final.reshape(-1, d)).view(k, len(data), -1)
            )
        columns = columns.to(final.device)

        def renumbered(ids: torch.Tensor) -> torch.Tensor:
            return torch.where(ids >= 0, torch.searchsorted(columns, ids.clamp(min=0)), ids)

        compact = replace(data, answers=renumbered(data.answers), wrong=renumbered(data.wrong))
        logits = self.unembed_residual(final.reshape(-1, d), columns)
        return self.metric(compact, logits.view(k, len(data), -1))

    def metric(self, data: TaskData, logits: torch.Tensor) -> torch.Tensor:
        """Task metric per variant and prompt: [K, N, V] -> [K, N]."""
        k = logits.shape[0]
        flat = logits.reshape(k * len(data), -1)
        repeated = _repeat_data(data, k)
        return self.task.metric(flat.float(), repeated).view(k, len(data))

    # ------------------------------------------------------------ common runs
    @torch.no_grad()
    def clean_metric(self, data: TaskData) -> torch.Tensor:
        """Per-prompt metric of the unmodified model on clean prompts: [N]."""
        return self.metric(data, self.target_logits(data))[0]

    @torch.no_grad()
    def corrupt_metric(self, data: TaskData) -> torch.Tensor:
        """Per-prompt metric of the unmodified model on corrupted prompts: [N]."""
        swapped = _with_clean(data, data.corrupt)
        return self.metric(swapped, self.target_logits(swapped))[0]

    def chunks(self, n_items: int, rows_per_item: int) -> Iterator[range]:
        """Split ``n_items`` variants into chunks of at most ``max_rows`` rows."""
        per = max(1, self.max_rows // max(1, rows_per_item))
        for first in range(0, n_items, per):
            yield range(first, min(n_items, first + per))

    @torch.no_grad()
    def ablated_metric(
        self, data: TaskData, keep: torch.Tensor, means: torch.Tensor
    ) -> torch.Tensor:
        """Metric with every head *not* kept replaced by its group mean.

        Args:
            data: split to run.
            keep: [K, L, H] or [L, H] bool; True = the head keeps its own activation.
            means: per-prompt means [L, N, T, H, d] (see :meth:`per_prompt`).

        Returns:
            [K, N] per-prompt metric of each of the K circuits.
        """
        keep = keep.bool()
        if keep.dim() == 2:
            keep = keep[None]
        outputs = []
        for chunk in self.chunks(keep.shape[0], len(data)):
            sub = keep[chunk.start : chunk.stop]
            reps = {
                layer: Replacement(~sub[:, layer], means[layer])
                for layer in range(self.n_layers)
                if not bool(sub[:, layer].all())
            }
            logits = self.target_logits(data, reps, n_variants=len(chunk))
            outputs.append(self.metric(data, logits))
        return torch.cat(outputs)

    @torch.no_grad()
    def patch_heads(
        self,
        data: TaskData,
        heads: Sequence[Head],
        source_z: torch.Tensor,
        resid_pre: torch.Tensor,
    ) -> dict[Head, torch.Tensor]:
        """Activation patching: for each head alone, write ``source_z`` into its ``hook_z``.

        Heads of one layer are batched; each run starts from the clean residual stream at the
        head's layer. Only the listed heads are run.

        Args:
            data: split whose clean prompts are run.
            heads: the heads to patch, one variant each.
            source_z: [L, N, T, H, d] activations to patch in (e.g. the corrupted cache).
            resid_pre: clean [L, N, T, d_model] cache.

        Returns:
            head -> per-prompt metric [N] of the run with that head patched.
        """
        by_layer: dict[int, list[Head]] = {}
        for head in sorted(set(heads)):
            by_layer.setdefault(head.layer, []).append(head)
        results: dict[Head, torch.Tensor] = {}
        for layer, layer_heads in by_layer.items():
            for chunk in self.chunks(len(layer_heads), len(data)):
                group = [layer_heads[i] for i in chunk]
                mask = torch.zeros(len(group), self.n_heads, dtype=torch.bool)
                for k, head in enumerate(group):
                    mask[k, head.head] = True
                rep = {layer: Replacement(mask, source_z[layer])}
                logits = self.target_logits(data, rep, len(group), resid_pre=resid_pre)
                values = self.metric(data, logits)
                for k, head in enumerate(group):
                    results[head] = values[k]
        return results


def _with_clean(data: TaskData, tokens: torch.Tensor) -> TaskData:
    return replace(data, clean=tokens)


def _repeat_data(data: TaskData, k: int) -> TaskData:
    """The split repeated k times along the batch (only the fields the metric reads)."""
    if k == 1:
        return data
    return replace(
        data,
        answers=data.answers.repeat(k, 1),
        wrong=data.wrong.repeat(k, 1),
        groups=data.groups.repeat(k),
        target_pos=data.target_pos.repeat(k),
        lengths=data.lengths.repeat(k),
        clean=data.clean.repeat(k, 1),
        corrupt=data.corrupt.repeat(k, 1),
    )


# ------------------------------------------------------------------ path patching
@dataclass(frozen=True)
class PathPatchingCache:
    """Clean and corrupted activations of one split, computed in two forward passes.

    Attributes:
        z_clean: [L, N, T, H, d_head] clean ``hook_z``.
        z_corrupt: [L, N, T, H, d_head] corrupted ``hook_z``.
        resid_pre: [L + 1, N, T, d_model] clean residual stream before each layer; index L
            is the final residual (before the final norm).
        attn_out: [L, N, T, d_model] clean ``hook_attn_out`` (what each attention layer adds).
        m_clean: mean metric on clean prompts.
        m_corrupt: mean metric on corrupted prompts.
    """

    z_clean: torch.Tensor
    z_corrupt: torch.Tensor
    resid_pre: torch.Tensor
    attn_out: torch.Tensor
    m_clean: float
    m_corrupt: float

    @property
    def gap(self) -> float:
        return self.m_clean - self.m_corrupt


@dataclass(frozen=True)
class LiveSpan:
    """Prompts of a split whose patched runs can differ from the clean run only at positions
    ``start .. stop - 1``, and whose metric reads nothing after them.

    Before a prompt's first differing token its clean and corrupted prompts agree, so in a
    causal model every activation there, the corrupted ``hook_z`` included, is the clean one,
    and so is every activation of a path-patched run. After its target position nothing
    reaches the target's logits. A patched run therefore needs only these positions, attending
    to the clean keys and values of the positions before ``start``.

    Attributes:
        data: the prompts (a selection of the split).
        rows: [n] their indices in the split.
        start: the first position that may change (the earliest of the rows).
        stop: one past the latest target position of the rows.
    """

    data: TaskData
    rows: torch.Tensor
    start: int
    stop: int

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [K, N, T, ...] of the whole split -> [K, n, stop, ...] of these rows."""
        return values[:, self.rows, : self.stop]


def live_windows(data: TaskData) -> tuple[list[int], list[int]]:
    """Each prompt's live positions ``start .. stop - 1`` (see :class:`LiveSpan`): from its
    first token that differs between clean and corrupted prompt (its target, if none differs
    before it) to its target."""
    length = data.clean.shape[1]
    positions = torch.arange(length, device=data.clean.device)
    differs = (data.clean != data.corrupt) & (positions[None, :] <= data.target_pos[:, None])
    first = torch.where(differs, positions[None, :], length).min(dim=1).values
    return torch.minimum(first, data.target_pos).tolist(), (data.target_pos + 1).tolist()


def _rows_by(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Row indices grouped by their key, keys in sorted order."""
    grouped: dict[Any, list[int]] = {}
    for row, key in enumerate(keys):
        grouped.setdefault(key, []).append(row)
    return dict(sorted(grouped.items()))


def live_spans(data: TaskData, max_spans: int = 8) -> list[LiveSpan]:
    """The split's prompts grouped into at most ``max_spans`` :class:`LiveSpan` s.

    Prompts with the same live window (:func:`live_windows`) form a span; while there are
    too many, the two spans whose union adds the fewest positions (prompts x window width)
    are merged.
    """
    windows = _rows_by(list(zip(*live_windows(data), strict=True)))
    groups = [(start, stop, rows) for (start, stop), rows in windows.items()]

    def cost(start: int, stop: int, n: int) -> int:
        return n * (stop - start)

    while len(groups) > max_spans:
        best: tuple[int, int, int] | None = None
        for i, (a_start, a_stop, a_rows) in enumerate(groups):
            for j in range(i + 1, len(groups)):
                b_start, b_stop, b_rows = groups[j]
                merged = cost(min(a_start, b_start), max(a_stop, b_stop), len(a_rows) + len(b_rows))
                extra = (
                    merged - cost(a_start, a_stop, len(a_rows)) - cost(b_start, b_stop, len(b_rows))
                )
                if best is None or extra < best[0]:
                    best = (extra, i, j)
        assert best is not None
        _, i, j = best
        (a_start, a_stop, a_rows), (b_start, b_stop, b_rows) = groups[i], groups[j]
        groups[i] = (min(a_start, b_start), max(a_stop, b_stop), sorted(a_rows + b_rows))
        del groups[j]
    return [
        LiveSpan(data.select(rows), torch.tensor(rows, dtype=torch.long), start, stop)
        for start, stop, rows in groups
    ]


@torch.no_grad()
def attends_causally(model: Any, tokens: torch.Tensor) -> bool:
    """Whether no position's output depends on a later one: the first prompt is run as it is
    and with random noise added to its last position's residual stream, and every earlier
    position must come out the same.

    A behavioural check, so that it catches every way attention can see the future (a
    bidirectional config, a zeroed ``IGNORE`` buffer, a subclass with its own mask).
    """
    row = tokens[:1]
    if row.shape[1] < 2:
        return True
    n_layers = int(model.cfg.n_layers)
    plain = model(row, stop_at_layer=n_layers)
    generator = torch.Generator().manual_seed(0)

    def perturb(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        noise = torch.randn(resid.shape[-1], generator=generator).to(resid)
        resid = resid.clone()
        resid[:, -1] += noise * (resid.abs().max() + 1.0)
        return resid

    with model.hooks(fwd_hooks=[(resid_pre_name(0), perturb)]):
        perturbed = model(row, stop_at_layer=n_layers)
    before, after = plain[0, :-1], perturbed[0, :-1]
    scale = float(before.abs().max()) or 1.0
    return bool((before - after).abs().max() <= 1e-5 * scale)


class PathPatcher:
    """Exact path patching (APP spec 3.2), computed with far fewer FLOPs than two full forward
    passes per sender per receiver input.

    The reference measurement of a sender s (clean run, every ``hook_z`` frozen to its clean
    value except s, which takes its corrupted value) has a closed structure that this class
    exploits without changing any score:

    - before s's layer the frozen run *is* the clean run, so it starts from the cached clean
      residual stream at that layer;
    - from s's layer on, every attention layer's output is frozen: it equals the clean
      ``hook_attn_out`` plus, at s's layer, s's own change ``(z_corrupt - z_clean) W_O``. Only
      the MLPs are recomputed, and with attention frozen no position sees any other, so the
      logits stage runs MLPs at the target positions only, and the receivers' frozen runs at
      the live positions only (see below);
    - the frozen residual at a receiver's layer depends on the sender alone, so it is
      computed once per (sender, layer) and reused for every receiver head and for q, k and v;
    - the second pass (clean run, the receiver's q, k or v input replaced) starts from the
      cached clean residual at the receiver's layer and stacks all senders and all three
      inputs along the batch. In the receiver's layer only the heads reading the replaced
      input are recomputed (the others' outputs are the cached clean ones); the last layer
      runs the target query alone (and a receiver in the last layer is computed at the target
      alone);
    - every patched run is computed only at each prompt's *live* positions
      (:class:`LiveSpan`): before its first token that differs between clean and corrupted
      prompt, every activation is the clean one (the model is causal), and after its target
      nothing reaches the metric. Those windows attend to the clean keys and values of the
      positions before them;
    - only the logits the metric reads are computed (:meth:`PatchingEngine.target_metric`);
    - plain blocks are rerun with fused kernels (:mod:`appbench.engine.fused`).

    What remains is what any exact method must compute: every layer after the receiver's at
    the live positions, for every (sender, input) variant, because the network is not linear
    in the change (``benchmarks/`` computes that bound and compares).

    Architectures where that closed form does not hold (norms after W_O, split q/k/v inputs)
    run the frozen passes through TransformerLens hooks instead; the scores are the same. A
    model whose attention is not causal (checked by :func:`attends_causally`) is refused with
    :class:`~appbench.errors.NotCausalError`: live positions would give other scores.

    Args:
        engine: the engine of the model and task.
        data: the split to patch on (clean and corrupted prompts).
        memo_bytes: budget for remembered frozen residuals (least recently used dropped).
    """

    def __init__(self, engine: PatchingEngine, data: TaskData, memo_bytes: int = 1 << 30) -> None:
        self.engine = engine
        self.model = engine.model
        self.data = data
        if not attends_causally(self.model, data.clean):
            raise NotCausalError(
                "PathPatcher relies on causal attention, and this model's positions see later "
                "positions (noise at the last position moved an earlier position's output)"
            )
        self.memo_bytes = memo_bytes
        self._memo: dict[tuple[Head, int], torch.Tensor] = {}
        self._clean_inputs: dict[Head, dict[str, torch.Tensor]] = {}
        self._clean_kv: dict[int, Past] = {}
        self.cache = self._build_cache()
        self.spans = live_spans(data)
        starts, stops = live_windows(data)
        length = int(data.clean.shape[1])
        #: Flat indices (prompt * T + position) of every live position of the split.
        self._live = torch.cat(
            [
                row * length + torch.arange(a, b)
                for row, (a, b) in enumerate(zip(starts, stops, strict=True))
            ]
        ).to(data.clean.device)
        self.whole = LiveSpan(data, torch.arange(len(data)), 0, length)
        #: The prompts grouped by target position, each span the target alone (receivers in
        #: the last layer, whose change reaches the logits through the target query only).
        self.target_spans = [
            LiveSpan(data.select(rows), torch.tensor(rows), target, target + 1)
            for target, rows in _rows_by(data.target_pos.tolist()).items()
        ]
        cfg = self.model.cfg
        self.closed_form = not (
            getattr(cfg, "use_normalization_before_and_after", False)
            or getattr(cfg, "use_split_qkv_input", False)
            or getattr(cfg, "use_attn_in", False)
            or getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES
        )
        self.target_only_last_layer = self.closed_form and plain_attention(cfg)
        self.fused = (
            FusedBlocks(self.model, self._count_flops)
            if self.target_only_last_layer and fusable(self.model)
            else None
        )

    def _count_flops(self, flops: float) -> None:
        self.engine.extra_flops += flops

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """MLP output of ``layer`` for the residual ``x`` (its norm included)."""
        if self.fused is not None:
            return self.fused.mlp(layer, x)
        block = self.model.blocks[layer]
        return block.apply_mlp(block.ln2(x))

    # ------------------------------------------------------------------ caches
    @torch.no_grad()
    def _build_cache(self) -> PathPatchingCache:
        model, data, n_layers = self.model, self.data, self.engine.n_layers
        names = {z_hook_name(layer) for layer in range(n_layers)}
        names |= {resid_pre_name(layer) for layer in range(n_layers)}
        names |= {f"blocks.{layer}.hook_attn_out" for layer in range(n_layers)}
        final_name = f"blocks.{n_layers - 1}.hook_resid_post"
        names.add(final_name)
        _, clean = model.run_with_cache(
            data.clean, names_filter=lambda name: name in names, return_type=None
        )
        _, corrupt = model.run_with_cache(
            data.corrupt,
            names_filter=lambda name: (
                name in {final_name} | {z_hook_name(i) for i in range(n_layers)}
            ),
            return_type=None,
        )
        rows = torch.arange(len(data))
        target = data.target_pos

        def mean_metric(final: torch.Tensor) -> float:
            logits = self.engine.unembed_residual(final[rows, target])
            return float(self.engine.task.metric(logits.float(), data).mean())

        resid = [clean[resid_pre_name(layer)] for layer in range(n_layers)] + [clean[final_name]]
        cache = PathPatchingCache(
            z_clean=torch.stack([clean[z_hook_name(layer)] for layer in range(n_layers)]),
            z_corrupt=torch.stack([corrupt[z_hook_name(layer)] for layer in range(n_layers)]),
            resid_pre=torch.stack(resid),
            attn_out=torch.stack(
                [clean[f"blocks.{layer}.hook_attn_out"] for layer in range(n_layers)]
            ),
            m_clean=mean_metric(clean[final_name]),
            m_corrupt=mean_metric(corrupt[final_name]),
        )
        metric_gap(cache.m_clean, cache.m_corrupt)  # raises when every score would be noise
        return cache

    def sender_delta(
        self, senders: Sequence[Head], select: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Each sender's change to its layer's attention output at the positions ``select``
        picks from an [N, T, d_head] tensor (``_at_targets``, ``_at_live``): [K, n, P, d_model]."""
        cache, w_o = self.cache, self.model.W_O
        diffs, weights = [], []
        for s in senders:
            diffs.append(
                select(
                    cache.z_corrupt[s.layer, :, :, s.head] - cache.z_clean[s.layer, :, :, s.head]
                )
            )
            weights.append(w_o[s.layer, s.head])
        diff_stack = torch.stack(diffs)  # [K, n, P, d_head]
        self.engine.extra_flops += 2 * diff_stack.numel() * w_o.shape[-1]
        return torch.einsum("knpe,ked->knpd", diff_stack, torch.stack(weights).to(diff_stack.dtype))

    # ------------------------------------------------------------ frozen passes
    @torch.no_grad()
    def _frozen(
        self,
        layer: int,
        until: int,
        delta: torch.Tensor | None,
        select: Callable[[torch.Tensor], torch.Tensor],
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Residual stream before layer ``until`` of the frozen run of senders in ``layer``.

        With every attention output frozen, no position reads any other: the run is computed
        at the positions ``select`` picks alone.

        Args:
            layer: the senders' layer (all of them share it), or the layer ``start`` is
                the residual before.
            until: stop before this layer (n_layers for the final residual).
            delta: [K, n, P, d] the senders' changes (see :meth:`sender_delta`) at the
                selected positions, added at ``layer``; None when resuming from ``start``.
            select: picks the positions computed from a clean [N, T, d] tensor: [n, P, d].
            start: [K, n, P, d] frozen residual before ``layer`` to resume from (a
                remembered shorter run of the same senders); None starts from the clean one.
        """
        cache, model = self.cache, self.model
        k, n, p, d = (delta if delta is not None else start).shape  # type: ignore[union-attr]
        # [K, n, P, d] throughout; the clean tensors [n, P, d] broadcast over senders.
        x = select(cache.resid_pre[layer]).expand(k, n, p, d) if start is None else start
        for current in range(layer, until):
            added = select(cache.attn_out[current])
            if current == layer and delta is not None:
                added = added + delta
            if model.cfg.attn_only:
                x = x + added
            elif model.cfg.parallel_attn_mlp:
                x = x + added + self._mlp(current, x.reshape(k * n, p, d)).view(k, n, p, d)
            else:
                mid = x + added
                x = mid + self._mlp(current, mid.view(k * n, p, d)).view(k, n, p, d)
        return x

    def _at_targets(self, tensor: torch.Tensor) -> torch.Tensor:
        """[N, T, ...] -> [N, 1, ...] at each prompt's target position."""
        return tensor[torch.arange(tensor.shape[0]), self.data.target_pos][:, None]

    def _at_live(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., N, T, d] -> [..., 1, M, d]: the M live positions of the split (see
        :class:`LiveSpan`) side by side in one row."""
        flat = tensor.reshape(*tensor.shape[:-3], -1, tensor.shape[-1])
        return flat[..., self._live, :].unsqueeze(-3)

    def _frozen_everywhere(
        self, layer: int, until: int, delta: torch.Tensor | None, start: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`_frozen` at every position, [K, N, T, d], computed at the live positions only
        (``delta`` at those positions, see :meth:`sender_delta`; ``start`` everywhere).

        Before a prompt's live positions the frozen run is the clean run, and after them
        nothing reaches its metric: those positions take the clean residual.
        """
        live = self._frozen(
            layer, until, delta, self._at_live, None if start is None else self._at_live(start)
        )
        clean = self.cache.resid_pre[until]
        out = clean.expand(live.shape[0], *clean.shape).clone()
        out.view(live.shape[0], -1, clean.shape[-1])[:, self._live] = live[:, 0]
        return out

    @torch.no_grad()
    def _frozen_by_hooks(self, senders: Sequence[Head], until: int) -> torch.Tensor:
        """The frozen run through TransformerLens (architectures without the closed form)."""
        model, cache, data = self.model, self.cache, self.data
        k, (n, length) = len(senders), data.clean.shape
        layer = senders[0].layer
        heads = torch.tensor([s.head for s in senders])

        def freeze(current: int) -> Any:
            def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
                frozen = (
                    cache.z_clean[current][None].expand(k, *cache.z_clean[current].shape).clone()
                )
                if current == layer:
                    frozen[torch.arange(k), :, :, heads] = cache.z_corrupt[current][
                        :, :, heads
                    ].permute(2, 0, 1, 3)
                return frozen.reshape(z.shape).to(z.dtype)

            return hook

        hooks = [(z_hook_name(i), freeze(i)) for i in range(layer, until)]
        start = cache.resid_pre[layer].repeat(k, 1, 1)
        with model.hooks(fwd_hooks=hooks):
            out = (
                model(start, start_at_layer=layer, stop_at_layer=until)
                if layer > 0
                else model(data.clean.repeat(k, 1), stop_at_layer=until)
            )
        return out.view(k, n, length, -1)

    def _frozen_resid_at(self, senders: Sequence[Head], until: int) -> torch.Tensor:
        """[K, N, T, d] frozen residual before layer ``until`` for each sender (memoised).

        A sender remembered at an earlier layer resumes from there (closed form only): the
        layers it already ran are not run again.
        """
        # Everything this call reads from the memo is taken out first: remembering the new
        # results may evict older entries, including ones a later group resumes from.
        found = {s: self._memo[(s, until)] for s in senders if (s, until) in self._memo}
        groups: dict[tuple[int, bool], list[Head]] = {}
        starts: dict[Head, torch.Tensor] = {}
        for s in senders:
            if s in found:
                continue
            resume = self._resumable(s, until) if self.closed_form else None
            if resume is not None:
                starts[s] = self._memo[(s, resume)]
            key = (resume, True) if resume is not None else (s.layer, False)
            groups.setdefault(key, []).append(s)
        for (layer, resumed), group in sorted(groups.items()):
            for chunk in self.engine.chunks(len(group), len(self.data)):
                part = [group[i] for i in chunk]
                if resumed:
                    start = torch.stack([starts[s] for s in part])
                    resid = self._frozen_everywhere(layer, until, None, start)
                elif self.closed_form:
                    delta = self.sender_delta(part, self._at_live)
                    resid = self._frozen_everywhere(layer, until, delta, None)
                else:
                    resid = self._frozen_by_hooks(part, until)
                for s, value in zip(part, resid, strict=True):
                    found[s] = value
                    self._remember((s, until), value)
        return torch.stack([found[s] for s in senders])

    def _resumable(self, sender: Head, until: int) -> int | None:
        """The latest layer before ``until`` at which ``sender``'s frozen residual is remembered."""
        for layer in range(until - 1, sender.layer, -1):
            if (sender, layer) in self._memo:
                return layer
        return None

    def _remember(self, key: tuple[Head, int], value: torch.Tensor) -> None:
        self._memo[key] = value
        size = value.numel() * value.element_size()
        while len(self._memo) > 1 and size * len(self._memo) > self.memo_bytes:
            self._memo.pop(next(iter(self._memo)))

    # ------------------------------------------------------------------ scores
    def _scores(self, metric_means: torch.Tensor) -> list[float]:
        return ((metric_means - self.cache.m_clean) / self.cache.gap).tolist()

    @torch.no_grad()
    def logits_scores(self, senders: Sequence[Head]) -> dict[Head, float]:
        """Score of each sender's path to the logits (receiver = final resid_post)."""
        data, engine = self.data, self.engine
        results: dict[Head, float] = {}
        by_layer: dict[int, list[Head]] = {}
        for s in sorted(set(senders)):
            by_layer.setdefault(s.layer, []).append(s)
        rows = torch.arange(len(data))
        for layer, group in sorted(by_layer.items()):
            for chunk in engine.chunks(len(group), len(data)):
                part = [group[i] for i in chunk]
                if self.closed_form:
                    delta = self.sender_delta(part, self._at_targets)
                    final = self._frozen(layer, engine.n_layers, delta, self._at_targets)[:, :, 0]
                else:
                    full = self._frozen_by_hooks(part, engine.n_layers)
                    final = full[:, rows, data.target_pos]
                values = engine.target_metric(data, final).mean(dim=1)
                results.update(zip(part, self._scores(values), strict=True))
        return results

    def receiver_input(self, resid: torch.Tensor, receiver: Head, kind: str) -> torch.Tensor:
        """The receiver's ``hook_{kind}`` slice computed from residuals [K, N, T, d] -> [K, N, T, d_head]."""
        from transformer_lens.utilities.attention import simple_attn_linear

        block = self.model.blocks[receiver.layer]
        attn = block.attn
        k, n, length, d = resid.shape
        normed = block.ln1(resid.reshape(k * n, length, d))
        index = self.input_head_index(receiver, kind)
        w, b = input_weights(attn, self.model.cfg, kind)
        out = simple_attn_linear(normed, w[index : index + 1], b[index : index + 1])
        self.engine.extra_flops += 2 * normed.shape[:-1].numel() * d * w.shape[-1]
        return out[:, :, 0].view(k, n, length, -1)

    def input_head_index(self, receiver: Head, kind: str) -> int:
        """Index of the receiver's slice in ``hook_{kind}``: the KV head for k/v under GQA."""
        cfg = self.model.cfg
        n_kv = getattr(cfg, "n_key_value_heads", None)
        if kind == "q" or not n_kv or cfg.ungroup_grouped_query_attention:
            return receiver.head
        return receiver.head // (cfg.n_heads // n_kv)

    @torch.no_grad()
    def receiver_scores(
        self, receiver: Head, senders: Sequence[Head], inputs: Sequence[str] = ("q", "k", "v")
    ) -> dict[str, dict[Head, float]]:
        """Score of each sender's path into each input of ``receiver`` (senders before its layer)."""
        data, engine = self.data, self.engine
        senders = sorted(set(senders))
        if any(s.layer >= receiver.layer for s in senders):
            raise ValueError(f"senders must lie before the receiver's layer {receiver.layer}")
        results: dict[str, dict[Head, float]] = {kind: {} for kind in inputs}
        if not senders:
            return results
        patched = self._frozen_resid_at(senders, receiver.layer)  # [K, N, T, d]
        variants = [(kind, s, i) for kind in inputs for i, s in enumerate(senders)]
        per_variant = {kind: self.receiver_input(patched, receiver, kind) for kind in inputs}
        last = engine.n_layers - 1
        if self.target_only_last_layer and receiver.layer == last:
            spans = self.target_spans  # only the target query reaches the logits
        elif self.fused is not None:
            spans = self.spans  # windows attend to a clean prefix: the fused blocks do that
        else:
            spans = [self.whole]
        totals = torch.zeros(len(variants), dtype=torch.float64)
        for span in spans:
            for chunk in engine.chunks(len(variants), len(span.data)):
                part = [variants[i] for i in chunk]
                rows_of = {kind: [j for j, v in enumerate(part) if v[0] == kind] for kind in inputs}
                values_of = {
                    kind: span.take(per_variant[kind][[part[j][2] for j in rows]])
                    for kind, rows in rows_of.items()
                    if rows
                }
                metric = self._patched_metric(receiver, span, len(part), rows_of, values_of)
                totals[chunk.start : chunk.stop] += metric.sum(dim=1).double().cpu()
        means = (totals / len(data)).float()
        for (kind, s, _), score in zip(variants, self._scores(means), strict=True):
            results[kind][s] = score
        return results

    def _patched_metric(
        self,
        receiver: Head,
        span: LiveSpan,
        n_part: int,
        rows_of: dict[str, list[int]],
        values_of: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Metric of ``span``'s prompts, [n_part, n], for ``n_part`` variants of the clean run
        in which the receiver's inputs take ``values_of`` (per input kind,
        [rows, n, span.stop, d_head]) on the variants ``rows_of``."""
        engine, data = self.engine, span.data
        last = engine.n_layers - 1
        if self.target_only_last_layer:
            x = self._after_receiver_layer(receiver, n_part, rows_of, values_of, span)
            if receiver.layer == last:  # a target span: x is the final residual at the target
                return engine.target_metric(data, x.view(n_part, len(data), -1))
            if self.fused is not None:
                x = self.fused.run(
                    x, receiver.layer + 1, last, lambda layer: self._past(layer, span, n_part)
                )
            elif receiver.layer + 1 < last:
                x = self.model(x, start_at_layer=receiver.layer + 1, stop_at_layer=last)
            targets = (data.target_pos.to(x.device) - span.start).repeat(n_part)
            final = self.last_layer_at_target(x, targets, past=self._past(last, span, n_part))
            return engine.target_metric(data, final.view(n_part, len(data), -1))
        clean_start = self.cache.resid_pre[receiver.layer][span.rows, : span.stop]
        hooks = [
            (
                f"blocks.{receiver.layer}.attn.hook_{kind}",
                self._input_hook(kind, receiver, rows, values_of[kind], n_part),
            )
            for kind, rows in rows_of.items()
            if rows
        ]
        model_input = clean_start.repeat(n_part, 1, 1)
        return engine.metric(
            data, engine.run_to_target(data, model_input, receiver.layer, hooks, n_part)
        )

    def _past(self, layer: int, span: LiveSpan, n_variants: int) -> Past | None:
        """Clean keys and values of ``span``'s prefix at ``layer``, for ``n_variants`` stacked
        variants; None when the span starts at position 0."""
        if span.start == 0:
            return None
        assert self.fused is not None
        if layer not in self._clean_kv:
            self._clean_kv[layer] = self.fused.clean_keys_values(layer, self.cache.resid_pre[layer])
        return tuple(  # type: ignore[return-value]
            t[span.rows, : span.start].repeat(n_variants, 1, 1, 1) for t in self._clean_kv[layer]
        )

    def _query_group(self, receiver: Head) -> list[int]:
        """The query heads reading the receiver's key/value head (just the receiver without GQA)."""
        kv = self.input_head_index(receiver, "k")
        return [
            h
            for h in range(self.engine.n_heads)
            if self.input_head_index(Head(receiver.layer, h), "k") == kv
        ]

    def _clean_receiver_inputs(self, receiver: Head) -> dict[str, torch.Tensor]:
        """Clean inputs of the receiver's group: q [N, T, G, d_head] for every query head of
        its key/value group, k and v [N, T, 1, d_head] (computed once per receiver)."""
        if receiver not in self._clean_inputs:
            resid = self.cache.resid_pre[receiver.layer][None]
            group = self._query_group(receiver)
            queries = [self.receiver_input(resid, Head(receiver.layer, h), "q")[0] for h in group]
            self._clean_inputs[receiver] = {
                "q": torch.stack(queries, dim=2),
                **{
                    kind: self.receiver_input(resid, receiver, kind)[0][:, :, None] for kind in "kv"
                },
            }
        return self._clean_inputs[receiver]

    @torch.no_grad()
    def _after_receiver_layer(
        self,
        receiver: Head,
        n_variants: int,
        rows_of: dict[str, list[int]],
        values_of: dict[str, torch.Tensor],
        span: LiveSpan,
    ) -> torch.Tensor:
        """Residual after the receiver's layer at ``span``'s live positions,
        [n_variants * n, span.stop - span.start, d], with the receiver's q, k or v replaced on
        the given variant rows.

        Only the heads that read the replaced input are recomputed (the receiver, and under
        GQA the query heads sharing its key/value head); every other head reads the clean
        residual, so its output is the cached clean one, and the layer's attention output is
        the clean one plus the recomputed heads' change ``(z - z_clean) W_O``.
        """
        from transformer_lens.utilities.activation_functions import apply_softcap

        model, cache = self.model, self.cache
        layer, rows, start, stop = receiver.layer, span.rows, span.start, span.stop
        attn = model.blocks[layer].attn
        n, width, d = len(rows), stop - start, cache.resid_pre.shape[-1]
        group = self._query_group(receiver)
        clean = self._clean_receiver_inputs(receiver)
        # Queries at the live positions; keys and values at every position up to the last one.
        inputs = {
            "q": clean["q"][rows, start:stop].repeat(n_variants, 1, 1, 1),
            **{kind: clean[kind][rows, :stop].repeat(n_variants, 1, 1, 1) for kind in "kv"},
        }
        slot = {"q": group.index(receiver.head), "k": 0, "v": 0}
        for kind, variant_rows in rows_of.items():
            if variant_rows:
                values = values_of[kind][:, :, start:] if kind == "q" else values_of[kind]
                shaped = inputs[kind].view(n_variants, n, *inputs[kind].shape[1:])
                shaped[variant_rows, :, :, slot[kind]] = values.to(inputs[kind].dtype)
        q, k, v = inputs["q"], inputs["k"], inputs["v"]  # [B, width or stop, G or 1, d_head]
        if model.cfg.positional_embedding_type == "rotary":
            q, k = attn.apply_rotary(q, start), attn.apply_rotary(k, 0)
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / attn.attn_scale  # [B, G, W, stop]
        scores = apply_softcap(scores, model.cfg.attn_scores_soft_cap)
        keys = torch.arange(stop, device=scores.device)
        future = keys[None, :] > start + torch.arange(width, device=scores.device)[:, None]
        pattern = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        z = pattern.to(v.dtype) @ v.transpose(1, 2)  # [B, G, W, d_head]
        z_clean = cache.z_clean[layer][rows, start:stop][:, :, group].permute(0, 2, 1, 3)
        w_o = attn.W_O[group]  # [G, d_head, d]
        change = torch.einsum(
            "bgte,ged->btd", (z - z_clean.repeat(n_variants, 1, 1, 1)).to(w_o.dtype), w_o
        )
        n_rows, d_head = n_variants * n, z.shape[-1]
        self.engine.extra_flops += (
            n_rows * width * len(group) * (2 * 2 * stop * d_head + 2 * d_head * d)
        )
        if model.cfg.attn_only or model.cfg.parallel_attn_mlp:
            # The MLP reads the residual before attention (or there is none): unchanged.
            return cache.resid_pre[layer + 1][rows, start:stop].repeat(n_variants, 1, 1) + change
        mid = (cache.resid_pre[layer] + cache.attn_out[layer])[rows, start:stop]
        mid = mid.repeat(n_variants, 1, 1) + change
        return mid + self._mlp(layer, mid)

    @torch.no_grad()
    def last_layer_at_target(
        self,
        resid: torch.Tensor,
        targets: torch.Tensor,
        past: Past | None = None,
    ) -> torch.Tensor:
        """The final residual at each row's target position, running the last layer for the
        target query alone (keys and values still cover every position).

        Every later position of the last layer is computed by a full forward pass and then
        thrown away: only the target query, its attention over the prefix and the MLP at the
        target reach the logits. Built from TransformerLens's own attention pieces.

        Args:
            resid: [R, T, d_model] residual stream before the last layer.
            targets: [R] target position of each row, counted from the first position of
                ``resid``.
            past: clean keys and values of the P positions before ``resid`` (which then
                covers positions P..P+T-1), as :meth:`FusedBlocks.attention` takes them.
        """
        model = self.model
        block = model.blocks[-1]
        attn = block.attn
        n_rows, length, d = resid.shape
        rows = torch.arange(n_rows, device=resid.device)
        normed = self.fused.norm(block.ln1, resid) if self.fused else block.ln1(resid)
        normed_target = normed[rows, targets][:, None]
        q, k, v = attn.calculate_qkv_matrices(normed_target, normed, normed)
        offset = 0 if past is None else int(past[0].shape[1])
        if model.cfg.positional_embedding_type == "rotary":
            k = attn.apply_rotary(k, offset)
            rotary = model.cfg.rotary_dim
            cos = attn.rotary_cos[targets + offset][:, None, None, :]
            sin = attn.rotary_sin[targets + offset][:, None, None, :]
            q_rot = q[..., :rotary]
            q = torch.cat([q_rot * cos + attn.rotate_every_two(q_rot) * sin, q[..., rotary:]], -1)
        if past is not None and offset > 0:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        scores = attn.calculate_attention_scores(q, k)  # [R, H, 1, P + T]
        future = torch.arange(offset + length, device=resid.device)[None, :] > (
            targets[:, None] + offset
        )
        scores = scores.masked_fill(future[:, None, None, :], float("-inf"))
        pattern = torch.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern).to(v.dtype)
        z = attn.calculate_z_scores(v, pattern)  # [R, 1, H, d_head]
        w_o = attn.W_O.reshape(-1, attn.W_O.shape[-1]).T.contiguous()
        out = torch.nn.functional.linear(z.reshape(n_rows, 1, -1).to(w_o.dtype), w_o, attn.b_O)
        # The counter saw this layer as one token per row; add keys and values of the other
        # positions computed here and the scores against every key.
        n_kv = k.shape[2]
        self.engine.extra_flops += n_rows * (length - 1) * 2 * d * model.cfg.d_head * 2 * n_kv
        self.engine.extra_flops += (
            n_rows * (offset + length - 1) * 2 * 2 * model.cfg.n_heads * model.cfg.d_head
        )
        x = resid[rows, targets][:, None]
        last = model.cfg.n_layers - 1
        if model.cfg.attn_only:
            x = x + out
        elif model.cfg.parallel_attn_mlp:
            x = x + out + self._mlp(last, x)
        else:
            mid = x + out
            x = mid + self._mlp(last, mid)
        return x[:, 0]

    def _input_hook(
        self, kind: str, receiver: Head, rows: list[int], values: torch.Tensor, n_variants: int
    ) -> Any:
        index = self.input_head_index(receiver, kind)
        n = len(self.data)
        row_index = torch.tensor(rows)

        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            shaped = act.view(n_variants, n, *act.shape[1:]).clone()
            shaped[row_index, :, :, index] = values.to(act.dtype)
            return shaped.view_as(act)

        return hook
