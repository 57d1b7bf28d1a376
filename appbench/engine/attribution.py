"""Edge attribution patching: every edge's effect from one forward and one backward pass.

EAP (Syed et al. 2023, arXiv:2310.10348) approximates the effect of patching one edge to its
corrupted value by a first-order Taylor expansion around the clean run:

    score(u -> v<i>) = sum over prompts and positions of (out_u(corrupt) - out_u(clean)) . dm/dx_v,i

where ``out_u`` is what sender head u writes into the residual stream (its ``z`` times W_O),
``x_v,i`` is the residual stream as receiver head v's input i (q, k or v) reads it, and m is the
mean task metric over the prompts. The edge into the logits reads the final residual stream.
Scores are divided by the metric gap m(clean) - m(corrupt), as path patching's are: -1 means the
edge alone would carry the whole clean-vs-corrupt difference.

EAP-IG (Hanna et al. 2024, arXiv:2403.17806) averages the gradient over ``steps`` points on the
straight line from the corrupted input embeddings to the clean ones, x_k = corrupt + (k / steps)
(clean - corrupt) for k = 1..steps; with one step the only point is the clean input, and EAP-IG
is EAP.

The graph is the one path patching measures (:class:`appbench.Edge`): head -> head q/k/v input
and head -> logits, direct paths through the residual stream. Receiver inputs are read per head
by TransformerLens's split-qkv-input mode, which applies each head's own layer norm to its own
copy of the residual stream, so the gradient is exactly the one the patched edge would see; for
grouped-query attention a receiver's k and v inputs are its key-value head's, as in
:func:`appbench.engine.reference.input_head_index`.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from appbench.circuit import QKV, Edge, Head
from appbench.engine.reference import input_head_index, metric_gap

if TYPE_CHECKING:
    from collections.abc import Iterator

    from appbench.tasks import Task, TaskData


@contextmanager
def split_qkv_inputs(model: Any) -> Iterator[None]:
    """Run ``model`` with per-head q/k/v inputs (``hook_q_input`` etc.), then restore it."""
    before = bool(model.cfg.use_split_qkv_input)
    model.set_use_split_qkv_input(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(before)


def _input_hook(layer: int, kind: str) -> str:
    return f"blocks.{layer}.hook_{kind}_input"


def edge_scores(
    model: Any,
    task: Task,
    data: TaskData,
    steps: int = 1,
    batch_size: int = 16,
) -> dict[Edge, float]:
    """Normalised EAP (``steps=1``) or EAP-IG (``steps > 1``) score of every edge of the model.

    Args:
        model: a TransformerLens model.
        task: the task whose metric is attributed.
        data: the prompt pairs (clean and corrupted aligned position by position).
        steps: integration points of EAP-IG; 1 is EAP.
        batch_size: prompts per forward/backward pass (bounds memory; the scores do not depend
            on it beyond float rounding).

    Returns:
        edge -> score / (m_clean - m_corrupt), for every sender head and every later receiver
        head's q, k and v input, and every head into the logits.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    cfg = model.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    w_o = model.W_O.detach()  # [L, H, d_head, d_model]
    device = w_o.device
    to_logits = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    # [receiver layer, input, receiver index, sender layer, sender head]
    # Grouped-query attention reads k and v per key-value head (see input_head_index).
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        n_kv = n_heads
    n_inputs = {"q": n_heads, "k": n_kv, "v": n_kv}
    to_inputs = {
        kind: torch.zeros(n_layers, n_inputs[kind], n_layers, n_heads, dtype=torch.float64)
        for kind in QKV
    }
    m_clean = m_corrupt = 0.0
    final_hook = f"blocks.{n_layers - 1}.hook_resid_post"
    for first in range(0, len(data), batch_size):
        batch = data.select(range(first, min(len(data), first + batch_size))).to(device)
        deltas, embeds, metrics = _sender_deltas(model, task, batch, w_o)
        m_clean += metrics[0] * len(batch)
        m_corrupt += metrics[1] * len(batch)
        clean_embed, corrupt_embed = embeds
        for k in range(1, steps + 1):
            mixed = corrupt_embed + (k / steps) * (clean_embed - corrupt_embed)
            grads = _input_gradients(model, task, batch, mixed, final_hook)
            # Sender deltas [L, N, T, H, d_model] against receiver gradients.
            g_final = grads[final_hook]  # [N, T, d_model]
            to_logits += torch.einsum("lnthd,ntd->lh", deltas, g_final).double().cpu() / steps
            for layer in range(1, n_layers):
                for kind in QKV:
                    g = grads[_input_hook(layer, kind)]  # [N, T, H_in, d_model]
                    part = torch.einsum("lnthd,ntid->ilh", deltas[:layer], g)
                    to_inputs[kind][layer, :, :layer] += part.double().cpu() / steps
    m_clean, m_corrupt = m_clean / len(data), m_corrupt / len(data)
    gap = metric_gap(m_clean, m_corrupt) * len(data)  # the metric above was summed
    scores: dict[Edge, float] = {}
    for sender_layer in range(n_layers):
        for h in range(n_heads):
            sender = Head(sender_layer, h)
            scores[Edge(sender, None)] = float(to_logits[sender_layer, h]) / gap
            for layer in range(sender_layer + 1, n_layers):
                for r in range(n_heads):
                    receiver = Head(layer, r)
                    for kind in QKV:
                        index = input_head_index(cfg, receiver, kind)
                        value = to_inputs[kind][layer, index, sender_layer, h]
                        scores[Edge(sender, receiver, kind)] = float(value) / gap
    return scores


def _input_gradients(
    model: Any, task: Task, batch: TaskData, embed: torch.Tensor, final_hook: str
) -> dict[str, torch.Tensor]:
    """Gradients of the summed metric with respect to every head's q/k/v input and the final
    residual stream, on a run whose input embeddings are replaced by ``embed``."""
    grads: dict[str, torch.Tensor] = {}

    def replace_embed(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return embed.detach().requires_grad_(True)

    def keep_grad(act: torch.Tensor, hook: Any) -> None:
        name = hook.name
        act.register_hook(lambda grad: grads.__setitem__(name, grad.detach()))

    n_layers = int(model.cfg.n_layers)
    hooks: list[tuple[str, Any]] = [("blocks.0.hook_resid_pre", replace_embed)]
    hooks += [(_input_hook(layer, kind), keep_grad) for layer in range(n_layers) for kind in QKV]
    hooks.append((final_hook, keep_grad))
    rows = torch.arange(len(batch), device=embed.device)
    with split_qkv_inputs(model), model.hooks(fwd_hooks=hooks), torch.enable_grad():
        logits = model(batch.clean)
        # Summed over prompts: the mean over the whole split is taken by the caller.
        task.metric(logits[rows, batch.target_pos].float(), batch).sum().backward()
    return grads


@torch.no_grad()
def _sender_deltas(
    model: Any, task: Task, batch: TaskData, w_o: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[float, float]]:
    """What each head writes on the corrupted minus the clean prompts, [L, N, T, H, d_model];
    both runs' input embeddings; and their mean metrics."""
    n_layers = int(model.cfg.n_layers)
    outputs = []
    embeds = []
    metrics = []
    rows = torch.arange(len(batch), device=w_o.device)
    for tokens in (batch.clean, batch.corrupt):
        logits, cache = model.run_with_cache(
            tokens,
            names_filter=lambda name: (
                name.endswith("attn.hook_z") or name == "blocks.0.hook_resid_pre"
            ),
        )
        z = torch.stack([cache[f"blocks.{layer}.attn.hook_z"] for layer in range(n_layers)])
        outputs.append(torch.einsum("lnthe,lhed->lnthd", z, w_o))
        embeds.append(cache["blocks.0.hook_resid_pre"])
        metrics.append(task.metric(logits[rows, batch.target_pos].float(), batch).mean().item())
    return outputs[1] - outputs[0], (embeds[0], embeds[1]), (metrics[0], metrics[1])


def head_scores(
    scores: dict[Edge, float], heads: Iterable[Head] | None = None
) -> dict[Head, float]:
    """A head's attribution as a pruner reads it: the sum of |score| over the edges it sends
    (into later heads and into the logits), counting only receivers among ``heads`` if given."""
    keep = None if heads is None else set(heads)
    totals: dict[Head, float] = {}
    for edge, value in scores.items():
        if keep is not None and (
            edge.sender not in keep or (edge.receiver and edge.receiver not in keep)
        ):
            continue
        totals[edge.sender] = totals.get(edge.sender, 0.0) + abs(value)
    return totals
