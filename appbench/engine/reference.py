"""Path patching, done plainly: the reference implementation of APP's two measurements.

Path patching (Wang et al. 2022, "Interpretability in the Wild", arXiv:2211.00593; automated in
Andersen et al. 2025, APP, arXiv:2511.05442, spec §3.2) asks how much of the clean-vs-corrupt
difference flows from one *sender* head along one path: into the logits directly, or into one
input (query, key or value) of one *receiver* head. Every score is the normalised metric change

    score = (m_patched - m_clean) / (m_clean - m_corrupt),

with the per-prompt metric averaged over prompts before the ratio (spec §3.1): 0 means the path
carries nothing, -1 means it carries the whole effect.

This module runs the measurements exactly as the authors do, with whole forward passes and
TransformerLens hooks: one pass per sender for the logits, two passes per sender for a receiver
input, no batching and no early stopping. It is slow on purpose, so that it stays obviously
correct: a faster engine must reproduce its scores.

Grouped-query attention: ``hook_q`` holds one slice per query head, but ``hook_k`` and
``hook_v`` hold one slice per *key-value* head (``[batch, pos, n_key_value_heads, d_head]`` in
TransformerLens 3.9 unless ``cfg.ungroup_grouped_query_attention`` is set). A receiver's k or v
input is therefore its KV head ``h // (n_heads / n_key_value_heads)``, shared by the query heads
of its group, and patching it reaches all of them, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appbench.circuit import QKV, Head
from appbench.errors import RunError

if TYPE_CHECKING:
    import torch

    from appbench.tasks import Task, TaskData


@dataclass(frozen=True, eq=False)
class PathPatchingBaseline:
    """What every path-patching measurement on one split needs, computed once.

    Attributes:
        m_clean: mean metric of the unmodified model on the clean prompts.
        m_corrupt: mean metric of the unmodified model on the corrupted prompts.
        z_clean: every layer's ``hook_z`` on the clean prompts, [L, N, T, H, d_head].
        z_corrupt: the same on the corrupted prompts.
    """

    m_clean: float
    m_corrupt: float
    z_clean: torch.Tensor
    z_corrupt: torch.Tensor

    @property
    def gap(self) -> float:
        """m_clean - m_corrupt, the denominator of every score."""
        return self.m_clean - self.m_corrupt


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def input_hook(layer: int, input: str) -> str:
    """The hook holding a layer's q, k or v: ``blocks.{layer}.attn.hook_{input}``."""
    if input not in QKV:
        raise ValueError(f"receiver input must be one of {QKV}, got {input!r}")
    return f"blocks.{layer}.attn.hook_{input}"


def input_head_index(cfg: Any, head: Head, input: str) -> int:
    """The slice of ``hook_{input}`` that belongs to ``head``.

    Queries are per query head. Keys and values are per key-value head for grouped-query
    models (``cfg.n_key_value_heads`` set and ``ungroup_grouped_query_attention`` off), so a
    query head h reads KV head ``h // (n_heads / n_key_value_heads)``.
    """
    if input not in QKV:
        raise ValueError(f"receiver input must be one of {QKV}, got {input!r}")
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if input == "q" or n_kv is None or getattr(cfg, "ungroup_grouped_query_attention", False):
        return head.head
    group = int(cfg.n_heads) // int(n_kv)
    return head.head // group


def cache_z(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: (logits [N, T, V], every layer's ``hook_z`` [L, N, T, H, d_head])."""
    import torch

    n_layers = int(model.cfg.n_layers)
    names = {z_hook(layer) for layer in range(n_layers)}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    return logits, torch.stack([cache[z_hook(layer)] for layer in range(n_layers)])


def mean_metric(task: Task, data: TaskData, logits: torch.Tensor) -> float:
    """The task metric read at each prompt's target position, averaged over prompts."""
    import torch

    rows = torch.arange(logits.shape[0], device=logits.device)
    at_target = logits[rows, data.target_pos.to(logits.device)]
    return float(task.metric(at_target.float(), data).mean().item())


def path_patching_baseline(model: Any, task: Task, data: TaskData) -> PathPatchingBaseline:
    """Clean and corrupted metrics and ``hook_z`` caches: two forward passes."""
    clean_logits, z_clean = cache_z(model, data.clean)
    corrupt_logits, z_corrupt = cache_z(model, data.corrupt)
    return PathPatchingBaseline(
        mean_metric(task, data, clean_logits),
        mean_metric(task, data, corrupt_logits),
        z_clean,
        z_corrupt,
    )


#: The smallest usable gap between the clean and corrupted mean metrics, relative to their
#: size: below it, float32 rounding of the metric (about 1e-7 relative) is a visible part of
#: every normalised score.
MIN_RELATIVE_GAP = 1e-4


def metric_gap(m_clean: float, m_corrupt: float) -> float:
    """``m_clean - m_corrupt``, the denominator of every normalised score.

    Raises RunError when the model barely tells clean from corrupted prompts (the gap is
    below :data:`MIN_RELATIVE_GAP` of the metrics' size): every score would be noise.
    """

    gap = m_clean - m_corrupt
    if abs(gap) < MIN_RELATIVE_GAP * max(1.0, abs(m_clean), abs(m_corrupt)):
        raise RunError(
            f"clean and corrupted metrics coincide to {MIN_RELATIVE_GAP:g} of their size "
            f"({m_clean:.6g} vs {m_corrupt:.6g}): "
            "the model does not tell the prompts apart, so every patching score would be "
            "float rounding noise"
        )
    return gap


def normalised_score(m_patched: float, m_clean: float, m_corrupt: float) -> float:
    """(m_patched - m_clean) / (m_clean - m_corrupt); raises ValueError when the gap is 0."""
    gap = m_clean - m_corrupt
    if gap == 0:
        raise ValueError(
            f"clean and corrupted metrics coincide ({m_clean:.4g}); no path can be scored"
        )
    return (m_patched - m_clean) / gap


def _freeze_hooks(
    n_layers: int, sender: Head, z_clean: torch.Tensor, z_corrupt: torch.Tensor
) -> list[tuple[str, Any]]:
    """Hooks that set every head's ``hook_z`` to its clean value, the sender's to its corrupted one."""

    def make(layer: int) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            frozen = z_clean[layer].to(z.dtype).clone()
            if layer == sender.layer:
                frozen[:, :, sender.head] = z_corrupt[layer, :, :, sender.head].to(z.dtype)
            return frozen

        return hook

    return [(z_hook(layer), make(layer)) for layer in range(n_layers)]


def _recorder(store: dict[str, torch.Tensor]) -> Any:
    """A hook that keeps a copy of the activation it sees in ``store["value"]``."""

    def hook(value: torch.Tensor, hook: Any) -> None:
        store["value"] = value.detach().clone()

    return hook


def _slice_patcher(recorded: torch.Tensor, index: int) -> Any:
    """A hook that overwrites slice ``index`` of dim 2 (heads) with ``recorded``, all positions."""

    def hook(value: torch.Tensor, hook: Any) -> torch.Tensor:
        if value.shape != recorded.shape:
            raise RuntimeError(f"{hook.name} changed shape between the two passes")
        out = value.clone()
        out[:, :, index] = recorded[:, :, index].to(value.dtype)
        return out

    return hook


def _metrics_or_baseline(
    model: Any,
    task: Task,
    data: TaskData,
    m_clean: float | None,
    m_corrupt: float | None,
) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        if m_clean is None:
            m_clean = mean_metric(task, data, model(data.clean))
        if m_corrupt is None:
            m_corrupt = mean_metric(task, data, model(data.corrupt))
    return m_clean, m_corrupt


def _check_senders(model: Any, senders: Iterable[Head], below: int | None) -> list[Head]:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    checked = sorted(set(senders))
    for head in checked:
        if head.layer >= n_layers or head.head >= n_heads:
            raise ValueError(
                f"sender {head.id} lies outside a model of {n_layers} layers x {n_heads} heads"
            )
        if below is not None and head.layer >= below:
            raise ValueError(
                f"sender {head.id} does not precede the receiver's layer {below}: "
                "senders must lie in earlier layers"
            )
    return checked


def sender_scores_to_logits(
    model: Any,
    task: Task,
    data: TaskData,
    senders: Iterable[Head],
    z_clean: torch.Tensor,
    z_corrupt: torch.Tensor,
    *,
    m_clean: float | None = None,
    m_corrupt: float | None = None,
) -> dict[Head, float]:
    """Score each sender's path into the logits (spec §3.2a), one forward pass per sender.

    The pass runs the clean prompts with every layer's ``hook_z`` frozen to its clean value,
    except the sender's head, which gets its corrupted value. MLPs are not frozen, so paths
    through MLPs count as direct. The metric is read from the logits at the target positions.

    Args:
        model: a TransformerLens HookedTransformer.
        task: supplies ``task.metric(logits_at_target, data)``.
        data: the split whose prompts are run.
        senders: heads to score (any layer).
        z_clean: clean ``hook_z`` of every layer, [L, N, T, H, d_head].
        z_corrupt: corrupted ``hook_z``, same shape.
        m_clean: mean clean metric; computed with one extra pass when None.
        m_corrupt: mean corrupted metric; computed with one extra pass when None.

    Returns:
        sender -> normalised score (0 = no effect, -1 = the whole clean-vs-corrupt effect).
    """
    import torch

    heads = _check_senders(model, senders, None)
    m_clean, m_corrupt = _metrics_or_baseline(model, task, data, m_clean, m_corrupt)
    n_layers = int(model.cfg.n_layers)
    scores: dict[Head, float] = {}
    with torch.no_grad():
        for sender in heads:
            logits = model.run_with_hooks(
                data.clean, fwd_hooks=_freeze_hooks(n_layers, sender, z_clean, z_corrupt)
            )
            m_patched = mean_metric(task, data, logits)
            scores[sender] = normalised_score(m_patched, m_clean, m_corrupt)
    return scores


def sender_scores_to_receiver(
    model: Any,
    task: Task,
    data: TaskData,
    senders: Iterable[Head],
    receiver: Head,
    input: str,
    z_clean: torch.Tensor,
    z_corrupt: torch.Tensor,
    *,
    m_clean: float | None = None,
    m_corrupt: float | None = None,
) -> dict[Head, float]:
    """Score each sender's path into one input of a receiver head (spec §3.2b).

    Two forward passes per sender, both on the clean prompts:

    1. every ``hook_z`` frozen to its clean value except the sender's, which is corrupted;
       record ``blocks.{L_r}.attn.hook_{input}``;
    2. nothing frozen; overwrite only the receiver's slice of that hook (at every position)
       with the value recorded in pass 1, let the rest of the model run, and score the logits.

    For grouped-query models the k and v slice is the receiver's KV head
    (:func:`input_head_index`), which the other query heads of its group share.

    Args:
        model: a TransformerLens HookedTransformer.
        task: supplies ``task.metric(logits_at_target, data)``.
        data: the split whose prompts are run.
        senders: heads to score; all must lie in layers before ``receiver.layer``.
        receiver: the receiver head.
        input: which input of the receiver the path enters: "q", "k" or "v".
        z_clean: clean ``hook_z`` of every layer, [L, N, T, H, d_head].
        z_corrupt: corrupted ``hook_z``, same shape.
        m_clean: mean clean metric; computed with one extra pass when None.
        m_corrupt: mean corrupted metric; computed with one extra pass when None.

    Returns:
        sender -> normalised score.
    """
    import torch

    name = input_hook(receiver.layer, input)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if receiver.layer >= n_layers or receiver.head >= n_heads:
        raise ValueError(
            f"receiver {receiver.id} lies outside a model of {n_layers} layers x {n_heads} heads"
        )
    heads = _check_senders(model, senders, receiver.layer)
    m_clean, m_corrupt = _metrics_or_baseline(model, task, data, m_clean, m_corrupt)
    index = input_head_index(model.cfg, receiver, input)
    scores: dict[Head, float] = {}
    with torch.no_grad():
        for sender in heads:
            recorded: dict[str, torch.Tensor] = {}
            hooks = [
                *_freeze_hooks(n_layers, sender, z_clean, z_corrupt),
                (name, _recorder(recorded)),
            ]
            model.run_with_hooks(data.clean, fwd_hooks=hooks, return_type=None)
            patch = _slice_patcher(recorded["value"], index)
            logits = model.run_with_hooks(data.clean, fwd_hooks=[(name, patch)])
            m_patched = mean_metric(task, data, logits)
            scores[sender] = normalised_score(m_patched, m_clean, m_corrupt)
    return scores
