"""One writer per output: an OS lock on a sidecar file, taken before a job writes anything.

`one_writer(path)` holds an exclusive, non-blocking `flock` on `<path>.lock` for as long as the
job writes `path` (a file, or a folder such as a trainer's `output_dir` or a pipeline's run
directory). A second job that asks for the same output is refused at once, with one line that
names the holder (pid, host, command, written into the lock file). The OS drops the lock when
its holder dies, however it dies, so a killed job never leaves a lock that blocks the next run;
the lock file itself is removed on release, so outputs folders hold only outputs.

Within one process the lock is re-entrant for the thread that holds it: a command takes it
before loading a model (so a refusal comes before minutes of work) and the job it runs takes it
again around the writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from openrlaif.errors import OutputBusyError

LOCK_SUFFIX = ".lock"


@dataclass
class _Held:
    fd: int
    thread: int
    depth: int = 1


_held: dict[Path, _Held] = {}  # lock file -> this process's hold on it
_held_guard = threading.Lock()


def lock_path(path: str | Path) -> Path:
    """The sidecar lock file of an output: `<path>.lock`, beside it (a folder's is outside it)."""
    path = Path(path).resolve()
    return path.with_name(path.name + LOCK_SUFFIX)


def _command() -> str:
    """This process's command line as a person would recognise it, cut to 120 characters."""
    argv = list(sys.argv) or [""]
    if "openrlaif" in argv[0]:  # the console script, or `python -m openrlaif.cli`
        program = "openrlaif"
    elif argv[0] in ("", "-c"):
        program = f"python {argv[0]}".strip()
    else:
        program = Path(argv[0]).name
    text = " ".join([program, *argv[1:]])
    return text if len(text) <= 120 else text[:117] + "..."


def _holder_text(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file (best effort: it may not have yet)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        where = "" if info["host"] == socket.gethostname() else f" on {info['host']}"
        return f"pid {info['pid']}{where} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _busy(path: Path, holder: str) -> OutputBusyError:
    return OutputBusyError(
        f"{path} is being written by {holder}; one output takes one writer: wait for that job to "
        "finish (or stop it), or write somewhere else"
    )


def _acquire(path: Path, lock_file: Path) -> int:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise _busy(path, holder) from None
        # A holder that was releasing may have removed the file between our open and our lock:
        # then we hold a lock on a file nobody else can see, and must start again.
        try:
            current = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(), "since": time.time()}
    with contextlib.suppress(OSError):  # naming the holder is a courtesy (a full disk may refuse it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    return fd


def _release(lock_file: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_file)  # while still holding it: the next writer starts on a fresh file
    os.close(fd)


@contextlib.contextmanager
def one_writer(path: str | Path) -> Iterator[None]:
    """Hold the only right to write `path` until the block ends; OutputBusyError if another
    process (or another thread of this one) holds it."""
    path = Path(path)
    lock_file = lock_path(path)
    with _held_guard:
        held = _held.get(lock_file)
        if held is not None:
            if held.thread != threading.get_ident():
                raise _busy(path, f"another thread of this process (pid {os.getpid()})")
            held.depth += 1
        else:
            held = _held[lock_file] = _Held(_acquire(path, lock_file), threading.get_ident())
    try:
        yield
    finally:
        with _held_guard:
            held.depth -= 1
            if held.depth == 0:
                del _held[lock_file]
                _release(lock_file, held.fd)
