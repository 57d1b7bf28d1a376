"""Strict interchange-intervention training (SIIT; Gupta et al. 2024, "InterpBench"): train a
model so that a designated circuit of heads carries a task and every other head is irrelevant.

Each training step on a batch of a task's prompt pairs runs three copies of the clean prompts
in one batch, together with one gradient-free run on the corrupted prompts:

1. **task**: the unmodified model, cross-entropy on the answers (the model solves the task);
2. **strict**: every head *outside* the task's designated circuit has its ``hook_z`` replaced by
   a corrupted activation: its paired corrupted prompt's, a random other corrupted prompt's of
   the same template (resample ablation), or the batch's per-template corrupted mean (mean
   ablation), in turn; cross-entropy on the clean answers, plus the mean squared difference of
   its log-probabilities from the unablated model's. The circuit alone must solve the task
   *as the whole model does*, no better and no worse (faithfulness is measured against the whole
   model; a KL divergence alone vanishes once both are confident, while their logit
   differences still disagree), so no other head may carry it or work against it;
3. **interchange**: one designated head per prompt (drawn at random) takes the same ablated
   activation. Two targets:

   - ``"necessity"`` (default): the log-probability of the clean answers must fall by at least
     ``NECESSITY_MARGIN`` nats below the unablated model's (a hinge): every designated head is
     necessary, however the task combines them;
   - ``"corrupted-output"``: the output must match the model's own output on the corrupted
     prompt (KL divergence), the high-level model of a strictly serial chain in which every
     designated head passes all of the task's information on. Right for induction's chain;
     too strong for IOI, whose name movers read the names from the residual stream as well;
   - ``"both"``: their sum;
   - ``"source-output"``: the necessity hinge, plus, when the ablated activation came from one
     corrupted prompt (paired or resample), the KL divergence to the model's output on *that*
     prompt. This is the interchange intervention of SIIT proper: the high-level serial chain,
     given the value of a node from a source input, outputs what the source would. The
     ``"corrupted-output"`` target compares with the paired prompt's output whatever the
     source, which a resampled activation cannot match when the corrupted answer depends on
     the prompt (docstring's names, gendered_pronouns' pronoun); it stays, for the models it
     trained.

The designated heads form a chain across layers (see the recipes' roles); which q, k or v
input each one reads its predecessor through is left to training and measured afterwards by
path patching (:mod:`appbench_plugins.zoo.verify`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from appbench import Head

#: The strict step's ablations, used in turn: the paired corrupted prompt, another corrupted
#: prompt of the same template, and the per-template mean over the batch's corrupted prompts.
STRICT_SOURCES = ("paired", "resample", "mean")
#: The interchange hinge: ablating one designated head must cost at least this many nats.
NECESSITY_MARGIN = 1.0
INTERCHANGE_TARGETS = ("necessity", "corrupted-output", "both", "source-output")


def z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def circuit_mask(heads: Sequence[Head], n_layers: int, n_heads: int) -> torch.Tensor:
    """[L, H] bool, True on the designated heads."""
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for head in heads:
        mask[head.layer, head.head] = True
    return mask


def same_template_partner(groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row, a random other row of the same template (itself when it is alone)."""
    partner = torch.arange(len(groups))
    for group in groups.unique().tolist():
        rows = (groups == group).nonzero().flatten()
        if len(rows) > 1:
            shift = int(torch.randint(1, len(rows), (1,), generator=generator))
            partner[rows] = rows.roll(shift)
    return partner


def group_means(z: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per-template means of z [B, T, H, d] over the batch, expanded back to every row."""
    n_groups = int(groups.max()) + 1
    sums = torch.zeros((n_groups, *z.shape[1:]), dtype=z.dtype)
    sums.index_add_(0, groups, z)
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).to(z.dtype)
    return (sums / counts.view(-1, 1, 1, 1))[groups]


def final_at_targets(model: Any, tokens: torch.Tensor, targets: torch.Tensor, hooks: list) -> Any:
    """Logits at each row's target position (only there is the unembedding computed)."""
    with model.hooks(fwd_hooks=hooks):
        final = model(tokens, stop_at_layer=model.cfg.n_layers)
    at_target = final[torch.arange(len(tokens)), targets][:, None]
    return model.unembed(model.ln_final(at_target))[:, 0]


def siit_losses(
    model: Any,
    batch: Any,
    circuit: torch.Tensor,
    step: int,
    generator: torch.Generator,
    answer_loss: Any,
    interchange_target: str = "necessity",
    consistency_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The three SIIT losses of one step on ``batch`` (a TaskData of B prompt pairs).

    Args:
        model: the HookedTransformer being trained.
        batch: the step's prompt pairs.
        circuit: [L, H] bool mask of the task's designated heads.
        step: the step number (picks the strict ablation in turn).
        generator: the training's random generator (partners, interchanged heads).
        answer_loss: ``(logits [B, V], answers [B, A]) -> loss``.
        interchange_target: ``"necessity"``, ``"corrupted-output"``, ``"both"`` or
            ``"source-output"`` (see the module).
        consistency_weight: weight of the strict step's log-probability match.

    Returns:
        ``task``, ``strict`` and ``interchange`` losses (scalars with gradients).
    """
    n_layers = model.cfg.n_layers
    size = len(batch)
    targets = batch.target_pos
    corrupt_z: dict[int, torch.Tensor] = {}

    def record(z: torch.Tensor, hook: Any) -> None:
        corrupt_z[hook.layer()] = z.detach()

    with torch.no_grad():
        corrupt_logits = final_at_targets(
            model,
            batch.corrupt,
            targets,
            [(z_name(layer), record) for layer in range(n_layers)],
        )
        corrupt_logprobs = corrupt_logits.log_softmax(dim=-1)

    source = STRICT_SOURCES[step % len(STRICT_SOURCES)]
    partner = torch.arange(size)
    if source == "resample":
        partner = same_template_partner(batch.groups, generator)
    outside = ~circuit
    designated = circuit.nonzero().tolist()
    chosen = torch.randint(len(designated), (size,), generator=generator)
    interchange = torch.zeros(size, *circuit.shape, dtype=torch.bool)
    for row, pick in enumerate(chosen.tolist()):
        layer, head = designated[pick]
        interchange[row, layer, head] = True

    def patch(z: torch.Tensor, hook: Any) -> torch.Tensor:
        layer = hook.layer()
        corrupted = corrupt_z[layer]
        if source == "paired":
            ablated = corrupted
        elif source == "resample":
            ablated = corrupted[partner]
        else:
            ablated = group_means(corrupted, batch.groups)
        full, strict, swapped = z[:size], z[size : 2 * size], z[2 * size :]
        strict = torch.where(outside[layer][None, None, :, None], ablated, strict)
        swapped = torch.where(interchange[:, layer][:, None, :, None], ablated, swapped)
        return torch.cat([full, strict, swapped])

    logits = final_at_targets(
        model,
        batch.clean.repeat(3, 1),
        targets.repeat(3),
        [(z_name(layer), patch) for layer in range(n_layers)],
    )
    full, strict, swapped = logits[:size], logits[size : 2 * size], logits[2 * size :]
    full_logprobs = full.log_softmax(dim=-1)
    if interchange_target not in INTERCHANGE_TARGETS:
        raise ValueError(f"interchange_target must be one of {INTERCHANGE_TARGETS}")
    interchange_loss = torch.zeros(())
    if interchange_target in ("necessity", "both", "source-output"):
        drop = answer_logprob(full, batch.answers).detach() - answer_logprob(swapped, batch.answers)
        interchange_loss = interchange_loss + torch.relu(NECESSITY_MARGIN - drop).mean()
    if interchange_target in ("corrupted-output", "both"):
        interchange_loss = interchange_loss + kl_divergence(
            corrupt_logprobs, swapped.log_softmax(dim=-1)
        )
    if interchange_target == "source-output" and source != "mean":
        interchange_loss = interchange_loss + kl_divergence(
            corrupt_logprobs[partner], swapped.log_softmax(dim=-1)
        )
    return {
        "task": answer_loss(full, batch.answers),
        "strict": answer_loss(strict, batch.answers)
        + consistency_weight * (full_logprobs - strict.log_softmax(dim=-1)).pow(2).mean(),
        "interchange": interchange_loss,
    }


def kl_divergence(target_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || model) over the rows."""
    return (target_logprobs.exp() * (target_logprobs - logprobs)).sum(dim=-1).mean()


def answer_logprob(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Per row, the mean log-probability of its answers ([B, A], padded with -1)."""
    valid = answers >= 0
    log_probs = logits.log_softmax(dim=-1).gather(1, answers.clamp(min=0))
    return (log_probs * valid).sum(dim=1) / valid.sum(dim=1)
