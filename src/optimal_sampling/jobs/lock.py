"""One job per output file: an exclusive lock on `<output>.lock`, held for the whole job.

Two runs appending to one journal would splice each other's lines and lose records, so the
process that owns an output (a single-process run, the data-parallel launcher, torchrun rank 0,
`score`) takes `fcntl.flock(LOCK_EX | LOCK_NB)` on a lock file beside it before it inspects or
touches anything, and a second run is refused at once with one line naming the holder's pid.

Invariants:
- The kernel releases a flock when its holder exits in any way (kill -9 included), so a lock
  file left behind by a crash is stale, never blocking: the next run simply takes it.
- The holder removes the lock file when it is done. A run that opened the file just before its
  removal would then hold a lock on an unlinked inode, so after taking the lock a run checks
  that the path still names the inode it locked, and starts over when it does not.
- Data-parallel workers write only their own shards and never take the lock: their launcher
  holds it for them, for as long as any of them runs.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..errors import UsageError

LOCK_SUFFIX = ".lock"


def lock_path_of(target: Path) -> Path:
    return target.with_name(target.name + LOCK_SUFFIX)


class OutputLock:
    """`with OutputLock(target):` holds the job's lock on `target` (a file that may not exist yet)."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target).expanduser()
        self.path = lock_path_of(self.target)
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise UsageError(self._busy_message()) from None
                raise
            if self._still_linked(fd):
                self._write_pid(fd)
                self.fd = fd
            else:  # the previous holder removed the file between our open and our lock
                os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can hold the old inode
        finally:
            os.close(self.fd)
            self.fd = None

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _write_pid(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _busy_message(self) -> str:
        try:
            pid = self.path.read_text(encoding="utf-8").strip()
        except OSError:
            pid = ""
        holder = f"process {pid}" if pid.isdigit() else "another process"
        return (
            f"{self.target} is being written by another optimal-sampling run ({holder}, lock {self.path}); "
            "wait for it to finish, or use another output"
        )
