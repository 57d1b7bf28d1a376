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
residual stream at that layer. Prompts run ``batch_size`` at a time (automatic: as many as fit
256 MiB of cached ``hook_z``), so a large split never holds more than one chunk.
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
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="prompts per pass (bounds memory); default: as many as fit 256 MiB of "
        "cached hook_z",
    )


class ActPatch(Discoverer):
    """Keep heads whose individual corrupted-activation patch moves the metric."""

    name = "actpatch"
    summary = "Node-level activation patching of each head's hook_z; keep heads above a threshold."
    Params = ActPatchParams

    def discover(self, ctx, space, params):
        engine, data = ctx.engine, ctx.search
        from appbench import auto_batch_size

        batch = params.batch_size or auto_batch_size(ctx.model, data, 4)
        clean_sum = corrupt_sum = 0.0
        patched_sum: dict = {}
        n = len(data)
        for first in range(0, n, batch):
            chunk = data if batch >= n else data.select(range(first, min(n, first + batch)))
            if batch < n:
                ctx.log(f"actpatch: prompts {first + 1}-{first + len(chunk)} of {n}")
            clean_sum += engine.clean_metric(chunk).double().sum().item()
            corrupt_sum += engine.corrupt_metric(chunk).double().sum().item()
            z_corrupt = engine.cache_z(chunk.corrupt)
            resid_pre = engine.cache_resid_pre(chunk.clean)
            patched = engine.patch_heads(chunk, space.sorted_heads(), z_corrupt, resid_pre)
            for head, values in patched.items():
                patched_sum[head] = patched_sum.get(head, 0.0) + values.double().sum().item()
        m_clean, m_corrupt = clean_sum / n, corrupt_sum / n
        gap = metric_gap(m_clean, m_corrupt)  # raises when every effect would be noise
        effects = {head: (total / n - m_clean) / gap for head, total in patched_sum.items()}
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
