"""An export folder appears whole or not at all, written by one export at a time.

As a package manager installs: everything is written into a hidden sibling,
``.NAME.partial-PID``, renamed to ``--out`` once its manifest is in it, under a lock on
``--out`` (``.NAME.lock``, see ``dq_export.lock``). So a reader never finds half an export
at ``--out``; a second export to the same ``--out`` fails at once instead of racing the
first; and the next export to take the lock removes what a killed one left behind.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from dq_export.errors import UserError
from dq_export.filesystem import bytes_under, disk_full_error, is_disk_full, make_folder
from dq_export.lock import exclusive

log = logging.getLogger(__name__)


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """The folder to write the export into, renamed to ``out`` when the block succeeds and
    removed when it fails; a full disk becomes a one-line UserError."""
    out = Path(out)
    make_folder(out.parent, "--out")

    def busy(holder: str) -> None:
        raise UserError(f"another dq-export (pid {holder}) is writing {out}: wait for it to "
                        "finish, or choose another --out")

    with ExitStack() as stack:
        try:
            stack.enter_context(exclusive(out.parent / f".{out.name}.lock", busy))
            remove_leftovers(out)
            check_out(out, force)
            partial = out.parent / f".{out.name}.partial-{os.getpid()}"
            partial.mkdir()
        except OSError as e:
            raise UserError(f"cannot write {out} ({e.strerror}): choose another --out") from None
        try:
            yield partial
            _replace(partial, out)
        except BaseException as error:
            full = None
            if is_disk_full(error, partial):
                full = disk_full_error(out.parent, bytes_under(partial), "export", "--out",
                                       "nothing was kept")
            shutil.rmtree(partial, ignore_errors=True)
            if full is not None:
                raise full from error
            raise


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder: choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty: pass --force to replace it, or choose "
                        "another folder")


def remove_leftovers(out: Path) -> None:
    """Remove what killed exports to ``out`` left: their partial folders, and the old export
    a killed ``--force`` run had moved aside to replace. Called under the lock, so no live
    export is writing any of it."""
    name = glob.escape(out.name)
    leftovers = sorted(out.parent.glob(f".{name}.partial-*")) + \
        sorted(out.parent.glob(f".{name}.old-*"))
    for path in leftovers:
        shutil.rmtree(path)
    if leftovers:
        log.warning("removed %s: left by an export to %s that was killed",
                    ", ".join(p.name for p in leftovers), out)


def _replace(partial: Path, out: Path) -> None:
    """Move the finished export into place; an old ``--force``d folder goes only after that."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
