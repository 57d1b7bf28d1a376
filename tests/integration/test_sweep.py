"""`appbench sweep`: the plan, the dense-first dependency, results equal to runs made one by
one, resuming, refusing other settings, surviving SIGKILL and Ctrl-C, failures that do not
stop the sweep, and the YAML file.

The runs use the default zoo model with 8 search and 8 evaluation prompts. Only three tests
start a process pool (or a sweep process): the results comparison, and the kill/interrupt
test; the scheduling tests run an in-process executor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from appbench.cli import cli
from appbench.results import load_result
from appbench.runner import RunConfig, execute, run
from appbench.sweep import (
    Executor,
    ModelCache,
    Outcome,
    Sweep,
    SweepSpec,
    WorkItem,
    inspect,
    plan,
    result_settings,
    run_item,
    settings_hash,
)

SMALL = ["--n-search", "8", "--n-eval", "8"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Runs in this process use one torch thread, as each worker of a two-worker pool does:
    on a shared two-core machine two threads per run are many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


class InlineExecutor(Executor):
    """Runs items in this process, finishing them in an order the test chooses (last in,
    first out by default) so that the driver's ordering, not the executor's, is tested."""

    name = "inline"

    def __init__(self, slots=2, fail=lambda item: None, lifo=True):
        self.slots, self.fail, self.lifo = slots, fail, lifo
        self.items: list[WorkItem] = []
        self.submitted: list[tuple[str, set[str]]] = []  # (key, keys in flight at submission)
        self.cache = ModelCache()

    def start(self):
        pass

    def submit(self, item):
        self.submitted.append((item.key, {i.key for i in self.items}))
        self.items.append(item)

    def wait(self, timeout):
        if not self.items:
            return []
        item = self.items.pop() if self.lifo else self.items.pop(0)
        error = self.fail(item)
        if error:
            return [Outcome(item.key, error=error)]
        return [run_item(item, self.cache)]

    def stop(self):
        abandoned, self.items = len(self.items), []
        return abandoned

    def close(self):
        pass


def _spec(tmp_path, **fields):
    defaults = dict(
        pruners=["magnitude"],
        discoverers=["actpatch", "pathpatch"],
        seeds=[1],
        n_search=8,
        n_eval=8,
        out=str(tmp_path / "sweep"),
    )
    return SweepSpec(**{**defaults, **fields})


# ------------------------------------------------------------------------ the plan
def test_the_plan_expands_all_and_default_and_puts_dense_runs_first(tmp_path):
    from appbench import get_registries

    spec = _spec(tmp_path, pruners="all", tasks="ioi,induction", seeds="1-2", models="default")
    planned = plan(spec)
    pruners = get_registries().pruners.names()
    assert len(planned.jobs) == 2 * 2 * len(pruners) * 2  # tasks x seeds x pruners x discoverers
    assert not planned.dense_added
    first = planned.jobs[0]
    assert (
        first.path == tmp_path / "sweep" / "seed-1" / "ioi" / "zoo-gt-ioi" / "none__actpatch.json"
    )
    assert first.config.out == tmp_path / "sweep" / "seed-1" and first.config.seed == 1
    assert {j.config.model for j in planned.jobs if j.config.task == "induction"} == {
        "zoo-gt-induction"
    }
    # Within each task x model x seed, every dense run precedes every pruned run.
    for job in planned.jobs:
        base = planned.baseline_of(job)
        if job.config.pruner == "none":
            assert base is None
        else:
            assert base is not None and base.config.pruner == "none"
            assert planned.jobs.index(base) < planned.jobs.index(job)
            assert base.path.parent == job.path.parent
    # Hashes: one per run, equal to the hash of the settings its result will record.
    assert len({job.hash for job in planned.jobs}) == len(planned.jobs)
    # none is added when not asked for: every speedup needs it.
    only_magnitude = plan(_spec(tmp_path))
    assert only_magnitude.dense_added
    assert [j.config.pruner for j in only_magnitude.jobs] == ["none", "none"] + ["magnitude"] * 2


def test_cli_parameters_apply_to_every_pruner_but_none_and_the_file_per_plugin(tmp_path):
    spec = _spec(tmp_path, pruners="magnitude,eap", pruner_params={"eap": {"batch_size": 4}})
    planned = plan(spec, pruner_params={"fraction": "0.25"}, discoverer_params={"batch_size": "4"})
    by_pruner = {j.config.pruner: j for j in planned.jobs if j.config.discoverer == "actpatch"}
    assert by_pruner["none"].config.pruner_params == {}
    assert by_pruner["magnitude"].config.pruner_params == {"fraction": "0.25"}
    assert by_pruner["eap"].config.pruner_params == {"batch_size": 4, "fraction": "0.25"}
    assert by_pruner["eap"].settings["pruner_params"]["fraction"] == 0.25  # validated
    assert all(j.config.discoverer_params == {"batch_size": "4"} for j in planned.jobs)


# ------------------------------------------------------- the driver (in this process)
def test_a_pruned_run_starts_only_after_its_dense_run_finished(tmp_path):
    planned = plan(_spec(tmp_path, seeds=[1, 2]))
    executor = InlineExecutor(slots=3)
    summary = Sweep(planned, inspect(planned), executor, progress=False).run()
    assert summary.counts() == {"done": 8, "skipped": 0, "failed": 0, "cancelled": 0}
    order = [key for key, _ in executor.submitted]
    for key, in_flight in executor.submitted:
        job = next(j for j in planned.jobs if j.key == key)
        base = planned.baseline_of(job)
        if base is not None:
            assert order.index(base.key) < order.index(key)
            assert base.key not in in_flight  # finished, not merely submitted
    for record in summary.records:
        if record.job.config.pruner != "none":
            assert record.result.speedup is not None
            assert record.result.speedup.baseline == str(record.job.dense_path)
    # A worker loads each model once: 8 runs, one load.
    assert executor.cache.loads == 1


def test_a_failed_dense_run_leaves_its_pruned_runs_running_without_speedup(tmp_path):
    planned = plan(_spec(tmp_path))
    executor = InlineExecutor(
        fail=lambda item: "RunError: simulated" if item.key.endswith("none__pathpatch") else None
    )
    reported = []
    summary = Sweep(planned, inspect(planned), executor, report=reported.append).run()
    assert summary.counts()["failed"] == 1 and summary.counts()["done"] == 3
    pruned = next(r for r in summary.records if r.job.key.endswith("magnitude__pathpatch"))
    assert pruned.status == "done" and pruned.result.speedup is None
    assert "no speedup: its dense run failed" in pruned.notes
    assert reported == ["failed: seed-1/ioi/zoo-gt-ioi/none__pathpatch: RunError: simulated"]


def test_a_run_whose_worker_died_is_retried_once(tmp_path):
    planned = plan(_spec(tmp_path, discoverers=["actpatch"], pruners=["none"]))
    deaths = []

    def die_twice(item):
        deaths.append(item.key)
        return "its worker process died" if len(deaths) <= 2 else None

    executor = InlineExecutor(fail=die_twice)
    # Outcomes of a dead worker are retryable; InlineExecutor's are not unless marked.
    executor.wait = _retryable(executor.wait)
    summary = Sweep(planned, inspect(planned), executor, progress=False, report=print).run()
    record = summary.records[0]
    assert record.status == "failed" and record.attempts == 2  # retried once, then reported
    summary = Sweep(planned, inspect(planned), executor, progress=False, report=print).run()
    assert summary.records[0].status == "done" and summary.records[0].attempts == 1


def _retryable(wait):
    def wrapped(timeout):
        return [
            Outcome(o.key, error=o.error, retryable=True) if o.error else o for o in wait(timeout)
        ]

    return wrapped


def test_overwrite_replaces_results_of_other_settings(tmp_path):
    spec = _spec(tmp_path, pruners=["none"], discoverers=["actpatch"])
    first = plan(spec)
    Sweep(first, inspect(first), InlineExecutor(), progress=False).run()
    path = first.jobs[0].path
    changed = plan(spec.model_copy(update={"n_eval": 9}))
    found = inspect(changed)
    assert found[changed.jobs[0].key].state == "conflict"
    assert "n_eval 8 there, 9 now" in found[changed.jobs[0].key].differences
    found = inspect(changed, overwrite=True)
    assert found[changed.jobs[0].key].state == "replace"
    Sweep(changed, found, InlineExecutor(), progress=False).run()
    assert load_result(path).n_eval == 9


def test_runs_leave_the_model_as_loaded(tmp_path):
    """A worker hands one model to run after run: no run may change its weights, leave a
    hook on it, switch it to training or turn gradients on."""
    import torch

    from appbench.models import load_model

    model = load_model("zoo-gt-ioi")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    for pruner, discoverer, pruner_params, discoverer_params in [
        ("cflap", "pathpatch", {"selection": "same"}, {}),
        ("eap", "eap-ig", {}, {}),
        ("none", "acdc", {}, {"graph": "heads"}),
    ]:
        config = RunConfig(
            pruner=pruner,
            discoverer=discoverer,
            pruner_params=pruner_params,
            discoverer_params=discoverer_params,
            n_search=8,
            n_eval=8,
            out=tmp_path,
        )
        execute(config, load=lambda name, device: model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert not model.training
    for name, module in model.named_modules():
        hooks = [module._forward_hooks, module._forward_pre_hooks, module._backward_hooks]
        assert not any(hooks), f"{name} keeps a hook"


def test_the_model_cache_loads_each_model_once_and_keeps_two():
    cache = ModelCache(size=2)
    a = cache.load("zoo-gt-ioi", "cpu")
    assert cache.load("zoo-gt-ioi", "cpu") is a and cache.loads == 1
    cache.load("zoo-ioi", "cpu")
    cache.load("zoo-gt-ioi", "cpu")  # still there: used last
    cache.load("zoo-multitask", "cpu")  # evicts zoo-ioi, the least recently used
    assert cache.loads == 3
    assert cache.load("zoo-gt-ioi", "cpu") is a
    cache.load("zoo-ioi", "cpu")
    assert cache.loads == 4


# ------------------------------------------------------ the command, with a process pool
@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep from a YAML file on the process pool: dense and magnitude runs of actpatch
    and pathpatch, and flap with a sparsity that keeps no head, which fails at run time."""
    root = tmp_path_factory.mktemp("sweep")
    config = root / "sweep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "pruners": ["magnitude", "flap"],
                "discoverers": ["actpatch", "pathpatch"],
                "seeds": [3],
                "n_search": 8,
                "n_eval": 8,
                "out": str(root / "out"),
                "pruner_params": {"flap": {"sparsity": 0.99}},
                "jobs": 2,
            }
        )
    )
    outcome = CliRunner().invoke(cli, ["sweep", "--config", str(config), "--json"], obj={})
    return root, config, outcome


def test_a_sweep_reports_a_failing_run_in_one_line_and_finishes_the_others(swept):
    _, _, outcome = swept
    assert outcome.exit_code == 1, outcome.output
    summary = json.loads(outcome.stdout)
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 2, "cancelled": 0}
    failures = [line for line in outcome.stderr.splitlines() if "failed: " in line]
    assert len(failures) == 2
    assert all("flap__" in line and "keeps no head" in line for line in failures)
    assert outcome.stderr.strip().splitlines()[-1].startswith("Error: 2 of 6 runs failed")
    # Models are loaded once per worker, not once per run.
    assert summary["model_loads"] <= summary["workers"] <= 2
    assert "Traceback" not in outcome.output


def test_a_sweep_gives_the_results_of_runs_made_one_by_one(swept, tmp_path):
    root, _, _ = swept
    folder = root / "out" / "seed-3" / "ioi" / "zoo-gt-ioi"
    assert sorted(p.name for p in folder.glob("*.json")) == [
        "magnitude__actpatch.json",
        "magnitude__pathpatch.json",
        "none__actpatch.json",
        "none__pathpatch.json",
    ]
    for discoverer in ("actpatch", "pathpatch"):
        for pruner in ("none", "magnitude"):
            config = RunConfig(
                pruner=pruner,
                discoverer=discoverer,
                seed=3,
                n_search=8,
                n_eval=8,
                out=tmp_path / "seed-3",
            )
            alone, _ = run(config)
            swept_result = load_result(folder / f"{pruner}__{discoverer}.json")
            assert _comparable(swept_result) == _comparable(alone)
            if pruner != "none":
                s, a = swept_result.speedup, alone.speedup
                assert s.baseline == str(folder / f"none__{discoverer}.json")
                assert (s.flops_ratio, s.prompt_passes_ratio) == (
                    a.flops_ratio,
                    a.prompt_passes_ratio,
                )


def _comparable(result):
    """A result without what differs between two identical runs: timings, creation time,
    the command line and the baseline's folder."""
    data = result.model_dump(mode="json")
    for key in ("cost", "speedup"):
        data.pop(key)
    data["provenance"].pop("created_at")
    data["provenance"].pop("command")
    return data


def test_a_rerun_skips_finished_runs_and_command_line_options_override_the_file(swept):
    root, config, _ = swept
    files = sorted((root / "out").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in files]
    # --pruners overrides the file's list: no flap (which would fail again), all skipped.
    outcome = invoke("sweep", "--config", str(config), "--pruners", "magnitude", "--json")
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(outcome.stdout)
    assert summary["counts"] == {"done": 0, "skipped": 4, "failed": 0, "cancelled": 0}
    assert summary["model_loads"] == 0 and summary["workers"] == 0
    assert [p.stat().st_mtime_ns for p in files] == stamps


def test_a_rerun_with_other_settings_is_refused_before_any_work(swept):
    root, config, _ = swept
    files = sorted((root / "out").rglob("*.json"))
    before = [p.read_bytes() for p in files]
    outcome = invoke("sweep", "--config", str(config), "--pruners", "magnitude", "--n-eval", "9")
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 2 and len(lines) == 1, outcome.output
    assert "and 3 more hold a run with other settings" in lines[0]
    assert "n_eval 8 there, 9 now" in lines[0] and "--overwrite" in lines[0]
    assert [p.read_bytes() for p in files] == before
    dry = invoke(
        "sweep", "--config", str(config), "--pruners", "magnitude", "--n-eval", "9",
        "--overwrite", "--dry-run",
    )  # fmt: skip
    assert dry.exit_code == 0 and dry.output.count("replacing other settings") == 4


def test_the_yaml_file_and_the_command_line_make_the_same_plan(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "pruners: [magnitude, eap]\n"
        "discoverers: actpatch, pathpatch\n"
        "tasks: [ioi, induction]\n"
        "models: [default]\n"
        "seeds: 1-2\n"
        "n_search: 8\n"
        "n_eval: 8\n"
        "device: cpu\n"
        f"out: {tmp_path / 'out'}\n"
        "pruner_params: {magnitude: {fraction: 0.25}, eap: {fraction: 0.25}}\n"
        "discoverer_params: {actpatch: {threshold: 0.05}}\n"
    )
    from_file = invoke("sweep", "--config", str(config), "--dry-run", "--json")
    # Per-plugin parameters exist only in the file: the flags' run takes them from a small one.
    (tmp_path / "params.yaml").write_text("discoverer_params: {actpatch: {threshold: 0.05}}\n")
    from_flags = invoke(
        "sweep", "--pruners", "magnitude,eap", "--discoverers", "actpatch,pathpatch",
        "--tasks", "ioi,induction", "--models", "default", "--seeds", "1,2", *SMALL,
        "--device", "cpu", "--out", str(tmp_path / "out"), "-p", "fraction", "0.25",
        "--config", str(tmp_path / "params.yaml"), "--dry-run", "--json",
    )  # fmt: skip
    assert from_file.exit_code == 0 and from_flags.exit_code == 0, from_flags.output
    file_runs = json.loads(from_file.output)["runs"]
    assert file_runs == json.loads(from_flags.output)["runs"]
    assert len(file_runs) == 2 * 2 * 3 * 2


# ------------------------------------------------- SIGKILL and Ctrl-C of a sweep process
def _children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


KILLED = dict(pruners="magnitude,eap", discoverers="actpatch,pathpatch", seeds="1", jobs=1)


def _start(out):
    args = ["sweep", *(f"--{key}={value}" for key, value in KILLED.items()), *SMALL]
    args += ["--out", str(out), "--json", "--quiet"]
    return subprocess.Popen(
        [sys.executable, "-m", "appbench.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_results(out, count, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(out.rglob("*.json"))) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {count} results in {timeout} s")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_a_sweep_killed_then_interrupted_completes_when_run_again(tmp_path):
    """SIGKILL mid-sweep loses at most the runs in flight and leaves no worker behind; Ctrl-C
    (SIGINT) exits 130 with the summary; the same sweep then finishes. (The last rerun runs
    in this process, on the in-process executor: a third sweep process would only pay for
    starting torch again.)"""
    out = tmp_path / "out"
    first = _start(out)
    _wait_for_results(out, 1, first)
    workers = _children(first.pid)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "workers outlived the killed sweep"
    kept = list(out.rglob("*.json"))
    assert 1 <= len(kept) < 6
    for path in kept:
        load_result(path)  # every file is a whole result

    second = _start(out)
    _wait_for_results(out, len(kept) + 1, second)
    second.send_signal(signal.SIGINT)
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 130, stderr[-2000:]
    summary = json.loads(stdout)
    assert summary["interrupted"] and summary["counts"]["skipped"] == len(kept)
    assert summary["counts"]["done"] >= 1
    assert stderr.strip().splitlines()[-1].startswith("Error: interrupted")
    assert "Traceback" not in stderr

    again = plan(_spec(tmp_path, **KILLED, out=str(out)))
    final = Sweep(again, inspect(again), InlineExecutor(), progress=False).run()
    counts = final.counts()
    assert counts["done"] + counts["skipped"] == 6 and counts["failed"] == 0
    assert counts["skipped"] == len(kept) + summary["counts"]["done"]
    results = [load_result(path) for path in out.rglob("*.json")]
    assert len(results) == 6
    assert all(r.speedup is not None for r in results if r.pruner != "none")
    assert {settings_hash(result_settings(r)) for r in results} == {
        r["config_hash"] for r in summary["runs"]
    }


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_sweep_is_taken_at_a_safe_point_and_a_second_one_at_once(number):
    """SIGTERM stops a sweep as Ctrl-C does (a sweep started in the background by a script
    ignores SIGINT, so kill is how it gets stopped): the first asks the driver to stop between
    steps, the second interrupts at once, and the handlers before the sweep come back."""
    from appbench.sweep import _DeferredInterrupt

    before = signal.getsignal(number)
    with _DeferredInterrupt() as interrupt:
        os.kill(os.getpid(), number)
        deadline = time.monotonic() + 5
        while not interrupt.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), number)
            time.sleep(5)
    assert signal.getsignal(number) is before
