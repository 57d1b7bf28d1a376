"""Checkpoints of a long discovery, so that an interrupted run goes on where it stopped.

ACDC on a 135M-parameter model takes hours on a CPU: longer than a session, and a sweep stopped
with Ctrl-C or SIGTERM loses the runs in flight. A discoverer that supports checkpoints saves
its progress through ``ctx.checkpoint`` now and then (at most every ``every`` seconds); the
runner keeps the file beside the result (:func:`checkpoint_path`) and removes it once the
result is written. The next run of the same settings loads it and goes on, and the runner adds
the cost of the earlier segments to the discovery stage and flags the result ``resumed``: the
times are summed over segments that may have run under different loads.

A checkpoint of other settings (parameters, search split, search space, appbench version) is
never resumed: it is left aside with a warning and replaced by this run's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appbench.results import StageCost, write_atomically

#: Seconds between two saves by default: a save is cheap, but not free for a large state.
DEFAULT_EVERY = 60.0
#: Version of the file's layout.
FORMAT = 1


def checkpoint_path(result: Path) -> Path:
    """Where the checkpoint of the run whose result goes to ``result`` lives: beside it, with
    a suffix no result reader takes for a result (``none__acdc.json`` -> ``none__acdc.checkpoint``)."""
    return result.with_suffix(".checkpoint")


def add_costs(a: StageCost, b: StageCost) -> StageCost:
    """Two segments of one stage as one: counters and times summed, peaks the larger."""
    gpu = [p for p in (a.peak_gpu_bytes, b.peak_gpu_bytes) if p is not None]
    return StageCost(
        wall_seconds=a.wall_seconds + b.wall_seconds,
        forward_calls=a.forward_calls + b.forward_calls,
        prompt_passes=a.prompt_passes + b.prompt_passes,
        tokens=a.tokens + b.tokens,
        flops=a.flops + b.flops,
        backward_prompt_passes=a.backward_prompt_passes + b.backward_prompt_passes,
        peak_rss_bytes=max(a.peak_rss_bytes, b.peak_rss_bytes),
        peak_gpu_bytes=max(gpu) if gpu else None,
    )


class Checkpoint:
    """A discoverer's handle on its run's checkpoint (``ctx.checkpoint``).

    A discoverer calls :meth:`load` once at the start (its saved state, or None) and, at
    points where its state is whole, :meth:`save` when :meth:`due`. Without a file (a run that
    writes no result, e.g. ``execute`` alone) loading finds nothing and saving does nothing.

    Args:
        path: the checkpoint file, or None for none.
        key: the settings a checkpoint must share to be resumed (JSON-serialisable).
        cost_so_far: the discovery stage's cost in this segment up to now (the runner's meter).
        log: where warnings and progress go.
        every: seconds between saves.
        fresh: ignore (and replace) a checkpoint found at ``path``.
    """

    def __init__(
        self,
        path: Path | None,
        key: dict[str, Any] | None = None,
        cost_so_far: Callable[[], StageCost] | None = None,
        log: Callable[[str], None] = lambda line: None,
        every: float = DEFAULT_EVERY,
        fresh: bool = False,
    ) -> None:
        if every < 0 or every != every:
            raise ValueError(f"checkpoint interval must be a non-negative number, got {every}")
        if path is not None and cost_so_far is None:
            raise ValueError("a checkpoint file needs the stage's meter (cost_so_far)")
        self.path, self.key, self.every, self.fresh = path, key or {}, every, fresh
        self._cost_so_far = cost_so_far
        self._log = log
        self._last = time.monotonic()
        #: The cost of the earlier segments, once a checkpoint was loaded.
        self.prior: StageCost | None = None
        #: How many earlier segments the loaded checkpoint holds.
        self.segments = 0
        #: Saves done in this segment.
        self.saves = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> Any:
        """The state the last segment saved, or None (no file, ``fresh``, other settings, or an
        unreadable file: each but the first said in a warning line)."""
        if self.path is None or not self.path.exists():
            return None
        if self.fresh:
            self._log(f"ignoring the checkpoint {self.path} (--fresh): discovering afresh")
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("not an appbench checkpoint of this format")
            prior = StageCost.model_validate(data["cost"])
            segments = int(data["segments"])
            state = data["state"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._log(
                f"warning: ignoring the checkpoint {self.path}: unreadable ({exc}); "
                "discovering afresh"
            )
            return None
        if data.get("key") != self.key:
            found = data.get("key")
            theirs: dict[str, Any] = found if isinstance(found, dict) else {}
            differ = sorted(k for k in {*self.key, *theirs} if theirs.get(k) != self.key.get(k))
            self._log(
                f"warning: ignoring the checkpoint {self.path}: it is of other settings "
                f"({', '.join(differ)}); discovering afresh"
            )
            return None
        self.prior, self.segments = prior, segments
        self._log(
            f"resuming from the checkpoint {self.path}: {segments} earlier segment(s), "
            f"{prior.wall_seconds:.0f} s, {prior.flops / 1e9:.1f} GFLOP"
        )
        return state

    def due(self) -> bool:
        """Whether a save now would be the first in ``every`` seconds."""
        return self.path is not None and time.monotonic() - self._last >= self.every

    def save(self, state: Any, uncounted_flops: float = 0.0) -> None:
        """Write ``state`` (JSON-serialisable) with the cost so far, atomically. A save that
        fails (disk full, folder gone) is a warning: the run goes on without it.

        ``uncounted_flops``: FLOPs of this segment that the runner's meter has not seen yet
        (work outside the model's modules that the discoverer reports at its end)."""
        if self.path is None:
            return
        assert self._cost_so_far is not None  # checked in __init__
        now = self._cost_so_far()
        now = now.model_copy(update={"flops": now.flops + uncounted_flops})
        cost = now if self.prior is None else add_costs(self.prior, now)
        text = json.dumps(
            {
                "format": FORMAT,
                "key": self.key,
                "segments": self.segments + 1,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "cost": cost.model_dump(mode="json"),
                "state": state,
            }
        )
        try:
            write_atomically(self.path, text)
        except OSError as exc:
            self._log(f"warning: could not save the checkpoint {self.path}: {exc}")
            return
        self._last = time.monotonic()
        self.saves += 1

    def clear(self) -> None:
        """Remove the file (the result is written: nothing is left to resume)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
