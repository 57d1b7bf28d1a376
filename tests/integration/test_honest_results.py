"""Results that look fine but cannot be right are flagged in the file, the table and --json;
speedups against unlike baselines are refused; stdout stays one JSON document."""

import json
import sys
import types

import pytest
from click.testing import CliRunner

from appbench import hookimpl
from appbench.cli import _ratio, cli
from appbench.results import load_result

# The multitask zoo model: its dense circuits (about 12 heads) are richer than a ground-truth
# model's chain, which is what these checks need.
MULTITASK = ["--model", "zoo-multitask"]
SMALL = ["--n-search", "30", "--n-eval", "30", "--quiet"]


def run_app(out, *extra):
    """APP (cflap then pathpatch, sweep on the search prompts) on the small IOI setup."""
    return invoke(
        "run",
        "--pruner",
        "cflap",
        "--discoverer",
        "pathpatch",
        "-p",
        "selection",
        "same",
        *extra,
        "--out",
        str(out),
        *MULTITASK,
        *SMALL,
    )


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


def flag_codes(result):
    return [flag.code for flag in result.flags]


def test_an_empty_circuit_is_flagged_in_the_file_the_table_and_json(tmp_path):
    # No path carries 5 times the clean-corrupted gap: the circuit is empty, the gap is real.
    args = ["run", "--pruner", "none", "--discoverer", "pathpatch", "-d", "effect_threshold", "5"]
    args += MULTITASK
    table = invoke(*args, "--out", str(tmp_path), "--n-search", "30", "--n-eval", "10")
    assert table.exit_code == 0, table.output
    assert "FLAG empty-circuit" in table.stdout
    assert "FLAG few-evaluation-prompts" in table.stdout
    result = load_result(tmp_path / "ioi" / "zoo-multitask" / "none__pathpatch.json")
    assert result.circuit_size == 0
    assert {"empty-circuit", "few-evaluation-prompts"} <= set(flag_codes(result))
    as_json = invoke(*args, "--out", str(tmp_path), "--n-search", "30", "--n-eval", "10", "--json")
    data = json.loads(as_json.stdout)
    assert {"empty-circuit", "few-evaluation-prompts"} <= {f["code"] for f in data["flags"]}
    # Warnings reach stderr too (as progress does), never stdout.
    assert "warning: the circuit is empty" in as_json.stderr


def test_the_reference_is_evaluated_beside_the_circuit(tmp_path):
    from appbench.interfaces import RunContext
    from appbench.runner import RunConfig, evaluate_circuit, run

    result, _ = run(
        RunConfig(
            pruner="none",
            discoverer="actpatch",
            model="zoo-multitask",
            n_search=30,
            n_eval=40,
            out=tmp_path,
        )
    )
    assert result.reference is not None and result.reference.faithfulness is not None
    assert result.reference.kind == "method-derived"
    # The same number evaluate_circuit gives for the reference heads alone.
    from appbench.circuit import Head
    from appbench.engine.patching import PatchingEngine
    from appbench.models import load_model
    from appbench.plugins import get_registries

    model = load_model("zoo-multitask")
    task = get_registries().tasks.get("ioi")
    search, evaluation = task.splits(model.tokenizer, 30, 40, task.spec.seed)
    ctx = RunContext(
        model, "zoo-multitask", task, search, evaluation, "cpu", 0, PatchingEngine(model, task)
    )
    alone = evaluate_circuit(ctx, frozenset(Head.parse(h) for h in result.reference.heads))
    assert result.reference.faithfulness == pytest.approx(alone.normalised, abs=1e-9)
    unfaithful = result.reference.faithfulness < 0.5
    assert ("unfaithful-reference" in flag_codes(result)) == unfaithful


def test_a_sweep_without_a_cliff_flags_its_fallback_sparsity(tmp_path):
    # Three sweep points that all keep one head of 32: a flat curve has no cliff, so the
    # fallback sparsity is used. (Fewer points than the cliff window needs are refused.)
    result = run_app(
        tmp_path,
        "-p",
        "sweep_start",
        "0.99",
        "-p",
        "sweep_stop",
        "0.992",
        "-p",
        "sweep_step",
        "0.001",
    )
    assert result.exit_code == 0, result.output
    saved = load_result(tmp_path / "ioi" / "zoo-multitask" / "cflap__pathpatch.json")
    assert "fallback-sparsity" in flag_codes(saved)
    assert saved.search_space["details"]["fallback_used"]
    assert "FLAG fallback-sparsity" in result.stdout


def test_the_sweep_is_measured_as_a_part_of_pruning(tmp_path):
    result = run_app(tmp_path)
    assert result.exit_code == 0, result.output
    saved = load_result(tmp_path / "ioi" / "zoo-multitask" / "cflap__pathpatch.json")
    prune, sweep = saved.cost["prune"], saved.cost["prune.sweep"]
    assert 0 < sweep.flops < prune.flops and 0 < sweep.wall_seconds <= prune.wall_seconds
    assert 0 < sweep.prompt_passes < prune.prompt_passes
    assert "prune.sweep cost (part of prune)" in result.stdout


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedup")
    result = invoke(
        "run",
        "--pruner",
        "none",
        "--discoverer",
        "pathpatch",
        "--out",
        str(out),
        *MULTITASK,
        *SMALL,
    )
    assert result.exit_code == 0, result.output
    return out


def test_speedup_against_the_same_search_reports_what_pruning_paid_and_saved(dense_run):
    result = run_app(dense_run)
    assert result.exit_code == 0, result.output
    saved = load_result(dense_run / "ioi" / "zoo-multitask" / "cflap__pathpatch.json")
    dense = load_result(dense_run / "ioi" / "zoo-multitask" / "none__pathpatch.json")
    s = saved.speedup
    assert s is not None and "speedup-refused" not in flag_codes(saved)
    assert s.prune_flops == saved.cost["prune"].flops
    assert s.saved_discover_flops == pytest.approx(
        dense.cost["discover"].flops - saved.cost["discover"].flops
    )
    total = dense.cost["prune"].flops + dense.cost["discover"].flops
    assert s.flops_ratio == pytest.approx(total / (s.prune_flops + saved.cost["discover"].flops))
    # The words match the ratio: never a negative percentage.
    word = "faster" if s.wall_ratio >= 1 else "slower"
    assert f"x {word}" in result.stdout or f"x {word}," in result.stdout
    assert "(-" not in result.stdout


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--seed", "7"], "seed (12345 there, 7 here)"),
        (["--n-search", "31"], "n_search (30 there, 31 here)"),
        (["-d", "effect_threshold", "0.1"], "effect_threshold 0.01 there, 0.1 here"),
    ],
)
def test_speedup_against_an_unlike_dense_run_is_refused_naming_the_difference(
    dense_run, extra, named
):
    args = ["run", "--pruner", "cflap", "--discoverer", "pathpatch", "-p", "selection", "same"]
    # Each case replaces the APP result of the one before: other settings, so --overwrite.
    args += ["--out", str(dense_run), "--n-eval", "30", "--quiet", "--overwrite", *MULTITASK]
    if "--n-search" not in extra:
        args += ["--n-search", "30"]
    result = invoke(*args, *extra)
    assert result.exit_code == 0, result.output
    saved = load_result(dense_run / "ioi" / "zoo-multitask" / "cflap__pathpatch.json")
    assert saved.speedup is None
    [flag] = [f for f in saved.flags if f.code == "speedup-refused"]
    assert named in flag.message
    assert "speedup vs none" not in result.stdout


def test_a_dense_run_from_other_code_is_refused(dense_run, tmp_path):
    folder = tmp_path / "ioi" / "zoo-multitask"
    folder.mkdir(parents=True)
    data = json.loads((dense_run / "ioi" / "zoo-multitask" / "none__pathpatch.json").read_text())
    data["provenance"]["git_commit"] = "0" * 40
    (folder / "none__pathpatch.json").write_text(json.dumps(data))
    result = run_app(tmp_path)
    saved = load_result(folder / "cflap__pathpatch.json")
    assert saved.speedup is None
    assert "git commit (0000000000000000000000000000000000000000 there" in saved.flags[-1].message
    assert result.exit_code == 0


def test_edges_worse_than_the_empty_circuit_are_flagged(tmp_path, monkeypatch):
    # The rule itself is tested on hand-made numbers (tests/unit/test_flags.py); here an edge
    # circuit whose edge faithfulness comes out below the empty circuit's reaches the file and
    # the table (as EAP's 108 edges on zoo-gt-greater_than-8x12 did: -0.525, heads alone 1.00).
    from appbench import runner
    from appbench.metrics import faithfulness
    from appbench.results import Faithfulness

    measured = runner.evaluate_edge_circuit

    def below_empty(ctx, circuit, node):
        real = measured(ctx, circuit, node)
        worse = faithfulness(real.m_model, real.m_empty, real.m_empty - 0.5 * abs(real.m_model))
        return Faithfulness(**worse.to_dict(), ablation=real.ablation)

    monkeypatch.setattr(runner, "evaluate_edge_circuit", below_empty)
    args = ["run", "--pruner", "none", "--discoverer", "eap", *MULTITASK, *SMALL]
    table = invoke(*args[:-1], "--out", str(tmp_path))
    assert table.exit_code == 0, table.output
    assert "FLAG edges-worse-than-empty" in table.stdout
    saved = load_result(tmp_path / "ioi" / "zoo-multitask" / "none__eap.json")
    assert saved.edge_faithfulness is not None and saved.edge_faithfulness.normalised < 0
    [flag] = [flag for flag in saved.flags if flag.code == "edges-worse-than-empty"]
    assert f"{len(saved.circuit['edges'])} edges" in flag.message


def test_the_commit_recorded_is_the_one_the_run_started_on(tmp_path, monkeypatch):
    # A run of hours outlives a checkout of its tree: the commit is the one read before the
    # model loads, not one read when the result is written.
    from appbench import runner
    from appbench.models import load_model

    loaded = []
    monkeypatch.setattr(runner, "_git_commit", lambda: ("b" if loaded else "a") * 40)

    def load(name, device):
        loaded.append(name)
        return load_model(name, device)

    config = runner.RunConfig(
        pruner="none", discoverer="actpatch", model="zoo-multitask", n_search=8, n_eval=8
    )
    result, _ = runner.run(config.model_copy(update={"out": tmp_path}), load=load)
    assert loaded == ["zoo-multitask"]
    assert result.provenance.git_commit == "a" * 40


@pytest.mark.parametrize(
    ("ratio", "words"),
    [
        (2.5, "2.50x faster"),
        (1.0, "1.00x faster"),
        (1 / 3.4, "3.40x slower"),
        (float("nan"), "not comparable"),
    ],
)
def test_ratios_in_words(ratio, words):
    assert _ratio(ratio) == words


def test_json_stays_one_document_when_a_loader_prints(fresh_plugins, tmp_path):
    from appbench.models import load_model

    module = types.ModuleType("chatty_plugin")

    @hookimpl
    def appbench_register_models(register):
        def loader(device):
            print("loading chatty weights...")  # as TransformerLens's model.to() does
            sys.stdout.write("more chatter\n")
            return load_model("zoo-multitask", device)

        register("chatty", loader, "zoo-multitask behind a loader that prints")

    module.appbench_register_models = appbench_register_models
    fresh_plugins.register_plugin(module, "chatty")
    result = invoke(
        "run",
        "--pruner",
        "none",
        "--discoverer",
        "actpatch",
        "--model",
        "chatty",
        "--json",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "chatty"
    assert "loading chatty weights..." in result.stderr


# ------------------------------------------------------------------- reference build
def test_reference_build_refuses_an_empty_reference_unless_asked(tmp_path):
    args = ["reference", "build", "--task", "ioi", "--model", "zoo-multitask", "--n-search", "30"]
    args += ["-d", "effect_threshold", "5", "--out", str(tmp_path)]
    refused = invoke(*args)
    assert refused.exit_code == 2
    lines = refused.stderr.strip().splitlines()
    assert "refusing to write a degenerate reference circuit: the circuit is empty" in lines[-1]
    assert not (tmp_path / "zoo-multitask.json").exists()
    allowed = invoke(*args, "--allow-degenerate")
    assert allowed.exit_code == 0, allowed.output
    written = json.loads((tmp_path / "zoo-multitask.json").read_text())["circuits"]
    assert written["appbench-pathpatch"]["heads"] == []
    assert (
        "written with --allow-degenerate: the circuit is empty"
        in (written["appbench-pathpatch"]["notes"])
    )


# --------------------------------------------------------------------- the default APP run
def check_app_keeps_the_dense_circuit(seed, out, *size):
    common = ["--discoverer", "pathpatch", *MULTITASK, "--seed", str(seed)]
    common += [*size, "--n-eval", "20"]
    common += ["--out", str(out), "--json", "--quiet"]
    dense = json.loads(invoke("run", "--pruner", "none", *common).stdout)
    app = json.loads(invoke("run", "--pruner", "cflap", *common).stdout)
    assert app["circuit_size"] > 0
    assert "empty-circuit" not in {flag["code"] for flag in app["flags"]}
    assert not dense["circuit"]["details"]["early_exit"]
    # Scores do not depend on the search space and each sender is selected on its own score,
    # so APP keeps exactly the dense edges it can reach from the logits through heads the
    # pruner kept (a dense head reached only through a pruned receiver is never scored).
    space = set(app["search_space"]["heads"])
    reachable, edges = set(), set()
    frontier = {"logits"}
    while frontier:
        receiver = frontier.pop()
        for edge in dense["circuit"]["edges"]:
            sender, _, target = edge.partition("->")
            if target.split("<")[0] == receiver and sender in space:
                edges.add(edge)
                if sender not in reachable:
                    reachable.add(sender)
                    frontier.add(sender)
    assert set(app["circuit"]["heads"]) == reachable
    assert set(app["circuit"]["edges"]) == edges
    assert app["speedup"] is not None  # the same search without pruning, so comparable


@pytest.mark.parametrize("seed", range(1, 11))
def test_app_keeps_the_dense_circuit_inside_its_search_space_for_every_seed(seed, tmp_path):
    # 40 search prompts keep the ten dense searches short; the slow test below uses 100.
    check_app_keeps_the_dense_circuit(seed, tmp_path, "--n-search", "40")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 11))
def test_the_default_app_run_keeps_the_dense_circuit_for_every_seed(seed, tmp_path):
    check_app_keeps_the_dense_circuit(seed, tmp_path)


@pytest.mark.parametrize(
    ("pruner", "discoverer", "params"),
    [
        ("none", "eap-ig", []),
        ("eap", "pathpatch", []),
        # On 30 prompts the chain's weakest head (7% of the metric's gap) moves the KL
        # divergence by less than tau: ACDC keeps it by the task metric.
        ("eap", "acdc", ["-d", "distance", "metric"]),
    ],
)
def test_edge_methods_on_the_default_model_report_edges_and_aurocs(
    tmp_path, pruner, discoverer, params
):
    """The ground-truth IOI model's chain, found by the edge-level methods and pipelines, with
    edge overlap and score-sweep AUROCs against the ground truth's measured edges."""
    invoke(
        "run",
        "--pruner",
        pruner,
        "--discoverer",
        discoverer,
        *params,
        "--out",
        str(tmp_path),
        *SMALL,
    )
    result = load_result(tmp_path / "ioi" / "zoo-gt-ioi" / f"{pruner}__{discoverer}.json")
    assert result.reference is not None and result.reference.kind == "ground-truth"
    assert result.overlap is not None and result.overlap.f1 == 1.0
    # The ground truth's edges are those between heads carrying at least 1% of the gap alone
    # on the evaluation split: borderline ones may fall either side on 30 search prompts,
    # ACDC's greedy removal drops redundant ones (its edge recall here is 0.64), and in the
    # full graph it keeps head edges whose effect the ground truth sees through the MLPs
    # (precision 0.82; EAP-IG 0.88, path patching 1.00).
    assert result.overlap.edge_precision is not None and result.overlap.edge_precision > 0.75
    # Patching every edge outside the circuit too keeps most of the task. In the full graph
    # MLPs and the input outside it are ablated as well, and the many MLP edges under the
    # threshold each carry a little: 0.80 (EAP-IG) and 0.88 (ACDC) on these 30 prompts.
    assert result.edge_faithfulness is not None and result.edge_faithfulness.normalised > 0.75
    assert result.circuit["edges"] and result.circuit["heads"] == [
        "a0.h3",
        "a1.h5",
        "a2.h1",
        "a3.h6",
    ]
    if discoverer == "eap-ig":
        assert result.overlap.edge_auroc is not None and result.overlap.edge_auroc > 0.95
        assert result.cost["discover"].backward_prompt_passes == 5 * 30  # 5 steps x 30 prompts
    if pruner == "eap":
        assert result.cost["prune"].backward_prompt_passes == 30
