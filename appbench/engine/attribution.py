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

The graph (:func:`appbench.circuit.model_graph`) is the EAP-IG / MIB one by default: the input
(the embeddings), every head with separate q/k/v inputs, every MLP and the logits, each node
reading every earlier one directly through the residual stream (``full=False``: only head ->
head q/k/v and head -> logits, the paths path patching measures). A sender writes ``z W_O``
(a head), its ``hook_mlp_out`` (an MLP) or the embeddings (the input); a receiver reads its own
copy of the residual stream: TransformerLens's split-qkv-input mode gives each head its own
q/k/v input (each head applies its own layer norm to it, so the gradient is exactly the one the
patched edge would see) and ``hook_mlp_in`` each MLP its own input; the logits read the final
residual stream. For grouped-query attention a receiver's k and v inputs are its key-value
head's, as in :func:`appbench.engine.reference.input_head_index`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from appbench.circuit import QKV, Edge, Head, Mlp, model_graph
from appbench.engine.reference import input_head_index, metric_gap

if TYPE_CHECKING:
    from collections.abc import Iterator

    from appbench.tasks import Task, TaskData


@contextmanager
def split_qkv_inputs(model: Any, on: bool = True) -> Iterator[None]:
    """Run ``model`` with per-head q/k/v inputs (``hook_q_input`` etc.; ``on=False``: one
    shared input, whatever the model's setting), then restore it."""
    before = bool(model.cfg.use_split_qkv_input)
    model.set_use_split_qkv_input(on)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(before)


def has_mlps(cfg: Any) -> bool:
    return not bool(getattr(cfg, "attn_only", False))


@contextmanager
def mlp_inputs(model: Any) -> Iterator[None]:
    """Run ``model`` with a hook on each MLP's own input (``hook_mlp_in``), then restore it."""
    if not has_mlps(model.cfg):
        yield
        return
    before = bool(model.cfg.use_hook_mlp_in)
    model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_hook_mlp_in(before)


@contextmanager
def receiver_inputs(model: Any) -> Iterator[None]:
    """Run ``model`` with a hook on every receiver's own input copy (per-head q/k/v inputs and
    each MLP's ``hook_mlp_in``), then restore it."""
    with split_qkv_inputs(model), mlp_inputs(model):
        yield


def _input_hook(layer: int, kind: str) -> str:
    if kind == "mlp":
        return f"blocks.{layer}.hook_mlp_in"
    return f"blocks.{layer}.hook_{kind}_input"


def edge_scores(
    model: Any,
    task: Task,
    data: TaskData,
    steps: int = 1,
    batch_size: int = 16,
    full: bool = True,
    ig: str = "inputs",
) -> dict[Edge, float]:
    """Normalised EAP (``steps=1``) or EAP-IG (``steps > 1``) score of every edge of the model.

    Args:
        model: a TransformerLens model.
        task: the task whose metric is attributed.
        data: the prompt pairs (clean and corrupted aligned position by position).
        steps: integration points of EAP-IG; 1 is EAP.
        batch_size: prompts per forward/backward pass (bounds memory; the scores do not depend
            on it beyond float rounding).
        full: score the EAP-IG / MIB graph (input and MLPs included), else only the edges
            between heads and into the logits.
        ig: what EAP-IG interpolates: ``inputs``, the input embeddings (EAP-IG-inputs), or
            ``activations``: a sender's edges take their gradients from runs in which the
            output of the sender's own site (the input, its layer's attention, its MLP) goes
            from corrupted to clean, the rest of the run computed from it (integrated
            gradients along the sender's own path). The EAP-IG library's EAP-IG-activations
            interpolates the same sites but averages every edge over every site's runs.

    Returns:
        edge -> score / (m_clean - m_corrupt), for every edge of ``model_graph(cfg, full)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if ig not in IG_VARIANTS:
        raise ValueError(f"ig must be one of {IG_VARIANTS}, got {ig!r}")
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    mlps = full and has_mlps(cfg)
    w_o = model.W_O.detach()  # [L, H, d_head, d_model]
    totals: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        # Each sender's edges take their gradients from ``steps`` runs.
        value = value.double().cpu() / steps
        totals[key] = totals[key] + value if key in totals else value

    m_clean = m_corrupt = 0.0
    final_hook = f"blocks.{n_layers - 1}.hook_resid_post"
    kinds = QKV + (("mlp",) if mlps else ())
    for first in range(0, len(data), batch_size):
        batch = data.select(range(first, min(len(data), first + batch_size))).to(w_o.device)
        everything, sites, metrics = _sender_deltas(model, task, batch, w_o, mlps)
        m_clean += metrics[0] * len(batch)
        m_corrupt += metrics[1] * len(batch)
        if ig == "activations":
            # Only sites with senders in the graph need their runs.
            sites = {
                name: pair
                for name, pair in sites.items()
                if (name != _EMBED or full) and (mlps or not name.endswith("hook_mlp_out"))
            }
        for replace, site in _interpolations(sites, steps, ig):
            grads = _input_gradients(model, task, batch, replace, final_hook, kinds)
            sent = everything.only(site)
            # Sender deltas (heads [L, N, T, H, d], MLPs [L, N, T, d], input [N, T, d])
            # against the gradient at each receiver input.
            g = grads[final_hook]  # [N, T, d_model]
            add("heads->logits", torch.einsum("lnthd,ntd->lh", sent.heads, g))
            if full:
                add("input->logits", torch.einsum("ntd,ntd->", sent.input, g))
            if mlps:
                add("mlps->logits", torch.einsum("lntd,ntd->l", sent.mlps, g))
            for layer in range(n_layers):
                for kind in kinds:
                    g = grads[_input_hook(layer, kind)]  # [N, T, H_in, d] or [N, T, d] (MLP)
                    if kind == "mlp":
                        g = g[:, :, None]
                    # Heads up to this layer (an MLP reads its own layer's heads), MLPs before.
                    upto = layer + 1 if kind == "mlp" else layer
                    if upto:
                        part = torch.einsum("lnthd,ntid->ilh", sent.heads[:upto], g)
                        add(f"heads->{kind}{layer}", part)
                    if full:
                        add(f"input->{kind}{layer}", torch.einsum("ntd,ntid->i", sent.input, g))
                    if mlps and layer:
                        part = torch.einsum("lntd,ntid->il", sent.mlps[:layer], g)
                        add(f"mlps->{kind}{layer}", part)
    m_clean, m_corrupt = m_clean / len(data), m_corrupt / len(data)
    gap = metric_gap(m_clean, m_corrupt) * len(data)  # the metric above was summed
    scores: dict[Edge, float] = {}
    for edge in model_graph(cfg, full):
        index: tuple[int, ...]
        if edge.receiver is None:
            key, index = "logits", ()
        elif isinstance(edge.receiver, Mlp):
            key, index = f"mlp{edge.receiver.layer}", (0,)
        else:
            key = f"{edge.input}{edge.receiver.layer}"
            index = (input_head_index(cfg, edge.receiver, edge.input),)
        sender = edge.sender
        if isinstance(sender, Head):
            value = totals[f"heads->{key}"][(*index, sender.layer, sender.head)]
        elif isinstance(sender, Mlp):
            value = totals[f"mlps->{key}"][(*index, sender.layer)]
        else:
            value = totals[f"input->{key}"][index]
        scores[edge] = float(value) / gap
    return scores


#: What EAP-IG can interpolate (:func:`edge_scores`).
IG_VARIANTS = ("inputs", "activations")
_EMBED = "blocks.0.hook_resid_pre"


def _interpolations(
    sites: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: int, ig: str
) -> Iterator[tuple[dict[str, torch.Tensor], str | None]]:
    """The runs EAP-IG takes gradients on, each with the site whose senders it serves (None:
    every sender). A run replaces one activation (by hook name) with corrupt + (k / steps)
    (clean - corrupt), k = 1..steps: the input embeddings (``inputs``), or each site in turn
    (``activations``)."""
    names = [_EMBED] if ig == "inputs" else list(sites)
    for name in names:
        clean, corrupt = sites[name]
        for k in range(1, steps + 1):
            yield (
                {name: corrupt + (k / steps) * (clean - corrupt)},
                (None if ig == "inputs" else name),
            )


def _input_gradients(
    model: Any,
    task: Task,
    batch: TaskData,
    replace: dict[str, torch.Tensor],
    final_hook: str,
    kinds: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """Gradients of the summed metric with respect to every receiver input (each head's q/k/v
    input, each MLP's input if ``kinds`` has ``mlp``) and the final residual stream, on the
    clean run with the activations in ``replace`` (by hook name) replaced."""
    grads: dict[str, torch.Tensor] = {}

    def replaced(name: str) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return replace[name].detach().requires_grad_(True)

        return hook

    def keep_grad(act: torch.Tensor, hook: Any) -> None:
        name = hook.name
        act.register_hook(lambda grad: grads.__setitem__(name, grad.detach()))

    n_layers = int(model.cfg.n_layers)
    hooks: list[tuple[str, Any]] = [(name, replaced(name)) for name in replace]
    if _EMBED not in replace:
        # A leaf that needs a gradient at the start, whatever the parameters' requires_grad.
        hooks.append((_EMBED, lambda resid, hook: resid.detach().requires_grad_(True)))
    hooks += [(_input_hook(layer, kind), keep_grad) for layer in range(n_layers) for kind in kinds]
    hooks.append((final_hook, keep_grad))
    rows = torch.arange(len(batch), device=batch.clean.device)
    with receiver_inputs(model), model.hooks(fwd_hooks=hooks), torch.enable_grad():
        logits = model(batch.clean)
        # Summed over prompts: the mean over the whole split is taken by the caller.
        task.metric(logits[rows, batch.target_pos].float(), batch).sum().backward()
    # A receiver upstream of a replaced site gets no gradient: it cannot move the metric.
    for layer in range(n_layers):
        for kind in kinds:
            name = _input_hook(layer, kind)
            if name not in grads:
                shape = model.cfg.n_heads if kind != "mlp" else None
                grads[name] = _zero_like_input(model, batch, kind, shape)
    return grads


def _zero_like_input(model: Any, batch: TaskData, kind: str, heads: int | None) -> torch.Tensor:
    cfg = model.cfg
    n, t, d = batch.clean.shape[0], batch.clean.shape[1], int(cfg.d_model)
    device, dtype = batch.clean.device, cfg.dtype
    if kind == "mlp":
        return torch.zeros(n, t, d, device=device, dtype=dtype)
    n_in = int(heads or 0)
    if kind in ("k", "v"):
        n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_in)
        if not getattr(cfg, "ungroup_grouped_query_attention", False):
            n_in = n_kv
    return torch.zeros(n, t, n_in, d, device=device, dtype=dtype)


@dataclass
class _Sent:
    """What each sender writes on the corrupted minus the clean prompts."""

    heads: torch.Tensor  # [L, N, T, H, d_model]
    mlps: torch.Tensor  # [L, N, T, d_model] (empty without MLPs)
    input: torch.Tensor  # [N, T, d_model]

    def only(self, site: str | None) -> _Sent:
        """The senders of one interpolation site (hook name), the others zero; all for None."""
        if site is None:
            return self
        heads, mlps, embed = (
            torch.zeros_like(self.heads),
            torch.zeros_like(self.mlps),
            torch.zeros_like(self.input),
        )
        layer = int(site.split(".")[1])
        if site == _EMBED:
            embed = self.input
        elif site.endswith("attn.hook_z"):
            heads[layer] = self.heads[layer]
        elif self.mlps.numel():
            mlps[layer] = self.mlps[layer]
        return _Sent(heads, mlps, embed)


@torch.no_grad()
def _sender_deltas(
    model: Any, task: Task, batch: TaskData, w_o: torch.Tensor, mlps: bool
) -> tuple[_Sent, dict[str, tuple[torch.Tensor, torch.Tensor]], tuple[float, float]]:
    """Every sender's corrupted-minus-clean output; the clean and corrupted activations of
    each interpolation site (input embeddings, each layer's ``hook_z``, each ``hook_mlp_out``)
    by hook name; and the two runs' mean metrics."""
    n_layers = int(model.cfg.n_layers)
    with_mlps = has_mlps(model.cfg)
    names = [_EMBED] + [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    if with_mlps:
        names += [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    runs, metrics = [], []
    rows = torch.arange(len(batch), device=w_o.device)
    for tokens in (batch.clean, batch.corrupt):
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
        runs.append({name: cache[name] for name in names})
        metrics.append(task.metric(logits[rows, batch.target_pos].float(), batch).mean().item())
    clean, corrupt = runs

    def stacked(run: dict[str, torch.Tensor], hook: str) -> torch.Tensor:
        return torch.stack([run[f"blocks.{layer}.{hook}"] for layer in range(n_layers)])

    z_delta = stacked(corrupt, "attn.hook_z") - stacked(clean, "attn.hook_z")
    sent = _Sent(
        heads=torch.einsum("lnthe,lhed->lnthd", z_delta, w_o),
        mlps=stacked(corrupt, "hook_mlp_out") - stacked(clean, "hook_mlp_out")
        if mlps
        else torch.zeros(0),
        input=corrupt[_EMBED] - clean[_EMBED],
    )
    sites = {name: (clean[name], corrupt[name]) for name in names}
    return sent, sites, (metrics[0], metrics[1])


def head_scores(
    scores: dict[Edge, float], heads: Iterable[Head] | None = None
) -> dict[Head, float]:
    """A head's attribution as a pruner reads it: the sum of |score| over the edges it sends
    (into later heads, MLPs and the logits), counting only receiver heads among ``heads`` if
    given."""
    keep = None if heads is None else set(heads)
    totals: dict[Head, float] = {}
    for edge, value in scores.items():
        if not isinstance(edge.sender, Head):
            continue
        if keep is not None and (
            edge.sender not in keep
            or (isinstance(edge.receiver, Head) and edge.receiver not in keep)
        ):
            continue
        totals[edge.sender] = totals.get(edge.sender, 0.0) + abs(value)
    return totals
