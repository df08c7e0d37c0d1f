"""One writer per output (data/lock.py): the primitive every writer, trainer and pipeline uses."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from writers import holder_pid

from openrlaif.data.lock import lock_path, one_writer
from openrlaif.errors import OutputBusyError

HOLD = """
import sys, time
from openrlaif.data.lock import one_writer

with one_writer(sys.argv[1]):
    time.sleep(600)
"""


def test_a_held_output_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(
    tmp_path: Path,
) -> None:
    out = tmp_path / "runs" / "x" / "labels.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)])
    try:
        deadline = time.monotonic() + 60
        while holder_pid(out) != holder.pid:
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(OutputBusyError) as err, one_writer(out):
            pass
        assert str(err.value).startswith(f"{out} is being written by pid {holder.pid} (python -c ")
        assert "one output takes one writer" in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # SIGKILL cleans nothing up...
    with one_writer(out):  # ...but the OS dropped the lock with its holder: the next job goes on
        assert holder_pid(out) is not None
    assert not lock_path(out).exists()  # and leaves the folder as it found it


def test_the_holding_thread_may_take_it_again_another_thread_may_not(tmp_path: Path) -> None:
    out = tmp_path / "model_dir"
    refused: list[str] = []

    def other_thread() -> None:
        try:
            with one_writer(out):
                pass
        except OutputBusyError as e:
            refused.append(str(e))

    with one_writer(out):
        with one_writer(out):  # a command holds it, and the job it runs takes it again
            pass
        assert lock_path(out).exists()  # still held after the inner release
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert refused and "another thread of this process" in refused[0]
    assert not lock_path(out).exists()
    with one_writer(out):  # free again
        pass
