"""Is the export a server loaded still on disk as it was when it started?

OpenVINO maps IR weights into memory from their files, so an export changed or deleted
under a running server can change its answers, or crash it. Like OpenVINO Model Server,
which reports a model whose files went away as unavailable, dq-serve then says so on
/healthz and answers requests with 503 (never an image from a broken model) until it is
restarted on a good export. Checking is a stat of each file: microseconds per request.
"""

from __future__ import annotations

import os
from pathlib import Path


class ExportWatch:
    """The size, modification time and inode of every file of an export, taken when the
    server starts, to compare with the files now."""

    def __init__(self, root: Path | None, files: dict):
        self.root = root
        self._seen = {rel: _fingerprint(Path(root) / rel) for rel in files}

    def problem(self) -> str | None:
        """What is wrong with the export on disk now, or None."""
        for rel, seen in self._seen.items():
            now = _fingerprint(Path(self.root) / rel)
            if now is None:
                return f"{rel} was removed from the export after the server loaded it"
            if now != seen:
                return f"{rel} changed on disk after the server loaded it"
        return None


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino
