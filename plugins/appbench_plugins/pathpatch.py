"""Automated path patching (Wang et al. 2022, arXiv:2211.00593), as automated and restricted to a
search space by APP (Andersen, Rudman, Zhang, Eickhoff 2025, arXiv:2511.05442; spec §3).

A discoverer. Starting from the logits, it walks the model backwards, breadth first:

1. **resid_post stage.** Every search-space head is scored as a sender into the logits (one
   clean pass with every ``hook_z`` frozen clean except the sender's, corrupted). The selection
   rule below, with its own ``resid_importance_threshold``, picks the first receivers.
2. **BFS over receivers.** A receiver is popped from the queue and added to the circuit. If it
   is not in layer 0, each of its inputs q, k, v is scored from every search-space head in an
   earlier layer (two passes per sender: record the receiver's input with the sender
   corrupted and everything else frozen, then patch only that input into a clean run). The
   selected senders not yet seen join the queue. When the queue plus the visited receivers
   exceed ``early_exit_fraction`` x L x H heads, the queue joins the circuit and the search
   stops ("too many heads to be a relevant circuit", as in the authors' code).

Every score is (m_patched - m_clean) / (m_clean - m_corrupt), means over prompts first.

**Selection rule.** ``selection=effect`` (the default) keeps sender (l, h) when its path moves
the metric by at least ``effect_threshold`` of the clean-corrupted gap: ``|R[l,h]| >=
effect_threshold`` (and, as in every mode, nothing when max|R| <= ``min_value_threshold``).
A head's selection depends on its own score alone, so pruning other heads away never changes
it: the search keeps exactly the dense search's edges that it can reach from the logits through
heads of the search space, so inside any space that keeps a circuit's heads it finds the dense
circuit (property-tested on planted models), and a lone dominant head is found in a model of
any size. Like ACDC's tau (Conmy et al. 2023), the threshold is absolute.

The authors' outlier rules (spec §3.3) stay as options: sender (l, h) is selected when
``|R[l,h]| - |mu| > base_l * |sigma|``, with mu and sigma (Bessel-corrected, as ``torch.std``)
over the receiver's scores and

- ``mode=sqrt`` (the paper's runs): ``base_l = T + k / sqrt(n_l)``;
- ``mode=linear`` (the authors' current code): ``base_l = T + 0.1 (n_rows - 1 - l)``.

``selection=model`` is the authors' convention (spec §3.5, §7 bug 10): heads outside the
search space count as zeros in mu and sigma, and n_l = (l+1) H. ``selection=scored`` takes mu,
sigma and n_l over the scored heads only (appbench's default before 0.2). Both fail in ways
the effect rule does not, measured on the default model over 10 seeds and the five tasks
(README, "How pathpatch selects senders"): one outlier among n scores reaches at most
(n-1)/sqrt(n) standard deviations, so no lone head can be selected among fewer than about 10
scored heads (``scored`` then returns an empty circuit exactly when the pruner kept only the
heads that matter: APP fails when pruning works), and never in a 2x4 model (``model`` too);
and because pruned heads enter ``model``'s statistics as zeros rather than as their real
scores, pruning still moves its thresholds (on gendered_pronouns the pruned circuit differed
from the dense one inside the search space in 10 of 10 seeds).

**How a pruner's search space enters** (spec §3.5): heads outside it are never scored (they
cost no forward pass), so they can never be selected nor become receivers.

Defaults: ``effect_threshold`` = 0.01, chosen from the same measurements: on SmolLM2 IOI (10
search prompts) the dense circuit at 0.01 has 43 heads and is 95.2% faithful, as faithful as
the 70 heads of the authors' rule; 0.02 gives 21 heads at 72%, 0.05 12 heads at 39%. It is
also the authors' ``min_value_threshold`` (the floor of their grid). For the outlier rules, T = 1.5 and
``min_value_threshold`` = 0.01 sit in the middle of the authors' grid (T in {1, 1.5, 2, 2.5},
min value in {0.001, 0.002, 0.01, 0.02}; spec §3.3), k = 2 and the resid threshold 2 are
theirs. Grouped-query models: k and v are scored per key-value head and
each KV head input is scored once; receivers sharing it reuse the scores (and get the edges).
(The authors' Qwen loop marks a KV head visited after scoring its k input, so its v input is
never scored; here k and v are each scored once per KV head.)

The circuit holds heads and the edges found: ``sender -> receiver<q|k|v>`` and
``sender -> logits``. ``Circuit.scores`` gives every scored head its strongest score (largest
magnitude) over all the measurements it was a sender in.

**Engines.** ``engine=fast`` (default) scores with ``appbench.PathPatcher``, which computes
the same scores (to float32 rounding; parity tests hold it to 1e-4 and identical circuits)
from cached clean and corrupted activations at a fraction of the cost: frozen sender passes
recompute only MLPs and are shared by every receiver and input, second passes start at the
receiver's layer with all senders and inputs batched, every patched run is computed only at
the positions between a prompt's first clean/corrupted difference and its target, and only the
logits the metric reads are computed, at the target positions. ``engine=reference`` runs ``appbench.sender_scores_to_logits`` /
``sender_scores_to_receiver``, the plain implementation with one or two whole forward passes
per sender, as the authors do. ``details.reference_forward_passes`` counts the passes the
reference makes for this search whichever engine ran; the runner measures what actually ran.
"""

import dataclasses
import math
import time
from collections import deque
from typing import Literal

from pydantic import Field

from appbench import (
    QKV,
    Circuit,
    Discoverer,
    Edge,
    Head,
    NotCausalError,
    Params,
    hookimpl,
    input_head_index,
    metric_gap,
    path_patching_baseline,
    sender_scores_to_logits,
    sender_scores_to_receiver,
)

#: Slope of the ``linear`` mode's per-layer threshold (the authors' ``alpha``).
LINEAR_ALPHA = 0.1


Selection = Literal["effect", "model", "scored"]


class PathPatchParams(Params):
    selection: Selection = Field(
        default="effect",
        description="how senders are selected from a receiver's scores: 'effect' = |R| >= "
        "effect_threshold (independent of every other head); 'model' = the authors' outlier "
        "rule with mu and sigma over every head of the earlier layers, unscored ones as zeros; "
        "'scored' = the outlier rule over the scored heads only",
    )
    effect_threshold: float = Field(
        default=0.01,
        gt=0.0,
        allow_inf_nan=False,
        description="selection=effect: a sender is kept when its path moves the metric by at "
        "least this fraction of the clean-corrupted gap",
    )
    importance_threshold: float = Field(
        default=1.5,
        ge=0.0,
        allow_inf_nan=False,
        description="outlier rules: T, a sender into a receiver's q/k/v needs |R| - |mu| > "
        "(T + ...) |sigma|",
    )
    resid_importance_threshold: float = Field(
        default=2.0,
        ge=0.0,
        allow_inf_nan=False,
        description="outlier rules: T of the first stage (senders into the logits)",
    )
    min_value_threshold: float = Field(
        default=0.01,
        ge=0.0,
        allow_inf_nan=False,
        description="no sender is selected for a receiver whose max |score| is at most this",
    )
    k: float = Field(
        default=2.0,
        ge=0.0,
        allow_inf_nan=False,
        description="outlier rules, sqrt mode: base_l = T + k / sqrt(n_l)",
    )
    mode: Literal["sqrt", "linear"] = Field(
        default="sqrt",
        description="outlier rules' per-layer threshold: 'sqrt' (T + k/sqrt(n_l), the paper's "
        "runs) or 'linear' (T + 0.1 x layers between l and the receiver)",
    )
    engine: Literal["fast", "reference"] = Field(
        default="fast",
        description="fast: appbench's PathPatcher (same scores, far fewer FLOPs); reference: "
        "two whole forward passes per sender per input, as the authors run it",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="prompts per pass (bounds memory); a split larger than this is scored a "
        "chunk at a time, its caches rebuilt per receiver; default: as many as fit 256 MiB "
        "of hook_z",
    )
    early_exit_fraction: float = Field(
        default=0.75,
        gt=0.0,
        le=1.0,
        description="stop when queued + visited receivers exceed this fraction of all heads "
        "(the queue joins the circuit); 0.75 as in the authors' GPT-2 runs, 1 never stops",
    )


def select_senders(
    scores,
    n_rows,
    n_heads,
    *,
    selection="effect",
    effect_threshold=0.01,
    threshold=1.5,
    min_value_threshold=0.01,
    k=2.0,
    mode="sqrt",
):
    """The senders selected from one receiver's scores (spec §3.3).

    Args:
        scores: head -> score for the scored heads, all in layers < ``n_rows``.
        n_rows: the layers a sender may come from (the receiver's layer, or L for the logits).
        n_heads: heads per layer.
        selection: ``effect`` (|score| >= ``effect_threshold``), ``model`` (outlier rule,
            unscored heads of layers < n_rows as zeros, n_l = (l+1) x n_heads) or ``scored``
            (outlier rule over the scored heads, n_l = scored heads in layers <= l).
        effect_threshold: the ``effect`` rule's threshold.
        threshold: T of the outlier rules.
        min_value_threshold: no selection when max |score| is at most this.
        k: the sqrt mode's constant.
        mode: the outlier rules' per-layer threshold, "sqrt" or "linear".

    Returns:
        the selected heads, a frozenset.
    """
    for head in scores:
        if head.layer >= n_rows:
            raise ValueError(f"{head.id} cannot send to a receiver fed by {n_rows} layers")
    if selection not in ("effect", "model", "scored"):
        raise ValueError(f"unknown selection {selection!r} (expected effect, model or scored)")
    if mode not in ("sqrt", "linear"):
        raise ValueError(f"unknown threshold mode {mode!r} (expected 'sqrt' or 'linear')")
    values = list(scores.values())
    if not values or max(abs(v) for v in values) <= min_value_threshold:
        return frozenset()
    if selection == "effect":
        return frozenset(head for head, value in scores.items() if abs(value) >= effect_threshold)
    if selection == "model":
        values += [0.0] * (n_rows * n_heads - len(values))
    mu = sum(values) / len(values)
    sigma = (
        math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0.0
    )
    selected = set()
    for head, value in scores.items():
        layer = head.layer
        if mode == "sqrt":
            if selection == "model":
                n_l = (layer + 1) * n_heads
            else:
                n_l = sum(1 for other in scores if other.layer <= layer)
            base = threshold + k / math.sqrt(n_l)
        else:
            base = threshold + LINEAR_ALPHA * (n_rows - 1 - layer)
        if abs(value) - abs(mu) > base * abs(sigma):
            selected.add(head)
    return frozenset(selected)


class PathPatch(Discoverer):
    """Breadth-first automated path patching from the logits through q, k and v."""

    name = "pathpatch"
    summary = (
        "Automated path patching (APP §3): BFS from the logits through receivers' q/k/v, "
        "senders scored only inside the search space."
    )
    Params = PathPatchParams

    def discover(self, ctx, space, params):
        model = ctx.model
        n_layers, n_heads = ctx.n_layers, ctx.n_heads
        space_heads = sorted(space.heads)

        def select(scores, n_rows, threshold):
            return select_senders(
                scores,
                n_rows,
                n_heads,
                selection=params.selection,
                effect_threshold=params.effect_threshold,
                threshold=threshold,
                min_value_threshold=params.min_value_threshold,
                k=params.k,
                mode=params.mode,
            )

        from appbench import auto_batch_size, prompt_chunks

        batch = params.batch_size or auto_batch_size(model, ctx.search, 4)
        chunks = list(prompt_chunks(ctx.search, batch))
        first_ctx = ctx if len(chunks) == 1 else dataclasses.replace(ctx, search=chunks[0])
        engine, fallback = params.engine, None
        scorer: _FastScorer | _ReferenceScorer | _ChunkedScorer | None = None
        if engine == "fast":
            try:
                scorer = _FastScorer(first_ctx)
            except NotCausalError as exc:
                fallback = str(exc)
                ctx.log(f"pathpatch: {exc}; scoring with the reference engine instead")
                ctx.flag(
                    "not-causal",
                    f"{exc}; path patching fell back to the (exact, slower) reference engine, "
                    "and a language model whose positions see later ones is likely miswired",
                )
                engine = "reference"
        if scorer is None:
            scorer = _ReferenceScorer(first_ctx)
        if len(chunks) > 1:
            ctx.log(f"pathpatch: {len(ctx.search)} prompts in {len(chunks)} chunks of {batch}")
            kind = _FastScorer if engine == "fast" else _ReferenceScorer
            scorer = _ChunkedScorer(ctx, chunks, kind)
        m_clean, m_corrupt = scorer.m_clean, scorer.m_corrupt
        strongest: dict[Head, float] = {}

        def remember(scores):
            for head, value in scores.items():
                if head not in strongest or abs(value) > abs(strongest[head]):
                    strongest[head] = value

        forward_passes = 2  # the clean and corrupted baselines
        evaluations = {"resid_post": 0, "q": 0, "k": 0, "v": 0}
        trace = []

        started = time.perf_counter()
        ctx.log(f"pathpatch: scoring {len(space_heads)} senders on the logits")
        resid_scores = scorer.logits(space_heads)
        forward_passes += len(space_heads)
        evaluations["resid_post"] += len(space_heads)
        remember(resid_scores)
        first = select(resid_scores, n_layers, params.resid_importance_threshold)
        trace.append(
            {
                "receiver": "logits",
                "input": None,
                "evaluated": len(resid_scores),
                "selected": [h.id for h in sorted(first)],
                "cached": False,
            }
        )
        edges = {Edge(head, None) for head in first}

        queue = deque(sorted(first))
        queued = set(queue)
        visited: set[Head] = set()
        visit_order = []
        circuit = set()
        input_cache = {}  # (layer, slice of hook_{input}, input) -> scores; GQA shares k/v
        limit = params.early_exit_fraction * n_layers * n_heads
        early_exit = False
        while queue:
            if len(queue) + len(visited) > limit:
                circuit |= queued
                early_exit = True
                break
            receiver = queue.popleft()
            queued.discard(receiver)
            circuit.add(receiver)
            if receiver in visited or receiver.layer == 0:
                continue
            visited.add(receiver)
            visit_order.append(receiver.id)
            senders = [h for h in space_heads if h.layer < receiver.layer]
            keys = {
                letter: (receiver.layer, input_head_index(model.cfg, receiver, letter), letter)
                for letter in QKV
            }
            missing = [letter for letter in QKV if keys[letter] not in input_cache]
            if missing:
                ctx.log(
                    f"pathpatch: receiver {receiver.id} ({len(visit_order)} visited, "
                    f"{len(queue)} queued): {len(senders)} senders x {''.join(missing)}, "
                    f"{time.perf_counter() - started:.0f} s so far"
                )
                for letter, scores in scorer.receiver(receiver, senders, missing).items():
                    input_cache[keys[letter]] = scores
                    forward_passes += 2 * len(senders)
                    evaluations[letter] += len(senders)
            for letter in QKV:
                key = keys[letter]
                cached = letter not in missing
                scores = input_cache[key]
                remember(scores)
                chosen = select(scores, receiver.layer, params.importance_threshold)
                trace.append(
                    {
                        "receiver": receiver.id,
                        "input": letter,
                        "evaluated": len(scores),
                        "selected": [h.id for h in sorted(chosen)],
                        "cached": cached,
                    }
                )
                edges |= {Edge(sender, receiver, letter) for sender in chosen}
                fresh = sorted(chosen - visited - queued)
                queue.extend(fresh)
                queued.update(fresh)

        return Circuit(
            n_layers,
            n_heads,
            frozenset(circuit),
            scores={h.id: v for h, v in sorted(strongest.items())},
            edges=frozenset(edges),
            details={
                "engine": engine,
                "engine_fallback": fallback,
                "m_clean": m_clean,
                "m_corrupt": m_corrupt,
                "receivers_visited": visit_order,
                "n_receivers_visited": len(visit_order),
                "early_exit": early_exit,
                "early_exit_limit": limit,
                "sender_evaluations": evaluations,
                "reference_forward_passes": forward_passes,
                "n_edges": len(edges),
                "trace": trace,
            },
        )


class _ReferenceScorer:
    """Scores from the plain reference implementation (whole forward passes per sender)."""

    def __init__(self, ctx):
        self.model, self.task, self.data = ctx.model, ctx.task, ctx.search
        baseline = path_patching_baseline(self.model, self.task, self.data)
        metric_gap(baseline.m_clean, baseline.m_corrupt)  # raises when scores would be noise
        self.caches = (baseline.z_clean, baseline.z_corrupt)
        self.m_clean, self.m_corrupt = baseline.m_clean, baseline.m_corrupt

    def logits(self, senders):
        return sender_scores_to_logits(
            self.model,
            self.task,
            self.data,
            senders,
            *self.caches,
            m_clean=self.m_clean,
            m_corrupt=self.m_corrupt,
        )

    def receiver(self, receiver, senders, letters):
        return {
            letter: sender_scores_to_receiver(
                self.model,
                self.task,
                self.data,
                senders,
                receiver,
                letter,
                *self.caches,
                m_clean=self.m_clean,
                m_corrupt=self.m_corrupt,
            )
            for letter in letters
        }


class _FastScorer:
    """Scores from appbench's PathPatcher (identical scores, far fewer FLOPs)."""

    def __init__(self, ctx):
        from appbench import PathPatcher  # imports torch: not at plugin load

        self.patcher = PathPatcher(ctx.engine, ctx.search)
        self.m_clean, self.m_corrupt = self.patcher.cache.m_clean, self.patcher.cache.m_corrupt

    def logits(self, senders):
        return self.patcher.logits_scores(senders)

    def receiver(self, receiver, senders, letters):
        return self.patcher.receiver_scores(receiver, senders, letters)


class _ChunkedScorer:
    """Scores of a split too large for one pass: every call scores each chunk of prompts with
    a scorer built for it (caches rebuilt, then dropped, so one chunk is held at a time), and
    combines them exactly. A chunk's score s_c = (m_c(patched) - m_c(clean)) / gap_c gives its
    mean patched metric back; the split's score is then (mean patched - m(clean)) / gap."""

    def __init__(self, ctx, chunks, kind):
        self.ctx, self.chunks, self.kind = ctx, chunks, kind
        engine = ctx.engine
        sizes = [len(chunk) for chunk in chunks]
        clean = [engine.clean_metric(chunk).double().sum().item() for chunk in chunks]
        corrupt = [engine.corrupt_metric(chunk).double().sum().item() for chunk in chunks]
        self.n = sum(sizes)
        self.m_clean, self.m_corrupt = sum(clean) / self.n, sum(corrupt) / self.n
        metric_gap(self.m_clean, self.m_corrupt)  # raises when scores would be noise

    def _combined(self, score):
        """``score(scorer)`` -> {key: {head: score}} per chunk, combined over the split."""
        patched: dict = {}
        for chunk in self.chunks:
            scorer = self.kind(dataclasses.replace(self.ctx, search=chunk))
            gap = scorer.m_clean - scorer.m_corrupt
            for key, scores in score(scorer).items():
                into = patched.setdefault(key, {})
                for head, value in scores.items():
                    mean = scorer.m_clean + value * gap
                    into[head] = into.get(head, 0.0) + mean * len(chunk)
        gap = self.m_clean - self.m_corrupt
        return {
            key: {h: (total / self.n - self.m_clean) / gap for h, total in scores.items()}
            for key, scores in patched.items()
        }

    def logits(self, senders):
        return self._combined(lambda scorer: {None: scorer.logits(senders)})[None]

    def receiver(self, receiver, senders, letters):
        return self._combined(lambda scorer: scorer.receiver(receiver, senders, letters))


@hookimpl
def appbench_register_discoverers(register):
    register(PathPatch)
