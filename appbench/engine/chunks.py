"""Prompts a chunk at a time: what keeps memory bounded by a batch, not by the split.

Every helper here gives exactly the whole-split result when one chunk holds the whole split
(the default for the splits appbench ships), and the same up to float rounding otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from appbench.tasks import TaskData

#: Bytes of one chunk's cached ``hook_z`` that an automatic batch size aims at.
CHUNK_BYTES = 256 * 2**20


def auto_batch_size(model: Any, data: TaskData, bytes_per_value: int = 8) -> int:
    """As many prompts as fit :data:`CHUNK_BYTES` of ``hook_z`` (``bytes_per_value`` each)."""
    cfg = model.cfg
    per_prompt = (
        int(cfg.n_layers) * int(data.clean.shape[1]) * int(cfg.n_heads) * int(cfg.d_head)
    ) * bytes_per_value
    return max(1, CHUNK_BYTES // per_prompt)


def prompt_chunks(data: TaskData, batch_size: int) -> Iterator[TaskData]:
    """``data`` in order, ``batch_size`` prompts at a time (itself when it fits one chunk)."""
    n = len(data)
    if n <= batch_size:
        yield data
        return
    for first in range(0, n, batch_size):
        yield data.select(range(first, min(n, first + batch_size)))


def corrupt_group_means(engine: Any, data: TaskData, batch_size: int) -> torch.Tensor:
    """Per-template, per-position means of ``hook_z`` on the corrupted prompts,
    [L, G, T, H, d], summed chunk by chunk (:func:`corrupt_hook_means` of every layer)."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(engine.n_layers)]
    means = corrupt_hook_means(engine.model, data, names, batch_size)
    return torch.stack([means[name] for name in names])


@torch.no_grad()
def chunked_ablated_metric(
    engine: Any, data: TaskData, keep: torch.Tensor, means: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """[K, N] metric of each kept-head set (``keep`` [K, L, H]), every other head at its
    group mean (``means`` [L, G, T, H, d]), run chunk by chunk of prompts."""
    rows = []
    for chunk in prompt_chunks(data, batch_size):
        rows.append(engine.ablated_metric(chunk, keep, engine.per_prompt(means, chunk)))
    return torch.cat(rows, dim=1)


@torch.no_grad()
def corrupt_hook_means(
    model: Any, data: TaskData, names: list[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """Per-template, per-position means of the hooks ``names`` on the corrupted prompts,
    [G, T, ...] each, summed chunk by chunk (index them with a chunk's ``groups``)."""
    totals: dict[str, torch.Tensor] = {}
    wanted = set(names)
    for chunk in prompt_chunks(data, batch_size):
        _, cache = model.run_with_cache(chunk.corrupt, names_filter=lambda n: n in wanted)
        for name in names:
            x = cache[name]
            if name not in totals:
                totals[name] = torch.zeros(
                    (data.n_groups, *x.shape[1:]), dtype=x.dtype, device=x.device
                )
            totals[name].index_add_(0, chunk.groups.to(x.device), x)
    counts = torch.bincount(data.groups, minlength=data.n_groups).clamp(min=1)
    return {
        name: total / counts.to(total.device, total.dtype).view(-1, *[1] * (total.dim() - 1))
        for name, total in totals.items()
    }
