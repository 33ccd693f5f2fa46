"""Exports of the audit trail: exactly the matching events, a manifest that tells the truth, and
flat memory for a year of events."""

import csv
import hashlib
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

import audit
from audit import chain
from audit.exports import COLUMNS, Export, FilterError, Filters, export_to_file
from audit.models import AuditEvent

pytestmark = [pytest.mark.pg]
ROOT = Path(__file__).resolve().parents[2]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def trail(db):
    """A small trail: three actors, several actions and outcomes, and two targets."""
    audit.record("alice", "backup.run.succeeded", ("backups.backuprun", 1, "run 1"))
    audit.record("alice", "backup.run.failed", ("backups.backuprun", 2, "run 2"), outcome="failure",
                 details={"error": 'disk full, "quoted", newline\nand comma'})
    audit.record("bob", "restore.request.approved_by", ("recovery.restorerequest", 7, "request 7"))
    audit.record("bob", "restore.request.approved", ("recovery.restorerequest", 7, "request 7"))
    audit.record("anonymous:mallory", "auth.login.failed", ("auth.user", "", "=cmd|' /C calc'!A0"),
                 outcome="failure", details={"username": "=cmd|' /C calc'!A0"})
    audit.record("carol", "restore.approval.denied", ("recovery.restorerequest", 7, "request 7"), outcome="denied",
                 details={"reason": "own request", "nested": {"ünï": ["cødé", 1]}})
    audit.record("alice", "config.database.changed", ("backups.database", 3, "auth"),
                 details={"changes": {"host": ["a", "b"]}})
    return list(AuditEvent.objects.order_by("sequence"))


def csv_rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def run_export(filters, fmt="csv", chunk_rows=2):
    exp = Export(filters, fmt, chunk_rows=chunk_rows)
    data = b"".join(exp)
    return exp, data


@pytest.mark.parametrize("filters,expected", [
    ({}, [1, 2, 3, 4, 5, 6, 7]),
    ({"actor": "alice"}, [1, 2, 7]),
    ({"action": "restore.request.*"}, [3, 4]),
    ({"action": "restore.*"}, [3, 4, 6]),
    ({"action": "restore.request.approved"}, [4]),
    ({"outcome": "failure"}, [2, 5]),
    ({"target_type": "recovery.restorerequest", "target_id": "7"}, [3, 4, 6]),
    ({"target_id": "7"}, [3, 4, 6]),
    ({"actor": "alice", "outcome": "success"}, [1, 7]),
    ({"actor": "nobody"}, []),
])
def test_csv_export_holds_exactly_the_matching_events(trail, filters, expected):
    exp, data = run_export(Filters.parse(**filters))
    rows = csv_rows(data)
    assert [int(r["sequence"]) for r in rows] == expected
    assert data.decode().splitlines()[0].split(",") == COLUMNS
    assert exp.count == len(expected)
    assert (exp.first_sequence, exp.last_sequence) == ((expected[0], expected[-1]) if expected else (None, None))


def test_period_filter_uses_created_at(trail):
    cut = trail[3].created_at
    exp, data = run_export(Filters(start=cut))
    assert [int(r["sequence"]) for r in csv_rows(data)] == [4, 5, 6, 7]
    exp, data = run_export(Filters(end=cut))
    assert [int(r["sequence"]) for r in csv_rows(data)] == [1, 2, 3]


def test_a_date_means_the_whole_day_and_the_to_day_is_included(settings):
    settings.TIME_ZONE = "Europe/Berlin"
    from django.utils import timezone

    with timezone.override("Europe/Berlin"):
        f = Filters.parse(start="2026-11-01", end="2026-11-30")
    assert f.start.isoformat() == "2026-11-01T00:00:00+01:00"
    assert f.end.isoformat() == "2026-12-01T00:00:00+01:00"
    exact = Filters.parse(start="2026-11-01T08:00:00+00:00", end="2026-11-01 09:30")
    assert exact.start.isoformat() == "2026-11-01T08:00:00+00:00"
    assert exact.end.hour == 9 and exact.end.minute == 30


@pytest.mark.parametrize("kwargs,message", [
    ({"start": "yesterday"}, "not a date"),
    ({"start": "2026-11-30", "end": "2026-11-01"}, "ends before it starts"),
    ({"outcome": "maybe"}, "use one of success"),
    ({"action": "restore request"}, "prefix ending in .*"),
    ({"action": "restore.*.approved"}, "prefix ending in .*"),
])
def test_bad_filters_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(FilterError, match=message):
        Filters.parse(**kwargs)


def test_csv_keeps_the_stored_values_exactly(trail):
    """An export is evidence: quotes, newlines, non-ASCII and even formula-like text survive as stored."""
    _, data = run_export(Filters())
    rows = {int(r["sequence"]): r for r in csv_rows(data)}
    assert json.loads(rows[2]["details"]) == {"error": 'disk full, "quoted", newline\nand comma'}
    assert rows[5]["target_label"] == "=cmd|' /C calc'!A0"
    assert json.loads(rows[6]["details"])["nested"] == {"ünï": ["cødé", 1]}
    assert rows[1]["created_at"] == trail[0].created_at.astimezone(UTC).isoformat(timespec="microseconds")


def test_jsonl_rows_carry_what_it_takes_to_recompute_every_hash(trail):
    """Whoever receives an export can check each event against its own hash without the portal."""
    _, data = run_export(Filters(), "jsonl")
    lines = data.decode().splitlines()
    assert len(lines) == 7
    prev = chain.GENESIS
    for line in lines:
        row = json.loads(line)
        assert list(row) == COLUMNS
        assert row["prev_hash"] == prev
        values = {**row, "created_at": datetime.fromisoformat(row["created_at"])}
        assert chain.link(row["prev_hash"], values) == row["hash"]
        prev = row["hash"]


def test_export_is_bounded_by_the_chain_head_it_names(trail):
    exp = Export(Filters(), "csv", chunk_rows=2)
    chunks = iter(exp)
    first = next(chunks)
    audit.record("late", "backup.run.queued", None)  # arrives while the file is being written
    data = first + b"".join(chunks)
    assert exp.head == (7, trail[-1].hash)
    assert [int(r["sequence"]) for r in csv_rows(data)] == [1, 2, 3, 4, 5, 6, 7]
    assert exp.manifest()["chain_head"] == {"sequence": 7, "hash": trail[-1].hash}


def test_export_to_file_writes_a_manifest_that_tells_the_truth(trail, tmp_path):
    path = tmp_path / "november.csv"
    manifest = export_to_file(Filters.parse(actor="alice"), "csv", path, "cli:test")
    on_disk = json.loads((tmp_path / "november.csv.manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["count"] == 3 == len(csv_rows(path.read_bytes()))
    assert (manifest["first_sequence"], manifest["last_sequence"]) == (1, 7)
    assert manifest["chain_head"] == {"sequence": 7, "hash": trail[-1].hash}
    assert manifest["sha256"] == sha256_of(path)
    assert manifest["bytes"] == path.stat().st_size
    assert manifest["filters"]["actor"] == "alice" and manifest["complete"] is True
    assert datetime.fromisoformat(manifest["generated_at"])
    assert not list(tmp_path.glob(".*partial"))

    event = AuditEvent.objects.get(action="audit.exported")
    assert event.actor_label == "cli:test" and event.outcome == "success"
    assert event.details["count"] == 3 and event.details["sha256"] == manifest["sha256"]
    assert event.details["filters"]["actor"] == "alice"
    assert chain.verify() == (8, [])


def test_manage_py_audit_export_writes_file_and_manifest(trail, tmp_path):
    path = tmp_path / "out.jsonl"
    err = StringIO()
    call_command("audit", "export", "--from", "2000-01-01", "--to", "2999-12-31", "--action", "restore.*",
                 "--format", "jsonl", "--output", str(path), stdout=StringIO(), stderr=err)
    manifest = json.loads(Path(f"{path}.manifest.json").read_text())
    assert [json.loads(line)["sequence"] for line in path.read_text().splitlines()] == [3, 4, 6]
    assert manifest["sha256"] == sha256_of(path) and manifest["count"] == 3
    assert manifest["filters"]["action"] == "restore.*" and manifest["format"] == "jsonl"
    assert "3 events" in err.getvalue()
    event = AuditEvent.objects.get(action="audit.exported")
    assert event.actor_label.startswith("cli:") and event.details["format"] == "jsonl"


def test_manage_py_audit_export_to_stdout_puts_the_manifest_on_stderr(trail):
    out, err = StringIO(), StringIO()
    call_command("audit", "export", "--actor", "bob", "--output", "-", stdout=out, stderr=err)
    assert [int(r["sequence"]) for r in csv_rows(out.getvalue().encode())] == [3, 4]
    manifest = json.loads(err.getvalue())
    assert manifest["count"] == 2 and manifest["sha256"] == hashlib.sha256(out.getvalue().encode()).hexdigest()
    assert AuditEvent.objects.filter(action="audit.exported").count() == 1


def test_manage_py_audit_export_refuses_bad_input_and_records_nothing(trail, tmp_path):
    with pytest.raises(CommandError, match="not a date"):
        call_command("audit", "export", "--from", "last week", "--output", str(tmp_path / "x.csv"))
    with pytest.raises(CommandError, match="cannot write"):
        call_command("audit", "export", "--output", str(tmp_path / "missing" / "x.csv"), stderr=StringIO())
    assert not (tmp_path / "x.csv").exists()
    # the failed write is on the record, as incomplete
    assert list(AuditEvent.objects.filter(action="audit.exported").values_list("outcome", flat=True)) == ["failure"]


# Runs argv and reports its peak RSS. A child's ru_maxrss counts the memory of the process it was
# forked from (the kernel keeps the larger of the two across exec), so the export is started
# from this small process rather than from pytest, which holds a few hundred MB by then.
PEAK_RSS = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
print("peak-rss-kb", usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""

GENERATE = """
INSERT INTO audit_auditevent (sequence, created_at, actor_id, actor_label, action, outcome, target_type, target_id,
                              target_label, source_ip, user_agent, request_id, details, prev_hash, hash)
SELECT g, TIMESTAMPTZ '2026-11-01 00:00:00+00' + g * INTERVAL '2 seconds', NULL,
       'user' || (g %% 50), (ARRAY['backup.run.queued', 'backup.run.started', 'backup.run.succeeded',
                                  'restore.request.approved', 'auth.login.succeeded', 'config.database.changed'])
                           [1 + g %% 6],
       CASE WHEN g %% 97 = 0 THEN 'failure' ELSE 'success' END, 'backups.backuprun', (g %% 1000)::text,
       'run ' || (g %% 1000), '10.0.0.1', 'bench', md5(g::text), jsonb_build_object('n', g, 'database', 'auth'),
       'p' || g, 'h' || g
FROM generate_series(1, %s) g
"""


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_million_events_export_to_csv_in_flat_memory(portal_env, tmp_path):
    n = 1_000_000
    t0 = time.monotonic()
    with connection.cursor() as cur:
        cur.execute(GENERATE, [n])
        cur.execute("ANALYZE audit_auditevent")
    generated = time.monotonic() - t0

    out = tmp_path / "year.csv"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "manage.py", "audit", "export",
                           "--from", "2026-11-01", "--to", "2026-11-30", "--format", "csv", "--output", str(out)],
                          cwd=ROOT, env=portal_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    exported = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stderr.rsplit("peak-rss-kb ", 1)[1]) / 1024
    print(f"generated {n} events in {generated:.1f} s; exported in {exported:.1f} s, peak RSS {peak_mb:.0f} MB")

    lines, digest = 0, hashlib.sha256()
    with open(out, "rb") as f:
        header = f.readline()
        digest.update(header)
        for line in f:
            digest.update(line)
            lines += 1
    assert header.decode().rstrip("\n").split(",") == COLUMNS
    assert lines == n
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["count"] == n and (manifest["first_sequence"], manifest["last_sequence"]) == (1, n)
    assert manifest["chain_head"] == {"sequence": n, "hash": f"h{n}"}
    assert manifest["sha256"] == digest.hexdigest()
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"
    assert AuditEvent.objects.filter(action="audit.exported", sequence=n + 1).exists()
    assert timedelta(seconds=exported) < timedelta(seconds=60)
