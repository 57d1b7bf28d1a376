"""Fused forward of plain TransformerLens blocks, for the patching engine's reruns.

TransformerLens spells every block out op by op so that each intermediate can be hooked: GELU
as eight elementwise passes over the MLP's hidden layer, LayerNorm as six, attention through
rearranged matmuls and a materialised pattern. The engine hooks nothing inside the blocks it
reruns, so it computes the same functions with torch's fused kernels (``F.layer_norm``,
``F.rms_norm``, ``F.gelu(approximate="tanh")``, ``scaled_dot_product_attention``). On a CPU
those elementwise passes cost about as much as the matmuls; the values agree with
TransformerLens to float rounding (the parity tests compare scores to 1e-4).

Only configurations whose every piece is mirrored here are fused (see :func:`fusable`); the
engine runs the others through TransformerLens.

Cost counting stays with the runner's module hooks: each attention layer passes its ``z``
through the layer's own ``hook_z`` (which the CostCounter watches), and MLP FLOPs, which no
TransformerLens module sees here, are reported through a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

#: Architectures whose attention and MLP outputs pass through a norm after their projection.
POST_NORM_ARCHITECTURES = ("OlmoForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")

_TANH_GELU = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **{name: lambda x: F.gelu(x, approximate="tanh") for name in _TANH_GELU},
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
_NORMS = ("LayerNorm", "LayerNormPre", "RMSNorm", "RMSNormPre", "Identity")
#: Keys and values [B, P, H_kv, d_head] of the P positions before a block's input.
Past = tuple[torch.Tensor, torch.Tensor]


def plain_attention(cfg: Any) -> bool:
    """Whether attention is plain causal softmax attention over every position, with no
    extras (q/k norms, clipping, soft caps, sinks, local windows) that a re-implementation
    would have to mirror."""
    return (
        cfg.positional_embedding_type in ("standard", "rotary")
        and cfg.dtype in (torch.float32, torch.float64)
        and getattr(cfg, "attention_dir", "causal") == "causal"
        and not getattr(cfg, "use_qk_norm", False)
        and cfg.original_architecture not in ("OlmoeForCausalLM", *POST_NORM_ARCHITECTURES)
        and getattr(cfg, "clip_qkv", None) is None
        and not getattr(cfg, "use_logn_attn", False)
        and not getattr(cfg, "use_attention_sinks", False)
        and not getattr(cfg, "use_dynamic_ntk_rope", False)
        and not getattr(cfg, "load_in_4bit", False)
        and not getattr(cfg, "use_attn_result", False)
        and all(kind == "global" for kind in (getattr(cfg, "attn_types", None) or ["global"]))
    )


def mlp_flops_per_token(cfg: Any) -> int:
    """Analytic FLOPs (2 per multiply-add) of one MLP call per token; 0 without MLPs."""
    if cfg.attn_only or not cfg.d_mlp:
        return 0
    return 2 * int(cfg.d_model) * int(cfg.d_mlp) * (3 if getattr(cfg, "gated_mlp", False) else 2)


def fusable(model: Any) -> bool:
    """Whether every block of ``model`` is built from pieces :class:`FusedBlocks` mirrors."""
    cfg = model.cfg
    soft_cap = getattr(cfg, "attn_scores_soft_cap", None)
    if (
        not plain_attention(cfg)
        or (soft_cap is not None and soft_cap > 0)
        or getattr(cfg, "use_split_qkv_input", False)
        or getattr(cfg, "use_attn_in", False)
        or getattr(cfg, "use_normalization_before_and_after", False)
    ):
        return False
    if not cfg.attn_only and (cfg.act_fn not in _ACTIVATIONS or cfg.is_layer_norm_activation()):
        return False
    for block in model.blocks:
        norms = [block.ln1] if cfg.attn_only else [block.ln1, block.ln2]
        if any(type(norm).__name__ not in _NORMS for norm in norms):
            return False
        if type(block.attn).__name__ not in ("Attention", "GroupedQueryAttention"):
            return False
        if not cfg.attn_only and type(block.mlp).__name__ not in ("MLP", "GatedMLP"):
            return False
    return True


def input_weights(attn: Any, cfg: Any, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) producing ``hook_{kind}`` of an attention layer: one slice per key/value head
    under grouped-query attention (as TransformerLens computes them), per query head else."""
    if kind == "q":
        return attn.W_Q, attn.b_Q
    if hasattr(attn, "_W_K") and not cfg.ungroup_grouped_query_attention:
        return (attn._W_K, attn._b_K) if kind == "k" else (attn._W_V, attn._b_V)
    return (attn.W_K, attn.b_K) if kind == "k" else (attn.W_V, attn.b_V)


class FusedBlocks:
    """The blocks of a :func:`fusable` model, computed with fused kernels.

    Args:
        model: the TransformerLens model (its weights are read at every call, never copied).
        count_flops: receives the analytic FLOPs of each MLP call.
    """

    def __init__(self, model: Any, count_flops: Callable[[float], None]) -> None:
        self.model = model
        self.cfg = model.cfg
        self.count_flops = count_flops
        self._mlp_per_token = mlp_flops_per_token(model.cfg)
        self._act = _ACTIVATIONS.get(model.cfg.act_fn or "", F.gelu)

    def norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """``module`` (a TransformerLens norm) applied to ``x``."""
        kind = type(module).__name__
        if kind == "Identity":
            return x
        shape = (x.shape[-1],)
        if kind.startswith("LayerNorm"):
            affine = kind == "LayerNorm"
            return F.layer_norm(
                x, shape, module.w if affine else None, module.b if affine else None, module.eps
            )
        return F.rms_norm(x, shape, module.w if kind == "RMSNorm" else None, eps=module.eps)

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output for the residual ``x`` (its ln2 included)."""
        block = self.model.blocks[layer]
        mlp = block.mlp
        flat = self.norm(block.ln2, x).reshape(-1, x.shape[-1])
        if type(mlp).__name__ == "GatedMLP":
            hidden = self._act(flat @ mlp.W_gate) * (flat @ mlp.W_in) + mlp.b_in
        else:
            hidden = self._act(torch.addmm(mlp.b_in, flat, mlp.W_in))
        self.count_flops(float(flat.shape[0] * self._mlp_per_token))
        return torch.addmm(mlp.b_out, hidden, mlp.W_out).view_as(x)

    def clean_keys_values(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated where rotary) and values of the residual ``x`` [B, T, d] at ``layer``:
        two [B, T, H_kv, d_head] tensors, as :meth:`attention` uses them."""
        normed = self.norm(self.model.blocks[layer].ln1, x)
        k, v = self._keys_values(layer, normed, offset=0)
        self.count_flops(
            float(normed.shape[:-1].numel() * 2 * 2 * x.shape[-1] * k.shape[-1] * k.shape[-2])
        )
        return k, v

    def _keys_values(
        self, layer: int, normed: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated for positions from ``offset`` on) and values of normed residuals."""
        from transformer_lens.utilities.attention import simple_attn_linear

        attn = self.model.blocks[layer].attn
        k = simple_attn_linear(normed, *input_weights(attn, self.cfg, "k"))  # [B, T, H_kv, d_head]
        v = simple_attn_linear(normed, *input_weights(attn, self.cfg, "v"))
        if self.cfg.positional_embedding_type == "rotary":
            k = attn.apply_rotary(k, offset)
        return k, v

    def attention(self, layer: int, x: torch.Tensor, past: Past | None = None) -> torch.Tensor:
        """The attention layer's output (``hook_attn_out``) for the residual ``x``.

        ``past`` holds the keys and values of positions before ``x`` (see
        :meth:`clean_keys_values`): ``x`` then covers positions ``P..P+T-1`` and attends to
        those P positions as well, causally.
        """
        from transformer_lens.utilities.attention import simple_attn_linear

        attn = self.model.blocks[layer].attn
        normed = self.norm(self.model.blocks[layer].ln1, x)
        offset = 0 if past is None else int(past[0].shape[1])
        q = simple_attn_linear(normed, *input_weights(attn, self.cfg, "q"))  # [B, T, H, d_head]
        k, v = self._keys_values(layer, normed, offset)
        if self.cfg.positional_embedding_type == "rotary":
            q = attn.apply_rotary(q, offset)
        mask = None
        if past is not None and offset > 0:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
            length = x.shape[1]
            keys = torch.arange(offset + length, device=x.device)
            mask = keys[None, :] <= offset + torch.arange(length, device=x.device)[:, None]
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=1.0 / float(attn.attn_scale),
            enable_gqa=k.shape[2] != q.shape[2],
        ).transpose(1, 2)  # [B, T, H, d_head]
        z = attn.hook_z(z)  # the CostCounter counts the layer here (T x T pairs)
        if offset > 0:  # ... and the pairs with the past positions here
            self.count_flops(
                float(z.shape[0] * z.shape[1] * offset * 2 * 2 * q.shape[2] * q.shape[3])
            )
        w_o = attn.W_O.reshape(-1, attn.W_O.shape[-1])  # [(H d_head), d]
        return F.linear(z.reshape(*z.shape[:2], -1), w_o.T, attn.b_O)

    def block(self, layer: int, x: torch.Tensor, past: Past | None = None) -> torch.Tensor:
        """The residual after block ``layer`` (``past`` as in :meth:`attention`)."""
        attn_out = self.attention(layer, x, past)
        if self.cfg.attn_only:
            return x + attn_out
        if self.cfg.parallel_attn_mlp:
            return x + attn_out + self.mlp(layer, x)
        mid = x + attn_out
        return mid + self.mlp(layer, mid)

    def run(
        self,
        x: torch.Tensor,
        start: int,
        stop: int,
        past: Callable[[int], Past | None] | None = None,
    ) -> torch.Tensor:
        """The residual before layer ``stop``, from the residual ``x`` before layer ``start``.

        ``past(layer)``, when given, returns the keys and values of the positions before
        ``x`` at each layer (positions whose residual does not change, such as the clean prefix
        a patched run shares with the clean one).
        """
        for layer in range(start, stop):
            x = self.block(layer, x, None if past is None else past(layer))
        return x
