"""Exports of the audit trail for compliance: the events matching a filter as CSV or JSONL,
streamed from a server-side cursor (a year of events exports in flat memory), with a manifest
that says what the file holds and how to check it.

Rows come in chain order (ascending sequence) and carry every field the chain hashes, plus
prev_hash and hash, so whoever receives an export can recompute each event's hash
(audit.chain.link) without access to the portal. Values are written as stored: the export is
evidence, not a spreadsheet (the human-facing CSV reports in monitoring.reports neutralise
formula-like cells; this file must not, or the hashes would no longer match).

The manifest names the chain head (sequence and hash) at export time, and the export is bounded
by it: events appended while the file is written are not in it, so "every matching event up
to #N" is exactly true.

This module belongs to the audit app and imports nothing of the other apps.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from . import chain

COLUMNS = ["sequence", "created_at", "actor_label", "actor_id", "action", "outcome", "target_type", "target_id",
           "target_label", "source_ip", "user_agent", "request_id", "details", "prev_hash", "hash"]
FORMATS = ("csv", "jsonl")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}
OUTCOMES = ("success", "failure", "denied")
CHUNK_ROWS = 2000  # rows per server-side cursor fetch and per written chunk
ACTION_RE = re.compile(r"^[A-Za-z0-9_.:-]+(\.\*)?$")


class FilterError(ValueError):
    """A filter value that cannot be used; the message says why, in words for the person typing it."""


def parse_bound(text: str | date | datetime | None, *, end: bool = False) -> datetime | None:
    """A period bound from user input. A date means its whole day in TIME_ZONE: as a start, its
    first instant; as an end, the first instant of the next day (the day is included). A date and
    time is taken as is (naive = TIME_ZONE); as an end it is exclusive."""
    if text in (None, ""):
        return None
    if isinstance(text, datetime):
        value = text
    elif isinstance(text, date):
        value = datetime.combine(text + timedelta(days=1) if end else text, time.min)
    else:
        text = text.strip()
        day = parse_date(text) if len(text) == 10 else None
        if day is not None:
            value = datetime.combine(day + timedelta(days=1) if end else day, time.min)
        else:
            try:
                value = parse_datetime(text.replace(" ", "T", 1))
            except ValueError:
                value = None
            if value is None:
                raise FilterError(f"{text!r} is not a date (2026-11-30) or a date and time (2026-11-30T14:00)")
    if timezone.is_naive(value):
        value = timezone.make_aware(value)
    return value


@dataclass(frozen=True)
class Filters:
    """Which events: a period on created_at [start, end), an actor (actor_label, exact), an action
    (exact, or a prefix written "restore.request.*"), an outcome, a target (type and/or id)."""

    start: datetime | None = None
    end: datetime | None = None
    actor: str = ""
    action: str = ""
    outcome: str = ""
    target_type: str = ""
    target_id: str = ""

    def __post_init__(self):
        if self.start and self.end and self.end <= self.start:
            raise FilterError("the period ends before it starts")
        if self.action and not ACTION_RE.match(self.action):
            raise FilterError(f"action {self.action!r}: use a dotted action (backup.run.failed) or a prefix "
                              "ending in .* (restore.request.*)")
        if self.outcome and self.outcome not in OUTCOMES:
            raise FilterError(f"outcome {self.outcome!r}: use one of {', '.join(OUTCOMES)}")

    @classmethod
    def parse(cls, *, start=None, end=None, actor="", action="", outcome="", target_type="", target_id=""):
        """From user input (command options, query parameters)."""
        return cls(start=parse_bound(start), end=parse_bound(end, end=True), actor=(actor or "").strip(),
                   action=(action or "").strip(), outcome=(outcome or "").strip(),
                   target_type=(target_type or "").strip(), target_id=(target_id or "").strip())

    def apply(self, qs):
        if self.start:
            qs = qs.filter(created_at__gte=self.start)
        if self.end:
            qs = qs.filter(created_at__lt=self.end)
        if self.actor:
            qs = qs.filter(actor_label=self.actor)
        if self.action.endswith(".*"):
            qs = qs.filter(action__startswith=self.action[:-1])
        elif self.action:
            qs = qs.filter(action=self.action)
        if self.outcome:
            qs = qs.filter(outcome=self.outcome)
        if self.target_type:
            qs = qs.filter(target_type=self.target_type)
        if self.target_id:
            qs = qs.filter(target_id=self.target_id)
        return qs

    def queryset(self):
        from .models import AuditEvent

        return self.apply(AuditEvent.objects.all())

    def as_dict(self) -> dict:
        """JSON-able, for manifests and the audit event that records the export."""
        out = {"from": self.start.isoformat() if self.start else None,
               "to": self.end.isoformat() if self.end else None}
        out.update({k: getattr(self, k) or None for k in ("actor", "action", "outcome", "target_type", "target_id")})
        return out

    def describe(self) -> str:
        parts = []
        for name in ("actor", "action", "outcome", "target_type", "target_id"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')} {getattr(self, name)}")
        return ", ".join(parts) or "all events"


def row_values(row: tuple) -> dict:
    """One values_list() row (COLUMNS order) as plain JSON types, created_at in UTC with the
    microseconds the database stores: the exact text audit.chain hashes."""
    values = dict(zip(COLUMNS, row))
    values["created_at"] = values["created_at"].astimezone(UTC).isoformat(timespec="microseconds")
    return values


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return str(value)


@dataclass
class Export:
    """One export: iterate it for the file's bytes (chunk by chunk), then read manifest().

    The chain head is read when the export is created and bounds it. Iterating twice is an
    error: the counts and the sha256 describe one pass.
    """

    filters: Filters
    fmt: str = "csv"
    chunk_rows: int = CHUNK_ROWS
    head: tuple[int, str] = field(default=(0, chain.GENESIS))
    generated_at: datetime | None = None
    count: int = 0
    bytes: int = 0
    first_sequence: int | None = None
    last_sequence: int | None = None
    complete: bool = False
    _sha: object = field(default_factory=hashlib.sha256, repr=False)
    _started: bool = False

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise FilterError(f"format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        self.head = chain.head()
        self.generated_at = timezone.now()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def queryset(self):
        return self.filters.queryset().filter(sequence__lte=self.head[0]).order_by("sequence")

    def _encode(self, text: str) -> bytes:
        data = text.encode()
        self._sha.update(data)
        self.bytes += len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("an export is iterated once")
        self._started = True
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n") if self.fmt == "csv" else None
        if writer:
            writer.writerow(COLUMNS)
        rows = self.queryset().values_list(*COLUMNS)
        # A transaction makes the server-side cursor a plain one: without it Django declares it
        # WITH HOLD, and PostgreSQL materialises the whole result before the first row comes.
        with transaction.atomic():
            pending = 0
            for row in rows.iterator(chunk_size=self.chunk_rows):
                values = row_values(row)
                if writer:
                    writer.writerow([_csv_cell(values[c]) for c in COLUMNS])
                else:
                    buf.write(json.dumps(values, ensure_ascii=False, separators=(",", ":")))
                    buf.write("\n")
                if self.first_sequence is None:
                    self.first_sequence = values["sequence"]
                self.last_sequence = values["sequence"]
                self.count += 1
                pending += 1
                if pending >= self.chunk_rows:
                    yield self._encode(buf.getvalue())
                    buf.seek(0)
                    buf.truncate()
                    pending = 0
        if buf.tell():
            yield self._encode(buf.getvalue())
        self.complete = True

    def write_to(self, fileobj) -> dict:
        """Write every chunk to a binary file object; returns the manifest."""
        for chunk in self:
            fileobj.write(chunk)
        return self.manifest()

    def manifest(self, output: str | None = None) -> dict:
        return {
            "kind": "bankvault audit export",
            "format": self.fmt,
            "columns": COLUMNS,
            "filters": self.filters.as_dict(),
            "count": self.count,
            "first_sequence": self.first_sequence,
            "last_sequence": self.last_sequence,
            "chain_head": {"sequence": self.head[0], "hash": self.head[1]},
            "sha256": self.sha256,
            "bytes": self.bytes,
            "complete": self.complete,
            "generated_at": self.generated_at.astimezone(UTC).isoformat(),
            "file": output,
            "how_to_check": "sha256 of the file equals sha256; every row's hash = "
                            "sha256(prev_hash + '\\n' + canonical(row)) as in audit.chain",
        }

    def record(self, actor, *, request=None, output: str | None = None):
        """The export is itself an audit event (a privileged read)."""
        from .recorder import record

        return record(actor, "audit.exported", None, outcome="success" if self.complete else "failure",
                      request=request,
                      details={"filters": self.filters.as_dict(), "format": self.fmt, "count": self.count,
                               "sha256": self.sha256, "bytes": self.bytes, "complete": self.complete,
                               "first_sequence": self.first_sequence, "last_sequence": self.last_sequence,
                               "head_sequence": self.head[0], "output": output})


def export_to_file(filters: Filters, fmt: str, path: str | Path, actor, *, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Write PATH and PATH.manifest.json, each atomically (a temporary name, fsync, rename), and
    record the export. Returns the manifest."""
    path = Path(path)
    exp = Export(filters, fmt, chunk_rows=chunk_rows)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            exp.write_to(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        exp.record(actor, output=str(path))  # complete=False: the attempt is on the record
        raise
    manifest = exp.manifest(output=str(path))
    write_manifest(manifest, manifest_path(path))
    exp.record(actor, output=str(path))
    return manifest


def manifest_path(path: str | Path) -> Path:
    return Path(f"{path}.manifest.json")


def write_manifest(manifest: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
