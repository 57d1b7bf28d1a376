"""`appbench sweep --executor ray` on a local Ray instance of 2 CPUs: the same results as the
local executor, and a Ray worker killed in the middle of a run retried to completion.

Ray is an optional extra. Without it these tests skip, except in CI (APPBENCH_CI set), which
installs it and where a skip would hide that the Ray executor went untested.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from click.testing import CliRunner

from appbench.cli import cli
from appbench.results import load_result
from appbench.sweep import Sweep, SweepSpec, inspect, plan
from appbench.sweep_ray import RayExecutor, run_resources

try:
    import ray
except ImportError:
    if os.environ.get("APPBENCH_CI"):
        raise
    pytest.skip(
        "Ray is not installed (pip install 'appbench[ray]'); CI installs it",
        allow_module_level=True,
    )

pytestmark = [
    # Ray's own modules warn about their dependencies on import and start.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

GRID = ["--pruners", "magnitude", "--discoverers", "actpatch", "--seeds", "5", "--jobs", "1"]
GRID += ["--n-search", "8", "--n-eval", "8", "--json", "--quiet"]


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this process with 2 CPUs, for the module's tests."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 2**20,
    )
    yield
    ray.shutdown()


def _comparable(result):
    data = result.model_dump(mode="json")
    for key in ("cost", "speedup"):
        data.pop(key)
    for key in ("created_at", "command"):
        data["provenance"].pop(key)
    speedup = result.speedup
    ratios = None if speedup is None else (speedup.flops_ratio, speedup.prompt_passes_ratio)
    return data, ratios


def test_a_ray_sweep_gives_the_results_of_the_local_executor(local_ray, tmp_path):
    outcome = CliRunner().invoke(
        cli, ["sweep", *GRID, "--executor", "ray", "--out", str(tmp_path / "ray")], obj={}
    )
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(outcome.stdout)
    assert summary["counts"]["done"] == 2 and summary["executor"].startswith("ray, 1 node(s)")
    assert summary["model_loads"] == summary["workers"] == 1  # one worker, one load, two runs
    local = CliRunner().invoke(cli, ["sweep", *GRID, "--out", str(tmp_path / "local")], obj={})
    assert local.exit_code == 0, local.output
    ray_files = sorted((tmp_path / "ray").rglob("*.json"))
    assert len(ray_files) == 2
    for path in ray_files:
        twin = tmp_path / "local" / path.relative_to(tmp_path / "ray")
        assert _comparable(load_result(path)) == _comparable(load_result(twin))
    # The driver wrote them, beside their dense baselines.
    pruned = load_result(
        tmp_path / "ray" / "seed-5" / "ioi" / "zoo-gt-ioi" / "magnitude__actpatch.json"
    )
    assert pruned.speedup is not None and pruned.speedup.baseline.startswith(str(tmp_path / "ray"))
    # A rerun on Ray skips them all.
    again = CliRunner().invoke(
        cli, ["sweep", *GRID, "--executor", "ray", "--out", str(tmp_path / "ray")], obj={}
    )
    assert json.loads(again.stdout)["counts"]["skipped"] == 2


def _ray_workers_running(function="run_in_ray_worker"):
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith(f"ray::{function}"):
            found.append(process.pid)
    return found


def test_a_ray_worker_killed_mid_run_is_retried_and_the_sweep_completes(local_ray, tmp_path):
    spec = SweepSpec(
        pruners=["magnitude"],
        discoverers=["actpatch", "pathpatch"],
        seeds=[1, 2],
        n_search=8,
        n_eval=8,
        out=str(tmp_path / "out"),
    )
    planned = plan(spec)
    reports: list[str] = []
    done: dict = {}

    def sweep():
        executor = RayExecutor()
        done["summary"] = Sweep(
            planned, inspect(planned), executor, progress=False, report=reports.append
        ).run()

    thread = threading.Thread(target=sweep)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        running = _ray_workers_running()
        if running:
            killed = running[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    thread.join(timeout=300)
    assert killed is not None, "no Ray worker was seen running a run"
    summary = done["summary"]
    assert summary.counts() == {"done": 8, "skipped": 0, "failed": 0, "cancelled": 0}
    retried = [r for r in summary.records if r.attempts == 2]
    assert len(retried) == 1, reports
    assert "retried after: WorkerCrashedError" in retried[0].notes[0]
    assert any(line.startswith(f"retrying {retried[0].job.key}") for line in reports)
    assert len([load_result(p) for p in (tmp_path / "out").rglob("*.json")]) == 8


def test_resources_follow_the_device_and_the_model_size():
    assert run_resources("cpu", None) == {"num_cpus": 1.0, "num_gpus": 0.0}
    small = 10 * 2**20
    assert run_resources("cpu", small) == {
        "num_cpus": 1.0,
        "num_gpus": 0.0,
        "memory": 3 * small + 512 * 2**20,
    }
    assert run_resources("cpu", 2 * 2**30)["num_cpus"] == 2.0
    assert run_resources("cpu", 8 * 2**30)["num_cpus"] == 4.0
    assert run_resources("cuda", None)["num_gpus"] == 1.0
    assert run_resources("cuda", small)["num_gpus"] == 0.25
    assert run_resources("cuda:1", 2**30) == {
        "num_cpus": 1.0,
        "num_gpus": 1.0,
        "memory": 2**30 + 512 * 2**20,
    }
    assert run_resources("cuda", small, cpus=3, gpus=2) == {
        "num_cpus": 3.0,
        "num_gpus": 2.0,
        "memory": small + 512 * 2**20,
    }
