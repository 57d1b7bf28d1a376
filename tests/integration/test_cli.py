"""The command line on the zoo models: output, result files and bad input."""

import json

import pytest
from click.testing import CliRunner

from appbench.cli import cli
from appbench.results import load_result


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


def test_list_json_shows_the_builtins():
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"none", "magnitude"} <= {row["name"] for row in data["pruners"]}
    assert "actpatch" in {row["name"] for row in data["discoverers"]}
    assert "ioi" in {row["name"] for row in data["tasks"]}
    assert {"zoo-ioi", "zoo-multitask", "smollm2-135m"} <= {row["name"] for row in data["models"]}
    magnitude = next(row for row in data["pruners"] if row["name"] == "magnitude")
    assert magnitude["params"]["fraction"]["default"] == 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense and a pruned actpatch run on the multitask zoo model, in one results folder."""
    out = tmp_path_factory.mktemp("results")
    common = ["--model", "zoo-multitask", "--out", str(out), "--n-search", "40", "--n-eval", "60"]
    common.append("--quiet")
    dense = invoke("run", "--pruner", "none", "--discoverer", "actpatch", *common)
    pruned = invoke(
        "run", "--pruner", "magnitude", "--discoverer", "actpatch", "-p", "fraction", "0.5", *common
    )
    return out, dense, pruned


def test_run_prints_a_table_and_writes_a_result(runs):
    out, dense, _ = runs
    assert dense.exit_code == 0, dense.output
    assert "faithfulness" in dense.output and "reduction" in dense.output
    result = load_result(out / "ioi" / "zoo-multitask" / "none__actpatch.json")
    assert result.search_space_size == 32 and result.reduction == 0.0
    # The default model ships a reference circuit (dense pathpatch) for IOI.
    assert result.reference is not None and result.overlap is not None
    assert "ioi/reference/zoo-multitask.json#appbench-pathpatch" in result.reference.source
    circuit, reference = set(result.circuit["heads"]), set(result.reference.heads)
    assert result.overlap.recall == len(circuit & reference) / len(reference)
    f = result.faithfulness
    assert f.m_model > 0 and f.m_model > f.m_empty
    assert result.cost["discover"].prompt_passes > 0 and result.cost["discover"].flops > 0
    assert result.provenance.plugins and result.provenance.libraries["torch"].startswith("2.13")


def test_pruned_run_reports_reduction_and_speedup(runs):
    out, _, pruned = runs
    assert pruned.exit_code == 0, pruned.output
    result = load_result(out / "ioi" / "zoo-multitask" / "magnitude__actpatch.json")
    assert result.search_space_size == 16 and result.reduction == pytest.approx(0.5)
    assert set(result.circuit["heads"]) <= set(result.search_space["heads"])
    assert result.speedup is not None
    assert result.speedup.prompt_passes_ratio > 1.0  # fewer heads were patched
    assert "speedup vs none" in pruned.output


def test_json_output_is_the_result(tmp_path):
    result = invoke(
        "run",
        "--pruner",
        "magnitude",
        "--discoverer",
        "actpatch",
        "--json",
        "--quiet",
        "--out",
        str(tmp_path),
        "--n-search",
        "20",
        "--n-eval",
        "20",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["pruner_params"] == {"fraction": 0.5, "norm": "ov"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--pruner", "magnitud", "--discoverer", "actpatch"],
            "Unknown pruner 'magnitud'. Did you mean 'magnitude'?",
        ),
        (
            ["--pruner", "none", "--discoverer", "actpach"],
            "Unknown discoverer 'actpach'. Did you mean 'actpatch'?",
        ),
        (
            ["--pruner", "none", "--discoverer", "actpatch", "--task", "iio"],
            "Unknown task 'iio'. Did you mean 'ioi'?",
        ),
        (
            ["--pruner", "magnitude", "--discoverer", "actpatch", "-p", "fraction", "two"],
            "bad parameters for magnitude",
        ),
        (
            ["--pruner", "magnitude", "--discoverer", "actpatch", "-p", "frac", "0.2"],
            "frac: Extra inputs",
        ),
        (
            ["--pruner", "none", "--discoverer", "actpatch", "--model", "no-such-model"],
            "Unknown model 'no-such-model'",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = invoke("run", *args, "--out", str(tmp_path), "--quiet")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "nonsense"], "'nonsense' is not a device"),
        (["--device", "CPU"], "'CPU' is not a device"),
        (["--device", "meta"], "'meta' is not a device"),
        (["--seed", "99999999999999999999"], "is not in the range 0<=x<=4294967295"),
        (["--seed", "-1"], "-1 is not in the range"),
    ],
)
def test_devices_and_seeds_that_cannot_mean_anything_are_usage_errors(tmp_path, args, message):
    result = invoke("run", "--pruner", "none", "--discoverer", "actpatch", *args, "--quiet")
    assert result.exit_code == 2
    assert message in result.output.strip().splitlines()[-1], result.output
    assert "Traceback" not in result.output


def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(tmp_path):
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    result = invoke(
        "run",
        "--pruner",
        "none",
        "--discoverer",
        "actpatch",
        "--device",
        "cuda:7",
        "--quiet",
        "--out",
        str(tmp_path),
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "device 'cuda:7' is not available" in lines[0]
    assert not list(tmp_path.rglob("*.json"))


def test_corrupt_baseline_does_not_lose_the_new_result(tmp_path):
    folder = tmp_path / "ioi" / "zoo-multitask"
    folder.mkdir(parents=True)
    (folder / "none__actpatch.json").write_text("{broken")
    result = invoke(
        "run",
        "--pruner",
        "magnitude",
        "--discoverer",
        "actpatch",
        "--model",
        "zoo-multitask",
        "--out",
        str(tmp_path),
        "--n-search",
        "20",
        "--n-eval",
        "20",
    )
    assert result.exit_code == 0, result.output
    assert "no speedup" in result.output
    assert load_result(folder / "magnitude__actpatch.json").speedup is None
    assert (folder / "none__actpatch.json").read_text() == "{broken"


# ------------------------------------------------------------------- reference build
def test_reference_build_runs_the_dense_discoverer_and_records_provenance(tmp_path):
    result = invoke(
        "reference",
        "build",
        "--task",
        "ioi",
        "--model",
        "zoo-multitask",
        "--n-search",
        "30",
        "--out",
        str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "zoo-multitask.json").read_text())
    circuit = data["circuits"]["appbench-pathpatch"]
    assert data["default"] == "appbench-pathpatch" and circuit["version"] == "1.0"
    assert circuit["parameters"]["n_search"] == 30 and circuit["heads"]
    assert "(appbench 0.4.0, commit " in circuit["source"]  # the command line is sys.argv
    assert "faithfulness on the evaluation split" in circuit["notes"]


def test_reference_build_from_a_dense_result_reuses_its_circuit(runs, tmp_path):
    out, _, _ = runs
    dense = out / "ioi" / "zoo-multitask" / "none__actpatch.json"
    run = load_result(dense)
    args = ["reference", "build", "--from-result", str(dense), "--out", str(tmp_path)]
    # The zoo model's dense actpatch circuit on 40 prompts recovers 40% of the gap: too little
    # for a reference, unless asked for.
    assert run.faithfulness.normalised < 0.5
    refused = invoke(*args)
    assert refused.exit_code == 2
    assert "its normalised faithfulness is 0.4" in refused.output
    assert not (tmp_path / "zoo-multitask.json").exists()
    result = invoke(*args, "--allow-degenerate")
    assert result.exit_code == 0, result.output
    circuit = json.loads((tmp_path / "zoo-multitask.json").read_text())["circuits"][
        "appbench-actpatch"
    ]
    assert circuit["heads"] == run.circuit["heads"]
    assert circuit["parameters"]["n_search"] == 40
    assert circuit["source"].startswith(run.provenance.command)


@pytest.mark.parametrize(
    ("result_file", "extra", "message"),
    [
        ("magnitude__actpatch.json", [], "was pruned by magnitude; a reference needs a dense run"),
        ("none__actpatch.json", ["--task", "docstring"], "is a run of --task ioi, not docstring"),
    ],
)
def test_reference_build_rejects_unusable_results_in_one_line(
    runs, tmp_path, result_file, extra, message
):
    out, _, _ = runs
    path = out / "ioi" / "zoo-multitask" / result_file
    result = invoke(
        "reference", "build", "--from-result", str(path), "--out", str(tmp_path), *extra
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "zoo-multitask.json").exists()


# ------------------------------------------------------------------- the default run
def test_the_default_app_run_finds_the_ground_truth_and_pruning_pays_for_itself(tmp_path):
    """`appbench run --pruner cflap --discoverer pathpatch` as the quick start runs it: on IOI's
    ground-truth model, APP finds the designated chain and spends fewer FLOPs than the dense
    search it is compared with (wall time is a benchmark's business, not a test's)."""
    common = ["--discoverer", "pathpatch", "--out", str(tmp_path), "--json", "--quiet"]
    dense = invoke("run", "--pruner", "none", *common)
    app = invoke("run", "--pruner", "cflap", *common)
    assert dense.exit_code == 0 and app.exit_code == 0, dense.output + app.output
    dense_result, app_result = json.loads(dense.stdout), json.loads(app.stdout)
    assert app_result["model"] == dense_result["model"] == "zoo-gt-ioi"
    truth = {"a0.h3", "a1.h5", "a2.h1", "a3.h6"}
    assert set(dense_result["circuit"]["heads"]) == set(app_result["circuit"]["heads"]) == truth
    assert app_result["reference"]["kind"] == "ground-truth"
    assert app_result["overlap"]["f1"] == 1.0 and not app_result["flags"]
    assert app_result["search_space_size"] < 32
    # FLOPs of prune + discover against the dense search: the sweep costs less than it saves.
    assert app_result["speedup"]["flops_ratio"] > 1.0


@pytest.mark.parametrize("seed", range(1, 11))
def test_the_default_app_run_finds_ground_truth_heads_for_every_seed(seed, tmp_path):
    # Seeds 4 and 8: the sparsity sweep keeps 3 heads and drops a3.h6 (the chain's weakest
    # link, 7% of the gap), and path patching finds the other three: recall 0.75, never an
    # empty circuit, never a head outside the ground truth.
    args = ["run", "--pruner", "cflap", "--discoverer", "pathpatch", "--seed", str(seed)]
    result = invoke(*args, "--n-eval", "20", "--out", str(tmp_path), "--json", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "zoo-gt-ioi" and data["circuit_size"] >= 3
    assert data["overlap"]["precision"] == 1.0 and data["overlap"]["recall"] >= 0.75
    assert "empty-circuit" not in {flag["code"] for flag in data["flags"]}


def test_python_dash_m_appbench_is_the_command_and_a_closed_pipe_is_quiet():
    import subprocess
    import sys

    version = subprocess.run(
        [sys.executable, "-m", "appbench", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and "appbench" in version.stdout
    # `appbench list models | head -1`: the reader leaves after one line.
    with subprocess.Popen(
        [sys.executable, "-m", "appbench", "list", "models"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as lister:
        assert lister.stdout.readline().startswith("models:")
        lister.stdout.close()
        stderr = lister.stderr.read()
        assert lister.wait(timeout=120) in (0, 141)
    assert "Error" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize(("amount", "said"), [(0.5, "0.50 s saved"), (-0.31, "0.31 s lost")])
def test_negative_savings_read_as_lost(amount, said):
    from appbench.cli import _saved

    assert _saved(amount, "s") == said
