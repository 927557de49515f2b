"""Two OpenVINO IR graphs over one weights file, so weights are on disk once.

An IR's ``.xml`` names each constant by an offset and size in its ``.bin``. A graph whose
constants another graph already stores (GenAI's form of the UNet, the feature cache's
shallow UNet) can point into that graph's ``.bin`` instead of a copy: its offsets are
rewritten to where the same bytes lie there, the few constants it alone has are appended
(the other graph reads only its own offsets), and its own ``.bin`` is deleted. Read it with
``core.read_model(xml, shared_bin)``.
"""

from __future__ import annotations

import hashlib
import mmap
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def _constants(xml: Path):
    """(element, offset, size) of every constant stored in the graph's weights file."""
    tree = ElementTree.parse(xml)
    found = []
    for layer in tree.getroot().iter("layer"):
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None and data.get("offset") is not None:
            found.append((data, int(data.get("offset")), int(data.get("size"))))
    return tree, found


def _digest(buffer, offset: int, size: int) -> bytes:
    return hashlib.blake2b(buffer[offset:offset + size], digest_size=20).digest()


def share_weights(xml: Path, other_xml: Path, shared_bin: Path) -> dict[str, int]:
    """Make ``xml`` read its constants from ``shared_bin`` (``other_xml``'s weights) and
    delete its own ``.bin``; return how many bytes were shared and appended."""
    own_bin = xml.with_suffix(".bin")
    _, theirs = _constants(other_xml)
    tree, ours = _constants(xml)
    with open(shared_bin, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        where = {(_digest(m, off, size), size): off for _, off, size in theirs}
    shared = appended = 0
    with open(own_bin, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as own, \
            open(shared_bin, "ab") as out:
        end = out.tell()
        for data, off, size in ours:
            key = (_digest(own, off, size), size)
            if key not in where:  # a constant only this graph has
                out.write(own[off:off + size])
                where[key], end = end, end + size
                appended += size
            else:
                shared += size
            data.set("offset", str(where[key]))
    tree.write(xml, encoding="utf-8", xml_declaration=True)
    own_bin.unlink()
    return {"shared_bytes": shared, "appended_bytes": appended}
