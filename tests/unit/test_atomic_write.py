"""A process killed (SIGKILL) while it saves a result leaves the earlier result whole; the
next save removes the orphaned temporary file. Two processes saving at once each write a
temporary file of their own."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from appbench.results import remove_orphans, write_atomically

KILLED_WHILE_SAVING = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from appbench import results

    def stall(src, dst):  # the new file is written and synced; stop before the rename
        print("saving", flush=True)
        time.sleep(60)

    results.os.replace = stall
    results.write_atomically(Path(sys.argv[1]), '{"new": true, "pad": "' + "x" * 16384 + '"}')
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_kill_during_the_save_keeps_the_earlier_result(tmp_path):
    path = tmp_path / "none__actpatch.json"
    write_atomically(path, json.dumps({"earlier": True}))
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_SAVING, str(path)], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "saving"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"earlier": True}
    [orphan] = list(tmp_path.glob(".none__actpatch.json.*.tmp"))
    assert orphan.stat().st_size > 16384  # the whole new text, never renamed
    write_atomically(path, json.dumps({"later": True}))
    assert json.loads(path.read_text()) == {"later": True}
    assert list(tmp_path.iterdir()) == [path]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    path = tmp_path / "r.json"
    mine = tmp_path / f".r.json.{os.getpid()}.abc.tmp"
    mine.write_text("in progress")
    old_style = tmp_path / "r.json.tmp"  # appbench before 0.4: one fixed name
    old_style.write_text("{")
    assert remove_orphans(path) == [old_style]
    assert mine.exists()


def test_concurrent_saves_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "r.json"
    script = "import sys; from pathlib import Path; from appbench.results import write_atomically\n"
    script += "[write_atomically(Path(sys.argv[1]), sys.argv[2] * 20000) for _ in range(30)]"
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(path), letter]) for letter in "ab"
    ]
    started = time.time()
    assert all(child.wait(timeout=120) == 0 for child in children), time.time() - started
    assert path.read_text() in ("a" * 20000, "b" * 20000)
    assert list(tmp_path.iterdir()) == [path]
