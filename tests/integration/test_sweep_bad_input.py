"""Bad input to `appbench sweep`: one line, `Error: ...`, exit code 2, no traceback, nothing
run and nothing written, whether it comes from the command line or the --config file.

Every case fails while the sweep is planned, before any worker starts: they take
milliseconds.
"""

import pytest
from click.testing import CliRunner

from appbench.cli import cli

GRID = ["sweep", "--pruners", "magnitude", "--discoverers", "actpatch"]


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "list.yaml").write_text("- pruners\n- discoverers\n")
    (tmp_path / "broken.yaml").write_text("pruners: [magnitude\n")
    (tmp_path / "latin1.yaml").write_bytes(b"pruners: \xff\xfe\n")
    (tmp_path / "typo.yaml").write_text("prunrs: [magnitude]\ndiscoverers: [actpatch]\n")
    (tmp_path / "unknown-plugin-params.yaml").write_text(
        "pruners: [magnitude]\ndiscoverers: [actpatch]\npruner_params: {magnitdue: {fraction: 0.3}}\n"
    )
    (tmp_path / "bad-plugin-params.yaml").write_text(
        "pruners: [magnitude]\ndiscoverers: [actpatch]\npruner_params: {magnitude: {fraction: 2}}\n"
    )
    (tmp_path / "params-not-mapping.yaml").write_text(
        "pruners: [magnitude]\ndiscoverers: [actpatch]\npruner_params: {magnitude: 0.3}\n"
    )
    (tmp_path / "bad-jobs.yaml").write_text(
        "pruners: [magnitude]\ndiscoverers: [actpatch]\njobs: 0\n"
    )
    (tmp_path / "empty.yaml").write_text("")
    return tmp_path


CASES = [
    ("no-pruners", ["sweep", "--discoverers", "actpatch"], "no pruners given"),
    ("no-discoverers", ["sweep", "--pruners", "magnitude"], "no discoverers given"),
    ("empty-list", ["sweep", "--pruners", ",", "--discoverers", "actpatch"], "no pruners given"),
    ("unknown-pruner", [*GRID[:2], "magnitude,cflp", *GRID[3:]], "Did you mean 'cflap'"),
    (
        "unknown-discoverer",
        ["sweep", "--pruners", "magnitude", "--discoverers", "actpach"],
        "Did you mean 'actpatch'",
    ),
    ("unknown-task", [*GRID, "--tasks", "ioi,iio"], "Unknown task 'iio'"),
    ("unknown-model", [*GRID, "--models", "default,no-such-model"], "Unknown model"),
    ("model-not-a-folder", [*GRID, "--models", "{root}/a-file"], "a file, not a model directory"),
    ("seed-negative", [*GRID, "--seeds", "-1"], "--seeds: seeds.0"),
    ("checkpoint-every-inf", [*GRID, "--checkpoint-every", "inf"], "not a number of seconds"),
    ("seed-word", [*GRID, "--seeds", "1,x"], "--seeds: seeds.1"),
    ("seed-range-backwards", [*GRID, "--seeds", "5-3"], "runs backwards"),
    ("seed-huge", [*GRID, "--seeds", "99999999999"], "less than or equal to 4294967295"),
    ("param-unknown-to-a-pruner", [*GRID, "-p", "batch_size", "4"], "bad parameters for magnitude"),
    ("param-bad-value", [*GRID, "-p", "fraction", "2"], "less than or equal to 1"),
    ("param-twice", [*GRID, "-d", "threshold", "0.1", "-d", "threshold", "0.2"], "given twice"),
    ("discoverer-param-inf", [*GRID, "-d", "threshold", "inf"], "finite number"),
    ("n-search-zero", [*GRID, "--n-search", "0"], "not in the range"),
    ("jobs-zero", [*GRID, "--jobs", "0"], "not in the range"),
    ("device-word", [*GRID, "--device", "gpu"], "is not a device"),
    ("device-absent", [*GRID, "--device", "cuda:7"], "is not available"),
    ("executor-unknown", [*GRID, "--executor", "slurm"], "is not one of"),
    ("address-without-ray", [*GRID, "--address", "ray://head:10001"], "for --executor ray only"),
    ("gpus-without-ray", [*GRID, "--gpus-per-run", "1"], "gpus_per_run: for --executor ray"),
    ("cpus-per-run-zero", [*GRID, "--executor", "ray", "--cpus-per-run", "0"], "not in the range"),
    ("out-empty", [*GRID, "--out", ""], "an empty folder name"),
    ("out-under-a-file", [*GRID, "--out", "{root}/a-file/results"], "cannot write results"),
    ("config-missing", [*GRID, "--config", "{root}/missing.yaml"], "No such file"),
    ("config-not-a-mapping", [*GRID, "--config", "{root}/list.yaml"], "a mapping of keys"),
    ("config-not-yaml", [*GRID, "--config", "{root}/broken.yaml"], "not a YAML file"),
    ("config-not-utf8", [*GRID, "--config", "{root}/latin1.yaml"], "not a YAML file"),
    ("config-unknown-key", ["sweep", "--config", "{root}/typo.yaml"], "Did you mean 'pruners'"),
    ("config-empty", ["sweep", "--config", "{root}/empty.yaml"], "no pruners given"),
    (
        "config-unknown-plugin-params",
        ["sweep", "--config", "{root}/unknown-plugin-params.yaml"],
        "Did you mean 'magnitude'",
    ),
    (
        "config-bad-plugin-params",
        ["sweep", "--config", "{root}/bad-plugin-params.yaml"],
        "bad parameters for magnitude",
    ),
    (
        "config-params-not-a-mapping",
        ["sweep", "--config", "{root}/params-not-mapping.yaml"],
        "pruner_params.magnitude",
    ),
    ("config-bad-jobs", ["sweep", "--config", "{root}/bad-jobs.yaml"], "bad-jobs.yaml: jobs"),
]


@pytest.mark.parametrize(("args", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_sweep_input_is_one_line(files, args, text):
    filled = [a.replace("{root}", str(files)) for a in args]
    out = [] if "--out" in filled else ["--out", str(files / "out")]
    outcome = invoke(*filled, *out)
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 2, outcome.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], outcome.output
    assert "Traceback" not in outcome.output
    assert not (files / "out").exists()


def test_ray_missing_is_one_line(files, monkeypatch):
    """Without Ray installed, --executor ray says how to get it, before any work."""
    import builtins
    import sys

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    outcome = invoke(*GRID, "--executor", "ray", "--out", str(files / "out"))
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 2 and len(lines) == 1, outcome.output
    assert "pip install 'appbench[ray]'" in lines[0]
    assert not (files / "out").exists()
