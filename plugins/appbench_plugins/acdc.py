"""ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic
Interpretability", arXiv:2304.14997): prune edges greedily from the whole graph.

Receivers are visited from the logits back to the first layer; each incoming edge is patched to
its corrupted value and stays removed when the output's distance from the full model's grows by
less than ``tau``: the KL divergence of the next-token distributions (``distance=kl``, ACDC's
default) or the loss of the task metric as a fraction of the clean-corrupted gap
(``distance=metric``). The graph (``graph``) is the EAP-IG / MIB one, with the input and the
MLPs as nodes (``full``), or heads -> later heads' q/k/v inputs and heads -> logits with the
MLPs left whole (``heads``; :mod:`appbench.engine.acdc`); edges into or out of heads outside
the search space are never tested. The circuit is the kept edges on a path into the logits,
and their heads.

With ``sweep`` set, ACDC also runs once per listed tau and records each run's edges and heads
in ``details["threshold_sweep"]``: the points of ACDC's threshold-sweep ROC, from which the
runner computes the pessimistic step AUC against the reference (METRICS.md 4.4). The circuit
stays the one at ``tau``.

ACDC on a model of a hundred million parameters takes hours on a CPU, so the run at ``tau``
saves its progress (the edges decided, receiver by receiver) in the run's checkpoint about once
a minute: an interrupted run of the same settings goes on from the last one (``ctx.checkpoint``;
the runner sums the segments' costs and flags the result). The sweep's extra runs start afresh.
"""

from typing import Annotated, Literal

from pydantic import Field, field_validator

from appbench import Circuit, Discoverer, Params, heads_of, hookimpl


class AcdcParams(Params):
    tau: float = Field(
        default=0.01,
        ge=0.0,
        allow_inf_nan=False,
        description="remove an edge when the distance from the full model grows by less than this",
    )
    distance: Literal["kl", "metric"] = Field(
        default="kl",
        description="'kl' = KL divergence of the next-token distributions at the target; "
        "'metric' = lost task metric as a fraction of the clean-corrupted gap",
    )
    max_rows: int = Field(
        default=1024, ge=1, description="prompt rows per batched run (bounds memory)"
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="prompts per pass (bounds memory); a larger split runs a chunk at a time, "
        "its caches rebuilt per run; default: as many as fit 256 MiB of hook_z",
    )
    graph: Literal["full", "heads"] = Field(
        default="full",
        description="'full' = the EAP-IG/MIB graph (input, heads' q/k/v, MLPs, logits); "
        "'heads' = head -> head and head -> logits edges only, MLPs left whole",
    )
    sweep: tuple[Annotated[float, Field(ge=0.0, allow_inf_nan=False)], ...] = Field(
        default=(),
        description="taus at each of which ACDC runs once more, for the threshold-sweep ROC "
        "(comma-separated on the command line, e.g. 0.001,0.01,0.1); none by default",
    )

    @field_validator("sweep", mode="before")
    @classmethod
    def _split_commas(cls, value):
        # The command line passes one string.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("sweep")
    @classmethod
    def _distinct_taus(cls, value):
        # Defaults are not validated: only a sweep actually given is checked.
        if not value:
            raise ValueError("an empty sweep runs nothing: leave the parameter out instead")
        if len(set(value)) != len(value):
            raise ValueError(f"the same tau twice in {list(value)}")
        return value


class Acdc(Discoverer):
    """Greedy edge removal from the logits back, keeping edges that move the output."""

    name = "acdc"
    summary = "ACDC: remove each edge whose corruption moves the output by less than tau."
    Params = AcdcParams

    def discover(self, ctx, space, params):
        from appbench import acdc, auto_batch_size

        batch = params.batch_size or auto_batch_size(ctx.model, ctx.search, 4)
        result = acdc(
            ctx.model,
            ctx.task,
            ctx.search,
            space.heads,
            tau=params.tau,
            distance=params.distance,
            log=ctx.log,
            max_rows=params.max_rows,
            full=params.graph == "full",
            batch_size=batch,
            checkpoint=ctx.checkpoint,
        )
        # The input corrections run outside the model's modules: counted here.
        ctx.engine.extra_flops += result.extra_flops
        details = {
            "edges_tested": result.tested,
            "edges_removed": result.removed,
            "final_distance": result.distance,
            "batched_runs": result.forward_runs,
        }
        if params.sweep:
            # Measured apart: the sweep serves the ROC, not the circuit at tau.
            with ctx.part("sweep"):
                details["threshold_sweep"] = [
                    _sweep_entry(tau, result if tau == params.tau else None, ctx, space, params)
                    for tau in params.sweep
                ]
        return Circuit(
            ctx.n_layers,
            ctx.n_heads,
            heads_of(result.edges),
            edges=result.edges,
            graph=params.graph,
            details=details,
        )


def _sweep_entry(tau, result, ctx, space, params):
    """One point of the threshold sweep: ACDC's edges and heads at ``tau``. ``result`` is the
    main run's when ``tau`` is its tau (ACDC is deterministic: a rerun would find the same)."""
    from appbench import acdc, auto_batch_size

    if result is None:
        result = acdc(
            ctx.model,
            ctx.task,
            ctx.search,
            space.heads,
            tau=tau,
            distance=params.distance,
            log=lambda line: ctx.log(f"tau {tau:g}: {line}"),
            max_rows=params.max_rows,
            full=params.graph == "full",
            batch_size=params.batch_size or auto_batch_size(ctx.model, ctx.search, 4),
        )
        ctx.engine.extra_flops += result.extra_flops
    return {
        "tau": tau,
        "edges": sorted(e.id for e in result.edges),
        "heads": [h.id for h in sorted(heads_of(result.edges))],
    }


@hookimpl
def appbench_register_discoverers(register):
    register(Acdc)
