"""manifest.json: an archive's own description, enough to verify and restore it and to rebuild
the portal's catalog from the repository alone. Never holds a password."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT = "bankvault-archive"
FORMAT_VERSION = 1
NAME = "manifest.json"


class ManifestError(Exception):
    pass


def write(directory: Path, manifest: dict) -> str:
    """Write manifest.json atomically into ``directory``; return its sha256."""
    data = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
    tmp = directory / (NAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, directory / NAME)
    return hashlib.sha256(data).hexdigest()


def read(directory: Path) -> tuple[dict, str]:
    """(manifest, sha256 of the file) — raises ManifestError when absent or not ours."""
    path = directory / NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing: the archive is incomplete or not an archive") from None
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a bankvault manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ManifestError(f"{path} has format version {manifest['format_version']}; "
                            f"this bankvault reads up to {FORMAT_VERSION}")
    return manifest, hashlib.sha256(data).hexdigest()
