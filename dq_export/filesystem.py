"""Where the commands write: files replaced whole or not at all, and the operating system's
refusals (an impossible or unwritable path, a full disk) as one-line UserErrors.

The commands check their output folders before any heavy work, so a bad ``--out`` costs
a second, not a model load and a calibration.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dq_export.errors import UserError

LOW_DISK_BYTES = 512 * 2**20  # below this, a failed write is taken as a full disk
DISK_FULL = ("No space left on device", "Disk quota exceeded")  # as Rust and C++ report them


def make_folder(path: Path, flag: str) -> Path:
    """Create ``path`` (and its parents) unless it exists, and write a file there to be sure
    it takes one (permission bits do not say so for root, a read-only mount or /proc); a
    UserError names ``flag``, the option that sets the path."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} exists and is not a folder: give {flag} another path")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dq-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {path} ({e.strerror}): give {flag} a folder you "
                        "can write to") from None
    return path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write, renamed over ``path`` only when the block
    succeeds and removed when it fails: a reader finds the old file or the new one, never
    part of one (a kill or a full disk mid-write leaves at most a stray ``.tmp``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """True when ``error`` came from a full disk (or quota) while writing under ``folder``.

    Python says so with an errno, safetensors in its message; OpenVINO and ONNX report a
    full disk as a bare I/O error (``basic_ios::clear``), so for those the disk is asked."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
        return False
    if any(text in str(error) for text in DISK_FULL):
        return True
    folder = Path(folder)
    return (isinstance(error, (OSError, RuntimeError)) and folder.exists()
            and shutil.disk_usage(folder).free < LOW_DISK_BYTES)


def disk_full_error(where: Path, written: int, what: str, flag: str, kept: str) -> UserError:
    """The one message for a full disk, whichever stage hit it: ``written`` bytes of
    ``what`` (the export, the calibration cache), the flag that moves it, what was kept."""
    return UserError(f"the disk holding {where} filled up after {written / 1e9:.1f} GB of "
                     f"the {what} were written: free space or pass {flag} on a larger disk "
                     f"({kept})")


def bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
