"""The same configuration and seed give the same circuit and the same numbers in two separate
processes (timings aside); another seed gives other prompts."""

import json
import subprocess
import sys

import pytest

SMALL = ["--n-search", "20", "--n-eval", "20", "--quiet", "--json"]


def _run(out, *args):
    done = subprocess.run(
        [sys.executable, "-m", "appbench.cli", "run", *args, "--out", str(out), *SMALL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _without_timings(result):
    kept = dict(result)
    for key in ("cost", "provenance", "speedup"):
        kept.pop(key)
    return kept


@pytest.mark.parametrize("discoverer", ["eap-ig", "acdc"])
def test_two_processes_with_one_seed_agree_on_everything_but_time(tmp_path, discoverer):
    args = ["--pruner", "cflap", "--discoverer", discoverer, "--seed", "7"]
    first = _run(tmp_path / "a", *args)
    second = _run(tmp_path / "b", *args)
    assert _without_timings(first) == _without_timings(second)
    assert first["circuit"]["edges"] and first["search_space"]["heads"]
    # The work done is the same too: prompt passes and FLOPs, not seconds.
    for stage in ("prune", "discover", "evaluate"):
        for key in ("prompt_passes", "flops"):
            assert first["cost"][stage][key] == second["cost"][stage][key]
    other = _run(tmp_path / "c", "--pruner", "cflap", "--discoverer", discoverer, "--seed", "8")
    assert other["search_sha256"] != first["search_sha256"]
