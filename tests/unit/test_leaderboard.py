"""The leaderboard's pure functions on synthetic results built here: grouping, mean and spread,
bootstrap intervals, wording, flags, reference kinds, ranks, the paper's rows."""

from __future__ import annotations

import math
import random

import pytest

from appbench import leaderboard as lb
from appbench.metrics import faithfulness
from appbench.results import (
    Faithfulness,
    Flag,
    Overlap,
    Provenance,
    Reference,
    RunResult,
    Speedup,
    StageCost,
)


def cost(wall=1.0, flops=1e9, passes=10.0):
    return StageCost(
        wall_seconds=wall,
        forward_calls=1,
        prompt_passes=passes,
        tokens=passes,
        flops=flops,
        peak_rss_bytes=0,
    )


def faith(model, empty, circuit):
    """Faithfulness from per-prompt values, as the runner stores it."""
    n = len(model)
    means = [math.fsum(v) / n for v in (model, empty, circuit)]
    return Faithfulness(
        **faithfulness(*means).to_dict(),
        ablation="test",
        per_prompt_model=list(model),
        per_prompt_empty=list(empty),
        per_prompt_circuit=list(circuit),
    )


def prompts(n, keep, seed):
    """Per-prompt metrics of n prompts whose circuit keeps about ``keep`` of the gap."""
    rng = random.Random(seed)
    model = [3.0 + rng.gauss(0, 1) for _ in range(n)]
    empty = [rng.gauss(0, 0.5) for _ in range(n)]
    circuit = [e + keep * (m - e) + rng.gauss(0, 0.5) for m, e in zip(model, empty, strict=True)]
    return model, empty, circuit


def result(
    *,
    task="ioi",
    model="zoo-x",
    pruner="cflap",
    discoverer="pathpatch",
    seed=0,
    keep=0.8,
    n_eval=50,
    f=None,
    reference_kind="ground-truth",
    reference_source="ref.json#gt",
    f1=1.0,
    speedup=None,
    flags=(),
    discover_flops=4e9,
    pruner_params=None,
    n_search=40,
):
    f = f or faith(*prompts(n_eval, keep, seed))
    reference = (
        None
        if reference_kind is None
        else Reference(source=reference_source, heads=["a0.h0"], kind=reference_kind)
    )
    overlap = (
        None
        if reference is None
        else Overlap(
            precision=f1,
            recall=f1,
            f1=f1,
            iou=f1,
            intersection=1,
            circuit_size=1,
            reference_size=1,
        )
    )
    return RunResult(
        task=task,
        model=model,
        pruner=pruner,
        discoverer=discoverer,
        pruner_params=pruner_params if pruner_params is not None else {"rule": "first"},
        discoverer_params={"threshold": 0.01},
        seed=seed,
        device="cpu",
        n_search=n_search,
        n_eval=n_eval,
        search_sha256="0" * 64,
        n_layers=2,
        n_heads=2,
        total_heads=4,
        graph_config={
            "n_layers": 2,
            "n_heads": 2,
            "d_model": 8,
            "attn_only": False,
            "parallel_attn_mlp": False,
        },
        search_space={"n_layers": 2, "n_heads": 2, "heads": ["a0.h0", "a1.h1"], "scores": {}},
        circuit={"n_layers": 2, "n_heads": 2, "heads": ["a0.h0"], "edges": ["a0.h0->logits"]},
        search_space_size=2,
        circuit_size=1,
        reduction=0.5,
        faithfulness=f,
        reference=reference,
        overlap=overlap,
        cost={
            "load": cost(),
            "prune": cost(flops=1e9),
            "discover": cost(flops=discover_flops),
            "evaluate": cost(),
        },
        speedup=speedup,
        flags=list(flags),
        provenance=Provenance(
            appbench_version="0.4.0",
            git_commit=None,
            created_at="2026-01-01T00:00:00+00:00",
            command="test",
            python="3.11",
            libraries={},
            plugins=[],
            task_version="1.0",
            model_source="test",
            hardware="test CPU, 2 logical cores",
        ),
    )


def ratio(value):
    return Speedup(
        baseline="none__pathpatch.json",
        wall_ratio=value,
        wall_percent=100 * (1 - 1 / value),
        prompt_passes_ratio=value,
        flops_ratio=value,
        discover_wall_ratio=value,
        discover_flops_ratio=value,
        prune_wall_seconds=1.0,
        prune_flops=1e9,
        saved_discover_wall_seconds=0.0,
        saved_discover_flops=0.0,
    )


# --------------------------------------------------------------- mean and spread
def test_mean_and_spread_of_three_seeds():
    stat = lb.summarise([0.5, 0.7, 0.9])
    assert stat.mean == pytest.approx(0.7)
    assert stat.sd == pytest.approx(0.2)  # sample s.d. (ddof 1): sqrt((0.04 + 0 + 0.04) / 2)
    assert stat.n == 3
    assert lb.format_stat(stat, 3) == "0.700 ± 0.200"


def test_fewer_than_three_seeds_show_no_spread_and_say_so():
    two = lb.summarise([0.5, 0.9])
    assert two.mean == pytest.approx(0.7) and two.sd is None
    assert lb.format_stat(two, 2) == "0.70"
    [row] = lb.group_runs([result(seed=4)])
    assert lb.seeds_cell(row) == "1 (4): n=1, no spread"
    # A cell some runs lack says how many it averages.
    assert lb.format_stat(lb.summarise([1.0, None, 2.0]), 1, 3) == "1.5 (n=2 of 3, no spread)"
    assert lb.format_stat(lb.summarise([None, None]), 1, 2) == "–"


def test_runs_are_grouped_by_their_fields_and_a_repeated_seed_is_refused():
    runs = [result(seed=s) for s in (2, 0, 1)]
    other = result(seed=0, pruner_params={"rule": "biggest"})
    rows = lb.group_runs([*runs, other])
    assert [len(r.runs) for r in rows] == [3, 1] or [len(r.runs) for r in rows] == [1, 3]
    three = next(r for r in rows if r.n == 3)
    assert three.seeds == [0, 1, 2]
    dense = result(pruner="none", seed=0)
    assert lb.group_runs([*runs, dense])[0].key.pruner == "none"  # the dense row leads
    with pytest.raises(lb.LeaderboardError, match="seed 1"):
        lb.group_runs([*runs, result(seed=1)])


# --------------------------------------------------------------- bootstrap
def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_prompts():
    def width(n):
        runs = [result(seed=s, n_eval=n) for s in range(3)]
        point = lb.summarise(r.faithfulness.normalised for r in runs).mean
        ci = lb.bootstrap_faithfulness(runs)
        assert ci is not None
        assert ci["normalised"].low < point < ci["normalised"].high
        percent = lb.summarise(r.faithfulness.percent for r in runs).mean
        assert ci["percent"].low < percent < ci["percent"].high
        return ci["normalised"].high - ci["normalised"].low

    small, large = width(20), width(500)
    assert large < small / 2  # about sqrt(25) = 5 times narrower


def test_bootstrap_resamples_the_three_metrics_paired_and_is_reproducible():
    model, empty, _ = prompts(40, 0.8, 1)
    # m(C) = m(M) on every prompt: a paired resample gives exactly 100 % every time; resampling
    # m(C) and m(M) independently would not.
    run = result(f=faith(model, empty, model))
    ci = lb.bootstrap_faithfulness([run])
    assert ci is not None
    assert ci["percent"].low == pytest.approx(100.0) and ci["percent"].high == pytest.approx(100.0)
    assert ci["normalised"].low == pytest.approx(1.0) and ci["normalised"].high == pytest.approx(
        1.0
    )
    runs = [result(seed=s) for s in range(3)]
    assert lb.bootstrap_faithfulness(runs) == lb.bootstrap_faithfulness(runs)


def test_results_without_per_prompt_values_get_no_interval():
    old = result()
    old.faithfulness.per_prompt_circuit = None
    assert lb.bootstrap_faithfulness([old]) is None
    [row] = lb.group_runs([old])
    assert lb._faith_cell(row, "normalised", 3).endswith("[n/a]")


# --------------------------------------------------------------- wording and flags
@pytest.mark.parametrize(
    ("values", "text"),
    [
        ([2.5], "2.50×"),
        ([0.6], "0.60× (slower)"),
        ([0.5, 0.6, 0.7], "0.60× ± 0.10 (slower)"),
        ([2.0, 3.0, 4.0], "3.00× ± 1.00"),
    ],
)
def test_a_speedup_below_one_says_slower(values, text):
    assert lb.format_ratio(lb.summarise(values)) == text


def test_speedup_cells_and_flags_are_shown_never_dropped():
    refused = Flag(code="speedup-refused", message="no speedup: the dense run differs in seed")
    runs = [
        result(seed=0, speedup=ratio(0.5)),
        result(seed=1, speedup=ratio(0.7)),
        result(seed=2, speedup=None, flags=[refused]),
    ]
    rows = lb.group_runs([*runs, result(pruner="none", seed=0)])
    dense, pruned = rows
    assert lb._speedup_cell(dense, lambda s: s.flops_ratio) == "dense baseline"
    assert (
        lb._speedup_cell(pruned, lambda s: s.flops_ratio) == "0.60× (n=2 of 3, no spread) (slower)"
    )
    assert lb._flags_cell(pruned) == "⚠ speedup-refused (1/3)"
    page = lb.task_page("ioi", rows, lb.paper_data(), {}, set(), set())
    assert "⚠ speedup-refused (1/3)" in page
    assert "seed 2: `speedup-refused`: no speedup: the dense run differs in seed" in page
    only_refused = lb.group_runs([result(speedup=None, flags=[refused])])[0]
    assert lb._speedup_cell(only_refused, lambda s: s.wall_ratio) == "refused ⚠"


def test_results_written_before_a_flag_rule_get_its_flag_from_their_own_numbers(tmp_path):
    # A result file from before edges-worse-than-empty existed: its edges lose to the empty
    # circuit, and the leaderboard flags it as a run made today would be.
    below_empty = Faithfulness(**faithfulness(4.0, 1.0, 0.5).to_dict(), ablation="test")
    old = result().model_copy(update={"edge_faithfulness": below_empty})
    assert old.flags == []
    folder = tmp_path / "results" / "ioi"
    folder.mkdir(parents=True)
    (folder / "cflap__pathpatch.json").write_text(old.model_dump_json())
    (folder / "sound.json").write_text(result(seed=1).model_dump_json())
    flagged, sound = lb.load_results(tmp_path / "results")
    assert [f.code for f in flagged.flags] == ["edges-worse-than-empty"]
    assert "1 edge," in flagged.flags[0].message and "-0.167" in flagged.flags[0].message
    assert sound.flags == []
    assert lb.with_current_flags(flagged) is flagged  # nothing twice
    page = lb.task_page("ioi", lb.group_runs([flagged]), lb.paper_data(), {}, set(), set())
    assert "seed 0: `edges-worse-than-empty`" in page


def test_reference_kinds_get_their_own_columns_and_mixed_references_are_not_averaged():
    truth = result(model="m", pruner="none", f1=1.0)
    derived = result(model="m", reference_kind="method-derived", reference_source="pp", f1=0.5)
    rows = lb.group_runs([truth, derived])
    headers = lb._model_headers(lb._reference_kinds(rows))
    assert "F1 vs ground-truth reference ↑" in headers
    assert "F1 vs method-derived reference ↑" in headers
    truth_row, derived_row = rows
    assert lb._overlap_cell(truth_row, "ground-truth", "f1") == "1.00"
    assert lb._overlap_cell(truth_row, "method-derived", "f1") == "–"
    assert lb._overlap_cell(derived_row, "method-derived", "f1") == "0.50"
    mixed = lb.group_runs(
        [result(seed=0), result(seed=1, reference_kind="method-derived", reference_source="pp")]
    )[0]
    assert mixed.reference == "mixed"
    assert lb._overlap_cell(mixed, "ground-truth", "f1") == "mixed references ⚠"


def test_arrows_come_from_higher_is_better():
    headers = lb._model_headers(["ground-truth"])
    assert "circuit size ↓" in headers
    assert "faithfulness 100·m(C)/m(M) % ↑ [95% CI]" in headers
    assert "speedup FLOPs ↑" in headers and "prune + discover GFLOP ↓" in headers


# --------------------------------------------------------------- ranks
def rank_fixture():
    """Model m, tasks a and b. A beats B on a, B beats A on b (by more on a); C only on a (it
    would win there); D on both but twice on b (other prompt counts)."""
    runs = []
    for task, keeps in (
        ("a", {"A": 0.9, "B": 0.7, "C": 0.99, "D": 0.5}),
        ("b", {"A": 0.6, "B": 0.65, "D": 0.5}),
    ):
        for name, keep in keeps.items():
            for seed in range(3):
                runs.append(
                    result(
                        task=task,
                        model="m",
                        pruner=name.lower(),
                        seed=seed,
                        keep=keep,
                        n_eval=400,
                        discover_flops={"A": 4e9, "B": 2e9, "C": 1e9, "D": 8e9}[name],
                    )
                )
    runs.append(result(task="b", model="m", pruner="d", n_search=80))
    return lb.group_runs(runs)


def test_mean_rank_over_tasks_of_the_complete_rows_only():
    ranked, left_out = lb.mean_ranks(rank_fixture())
    by_name = {r.pruner: r for r in ranked}
    assert set(by_name) == {"a", "b"}  # C missing task b, D twice on b: left out
    # Faithfulness: a: A 1, B 2 (C is not a competitor); b: B 1, A 2. Mean 1.5 each.
    assert by_name["a"].mean_ranks[0] == pytest.approx(1.5)
    assert by_name["b"].mean_ranks[0] == pytest.approx(1.5)
    # F1 is 1.0 everywhere: a tie shares the mean rank 1.5.
    assert by_name["a"].mean_ranks[1] == pytest.approx(1.5)
    # FLOPs (fewer is better): B cheaper on both tasks.
    assert by_name["b"].mean_ranks[2] == pytest.approx(1.0)
    assert by_name["a"].mean_ranks[2] == pytest.approx(2.0)
    assert by_name["a"].tasks == 2 and by_name["a"].min_seeds == 3
    assert any("c → pathpatch" in line and "not run on b" in line for line in left_out)
    assert any("d → pathpatch" in line and "several rows" in line for line in left_out)


def test_the_summary_states_compute_and_hardware_and_lists_rows_left_out():
    rows = rank_fixture()
    page = lb.summary_page(rows, lb.paper_data())
    assert page.startswith(lb.HEADER + "\n")
    n_runs = sum(r.n for r in rows)
    assert n_runs == 22
    # 4 stages of 1 s per run: load, prune, discover, evaluate.
    assert "Total compute of these results: 88.0 s of wall time" in page
    assert f"- test CPU, 2 logical cores (device `cpu`): {n_runs} runs" in page
    assert "Left out:" in page and "- c → pathpatch" in page
    ranks = page.split("## Mean rank across tasks")[1].split("## Task pages")[0]
    assert "Andersen" not in ranks and "Path Patching" not in ranks


# --------------------------------------------------------------- the paper
def test_the_papers_numbers_are_data_with_their_citation():
    paper = lb.paper_data()
    assert "Andersen et al." in paper.citation
    assert paper.label == "reported by the paper (Andersen et al. 2025)"
    assert len(paper.table2) == 4 * 4 * 5 and len(paper.gflops) == 20
    ioi_pp = next(
        r
        for r in paper.table2
        if (r["model"], r["method"], r["task"]) == ("gpt2-small", "path_patching", "ioi")
    )
    assert (ioi_pp["performance"], ioi_pp["size"], ioi_pp["tpr"]) == (96.95, 21, None)
    induction = next(
        g for g in paper.gflops if (g["model"], g["task"]) == ("gpt2-large", "induction")
    )
    assert induction["factor"] == 14.87 and induction["pp_gflops"] == pytest.approx(1.45e9)
    assert paper.model_for("gpt2") == "gpt2-small" and paper.model_for("zoo-x") is None


def test_paper_rows_sit_beside_ours_and_never_enter_the_ranks():
    paper = lb.paper_data()
    ours = lb.group_runs([result(model="gpt2", seed=s) for s in range(3)])
    page = lb.task_page("ioi", ours, paper, {}, set(), set())
    table = page.split("## gpt2")[1].split("\n\n")[2]
    # Inline, in our GPT-2 table, named and labelled: the four methods of Table 2.
    assert table.count("**reported by the paper (Andersen et al. 2025)**") == 4
    assert "GPT-2 small" in table and "96.95" in table
    # And every model's rows in the paper's own section, with the GFLOPs.
    section = page.split('<a id="reported-by-the-paper"></a>')[1]
    assert "Qwen2.5-7B" in section and "5.60×" in section
    ranked, _ = lb.mean_ranks(ours)
    assert [(r.pruner, r.discoverer) for r in ranked] == [("cflap", "pathpatch")]
    # A task the paper did not run says so.
    assert "The paper reports no numbers for this task." in lb.task_page(
        "other", ours, paper, {}, set(), set()
    )


# --------------------------------------------------------------- the whole build
def test_build_is_deterministic_and_writes_every_kind_of_file():
    runs = [result(seed=s, pruner=p) for s in range(3) for p in ("none", "cflap")]
    first, second = lb.build(runs), lb.build(list(reversed(runs)))
    assert first.texts == second.texts and first.plots == second.plots
    assert {"README.md", "tasks/ioi.md"} <= set(first.texts)
    assert "circuits/ioi/zoo-x/seed-0/cflap__pathpatch.eap-ig.json.gz" in first.texts
    assert "plots/ioi/zoo-x/cost.svg" in first.plots
    assert "plots/ioi/zoo-x/circuits/seed-2/none__pathpatch.svg" in first.plots
    for name, text in first.texts.items():
        if name.endswith(".md"):
            assert text.startswith(lb.HEADER + "\n"), name
    with pytest.raises(lb.LeaderboardError, match="no results"):
        lb.build([])


def test_f1_is_not_ranked_across_different_references():
    # On task a, A was measured against the ground truth and B against a method's circuit:
    # their F1s are not one scale, so no row gets an F1 rank; the other measures still rank.
    runs = [
        result(task="a", pruner="x", f1=1.0),
        result(
            task="a", pruner="y", f1=0.5, reference_kind="method-derived", reference_source="pp"
        ),
    ]
    ranked, _ = lb.mean_ranks(lb.group_runs(runs))
    assert [r.mean_ranks[1] for r in ranked] == [None, None]
    assert all(r.mean_ranks[0] is not None and r.mean_ranks[2] is not None for r in ranked)
    page = lb.summary_page(lb.group_runs(runs), lb.paper_data())
    assert "Reference kinds (F1): a ground-truth/method-derived." in page


def test_a_result_without_the_models_shape_gets_no_circuit_file_and_no_dead_link():
    old = result()
    old.graph_config = None
    built = lb.build([old])
    assert not any(name.startswith("circuits/") for name in built.texts)
    assert "[graph]" not in built.texts["tasks/ioi.md"]
    assert "[diagram]" in built.texts["tasks/ioi.md"]


def test_each_tasks_ground_truth_model_ranks_as_one_family_across_tasks():
    """zoo-gt-ioi on ioi and zoo-gt-docstring on docstring: one model per task, so only as one
    family can a row get a mean rank over both tasks. zoo-gt-ioi on another task stays apart."""
    runs = [
        result(task=task, model=f"zoo-gt-{task}", pruner=pruner, seed=seed, keep=keep)
        for task, keeps in (("ioi", {"a": 0.9, "b": 0.7}), ("docstring", {"a": 0.6, "b": 0.8}))
        for pruner, keep in keeps.items()
        for seed in range(3)
    ] + [result(task="docstring", model="zoo-gt-ioi", pruner="a", seed=s) for s in range(3)]
    rows = lb.group_runs(runs)
    ranked, _ = lb.mean_ranks(rows)
    family = {r.pruner: r for r in ranked if r.model == lb.GROUND_TRUTH_GROUP}
    assert set(family) == {"a", "b"} and {r.tasks for r in family.values()} == {2}
    assert family["a"].mean_ranks[0] == pytest.approx(1.5)  # 1st on ioi, 2nd on docstring
    assert [r.model for r in ranked if r.model != lb.GROUND_TRUTH_GROUP] == ["zoo-gt-ioi"]
    page = lb.summary_page(rows, lb.paper_data())
    assert "(each task's own ground-truth zoo model: zoo-gt-docstring, zoo-gt-ioi)" in page
