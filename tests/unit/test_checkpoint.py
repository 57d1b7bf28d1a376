"""The checkpoint file: where it lives, what it holds, and what it refuses to resume."""

import json

import pytest

from appbench.checkpoint import Checkpoint, add_costs, checkpoint_path
from appbench.results import StageCost


def _cost(seconds=1.0, flops=10.0, rss=5, gpu=None):
    return StageCost(
        wall_seconds=seconds,
        forward_calls=2,
        prompt_passes=3.0,
        tokens=4.0,
        flops=flops,
        backward_prompt_passes=1.0,
        peak_rss_bytes=rss,
        peak_gpu_bytes=gpu,
    )


def test_the_file_sits_beside_the_result_and_is_no_result():
    from pathlib import Path

    path = checkpoint_path(Path("out/ioi/zoo-gt-ioi/none__acdc.json"))
    assert path == Path("out/ioi/zoo-gt-ioi/none__acdc.checkpoint")
    assert path.suffix != ".json"


def test_segments_add_up():
    both = add_costs(_cost(1.0, 10.0, 5, None), _cost(2.0, 30.0, 7, 9))
    assert (both.wall_seconds, both.flops, both.forward_calls) == (3.0, 40.0, 4)
    assert (both.prompt_passes, both.tokens, both.backward_prompt_passes) == (6.0, 8.0, 2.0)
    assert (both.peak_rss_bytes, both.peak_gpu_bytes) == (7, 9)


def test_a_saved_state_comes_back_with_the_cost_of_every_segment(tmp_path):
    path = tmp_path / "run.checkpoint"
    first = Checkpoint(path, {"tau": 0.01}, lambda: _cost(10.0, 100.0), every=0)
    assert first.load() is None
    first.save({"next": 3}, uncounted_flops=5.0)
    second = Checkpoint(path, {"tau": 0.01}, lambda: _cost(20.0, 200.0), every=0)
    assert second.load() == {"next": 3}
    assert second.segments == 1 and second.prior is not None
    assert (second.prior.wall_seconds, second.prior.flops) == (10.0, 105.0)
    second.save({"next": 7})
    third = Checkpoint(path, {"tau": 0.01}, lambda: _cost(), every=0)
    assert third.load() == {"next": 7}
    assert third.segments == 2 and third.prior is not None
    assert (third.prior.wall_seconds, third.prior.flops) == (30.0, 305.0)


def test_saves_wait_for_their_interval(tmp_path):
    rare = Checkpoint(tmp_path / "a", {}, _cost, every=3600)
    assert not rare.due()
    assert Checkpoint(tmp_path / "b", {}, _cost, every=0).due()
    assert not Checkpoint(None).due()


def test_without_a_file_nothing_is_loaded_or_saved(tmp_path):
    off = Checkpoint(None)
    assert not off.enabled and off.load() is None
    off.save({"x": 1})
    off.clear()
    assert off.saves == 0


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{not json", "unreadable"),
        (json.dumps({"format": 99}), "not an appbench checkpoint"),
        (json.dumps({"format": 1, "key": {}, "segments": 1}), "unreadable"),
    ],
)
def test_an_unreadable_checkpoint_is_said_and_not_resumed(tmp_path, content, said):
    path = tmp_path / "run.checkpoint"
    path.write_text(content)
    lines: list[str] = []
    assert Checkpoint(path, {}, _cost, lines.append).load() is None
    assert len(lines) == 1 and said in lines[0] and "discovering afresh" in lines[0]


def test_a_checkpoint_of_other_settings_names_them_and_is_not_resumed(tmp_path):
    path = tmp_path / "run.checkpoint"
    Checkpoint(path, {"tau": 0.01, "seed": 1}, _cost).save({"next": 3})
    lines: list[str] = []
    again = Checkpoint(path, {"tau": 0.02, "seed": 1}, _cost, lines.append)
    assert again.load() is None and again.prior is None
    assert lines == [
        f"warning: ignoring the checkpoint {path}: it is of other settings (tau); "
        "discovering afresh"
    ]


def test_fresh_ignores_the_checkpoint(tmp_path):
    path = tmp_path / "run.checkpoint"
    Checkpoint(path, {}, _cost).save({"next": 3})
    lines: list[str] = []
    assert Checkpoint(path, {}, _cost, lines.append, fresh=True).load() is None
    assert "(--fresh)" in lines[0]


def test_a_save_that_fails_is_a_warning(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    lines: list[str] = []
    saver = Checkpoint(blocker / "run.checkpoint", {}, _cost, lines.append)
    saver.save({"next": 1})
    assert saver.saves == 0 and lines and lines[0].startswith("warning: could not save")


@pytest.mark.parametrize("every", [-1.0, float("nan")])
def test_an_interval_that_cannot_mean_anything_is_refused(tmp_path, every):
    with pytest.raises(ValueError, match="non-negative"):
        Checkpoint(tmp_path / "x", {}, _cost, every=every)


def test_a_file_without_a_meter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="meter"):
        Checkpoint(tmp_path / "x", {})
