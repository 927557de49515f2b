"""manifest.json: what an export holds, how it was made, and hashes to check it by.

The manifest is written last, into a folder that is renamed into place only when complete,
so a folder with a manifest is a finished export; the hashes catch later tampering.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dq_export.errors import UserError

MANIFEST = "manifest.json"
SCHEMA = "dq-export/manifest"
SCHEMA_VERSION = 2  # 2: one OpenVINO UNet for all timestep groups
REQUIRED = ("model", "recipe", "image", "scheduler", "components", "files")  # what loading reads
CHUNK = 16 * 1024 * 1024


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def export_files(root: Path) -> list[Path]:
    """Every file under ``root`` except the manifest: what the manifest lists."""
    return [path for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST]


def file_entries(root: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} for every file of the export."""
    return {path.relative_to(root).as_posix(): {"bytes": path.stat().st_size,
                                                "sha256": sha256(path)}
            for path in export_files(root)}


def write_manifest(root: Path, body: dict) -> dict:
    manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **body,
                "files": file_entries(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(root: Path, verify: bool = True) -> dict:
    """Load and check a manifest; every problem is a one-line UserError."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is not a dq-export folder: no {MANIFEST} "
                        "(export one with dq-export --out DIR)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): re-export") from None
    if manifest.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a dq-export manifest: re-export")
    version = manifest.get("schema_version", 0)
    if version > SCHEMA_VERSION:
        raise UserError(f"{path} has schema version {version}, newer than "
                        f"this dq-export reads ({SCHEMA_VERSION}): upgrade dq-export")
    if version < SCHEMA_VERSION:
        raise UserError(f"{path} has schema version {version}, older than this dq-export "
                        f"reads ({SCHEMA_VERSION}): re-export with this version")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (edited by hand?): re-export")
    if verify:
        verify_files(Path(root), manifest["files"])
    return manifest


def ir_files(root: Path, entry: dict) -> tuple[Path, Path]:
    """A component's OpenVINO graph and weights: ``<graph>.bin``, or the ``weights`` the
    entry names (the export's own UNet graph reads the weights GenAI's UNet graph reads)."""
    xml = Path(root) / entry["openvino"]
    return xml, Path(root) / entry["weights"] if "weights" in entry else xml.with_suffix(".bin")


def verify_files(root: Path, files: dict[str, dict]) -> None:
    """Every listed file is there with its hash, and no file is there unlisted: loaders read
    whole folders (a tokenizer reads any added_tokens.json), so an added file changes what
    is loaded as surely as an edited one."""
    for rel, entry in files.items():
        path = root / rel
        if not path.is_file():
            raise UserError(f"{path} is missing from the export: re-export or restore it")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise UserError(f"{path} does not match its manifest hash (modified or corrupt): "
                            "re-export or restore it")
    for path in export_files(root):
        if path.relative_to(root).as_posix() not in files:
            raise UserError(f"{path} is not in the export's manifest (added after the "
                            "export): remove it, or re-export")
