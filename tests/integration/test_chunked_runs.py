"""A whole run with every automatic batch at 7 prompts (pruning, its sweep, path patching,
the evaluation and the edge faithfulness all chunked) gives the run of the whole split."""

import json

import pytest
from click.testing import CliRunner

from appbench.cli import cli
from appbench.engine import chunks

SMALL = ["--n-search", "20", "--n-eval", "20", "--quiet", "--json"]


def _run(tmp_path, name, *args):
    outcome = CliRunner().invoke(cli, ["run", *args, "--out", str(tmp_path / name), *SMALL], obj={})
    assert outcome.exit_code == 0, outcome.output
    return json.loads(outcome.stdout)


@pytest.mark.parametrize(
    "args",
    [
        ["--pruner", "cflap", "--discoverer", "pathpatch"],
        ["--pruner", "none", "--discoverer", "eap-ig"],
        ["--pruner", "magnitude", "--discoverer", "actpatch"],
    ],
    ids=["app", "eap-ig", "actpatch"],
)
def test_a_run_in_chunks_of_7_prompts_is_the_whole_split_run(tmp_path, monkeypatch, args):
    whole = _run(tmp_path, "whole", *args)
    monkeypatch.setattr(chunks, "auto_batch_size", lambda model, data, bytes_per_value=8: 7)
    chunked = _run(tmp_path, "chunked", *args)
    assert chunked["search_space"]["heads"] == whole["search_space"]["heads"]
    assert chunked["circuit"]["heads"] == whole["circuit"]["heads"]
    assert chunked["circuit"]["edges"] == whole["circuit"]["edges"]
    for key in ("faithfulness", "edge_faithfulness"):
        if whole[key] is None:
            assert chunked[key] is None
            continue
        assert chunked[key]["normalised"] == pytest.approx(whole[key]["normalised"], abs=1e-4)
