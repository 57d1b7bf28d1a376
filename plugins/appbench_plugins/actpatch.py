"""Node-level activation patching (Vig et al. 2020; Meng et al. 2022; as used in Wang et al.
2022 for IOI): the effect of each head alone.

For every head inside the search space, run the clean prompts with that head's ``hook_z``
replaced (at all positions) by its value on the corrupted prompts, and measure the normalised
metric change

    effect(h) = (m(patched h) - m(clean)) / (m(clean) - m(corrupt)),

with means over prompts taken before the ratio. 0 means no effect, -1 means the head alone
carries the whole clean-vs-corrupt difference. Heads with |effect| above ``threshold`` form the
circuit (``absolute=false`` keeps only heads whose patching hurts the metric). Heads outside
the search space are never run. Runs of one layer are batched and start from the cached clean
residual stream at that layer.
"""

from pydantic import Field

from appbench import Circuit, Discoverer, Params, hookimpl, metric_gap


class ActPatchParams(Params):
    threshold: float = Field(
        default=0.05, ge=0.0, description="keep heads with |normalised effect| above this"
    )
    absolute: bool = Field(
        default=True,
        description="compare |effect| (true) or only the metric drop, -effect (false), to the threshold",
    )


class ActPatch(Discoverer):
    """Keep heads whose individual corrupted-activation patch moves the metric."""

    name = "actpatch"
    summary = "Node-level activation patching of each head's hook_z; keep heads above a threshold."
    Params = ActPatchParams

    def discover(self, ctx, space, params):
        engine, data = ctx.engine, ctx.search
        m_clean = engine.clean_metric(data).mean().item()
        m_corrupt = engine.corrupt_metric(data).mean().item()
        gap = metric_gap(m_clean, m_corrupt)  # raises when every effect would be noise
        z_corrupt = engine.cache_z(data.corrupt)
        resid_pre = engine.cache_resid_pre(data.clean)
        patched = engine.patch_heads(data, space.sorted_heads(), z_corrupt, resid_pre)
        effects = {head: (values.mean().item() - m_clean) / gap for head, values in patched.items()}
        strength = {h: abs(e) if params.absolute else -e for h, e in effects.items()}
        heads = {h for h, s in strength.items() if s > params.threshold}
        return Circuit(
            ctx.n_layers,
            ctx.n_heads,
            frozenset(heads),
            scores={h.id: e for h, e in sorted(effects.items())},
            details={"m_clean": m_clean, "m_corrupt": m_corrupt, "evaluated_heads": len(effects)},
        )


@hookimpl
def appbench_register_discoverers(register):
    register(ActPatch)
