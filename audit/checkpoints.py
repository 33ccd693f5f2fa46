"""Checkpoints: the chain head {sequence, hash, time} written where the portal's database cannot
rewrite it — an append-only file in the backup repository (and S3 where configured). A rewrite
of the whole audit table produces a consistent chain again, but not these heads."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import chain


def location() -> Path:
    configured = getattr(settings, "AUDIT_CHECKPOINT_FILE", "")
    return Path(configured) if configured else Path(settings.BANKVAULT_REPOSITORY) / "audit" / "checkpoints.jsonl"


def write() -> dict:
    """Append the current head; fsynced before it counts."""
    sequence, head = chain.head()
    entry = {"sequence": sequence, "hash": head, "time": timezone.now().isoformat(), "host": socket.gethostname()}
    path = location()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return {**entry, "location": str(path)}


def read() -> list[dict]:
    path = location()
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
                out.append({**entry, "location": f"{path}:{n}"})
            except ValueError:
                out.append({"sequence": -1, "hash": "", "time": "?", "location": f"{path}:{n} (unreadable)"})
    return [c for c in out if c["sequence"] > 0]
