"""Test aids for the write guarantees: a first writer caught mid-job, a disk that fills up.

with paused_writer(command, output, env) as first:   # `first` holds output's lock, frozen
    ... a second writer on `output` must be refused, naming first.pid ...
# here `first` has been resumed and has finished cleanly

with tiny_disk(tmp_path / "disk", "128k") as disk:   # a real tmpfs (skips the test if none)
    ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from openrlaif.data.lock import lock_path


def holder_pid(output: Path) -> int | None:
    """The pid written into `output`'s lock file, if someone holds it and has said so."""
    try:
        return int(json.loads(lock_path(output).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def paused_writer(
    command: list[str], output: Path, env: dict[str, str], timeout: float = 120.0
) -> Iterator[subprocess.Popen[str]]:
    """Start `command` (a job that writes `output`), wait until it holds the output's lock and
    freeze it there (SIGSTOP). On leaving the block it is resumed and must finish cleanly."""
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while holder_pid(output) != first.pid:
            assert first.poll() is None, (
                f"the first writer ended before holding {output}: {first.communicate()}"
            )
            assert time.monotonic() < deadline, f"the first writer never took {lock_path(output)}"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        yield first
    except BaseException:
        first.kill()
        first.wait()
        raise
    first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]


@contextlib.contextmanager
def tiny_disk(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mount` (root only); the test is skipped where none can be mounted.
    `grow(mount, size)` frees space the way a user would, by making room."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def grow(mount: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def fsync_fails_for(match: Callable[[str], bool]) -> Callable[[int], None]:
    """An `os.fsync` that reports a full disk (ENOSPC) for files whose path `match`es, as a
    filesystem that runs out of space when the data is flushed (NFS, quotas) does."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if match(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    return fsync
