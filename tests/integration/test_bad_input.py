"""Every bad input a new user might type: one line, `Error: ...`, exit code 2 (bad input) or 1
(a failure at run time), never a traceback, and nothing already written lost.

Each case names the command, what it must print and its exit code. Cases that fail before
the model loads take milliseconds; the few that need the model (a pruner size that keeps no
head) use the small default model.
"""

import json
import shutil

import pytest
from click.testing import CliRunner

from appbench import Discoverer, Params, hookimpl
from appbench.cli import cli

SMALL = ["--n-search", "20", "--n-eval", "20", "--quiet"]
RUN = ["run", "--pruner", "none", "--discoverer", "actpatch", *SMALL]


def invoke(*args, env=None):
    return CliRunner().invoke(cli, list(args), obj={}, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Broken and valid input files, and one finished run whose result must survive."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "a-file").write_text("x")
    (root / "latin1.json").write_bytes(b"\xff\xfe\x00 not utf-8")
    (root / "not-json.json").write_text("{nope")
    (root / "empty.json").write_text("")
    (root / "list.json").write_text("[1, 2]")
    (root / "schema99.json").write_text(json.dumps({"schema_version": 99}))
    (root / "empty-model").mkdir()
    bad_config = root / "bad-config-model"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    graph = {"cfg": {"n_layers": 2, "n_heads": 2}, "nodes": {}, "edges": {"a7.h0->logits": {}}}
    (root / "graph-outside.json").write_text(json.dumps(graph))
    graph = {"cfg": {"n_layers": 2, "n_heads": 2}, "nodes": {}, "edges": {"x": 1}}
    (root / "graph-bad-edge.json").write_text(json.dumps(graph))
    done = root / "done"
    ran = invoke(
        "run", "--pruner", "magnitude", "--discoverer", "actpatch", "--out", str(done), *SMALL
    )
    assert ran.exit_code == 0, ran.output
    result = done / "ioi" / "zoo-gt-ioi" / "magnitude__actpatch.json"
    shapeless = json.loads(result.read_text())
    del shapeless["graph_config"]
    (root / "shapeless.json").write_text(json.dumps(shapeless))
    return root, result


# (case id, command line with {root} and {result} filled in, exit code, text of the line)
CASES = [
    # -- run: names, options and values ----------------------------------------------
    (
        "unknown-pruner",
        ["run", "--pruner", "flapp", "--discoverer", "actpatch"],
        2,
        "Did you mean 'flap'",
    ),
    (
        "unknown-discoverer",
        ["run", "--pruner", "none", "--discoverer", "acdcc"],
        2,
        "Unknown discoverer",
    ),
    ("unknown-task", [*RUN, "--task", "iio"], 2, "Did you mean 'ioi'"),
    ("unknown-model", [*RUN, "--model", "no-such-model"], 2, "Unknown model"),
    ("missing-pruner", ["run", "--discoverer", "actpatch"], 2, "Missing option '--pruner'"),
    ("unknown-option", [*RUN, "--frobnicate"], 2, "No such option"),
    ("device-word", [*RUN, "--device", "nonsense"], 2, "is not a device"),
    ("device-upper", [*RUN, "--device", "CPU"], 2, "is not a device"),
    ("device-meta", [*RUN, "--device", "meta"], 2, "is not a device"),
    ("device-absent", [*RUN, "--device", "cuda:7"], 2, "is not available"),
    ("seed-negative", [*RUN, "--seed", "-1"], 2, "not in the range"),
    ("seed-huge", [*RUN, "--seed", "99999999999999999999"], 2, "not in the range"),
    ("seed-float", [*RUN, "--seed", "1.5"], 2, "not a valid integer"),
    ("n-search-zero", [*RUN, "--n-search", "0"], 2, "not in the range"),
    ("n-search-negative", [*RUN, "--n-search", "-5"], 2, "not in the range"),
    ("n-search-word", [*RUN, "--n-search", "many"], 2, "not a valid integer"),
    ("n-eval-zero", [*RUN, "--n-eval", "0"], 2, "not in the range"),
    ("out-empty", [*RUN, "--out", ""], 2, "an empty folder name"),
    ("out-under-a-file", [*RUN, "--out", "{root}/a-file/results"], 2, "cannot write results"),
    ("param-without-value", [*RUN, "-d", "threshold"], 2, "requires 2 arguments"),
    ("param-unknown", [*RUN, "-d", "thresold", "0.1"], 2, "Extra inputs"),
    ("debug-after-subcommand", [*RUN, "--device", "nonsense", "--debug"], 2, "is not a device"),
    # -- plugin parameters: values that cannot mean anything -------------------------
    ("threshold-inf", [*RUN, "-d", "threshold", "inf"], 2, "finite number"),
    ("threshold-1e400", [*RUN, "-d", "threshold", "1e400"], 2, "finite number"),
    ("threshold-nan", [*RUN, "-d", "threshold", "nan"], 2, "finite number"),
    ("threshold-word", [*RUN, "-d", "threshold", "high"], 2, "valid number"),
    (
        "fraction-zero",
        ["run", "--pruner", "magnitude", "--discoverer", "actpatch", "-p", "fraction", "0"],
        2,
        "greater than 0",
    ),
    (
        "fraction-above-one",
        ["run", "--pruner", "magnitude", "--discoverer", "actpatch", "-p", "fraction", "1.5"],
        2,
        "less than or equal to 1",
    ),
    (
        "fraction-keeps-nothing",
        [
            "run",
            "--pruner",
            "magnitude",
            "--discoverer",
            "actpatch",
            "-p",
            "fraction",
            "1e-9",
            *SMALL,
        ],
        2,
        "keeps no head",
    ),
    (
        "norm-unknown",
        ["run", "--pruner", "magnitude", "--discoverer", "actpatch", "-p", "norm", "l7"],
        2,
        "bad parameters for magnitude",
    ),
    (
        "sparsity-one",
        ["run", "--pruner", "flap", "--discoverer", "actpatch", "-p", "sparsity", "1.0"],
        2,
        "less than 1",
    ),
    (
        "sparsity-negative",
        ["run", "--pruner", "flap", "--discoverer", "actpatch", "-p", "sparsity", "-0.1"],
        2,
        "greater than or equal to 0",
    ),
    (
        "sparsity-keeps-nothing",
        ["run", "--pruner", "flap", "--discoverer", "actpatch", "-p", "sparsity", "0.99", *SMALL],
        2,
        "keeps no head",
    ),
    (
        "keep-k-zero",
        ["run", "--pruner", "cflap", "--discoverer", "actpatch", "-p", "keep_k", "0"],
        2,
        "greater than or equal to 1",
    ),
    (
        "keep-k-too-many",
        ["run", "--pruner", "cflap", "--discoverer", "actpatch", "-p", "keep_k", "33", *SMALL],
        2,
        "exceeds the model's 32 heads",
    ),
    (
        "keep-k-and-sparsity",
        [
            "run",
            "--pruner",
            "cflap",
            "--discoverer",
            "actpatch",
            "-p",
            "keep_k",
            "3",
            "-p",
            "sparsity",
            "0.5",
        ],
        2,
        "not both",
    ),
    (
        "sparsity-and-rule",
        [
            "run",
            "--pruner",
            "cflap",
            "--discoverer",
            "actpatch",
            "-p",
            "sparsity",
            "0.5",
            "-p",
            "rule",
            "biggest",
        ],
        2,
        "cliff rule means nothing",
    ),
    (
        "one-point-sweep",
        ["run", "--pruner", "cflap", "--discoverer", "actpatch", "-p", "sweep_step", "1"],
        2,
        "cannot show a cliff",
    ),
    (
        "sweep-backwards",
        [
            "run",
            "--pruner",
            "cflap",
            "--discoverer",
            "actpatch",
            "-p",
            "sweep_start",
            "0.9",
            "-p",
            "sweep_stop",
            "0.7",
        ],
        2,
        "lies below",
    ),
    (
        "rule-unknown",
        ["run", "--pruner", "cflap", "--discoverer", "actpatch", "-p", "rule", "steepest"],
        2,
        "bad parameters for cflap",
    ),
    (
        "window-one",
        ["run", "--pruner", "cflap", "--discoverer", "actpatch", "-p", "window", "1"],
        2,
        "greater than or equal to 2",
    ),
    (
        "effect-threshold-inf",
        ["run", "--pruner", "none", "--discoverer", "pathpatch", "-d", "effect_threshold", "inf"],
        2,
        "finite number",
    ),
    (
        "engine-unknown",
        ["run", "--pruner", "none", "--discoverer", "pathpatch", "-d", "engine", "turbo"],
        2,
        "bad parameters for pathpatch",
    ),
    (
        "tau-negative",
        ["run", "--pruner", "none", "--discoverer", "acdc", "-d", "tau", "-1"],
        2,
        "greater than or equal to 0",
    ),
    (
        "tau-inf",
        ["run", "--pruner", "none", "--discoverer", "acdc", "-d", "tau", "inf"],
        2,
        "finite number",
    ),
    (
        "checkpoint-every-nan",
        ["run", "--pruner", "none", "--discoverer", "acdc", "--checkpoint-every", "nan"],
        2,
        "nan is not a number of seconds",
    ),
    (
        "checkpoint-every-negative",
        ["run", "--pruner", "none", "--discoverer", "acdc", "--checkpoint-every", "-5"],
        2,
        "not in the range x>=0",
    ),
    (
        "distance-unknown",
        ["run", "--pruner", "none", "--discoverer", "acdc", "-d", "distance", "l2"],
        2,
        "bad parameters for acdc",
    ),
    (
        "sweep-empty",
        ["run", "--pruner", "none", "--discoverer", "acdc", "-d", "sweep", ","],
        2,
        "empty sweep",
    ),
    (
        "sweep-twice",
        ["run", "--pruner", "none", "--discoverer", "acdc", "-d", "sweep", "0.1,0.1"],
        2,
        "the same tau twice",
    ),
    (
        "top-n-zero",
        ["run", "--pruner", "none", "--discoverer", "eap", "-d", "top_n", "0"],
        2,
        "greater than or equal to 1",
    ),
    (
        "eap-threshold-zero",
        ["run", "--pruner", "none", "--discoverer", "eap", "-d", "threshold", "0"],
        2,
        "greater than 0",
    ),
    (
        "graph-unknown",
        ["run", "--pruner", "none", "--discoverer", "eap", "-d", "graph", "mlps"],
        2,
        "'full' or 'heads'",
    ),
    (
        "steps-zero",
        ["run", "--pruner", "none", "--discoverer", "eap-ig", "-d", "steps", "0"],
        2,
        "greater than or equal to 1",
    ),
    (
        "ig-unknown",
        ["run", "--pruner", "none", "--discoverer", "eap-ig", "-d", "ig", "outputs"],
        2,
        "'inputs' or 'activations'",
    ),
    (
        "batch-size-zero",
        ["run", "--pruner", "none", "--discoverer", "eap", "-d", "batch_size", "0"],
        2,
        "greater than or equal to 1",
    ),
    (
        "eap-fraction-and-keep-k",
        [
            "run",
            "--pruner",
            "eap",
            "--discoverer",
            "actpatch",
            "-p",
            "fraction",
            "0.5",
            "-p",
            "keep_k",
            "3",
        ],
        2,
        "not both",
    ),
    # -- model directories ------------------------------------------------------------
    ("model-empty-folder", [*RUN, "--model", "{root}/empty-model"], 2, "no config.json"),
    ("model-a-file", [*RUN, "--model", "{root}/a-file"], 2, "a file, not a model directory"),
    ("model-broken-config", [*RUN, "--model", "{root}/bad-config-model"], 2, "config.json"),
    # -- result files -------------------------------------------------------------------
    (
        "from-result-not-utf8",
        ["reference", "build", "--from-result", "{root}/latin1.json", "--out", "{root}/refs"],
        2,
        "not a valid appbench result",
    ),
    (
        "from-result-not-json",
        ["reference", "build", "--from-result", "{root}/not-json.json", "--out", "{root}/refs"],
        2,
        "not a valid appbench result",
    ),
    (
        "from-result-empty",
        ["reference", "build", "--from-result", "{root}/empty.json", "--out", "{root}/refs"],
        2,
        "not a valid appbench result",
    ),
    (
        "from-result-schema-99",
        ["reference", "build", "--from-result", "{root}/schema99.json", "--out", "{root}/refs"],
        2,
        "result schema 99",
    ),
    (
        "from-result-missing",
        ["reference", "build", "--from-result", "{root}/missing.json", "--out", "{root}/refs"],
        2,
        "No such file",
    ),
    (
        "from-result-pruned",
        ["reference", "build", "--from-result", "{result}", "--out", "{root}/refs"],
        2,
        "a reference needs a dense run",
    ),
    (
        "from-result-other-task",
        [
            "reference",
            "build",
            "--from-result",
            "{result}",
            "--task",
            "induction",
            "--out",
            "{root}/r",
        ],
        2,
        "is a run of --task ioi",
    ),
    (
        "reference-nowhere",
        ["reference", "build", "--from-result", "{result}"],
        2,
        "give --out DIR",
    ),
    (
        "reference-two-places",
        ["reference", "build", "--from-result", "{result}", "--out", "{root}/r", "--into-package"],
        2,
        "not both",
    ),
    (
        "reference-without-task",
        ["reference", "build", "--model", "zoo-gt-ioi", "--out", "{root}/r"],
        2,
        "give --task and --model",
    ),
    ("export-missing", ["circuit", "export", "{root}/missing.json"], 2, "No such file"),
    (
        "export-not-a-result",
        ["circuit", "export", "{root}/list.json"],
        2,
        "not a valid appbench result",
    ),
    (
        "export-without-shape",
        ["circuit", "export", "{root}/shapeless.json"],
        2,
        "does not record the model's shape",
    ),
    (
        "export-head-circuit-as-mib",
        ["circuit", "export", "{result}", "--format", "mib", "-o", "{root}/g.json"],
        2,
        "MIB ranks every edge",
    ),
    (
        "export-unknown-format",
        ["circuit", "export", "{result}", "--format", "graphml"],
        2,
        "is not one of",
    ),
    (
        "import-not-json",
        ["circuit", "import", "{root}/not-json.json", "-o", "{root}/c.json"],
        2,
        "not-json.json",
    ),
    (
        "import-not-a-graph",
        ["circuit", "import", "{root}/list.json", "-o", "{root}/c.json"],
        2,
        "not an EAP-IG graph",
    ),
    (
        "import-edge-outside",
        ["circuit", "import", "{root}/graph-outside.json", "-o", "{root}/c.json"],
        2,
        "not in the graph",
    ),
    (
        "import-bad-edge",
        ["circuit", "import", "{root}/graph-bad-edge.json", "-o", "{root}/c.json"],
        2,
        "not in the graph",
    ),
    ("import-without-out", ["circuit", "import", "{root}/list.json"], 2, "Missing option '--out'"),
    # -- other commands ------------------------------------------------------------------
    ("list-unknown-kind", ["list", "widgets"], 2, "is not one of"),
    ("pull-unknown-model", ["models", "pull", "no-such-model"], 2, "Unknown model"),
    # -- an earlier result is never replaced by a run of other settings ------------------
    (
        "rerun-other-settings",
        [
            "run",
            "--pruner",
            "magnitude",
            "--discoverer",
            "actpatch",
            "-p",
            "fraction",
            "0.3",
            "--out",
            "{root}/done",
            *SMALL,
        ],
        2,
        "holds a run with other settings",
    ),
]


@pytest.mark.parametrize(
    ("args", "code", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line(files, args, code, text):
    root, result = files
    before = result.read_bytes()
    filled = [a.replace("{root}", str(root)).replace("{result}", str(result)) for a in args]
    outcome = invoke(*filled)
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == code, outcome.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], outcome.output
    assert "Traceback" not in outcome.output
    assert result.read_bytes() == before  # the finished run is never touched


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_a_plugin_switch_naming_nothing_installed_is_one_line(fresh_plugins):
    env = {"APPBENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "APPBENCH_LOAD_PLUGINS": "appbench-nope"}
    outcome = invoke("list", env=env)
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 2 and len(lines) == 1, outcome.output
    assert "APPBENCH_LOAD_PLUGINS names appbench-nope" in lines[0]


def test_a_failure_at_run_time_is_one_line_and_exit_code_1(fresh_plugins, tmp_path):
    """A discoverer that crashes: one line naming the error, exit 1; --debug shows the
    traceback instead."""
    import types

    class Crashing(Discoverer):
        name = "crashing"
        summary = "raises"
        Params = Params

        def discover(self, ctx, space, params):
            raise RuntimeError("CUDA out of memory (simulated)")

    module = types.ModuleType("crashing_plugin")

    @hookimpl
    def appbench_register_discoverers(register):
        register(Crashing)

    module.appbench_register_discoverers = appbench_register_discoverers
    fresh_plugins.register_plugin(module, "crashing")
    args = ["run", "--pruner", "none", "--discoverer", "crashing", "--out", str(tmp_path), *SMALL]
    outcome = invoke(*args)
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 1 and len(lines) == 1, outcome.output
    assert "RuntimeError: CUDA out of memory (simulated)" in lines[0] and "--debug" in lines[0]
    debug = invoke(*args, "--debug")
    assert isinstance(debug.exception, RuntimeError)


def test_a_rerun_with_other_settings_runs_with_overwrite(files, tmp_path):
    _, result = files
    folder = tmp_path / "ioi" / "zoo-gt-ioi"
    folder.mkdir(parents=True)
    shutil.copy(result, folder / result.name)
    args = ["run", "--pruner", "magnitude", "--discoverer", "actpatch", "-p", "fraction", "0.3"]
    outcome = invoke(*args, "--out", str(tmp_path), "--overwrite", *SMALL)
    assert outcome.exit_code == 0, outcome.output
    saved = json.loads((folder / result.name).read_text())
    assert saved["pruner_params"]["fraction"] == 0.3
    # The same settings again: a rerun, no --overwrite needed.
    again = invoke(*args, "--out", str(tmp_path), *SMALL)
    assert again.exit_code == 0, again.output


GOOD_REFERENCE = {
    "task": "ioi",
    "model": "zoo-gt-ioi",
    "default": "hand",
    "circuits": {
        "hand": {
            "heads": ["a0.h3"],
            "n_layers": 4,
            "n_heads": 8,
            "source": "hand-set",
            "method": "by hand",
            "version": "1",
        }
    },
}


def _broken(change):
    document = json.loads(json.dumps(GOOD_REFERENCE))
    change(document)
    return json.dumps(document)


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("{not json", "invalid reference file"),
        (b"\xff\xfe not utf-8", "invalid reference file"),
        (_broken(lambda d: d["circuits"]["hand"].update(heads=["a99.h99"])), "outside"),
        (_broken(lambda d: d["circuits"]["hand"].update(heads=["head three"])), "bad head id"),
        (_broken(lambda d: d["circuits"]["hand"].update(edges=["a0.h3->a2.h1<v>"])), "joins"),
        (_broken(lambda d: d.update(default="missing")), "invalid reference file"),
    ],
    ids=["not-json", "not-utf8", "head-outside", "bad-head-id", "edge-outside", "no-default"],
)
def test_a_broken_shipped_reference_file_is_one_line_before_any_work(
    tmp_path, monkeypatch, content, text
):
    """A task's shipped reference for the model is read before the model loads: a broken one
    is one line and exit 2, and no result is written."""
    import sys

    from appbench import get_registries

    package = tmp_path / "brokenref"
    (package / "reference").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    target = package / "reference" / "zoo-gt-ioi.json"
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("brokenref", None)
    task = get_registries().tasks.get("ioi")
    monkeypatch.setattr(type(task), "package", "brokenref")
    outcome = invoke(*RUN, "--out", str(tmp_path / "out"))
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 2 and len(lines) == 1, outcome.output
    assert text in lines[0] and "Traceback" not in outcome.output
    assert not list((tmp_path / "out").rglob("*.json"))


@pytest.mark.parametrize(
    ("env", "text"),
    [
        (
            {"APPBENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "APPBENCH_LOAD_PLUGINS": "appbench-nope"},
            "names appbench-nope",
        ),
        ({"APPBENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "APPBENCH_LOAD_PLUGINS": "a,,b"}, "names a, b"),
    ],
    ids=["unknown-distribution", "two-unknown"],
)
def test_plugin_switches_naming_nothing_installed_are_one_line(fresh_plugins, env, text):
    outcome = invoke("list", env=env)
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 2 and len(lines) == 1, outcome.output
    assert text in lines[0]


@pytest.mark.parametrize("args", [[], ["reference"], ["circuit"]])
def test_a_group_without_a_command_shows_its_help(args):
    outcome = invoke(*args)
    assert outcome.exit_code == 0, outcome.output
    assert outcome.output.startswith("Usage: ") and "Error" not in outcome.output
    assert len(outcome.output.splitlines()) > 5
