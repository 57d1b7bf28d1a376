"""Checkpoints: an ACDC run killed in the middle goes on from its last checkpoint to the
circuit and the counters of an uninterrupted run, through `execute`, `run`, the CLI and a
sweep; checkpoints of other settings, unreadable ones and `--fresh` start afresh, said in a
line; the file goes once the result is written."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from appbench.checkpoint import Checkpoint, checkpoint_path
from appbench.cli import cli
from appbench.results import load_result, result_path
from appbench.runner import RunConfig, execute, run
from appbench.sweep import (
    Executor,
    ModelCache,
    Sweep,
    SweepSpec,
    inspect,
    plan,
    plan_rows,
    run_item,
)


class _InProcess(Executor):
    """Runs each item in this process, writing checkpoints where the driver says, as the
    local executor's workers do."""

    name = "in-process"
    shares_files = True
    slots = 1

    def __init__(self):
        self.items, self.cache = [], ModelCache()

    def start(self):
        pass

    def submit(self, item):
        self.items.append(item)

    def wait(self, timeout):
        return [run_item(self.items.pop(), self.cache)] if self.items else []

    def stop(self):
        abandoned, self.items = len(self.items), []
        return abandoned

    def close(self):
        pass


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path, **fields):
    defaults = dict(
        pruner="none",
        discoverer="acdc",
        n_search=8,
        n_eval=8,
        out=tmp_path / "out",
        checkpoint_every=0.0,
    )
    return RunConfig(**{**defaults, **fields})


def _killed_after(monkeypatch, saves: int) -> None:
    """Every checkpoint from now on kills its run right after its ``saves``-th save."""
    original = Checkpoint.save

    def save_then_die(self, state, uncounted_flops=0.0):
        original(self, state, uncounted_flops)
        if self.saves == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_die)


#: Forward calls each segment of ACDC starts with: the clean and the corrupted runs whose
#: activations it patches with (a resumed run makes them again).
SETUP_CALLS = 2


def _killed_run(tmp_path, monkeypatch):
    """A run killed after its third checkpoint: its config and the checkpoint it left."""
    config = _config(tmp_path)
    saved = checkpoint_path(result_path(config.out, "ioi", config.model, "none", "acdc"))
    with monkeypatch.context() as patch:
        _killed_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            run(config)
    return config, saved


def _same_work(resumed, whole, interruptions):
    """The same decisions, and the same work but for each later segment's setup."""
    assert resumed.circuit["edges"] == whole.circuit["edges"] and whole.circuit["edges"]
    assert resumed.circuit["details"]["edges_tested"] == whole.circuit["details"]["edges_tested"]
    assert resumed.faithfulness == whole.faithfulness
    a, b = resumed.cost["discover"], whole.cost["discover"]
    assert a.forward_calls == b.forward_calls + SETUP_CALLS * interruptions
    # Full passes over the 8 search prompts, no more: nothing decided before is run again.
    assert a.prompt_passes == pytest.approx(b.prompt_passes + SETUP_CALLS * 8 * interruptions)
    assert a.flops > b.flops
    return a.flops - b.flops


def test_a_killed_run_goes_on_from_its_checkpoint_to_the_whole_runs_result(tmp_path, monkeypatch):
    config = _config(tmp_path)
    whole = execute(config)
    assert not whole.flags or "resumed" not in {f.code for f in whole.flags}
    path = tmp_path / "none__acdc.checkpoint"
    with monkeypatch.context() as patch:
        _killed_after(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            execute(config, checkpoint=path)
    assert path.is_file()
    lines: list[str] = []
    resumed = execute(config, lines.append, checkpoint=path)
    setup_flops = _same_work(resumed, whole, 1)
    assert [f.code for f in resumed.flags].count("resumed") == 1
    assert "after 1 interruption" in next(f.message for f in resumed.flags if f.code == "resumed")
    assert any(line.startswith("resuming from the checkpoint") for line in lines)
    assert any("acdc: going on from receiver" in line for line in lines)
    # Killed twice: three segments, the same work.
    with monkeypatch.context() as patch:
        _killed_after(patch, 2)
        path.unlink()
        with pytest.raises(KeyboardInterrupt):
            execute(config, checkpoint=path)
        with pytest.raises(KeyboardInterrupt):
            execute(config, checkpoint=path)
    thrice = execute(config, checkpoint=path)
    assert _same_work(thrice, whole, 2) == pytest.approx(2 * setup_flops)
    assert "after 2 interruption" in next(f.message for f in thrice.flags if f.code == "resumed")


def test_run_resumes_and_removes_the_checkpoint_with_the_result_written(tmp_path, monkeypatch):
    config, saved = _killed_run(tmp_path, monkeypatch)
    assert saved.is_file() and saved.name == "none__acdc.checkpoint"
    result, path = run(config)
    assert "resumed" in {f.code for f in result.flags}
    assert load_result(path).flags == result.flags
    assert not saved.exists()


@pytest.mark.parametrize("why", ["other-settings", "unreadable", "fresh"])
def test_a_checkpoint_that_cannot_be_resumed_is_said_and_discovery_starts_afresh(
    tmp_path, monkeypatch, why
):
    config, saved = _killed_run(tmp_path, monkeypatch)
    if why == "unreadable":
        saved.write_text("{not json")
    args = ["run", "--pruner", "none", "--discoverer", "acdc", "--n-search", "8"]
    args += ["--n-eval", "8", "--out", str(config.out), "--checkpoint-every", "0"]
    if why == "other-settings":
        args += ["-d", "tau", "0.02", "--overwrite"]
    if why == "fresh":
        args += ["--fresh"]
    done = CliRunner().invoke(cli, [*args, "--json"], obj={})
    assert done.exit_code == 0, done.output
    expected = {
        "other-settings": "it is of other settings (discoverer_params)",
        "unreadable": "unreadable",
        "fresh": "(--fresh): discovering afresh",
    }[why]
    assert expected in done.stderr
    result = load_result(result_path(config.out, "ioi", config.model, "none", "acdc"))
    assert "resumed" not in {f.code for f in result.flags}
    assert not saved.exists()


def test_a_sweep_goes_on_from_the_checkpoint_of_a_run_stopped_in_flight(tmp_path, monkeypatch):
    spec = SweepSpec(
        pruners=["none"],
        discoverers=["acdc"],
        seeds=[1],
        n_search=8,
        n_eval=8,
        out=str(tmp_path / "sweep"),
        checkpoint_every=0.0,
    )
    planned = plan(spec)
    (job,) = planned.jobs
    saved = checkpoint_path(job.path)
    with monkeypatch.context() as patch:
        _killed_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            execute(job.config, checkpoint=saved)
    assert saved.is_file()
    (row,) = plan_rows(planned, inspect(planned))
    assert row["action"] == "run (from its checkpoint, if of these settings)"
    summary = Sweep(planned, inspect(planned), _InProcess(), progress=False).run()
    assert [r.status for r in summary.records] == ["done"]
    result = load_result(job.path)
    assert "resumed" in {f.code for f in result.flags}
    assert not saved.exists()
    whole = execute(job.config)
    _same_work(result, whole, 1)
