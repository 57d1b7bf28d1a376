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

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from appbench.circuit import Head

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
        model = self.model
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
        with model.hooks(fwd_hooks=hooks):
            if start > 0:
                final = model(model_input, start_at_layer=start, stop_at_layer=self.n_layers)
            else:
                final = model(model_input, stop_at_layer=self.n_layers)
        rows = torch.arange(n_variants * n, device=final.device)
        at_target = final[rows, data.target_pos.to(final.device).repeat(n_variants)][:, None, :]
        if model.cfg.normalization_type is not None:
            at_target = model.ln_final(at_target)
        logits = model.unembed(at_target)[:, 0, :]
        softcap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        return logits.view(n_variants, n, -1)

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
    from dataclasses import replace

    return replace(data, clean=tokens)


def _repeat_data(data: TaskData, k: int) -> TaskData:
    """The split repeated k times along the batch (only the fields the metric reads)."""
    if k == 1:
        return data
    from dataclasses import replace

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
