"""One writer at a time: a lock file held for the length of a job.

flock(2) locks belong to the open file, so the kernel drops one when its holder exits,
however it exits (SIGKILL included): a killed export never leaves a lock that blocks the
next. The file holds the holder's pid, for the message the next one prints, and is removed
by its holder when the job is done.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def exclusive(path: Path, busy: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock at ``path`` for the block. When another process holds it,
    ``busy(its pid)`` is called first: it raises to give up, or returns to wait."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                busy(os.read(fd, 32).decode(errors="replace").strip() or "unknown")
            except BaseException:
                os.close(fd)
                raise
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _is_at(fd, path):
            break
        os.close(fd)  # the holder waited for removed the file as it finished: lock a new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while held: whoever opened this file retries
        os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    """True when the open file ``fd`` is still the file at ``path``."""
    try:
        here = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)
