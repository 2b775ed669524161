"""One run_agent.py job at a time writes into a run directory.

Two jobs started into one ``--out`` (or a ``--resume`` of a run still going) interleaved their
episodes.jsonl and mixed their files. The job holds an advisory lock (``flock``) on
``.run.lock`` in the run directory for as long as it runs; the system frees it when the process
ends however it ends (Ctrl-C, SIGTERM, ``kill -9``), so a lock is never left stale. The file
also says who holds it (pid, host), for the message a second job gets.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from rl_mtd.errors import RlMtdError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".run.lock"


class RunLock:
    """The lock of one run directory, taken by ``take`` and freed by ``release`` (or the end of
    a ``with`` block)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: Path | None = None
        self.made = False

    def take(self, run_dir: Path, resume: bool = False) -> None:
        """Lock ``run_dir`` (made if missing) or refuse, naming the job that holds it."""
        if fcntl is None or self.fd is not None:
            return
        self.made = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RlMtdError(_held_message(path, run_dir, resume)) from None
            try:  # the file we locked is still the one at the path (a releasing job unlinks it)
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self.fd, self.path = fd, path

    def release(self) -> None:
        """Unlock; a directory the lock made is removed again if the job left it empty (Ctrl-C
        while the baseline trained)."""
        if self.fd is None or self.path is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: a waiting job re-checks the inode
        os.close(self.fd)
        if self.made:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only if empty
        self.fd = self.path = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _held_message(path: Path, run_dir: Path, resume: bool) -> str:
    try:
        holder = json.loads(path.read_text())
        who = f"process {int(holder['pid'])} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a job that is starting"
    then = (
        f"wait for it to end (or stop it), then --resume {run_dir} again"
        if resume
        else "wait for it to end, or pass another --out"
    )
    return f"{run_dir} is in use by another run_agent.py job ({who}); {then}"
