"""Sparsity selection shared by the FLAP-family pruners (APP, Andersen et al. 2025, spec 1.4, 2.3-2.4).

Not a plugin: the ``flap``, ``cflap`` and ``merged`` pruners score heads their own way and
then hand their head scores to :func:`prune_branches`, which picks how many to keep:

1. **K(p)**, the number of heads kept at sparsity p (:func:`keep_count`). By default
   ``K(p) = floor(N(1-p) + 1/2)``, i.e. N(1-p) rounded half *up* (not Python's banker's
   rounding), clamped to [1, N]. With ``compat`` it is the authors' AL-AM mapping, the first
   minimiser k of |(k+1) - N(1-p)|: one head fewer (``round(N(1-p)) - 1``), and 0 heads at
   p = 0.99 on 144 heads.
2. **The sweep** (:func:`sparsity_grid`): p from ``sweep_start`` to ``sweep_stop`` inclusive
   (default 0.60..0.99 step 0.01, 40 points; compat 0.60..0.98 as the authors' ``range(60,
   99)``). At each point the top-K(p) heads are kept and every other head's ``hook_z`` is
   replaced by its per-template, per-position mean over the corrupted prompts (computed once);
   ``performance(p) = 100 m(circuit) / m(full model)`` (ratio of means over prompts). Every
   distinct K is evaluated once, all in one batched :meth:`ablated_metric` call, together with
   the full model and, for ``merged``, the other branch's circuits.
3. **The cliff rule** (:func:`find_cliff`): ``first``, ``biggest`` or ``fixed``, as spec 2.4.
   Window ``w = max(2, round_half_up(len(grid) / 10))`` (4 for both the default 40-point and
   the authors' 39-point grid), ``delta = (max - min) / 10``. Index -1 means "no cliff": the
   sparsity falls back to ``fallback`` (0.75). Otherwise the chosen sparsity is ``grid[c]``.
   One deliberate deviation: a flat curve (max == min, delta = 0) has no cliff and returns -1,
   where the coded rule would accept a zero "drop" at index 0.

**Which prompts.** The authors calibrate FLAP and select the cliff on the same prompts (spec
7.1.9), so the cliff is chosen in-sample. By default (``selection=holdout``) the search split
is divided deterministically into halves, alternating within each template group (the 1st,
3rd, ... prompt of a template calibrate; the 2nd, 4th, ... select), and the sweep runs on the
selection half only. ``selection=same`` (implied by ``compat``) uses every search prompt for
both. When no sweep is needed (``sparsity`` or ``keep_k`` given, or rule ``fixed``) every
search prompt calibrates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, model_validator

from appbench import Head, Params, RunError, SearchSpace

Rule = Literal["first", "biggest", "fixed"]
RULES: tuple[str, ...] = ("first", "biggest", "fixed")


# --------------------------------------------------------------------- pure helpers
def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves upwards (2.5 -> 3), unlike Python's ``round``.

    ``x`` is first rounded to 9 decimals so that float noise such as 144 * (1 - 0.94) =
    8.640000000000008 or 0.5000000000000001 cannot move a result across a half.
    """
    return math.floor(round(x, 9) + 0.5)


def keep_count(p: float, n: int, compat: bool = False) -> int:
    """K(p): how many of ``n`` heads are kept at sparsity ``p``.

    Args:
        p: sparsity in [0, 1], the fraction of heads removed.
        n: number of heads N.
        compat: reproduce the authors' AL-AM off-by-one (spec 1.4): the first minimiser k in
            0..N-1 of |(k+1) - N(1-p)|, which can be 0.

    Returns:
        ``round_half_up(N(1-p))`` clamped to [1, N], or the compat count.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {p}")
    if n < 1:
        raise ValueError(f"need at least one head, got {n}")
    target = round(n * (1.0 - p), 9)
    if compat:
        # Cumulative (equal) unit weight at sorted position k is k+1; the threshold sits at the
        # first position closest to the target and only units strictly above it are kept.
        distances = [abs((k + 1) - target) for k in range(n)]
        return distances.index(min(distances))
    return min(n, max(1, round_half_up(target)))


def sparsity_grid(start: float, stop: float, step: float) -> list[float]:
    """Sparsities ``start, start+step, ...`` up to ``stop`` inclusive, free of float drift."""
    if step <= 0:
        raise ValueError(f"sweep step must be positive, got {step}")
    if stop < start:
        raise ValueError(f"sweep stop {stop} lies below its start {start}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 10) for i in range(count)]


def default_window(n_points: int) -> int:
    """The cliff window: ``round((99-60)/10) = 4`` for the authors' 39 points, generalised."""
    return max(2, round_half_up(n_points / 10))


def _drops(values: Sequence[float], window: int) -> list[float]:
    # |v[i] - min of the next window-1 points|: abs, so a rise counts as much as a fall.
    return [abs(values[i] - min(values[i + 1 : i + window])) for i in range(len(values) - window)]


def _delta(values: Sequence[float]) -> float:
    return (max(values) - min(values)) / 10.0


def cliff_first(values: Sequence[float], window: int) -> int:
    """The ``first`` rule (spec 2.4): the first index whose drop reaches delta, then moved to
    the first of the next ``window`` one-step falls that itself reaches delta.

    The spec's "valley" check (move c to the argmax of ``v[i:i+w]`` when ``v[i]`` exceeds every
    later point) is left out: under its own condition ``v[i]`` is that argmax, so it never
    moves c.

    Returns:
        The cliff index into ``values``, or -1 when there is none.
    """
    v = [float(x) for x in values]
    if window < 2 or len(v) <= window:
        return -1
    delta = _delta(v)
    if delta <= 0:
        return -1  # a flat curve has no cliff
    for i, drop in enumerate(_drops(v, window)):
        if drop >= delta:
            # i <= len(v) - window - 1, so v[i + window] exists.
            steps = [v[i + k] - v[i + k + 1] for k in range(window)]
            offset = next((k for k, s in enumerate(steps) if s >= delta), 0)
            return i + offset
    return -1


def cliff_biggest(values: Sequence[float], window: int) -> int:
    """The ``biggest`` rule (spec 2.4): the index of the largest drop, moved to the last index
    (within ``window``) whose drop is still within delta of that largest drop.

    Returns:
        The cliff index into ``values``, or -1 when there is none.
    """
    v = [float(x) for x in values]
    if window < 2 or len(v) <= window:
        return -1
    delta = _delta(v)
    if delta <= 0:
        return -1
    drops = _drops(v, window)
    c = drops.index(max(drops))
    gaps = [drops[c] - d for d in drops[c : c + window]]
    m = next((k for k, g in enumerate(gaps) if g >= delta), None)
    # gaps[0] = 0 < delta, so m >= 1 and c never decreases.
    return c + m - 1 if m is not None else c


def find_cliff(values: Sequence[float], rule: str, window: int | None = None) -> int:
    """Apply a cliff rule to a performance curve; -1 means "use the fallback sparsity"."""
    w = default_window(len(values)) if window is None else window
    if rule == "first":
        return cliff_first(values, w)
    if rule == "biggest":
        return cliff_biggest(values, w)
    if rule == "fixed":
        return -1
    raise ValueError(f"unknown cliff rule {rule!r}; choose one of {', '.join(RULES)}")


def top_heads(scores: Any, k: int) -> frozenset[Head]:
    """The ``k`` highest-scoring heads of an [L, H] tensor; ties go to the lower (layer, head)."""
    n_heads = int(scores.shape[1])
    order = scores.flatten().argsort(descending=True, stable=True)[:k].tolist()
    return frozenset(Head(i // n_heads, i % n_heads) for i in order)


def scores_by_id(scores: Any) -> dict[str, float]:
    """An [L, H] tensor as {head id: score} for every head."""
    rows = scores.detach().double().cpu().tolist()
    return {
        Head(layer, h).id: float(s) for layer, row in enumerate(rows) for h, s in enumerate(row)
    }


# ------------------------------------------------------------------------ parameters
class SweepParams(Params):
    """Sparsity-sweep settings shared by every branch of a FLAP-family pruner."""

    sweep_start: float = Field(
        default=0.60, ge=0.0, le=1.0, description="first sparsity of the sweep"
    )
    sweep_stop: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="last sparsity of the sweep, inclusive; default 0.99 (0.98 with compat)",
    )
    sweep_step: float = Field(default=0.01, gt=0.0, le=1.0, description="sweep step")
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="prompts per pass while scoring and sweeping (bounds memory); default: "
        "as many as fit 256 MiB of hook_z",
    )
    window: int | None = Field(
        default=None,
        ge=2,
        description="cliff window w; default max(2, round(len(grid)/10)), 4 for 40 points",
    )
    fallback: float = Field(
        default=0.75,
        ge=0.0,
        le=1.0,
        description="sparsity used when the cliff rule finds no cliff (and by rule=fixed)",
    )
    selection: Literal["holdout", "same"] | None = Field(
        default=None,
        description="prompts the sweep runs on: 'holdout' = half the search split, the other "
        "half calibrates; 'same' = all of it for both, as the authors; default holdout "
        "(same with compat)",
    )
    compat: bool = Field(
        default=False,
        description="reproduce the authors' choices: position-summed per-prompt statistics "
        "with padding and FLAP's running update, K(p) = round(N(1-p)) - 1, sweep 0.60..0.98, "
        "selection on the calibration prompts",
    )

    @model_validator(mode="after")
    def _check_grid(self) -> SweepParams:
        if self.stop < self.sweep_start:
            raise ValueError(f"sweep_stop {self.stop} lies below sweep_start {self.sweep_start}")
        given = {"sweep_start", "sweep_stop", "sweep_step", "window"} & self.model_fields_set
        points = len(self.grid())
        window = default_window(points) if self.window is None else self.window
        if given and points <= window:
            # The cliff rules compare each point with the next window - 1 ones.
            raise ValueError(
                f"a sweep of {points} point(s) ({self.sweep_start} to {self.stop} by "
                f"{self.sweep_step}) cannot show a cliff in a window of {window}: give at "
                f"least {window + 1} points"
            )
        return self

    @property
    def stop(self) -> float:
        if self.sweep_stop is not None:
            return self.sweep_stop
        return 0.98 if self.compat else 0.99

    @property
    def selection_mode(self) -> str:
        if self.selection is not None:
            return self.selection
        return "same" if self.compat else "holdout"

    def grid(self) -> list[float]:
        return sparsity_grid(self.sweep_start, self.stop, self.sweep_step)


# ------------------------------------------------------------------------- the stage
class Prompts:
    """A set of prompts, run in chunks of ``batch_size`` prompts so that pruning holds one
    chunk's activations at a time, whatever the size of the split (automatic: as many
    prompts as fit 256 MiB of float64 ``hook_z``; :mod:`appbench.engine.chunks`)."""

    def __init__(self, engine: Any, data: Any, batch_size: int | None = None) -> None:
        from appbench import auto_batch_size

        self.engine = engine
        self.data = data
        self.batch_size = batch_size or auto_batch_size(engine.model, data)

    def chunks(self) -> Iterator[Any]:
        """The prompts, ``batch_size`` at a time (in order)."""
        from appbench import prompt_chunks

        return prompt_chunks(self.data, self.batch_size)

    def z_chunks(self, which: str) -> Iterator[tuple[Any, Any]]:
        """``(hook_z [L, n, T, H, d], pad mask [n, T])`` of each chunk's clean or corrupted
        prompts."""
        for chunk in self.chunks():
            yield self.engine.cache_z(getattr(chunk, which)), chunk.pad_mask()

    @cached_property
    def corrupt_group_means(self) -> Any:
        """Per-template, per-position means of ``hook_z`` on the corrupted prompts."""
        from appbench import corrupt_group_means

        return corrupt_group_means(self.engine, self.data, self.batch_size)

    def ablated_metric(self, keep: Any) -> Any:
        """[K, N] metric of each kept-head set, every other head at its corrupted group mean,
        run chunk by chunk of prompts."""
        from appbench import chunked_ablated_metric

        return chunked_ablated_metric(
            self.engine, self.data, keep, self.corrupt_group_means, self.batch_size
        )


@dataclass(frozen=True)
class Branch:
    """One scored head ranking and how its size is chosen.

    Attributes:
        name: label in the details (``flap``, ``cflap``).
        score: calibration prompts -> [L, H] head scores (higher = keep).
        rule: cliff rule.
        sparsity: fixed sparsity (skips the sweep), or None.
        keep_k: fixed number of heads (skips the sweep and p), or None.
        details: extra entries for this branch's details (its metric, ...).
    """

    name: str
    score: Callable[[Prompts], Any]
    rule: str = "first"
    sparsity: float | None = None
    keep_k: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sweeps(self) -> bool:
        return self.keep_k is None and self.sparsity is None and self.rule != "fixed"


@dataclass(frozen=True)
class BranchResult:
    """A branch's kept heads, its [L, H] scores, and its JSON-serialisable details."""

    heads: frozenset[Head]
    scores: Any
    details: dict[str, Any]


def split_halves(data: Any) -> tuple[list[int], list[int]]:
    """Deterministic calibration / selection halves of a split, alternating within templates."""
    seen: dict[int, int] = {}
    calibration: list[int] = []
    selection: list[int] = []
    for index, group in enumerate(data.groups.tolist()):
        (calibration if seen.get(group, 0) % 2 == 0 else selection).append(index)
        seen[group] = seen.get(group, 0) + 1
    return calibration, selection


def prune_branches(
    ctx: Any, params: SweepParams, branches: Sequence[Branch]
) -> tuple[list[BranchResult], dict[str, Any]]:
    """Score every branch on the calibration prompts and size it by sweep, sparsity or keep_k.

    All sweeps share one set of corrupted means and one batched evaluation.

    Returns:
        One result per branch, and the details common to all of them.
    """
    n_total = ctx.n_layers * ctx.n_heads
    for branch in branches:
        if branch.keep_k is not None and branch.keep_k > n_total:
            raise RunError(
                f"{branch.name}: keep_k={branch.keep_k} exceeds the model's {n_total} heads"
            )
    sweeping = any(b.sweeps for b in branches)
    mode = params.selection_mode if sweeping else "none"
    search = ctx.search
    if mode == "holdout":
        calib_idx, select_idx = split_halves(search)
        if not select_idx:
            raise RunError(
                "selection=holdout needs at least two prompts of one template in the search "
                "split; use more search prompts or selection=same"
            )
        calibration = Prompts(ctx.engine, search.select(calib_idx), params.batch_size)
        selection: Prompts | None = Prompts(
            ctx.engine, search.select(select_idx), params.batch_size
        )
    else:
        calibration = Prompts(ctx.engine, search, params.batch_size)
        selection = calibration if sweeping else None
    common: dict[str, Any] = {
        "selection": mode,
        "n_calibration": len(calibration.data),
        "n_selection": len(selection.data) if selection is not None else 0,
        "compat": params.compat,
    }

    names = ", ".join(b.name for b in branches)
    ctx.log(f"{names}: scoring {n_total} heads on {len(calibration.data)} calibration prompts")
    scores = [b.score(calibration) for b in branches]
    curves: list[list[dict[str, Any]]] = [[] for _ in branches]
    grid = params.grid() if sweeping else []
    window = params.window if params.window is not None else default_window(len(grid))
    if sweeping:
        assert selection is not None
        with ctx.part("sweep"):
            curves, m_full = _sweep(ctx, params, selection, branches, scores, grid)
        common.update(
            m_full=m_full,
            grid={"start": grid[0], "stop": grid[-1], "step": params.sweep_step},
            window=window,
        )

    results = []
    for branch, branch_scores, curve in zip(branches, scores, curves, strict=True):
        details: dict[str, Any] = {"rule": branch.rule, **branch.details}
        cliff: int | None = None
        sparsity: float | None
        if branch.keep_k is not None:
            source, sparsity, k = "keep_k", None, branch.keep_k
        elif branch.sparsity is not None:
            source, sparsity = "sparsity", branch.sparsity
            if round(n_total * (1.0 - sparsity), 9) < 0.5:
                raise RunError(
                    f"sparsity {sparsity} keeps no head of {n_total} (at most "
                    f"{1 - 0.5 / n_total:.4f} keeps one)"
                )
            k = keep_count(sparsity, n_total, params.compat)
        else:
            values = [point["performance"] for point in curve]
            cliff = find_cliff(values, branch.rule, window) if branch.sweeps else -1
            source = "sweep" if branch.sweeps else "fixed"
            sparsity = grid[cliff] if cliff >= 0 else params.fallback
            k = keep_count(sparsity, n_total, params.compat)
            if values:
                details["delta"] = _delta(values)
        if source == "sweep" and cliff == -1:
            ctx.flag(
                "fallback-sparsity",
                f"{branch.name}: the {branch.rule} cliff rule found no cliff in the sparsity "
                f"sweep, so the fallback sparsity {params.fallback} was used ({k} heads)",
            )
        performance = next((pt["performance"] for pt in curve if pt["k"] == k), None)
        details.update(
            source=source,
            sparsity=sparsity,
            k=k,
            fallback_used=cliff == -1,
            cliff_index=cliff,
            performance=performance,
            curve=curve,
        )
        results.append(BranchResult(top_heads(branch_scores, k), branch_scores, details))
    return results, common


def _sweep(
    ctx: Any,
    params: SweepParams,
    selection: Prompts,
    branches: Sequence[Branch],
    scores: Sequence[Any],
    grid: Sequence[float],
) -> tuple[list[list[dict[str, Any]]], float]:
    """Performance curves of the sweeping branches (empty lists for the others) and m(full)."""
    import torch

    data = selection.data
    n_total = ctx.n_layers * ctx.n_heads
    ks = [keep_count(p, n_total, params.compat) for p in grid]
    # One variant per distinct head set: the full model first, then every branch's circuits.
    variants: dict[frozenset[Head], int] = {}

    def variant(heads: frozenset[Head]) -> int:
        return variants.setdefault(heads, len(variants))

    full = variant(
        frozenset(Head(layer, h) for layer in range(ctx.n_layers) for h in range(ctx.n_heads))
    )
    index = [
        {k: variant(top_heads(s, k)) for k in sorted(set(ks))} if b.sweeps else {}
        for b, s in zip(branches, scores, strict=True)
    ]
    keep = torch.zeros(len(variants), ctx.n_layers, ctx.n_heads, dtype=torch.bool)
    for heads, row in variants.items():
        for head in heads:
            keep[row, head.layer, head.head] = True
    ctx.log(
        f"sparsity sweep: {len(grid)} points, {len(variants)} distinct head sets on "
        f"{len(data)} selection prompts"
    )
    metric = selection.ablated_metric(keep).double().mean(dim=1).tolist()
    m_full = float(metric[full])
    if not m_full > 0:
        raise RunError(
            f"the full model's mean metric on the selection prompts is {m_full:.4g}; the "
            "sparsity sweep's performance 100 m(C)/m(M) needs m(M) > 0"
        )
    curves = [
        [
            {"sparsity": p, "k": k, "performance": 100.0 * metric[rows[k]] / m_full}
            for p, k in zip(grid, ks, strict=True)
        ]
        if rows
        else []
        for rows in index
    ]
    return curves, m_full


def prune_single(ctx: Any, params: Any, branch: Branch) -> SearchSpace:
    """Run one branch (flap or cflap alone) and wrap its heads, scores and details."""
    [result], common = prune_branches(ctx, params, [branch])
    return SearchSpace(
        ctx.n_layers,
        ctx.n_heads,
        result.heads,
        scores_by_id(result.scores),
        {**common, **result.details},
    )


class SingleBranchParams(SweepParams):
    """Sweep parameters plus the choices of one branch (the ``flap`` and ``cflap`` pruners)."""

    rule: Rule = Field(default="first", description="cliff rule of the sparsity sweep")
    sparsity: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="fixed sparsity p (below 1: p = 1 keeps no head); skips the sweep",
    )
    keep_k: int | None = Field(
        default=None, ge=1, description="keep exactly this many heads; skips p and the sweep"
    )

    @model_validator(mode="after")
    def _one_size(self) -> SingleBranchParams:
        given = [name for name in ("sparsity", "keep_k") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError("give sparsity or keep_k, not both")
        if given and "rule" in self.model_fields_set:
            raise ValueError(f"{given[0]} skips the sweep, so a cliff rule means nothing")
        return self
