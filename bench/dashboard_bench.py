"""Dashboard speed with a large history: the overview, a database's page and the lists behind them
over 100,000 runs, 20,000 archives and 1,000,000 audit events, and their SQL query counts with a
small history and a large one.

    .venv/bin/python bench/dashboard_bench.py [--runs 100000] [--archives 20000] [--events 1000000]
                                              [--requests 200] [--strict]

Everything it needs it starts itself (the portal's catalog cluster, a listener standing in for the
backed-up databases) and removes at the end. See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # as a script, sys.path[0] is bench/, not the project root

# The portal set-up (catalog + what the pages need outside a test run), the actors and actions of
# the audit trail and the table printer are the audit benchmark's, so the benchmarks agree.
from audit_bench import ACTIONS, ACTORS, percentile, print_table, start_portal  # noqa: E402

from backups.engine.cluster import LocalCluster  # noqa: E402  (needs the path above)

TARGET_MS = 150  # p95 of the overview and the database pages
SPAN = timedelta(days=730)  # the history: two years, ending now
SMALL_RUNS = 10  # the small history: the newest runs only
WARMUP = 5
PAGE_SECONDS = 60  # a page this slow stops after a minute of timed requests (the count is shown)
# (label, url, who, held to the target). Operators use the dashboard; only auditors read the trail.
PAGES = [
    ("overview", "/", "operator", True),
    ("database", "/databases/auth/", "operator", True),
    ("database, 90 days", "/databases/auth/?days=90", "operator", True),
    ("database, no WAL", "/databases/account/", "operator", True),  # no restore windows to compute
    ("runs", "/runs/", "operator", False),
    ("archives", "/archives/", "operator", False),
    ("health", "/health/", "operator", False),
    ("audit log", "/audit/", "auditor", False),
    ("restores", "/restores/", "operator", False),
]
SLOW_QUERY_MS = 20  # a query this slow gets its plan printed (so do the suspects of a page over the target)


class ConnectionCounter:
    """Listens where the registered databases claim to be. Every connection a page opens to them
    is counted (and closed at once), so a page that talks to a backed-up database shows up in the
    results instead of hiding in the timings of an unreachable host."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


# -- seeding --------------------------------------------------------------------------------------------
# Row g of each history (1 = oldest, total = newest) has its time at start + g * step and, for runs,
# archives, drills and check results, the id g: the small history is the newest rows, the bulk
# fills in everything older, and ids keep the order of time either way.
RUNS_SQL = """
INSERT INTO backups_backuprun (id, database_id, policy_id, kind, trigger, state, requested_by_id, requested_by_label,
                               queued_at, started_at, finished_at, bytes, worker, error, error_detail,
                               progress_done, progress_total, progress_item)
SELECT g, CASE WHEN odd THEN %(auth)s ELSE %(account)s END,
       CASE WHEN manual THEN NULL WHEN base THEN %(auth_base)s WHEN odd THEN %(auth_hourly)s
            ELSE %(account_hourly)s END,
       CASE WHEN base THEN 'base' ELSE 'logical' END,
       CASE WHEN manual THEN 'manual' ELSE 'scheduled' END,
       state, CASE WHEN manual THEN %(operator)s END, CASE WHEN manual THEN 'olga' ELSE 'system:beat' END,
       t, t + INTERVAL '5 seconds',
       CASE WHEN state = 'running' THEN NULL
            WHEN state = 'failed' THEN t + (5 + g %% 30) * INTERVAL '1 second'
            WHEN base THEN t + (905 + g %% 300) * INTERVAL '1 second'
            ELSE t + (65 + g %% 240) * INTERVAL '1 second' END,
       CASE WHEN state <> 'succeeded' THEN 0 ELSE size END,
       'celery@worker' || (1 + g %% 2),
       CASE WHEN state = 'failed' THEN 'pg_dump: error: connection to server at "10.20.0.5", port 5432 failed: '
                                       || 'timeout expired' ELSE '' END,
       '',
       CASE WHEN state = 'running' THEN size / 3 ELSE size END, size,
       CASE WHEN state = 'running' THEN 'public.ledger_entries' ELSE '' END
FROM (SELECT g, g %% 2 = 1 AS odd, g %% 8 = 1 AS base, g %% 50 = 25 AS manual,
             %(start)s + g * %(step)s AS t,
             CASE WHEN g %% 8 = 1 THEN 8000000000 + g * 20000
                  WHEN g %% 2 = 1 THEN 1200000000 + g * 5000 ELSE 300000000 + g * 1000 END AS size,
             CASE WHEN g = %(total)s THEN 'running'
                  WHEN g < %(total)s AND g >= %(total)s - %(archives)s * %(k)s AND (%(total)s - 1 - g) %% %(k)s = 0
                       THEN 'succeeded'
                  WHEN g %% 37 = 0 THEN 'failed' ELSE 'succeeded' END AS state
      FROM generate_series(%(lo)s, %(hi)s) g) s
"""
# Every k-th run (counting down from the newest finished one) kept its archive: the newest gets the
# highest archive id. About one archive in a thousand failed its last verification.
ARCHIVES_SQL = """
INSERT INTO backups_archive (id, run_id, database_id, kind, state, path, started_at, finished_at, bytes,
                             server_version, compression, manifest_sha256, verified_at, verify_error,
                             timeline, start_lsn, stop_lsn, created_at)
SELECT %(archives)s - (%(total)s - 1 - r.id) / %(k)s, r.id, r.database_id, r.kind,
       CASE WHEN r.id %% 997 = 0 THEN 'corrupt' ELSE 'complete' END,
       'archives/' || d.name || '/' || to_char(r.started_at AT TIME ZONE 'UTC', 'YYYYMMDD_HH24MISS') || '_'
           || r.kind || '_r' || r.id,
       r.started_at, r.finished_at, r.bytes, '15.20', 'zstd', md5(r.id::text) || md5('manifest' || r.id),
       r.finished_at + INTERVAL '3 minutes',
       CASE WHEN r.id %% 997 = 0 THEN 'sha256 of dump.pgdump.zst does not match the manifest' ELSE '' END,
       CASE WHEN r.kind = 'base' THEN 1 END,
       CASE WHEN r.kind = 'base' THEN upper(to_hex(r.id)) || '/2000028' ELSE '' END,
       CASE WHEN r.kind = 'base' THEN upper(to_hex(r.id)) || '/2000138' ELSE '' END,
       r.finished_at
FROM backups_backuprun r JOIN backups_database d ON d.id = r.database_id
WHERE r.id BETWEEN %(lo)s AND %(hi)s AND r.id < %(total)s AND r.id >= %(total)s - %(archives)s * %(k)s
      AND (%(total)s - 1 - r.id) %% %(k)s = 0
"""
# A logical archive holds the dump and the globals; a base backup its tar.
FILES_SQL = """
INSERT INTO backups_archivefile (archive_id, path, role, bytes, sha256)
SELECT a.id, CASE WHEN a.kind = 'base' THEN 'base.tar.zst' ELSE 'dump.pgdump.zst' END,
       CASE WHEN a.kind = 'base' THEN 'base' ELSE 'dump' END, a.bytes - 20000, md5(a.path) || md5(a.path || 'f')
FROM backups_archive a WHERE a.run_id BETWEEN %(lo)s AND %(hi)s
UNION ALL
SELECT a.id, 'globals.sql.zst', 'globals', 20000, md5(a.path || 'g') || md5(a.path || 'h')
FROM backups_archive a WHERE a.run_id BETWEEN %(lo)s AND %(hi)s AND a.kind = 'logical'
"""
DRILLS_SQL = """
INSERT INTO monitoring_drill (id, database_id, kind, archive_id, target_time, state, started_at, finished_at,
                              rto_seconds, tables_verified, error, progress_done, progress_total, progress_item)
SELECT g, CASE WHEN g %% 2 = 1 THEN %(auth)s ELSE %(account)s END, 'archive', NULL, NULL,
       CASE WHEN g %% 13 = 0 THEN 'failed' ELSE 'succeeded' END, t, t + (300 + g %% 200) * INTERVAL '1 second',
       CASE WHEN g %% 13 = 0 THEN NULL ELSE 300 + g %% 200 END, CASE WHEN g %% 13 = 0 THEN 0 ELSE 42 END,
       CASE WHEN g %% 13 = 0 THEN 'pg_restore: error: could not create scratch cluster: no space left on device'
            ELSE '' END, 42, 42, ''
FROM (SELECT g, %(start)s + g * %(step)s AS t FROM generate_series(%(lo)s, %(hi)s) g) s
"""
CHECKS_SQL = """
INSERT INTO monitoring_checkresult (id, name, target, status, summary, details, checked_at)
SELECT g, (ARRAY['connectivity', 'connectivity', 'freshness', 'freshness', 'wal', 'disk'])[1 + g %% 6],
       (ARRAY['auth', 'account', 'auth/hourly', 'account/hourly', 'auth', ''])[1 + g %% 6],
       CASE WHEN g %% 101 = 0 THEN 'failing' WHEN g %% 47 = 0 THEN 'warning' ELSE 'ok' END,
       CASE WHEN g %% 101 = 0 THEN 'the check failed (generated)' ELSE 'all good (generated)' END,
       jsonb_build_object('n', g), %(start)s + g * %(step)s
FROM generate_series(%(lo)s, %(hi)s) g
"""


def required_unnamed(model, named: list[str]) -> list[tuple[str, object]]:
    """The columns of a model's table that need a value (NOT NULL, no default in the database) but
    are not in `named`, each with its model field's default: the schema grows (a new column on
    Archive, say) while the SQL here stays put."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                    "AND is_nullable = 'NO' AND column_default IS NULL AND is_identity = 'NO'", [model._meta.db_table])
        required = {r[0] for r in cur.fetchall()}
    fields = {f.column: f for f in model._meta.concrete_fields}
    return [(c, fields[c].get_default()) for c in sorted(required - set(named))]


def with_defaults(sql: str, model, params: dict) -> tuple[str, dict]:
    """An INSERT ... SELECT of the templates above, completed with required_unnamed(). Each
    template's outer select lists end where a line starts with FROM."""
    from django.db import connection

    head, _, tail = sql.partition("(")
    named = [c.strip() for c in tail.split(")", 1)[0].split(",")]
    extra = required_unnamed(model, named)
    if not extra:
        return sql, params
    fields = {f.column: f for f in model._meta.concrete_fields}
    cols = "".join(f", {c}" for c, _ in extra)
    vals = "".join(f", %(fill_{c})s" for c, _ in extra)
    sql = head + "(" + tail.replace(")", cols + ")", 1)
    params = {**params, **{f"fill_{c}": fields[c].get_db_prep_save(v, connection) for c, v in extra}}
    return sql.replace("\nFROM ", vals + "\nFROM "), params


class History:
    """The sizes of the history and where each part of it lies in time."""

    def __init__(self, runs: int, archives: int, ids: dict):
        self.end = datetime.now(UTC)
        self.start = self.end - SPAN
        self.runs, self.archives = runs, archives
        self.k = runs // archives  # one run in k kept its archive
        self.drills = max(2, runs // 500)  # about two a week over two years, at the default size
        self.checks = max(20, runs // 2)
        self.ids = ids

    def params(self, total: int, lo: int, hi: int) -> dict:
        return {**self.ids, "total": total, "lo": lo, "hi": hi, "start": self.start, "step": SPAN / total,
                "archives": self.archives, "k": self.k}

    def seed(self, newest: bool) -> None:
        """newest=True: the small history (the newest few rows of each kind); False: all the rest."""
        from django.db import connection

        def part(total: int, small: int) -> tuple[int, int]:
            return (total - small + 1, total) if newest else (1, total - small)

        from backups.models import Archive, ArchiveFile, BackupRun
        from monitoring.models import CheckResult, Drill

        runs = self.params(self.runs, *part(self.runs, SMALL_RUNS))
        with connection.cursor() as cur:
            for sql, model, params in ((RUNS_SQL, BackupRun, runs), (ARCHIVES_SQL, Archive, runs),
                                       (FILES_SQL, ArchiveFile, runs),
                                       (DRILLS_SQL, Drill, self.params(self.drills, *part(self.drills, 2))),
                                       (CHECKS_SQL, CheckResult, self.params(self.checks, *part(self.checks, 20)))):
                cur.execute(*with_defaults(sql, model, params))
            for table in ("backups_backuprun", "backups_archive", "monitoring_drill", "monitoring_checkresult"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                            f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)")


def seed_config(port: int) -> tuple[dict, dict]:
    """Users, the two databases (said to listen on `port`) with their policies and the current
    check states: what does not grow with time. Returns (users by persona, ids for the seeding SQL)."""
    from django.contrib.auth.models import Group, User
    from django_celery_beat.models import CrontabSchedule

    from backups.models import BackupPolicy, Database
    from monitoring.models import CheckState

    def make_user(username: str, role: str) -> User:  # as tests/conftest.py make_user
        user = User.objects.create_user(username, email=f"{username}@bank.example",
                                        password="bench-password-123", is_staff=True)
        user.groups.add(Group.objects.get(name=role))
        return user

    users = {"operator": make_user("olga", "operator"), "auditor": make_user("audrey", "auditor")}
    hourly, _ = CrontabSchedule.objects.get_or_create(minute="0", hour="*", day_of_week="*", day_of_month="*",
                                                      month_of_year="*")
    nightly, _ = CrontabSchedule.objects.get_or_create(minute="0", hour="2", day_of_week="*", day_of_month="*",
                                                       month_of_year="*")
    dbs = {}
    for name, wal_mode in (("auth", "archive"), ("account", "none")):
        db = Database(name=name, host="127.0.0.1", port=port, dbname=name, user="bankvault",
                      wal_mode=wal_mode, last_size_bytes=3_000_000_000 if name == "auth" else 900_000_000)
        db.set_password("never-used-here")
        db.save()
        dbs[name] = db
    policies = {
        "auth_hourly": BackupPolicy(database=dbs["auth"], name="hourly", schedule=hourly, rpo_minutes=120, drill=True),
        "auth_base": BackupPolicy(database=dbs["auth"], name="nightly-base", kind="base", schedule=nightly),
        "account_hourly": BackupPolicy(database=dbs["account"], name="hourly", schedule=hourly, rpo_minutes=120),
    }
    for p in policies.values():
        p.save()
    now = datetime.now(UTC)
    states = [("connectivity", "auth", "ok", "auth answers (2.1 ms)"),
              ("connectivity", "account", "ok", "account answers (1.8 ms)"),
              ("freshness", "auth/hourly", "ok", "newest good backup 20 min ago"),
              ("freshness", "auth/nightly-base", "ok", "newest good backup 9 h ago"),
              ("freshness", "account/hourly", "warning", "newest good backup 95 min ago"),
              ("wal", "auth", "ok", "archiving; last segment 40 s ago, no gaps"),
              ("disk", "", "ok", "61% used, about 300 days until full"),
              ("workers", "", "ok", "1 worker answers"),
              ("beat-heartbeat", "", "ok", "beat alive")]
    CheckState.objects.bulk_create([CheckState(name=n, target=t, status=s, summary=m, since=now - timedelta(days=3),
                                               checked_at=now) for n, t, s, m in states])
    ids = {"auth": dbs["auth"].pk, "account": dbs["account"].pk, "operator": users["operator"].pk,
           **{k: p.pk for k, p in policies.items()}}
    return users, ids


def seed_restores(operator) -> None:
    """A few finished restore requests and an open one (after the small history: they name its archives)."""
    from backups.models import Archive, Database
    from recovery.models import RestoreRequest

    now = datetime.now(UTC)
    auth, account = Database.objects.get(name="auth"), Database.objects.get(name="account")
    archive = Archive.objects.filter(database=auth, kind="logical").order_by("-id").first()
    for i, state in enumerate(["succeeded", "succeeded", "rejected", "expired", "failed"]):
        at = now - timedelta(days=30 * (i + 1))
        RestoreRequest(kind="archive" if archive else "pitr", mode="copy", requester=operator,
                       reason=f"incident drill {i} (generated)", database=auth, archive=archive,
                       target_time=None if archive else at, new_name=f"auth_copy_{i}",
                       items=[{"database": auth.pk, "name": "auth", "archive": archive.pk if archive else None}],
                       state=state, created_at=at, decided_at=at + timedelta(minutes=20),
                       started_at=at + timedelta(minutes=21) if state in ("succeeded", "failed") else None,
                       finished_at=at + timedelta(minutes=40) if state in ("succeeded", "failed") else None).save()
    RestoreRequest(kind="pitr", mode="copy", requester=operator, reason="a customer's ledger question (generated)",
                   database=account, target_time=now - timedelta(hours=5), new_name="account_at_0900",
                   items=[{"database": account.pk, "name": "account"}], state="pending", created_at=now).save()


def seed_events(n: int, end: datetime) -> tuple[float, float]:
    """n audit events over the two years up to `end`, appended to the chain as audit.chain.append
    would (sequence, prev_hash and hash all correct; hashed by chain.link itself) and streamed in with
    COPY, so PostgreSQL inserts on one core while Python hashes on the other. Returns the seconds
    of hashing + COPY, and of rebuilding the table's indexes.

    They follow the few events the small history wrote, which are newer in time: a trail imported
    after the fact. Only a period filter of the audit log pages in time order, and none is measured."""
    from django.db import connection

    from audit import chain
    from audit.models import AuditEvent

    t0 = time.perf_counter()
    rebuild = drop_indexes("audit_auditevent")
    seq, prev = chain.head()
    rng = random.Random(7)
    # ~50 actors, busiest first (a power law, as in audit_bench); the rest cycles.
    actors = [ACTORS[int(rng.random() ** 2.5 * len(ACTORS))] for _ in range(997)]
    targets = [("backups.backuprun", "run {} of auth (succeeded)"), ("backups.database", "auth"),
               ("recovery.restorerequest", "restore request {} (archive, copy, auth)"), ("auth.user", "user{}")]
    start = end - SPAN
    step_us = SPAN / timedelta(microseconds=1) / n
    cols = ["sequence", "created_at", "actor_id", "actor_label", "action", "outcome", "target_type", "target_id",
            "target_label", "source_ip", "user_agent", "request_id", "details", "prev_hash", "hash"]
    extra = required_unnamed(AuditEvent, cols)  # columns added since, with their defaults
    extra_hashed = {c: v for c, v in extra if c in chain.FIELDS}
    extra_text = "".join("\t" + ("\\N" if v is None else json.dumps(v) if isinstance(v, (dict, list))
                                  else "t" if v is True else "f" if v is False else str(v)) for _, v in extra)
    connection.ensure_connection()
    # Text COPY: every value below is built here without tabs, newlines or backslashes.
    copy_sql = f"COPY audit_auditevent ({', '.join(cols + [c for c, _ in extra])}) FROM STDIN"
    with connection.connection.cursor() as cur, cur.copy(copy_sql) as copy:
        lines = []
        for g in range(1, n + 1):
            seq += 1
            target_type, label = targets[g % 4]
            target_id = str(g % 5000 + 1)
            values = {
                "sequence": seq, "created_at": start + timedelta(microseconds=int(g * step_us)), "actor_id": None,
                "actor_label": actors[g % 997], "action": ACTIONS[(g * 7 + g // 13) % len(ACTIONS)],
                "outcome": "failure" if g % 53 == 0 else "denied" if g % 211 == 0 else "success",
                "target_type": target_type, "target_id": target_id, "target_label": label.format(target_id),
                "source_ip": None if g % 3 == 0 else f"10.1.{g % 250}.{g % 200}", "user_agent": "bankvault-bench",
                "request_id": f"{g:032x}", "details": {"database": "auth" if g % 2 else "account", "n": g},
                **extra_hashed,
            }
            digest = chain.link(prev, values)
            lines.append("\t".join((
                str(seq), values["created_at"].isoformat(timespec="microseconds"), "\\N", values["actor_label"],
                values["action"], values["outcome"], target_type, target_id, values["target_label"],
                values["source_ip"] or "\\N", values["user_agent"], values["request_id"],
                json.dumps(values["details"]), prev, digest)) + extra_text)
            prev = digest
            if len(lines) == 10_000:
                copy.write("\n".join(lines) + "\n")
                lines.clear()
        if lines:
            copy.write("\n".join(lines) + "\n")
    t_copy = time.perf_counter() - t0
    t0 = time.perf_counter()
    rebuild()
    return t_copy, time.perf_counter() - t0


def drop_indexes(table: str):
    """Drop a table's indexes and unique constraints (not its primary key) and return what puts
    them back as they were. A million rows COPY in twice as fast without them (five of them are on
    random hashes), and building them afterwards costs less than what that saves."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = %s::regclass AND contype = 'u'", [table])
        constraints = cur.fetchall()
        cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s AND indexname NOT IN "
                    "(SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass)", [table, table])
        indexes = cur.fetchall()
        for name, _ in constraints:
            cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _ in indexes:
            cur.execute(f'DROP INDEX "{name}"')

    def rebuild():
        with connection.cursor() as cur:
            for name, definition in constraints:
                cur.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
            for _, definition in indexes:
                cur.execute(definition)

    return rebuild


def check_chain(first: int, n: int = 2000) -> tuple[int, int]:
    """Re-hash the events where the seeded ones join the chain and the newest ones (a full
    `manage.py audit verify` of a million events takes longer than this whole benchmark).
    Returns (events checked, mismatches)."""
    from audit import chain
    from audit.models import AuditEvent

    head = chain.head()[0]
    checked = bad = 0
    for lo in (max(1, first - n // 2), max(1, head - n)):
        rows = list(AuditEvent.objects.filter(sequence__gte=lo, sequence__lte=lo + n).order_by("sequence")
                    .values("prev_hash", "hash", *chain.FIELDS))
        for before, row in zip([None, *rows], rows, strict=False):
            checked += 1
            broken = before is not None and row["prev_hash"] != before["hash"]
            bad += broken or chain.link(row["prev_hash"], row) != row["hash"]
    return checked, bad


# -- measuring ------------------------------------------------------------------------------------------
def get_ok(client, url: str):
    response = client.get(url)
    if response.status_code != 200:
        raise SystemExit(f"GET {url} answered {response.status_code}: {response.content[:300]!r}")
    return response


def count_queries(client, url: str) -> tuple[int, list[dict]]:
    """The SQL of one GET of a warm page: (count, [{sql, params, text, ms, rows}] in the order the
    queries ran; rows = rows a SELECT returned). CaptureQueriesContext counts them (with
    BEGIN/COMMIT, as Django does); its times are whole milliseconds, so each query is also timed here."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    timed = []

    def timer(execute, sql, params, many, context):
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            ms = round((time.perf_counter() - t0) * 1000, 3)
            cursor = context["cursor"]
            text = connection.ops.last_executed_query(cursor, sql, params)  # parameters in place
            rows = max(cursor.rowcount, 0) if sql.lstrip().upper().startswith("SELECT") else 0
            timed.append({"sql": sql, "params": params, "text": text, "ms": ms, "rows": rows})

    for _ in range(WARMUP):
        get_ok(client, url)
    with CaptureQueriesContext(connection) as captured, connection.execute_wrapper(timer):
        get_ok(client, url)
    return len(captured), timed


def time_page(client, url: str, requests: int) -> dict:
    """Timed GETs, with the full (generation 2) garbage collections that ran during them: a page
    that builds many objects pays for them again in the tail of its latencies."""
    samples, full = [], {"n": 0, "ms": 0.0, "t0": 0.0}

    def on_gc(phase, info):
        if info["generation"] == 2:
            if phase == "start":
                full["t0"] = time.perf_counter()
            else:
                full["n"] += 1
                full["ms"] += (time.perf_counter() - full["t0"]) * 1000

    t_end = time.perf_counter() + PAGE_SECONDS
    gc.callbacks.append(on_gc)
    try:
        for _ in range(requests):
            t0 = time.perf_counter()
            get_ok(client, url)
            samples.append((time.perf_counter() - t0) * 1000)
            if t0 > t_end:
                break
    finally:
        gc.callbacks.remove(on_gc)
    return {"requests": len(samples), "p50_ms": round(statistics.median(samples), 2),
            "p95_ms": round(percentile(samples, 95), 2), "max_ms": round(max(samples), 2),
            "full_gcs": full["n"], "full_gc_ms": round(full["ms"], 1)}


def explain(sql: str, params) -> str:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        return "\n".join(r[0] for r in cur.fetchall())


def short_sql(sql: str) -> str:
    """The query without its long list of selected columns (subqueries among them included)."""
    depth = 0
    for i, ch in enumerate(sql):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and sql.startswith(" FROM ", i):
            head, rest = sql[:i], sql[i:]
            if head.startswith("SELECT ") and len(head) > 80:
                head = "SELECT …"
            return head + rest
    return sql


def clients(users: dict) -> dict:
    from django.test import Client

    out = {}
    for who, user in users.items():
        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(user)
        out[who] = client
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000, help="backup runs over two years, two databases")
    parser.add_argument("--archives", type=int, default=20_000, help="archives, each of a run (1 to 2 files each)")
    parser.add_argument("--events", type=int, default=1_000_000, help="audit events, hash-chained")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per page")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args()
    if args.runs < 2 * SMALL_RUNS or not 1 <= args.archives <= args.runs // 2 or args.events < 1 or args.requests < 1:
        parser.error(f"--runs must be at least {2 * SMALL_RUNS}, --archives between 1 and runs/2, "
                     "--events and --requests at least 1")

    # A plain `kill` ends the run through the finally below, like Ctrl-C, so nothing is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bv-dash-bench-"))
    clusters: list[LocalCluster] = []
    counter = ConnectionCounter()
    try:
        os.environ["DEBUG"] = "false"  # as in production: no query log, no debug pages
        # The catalog's data is worth nothing after the run: fsync off (the pages only read).
        clusters.append(LocalCluster.create(throwaway=True))
        start_portal(clusters[0], scratch)
        from django.db import connection

        with connection.cursor() as cur:
            cur.execute("SELECT current_setting('server_version'), current_setting('shared_buffers')")
            pg_version, shared_buffers = cur.fetchone()
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor() or "?")
        header = {"cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "postgresql": pg_version,
                  "shared_buffers": shared_buffers, "runs": args.runs, "archives": args.archives,
                  "events": args.events, "requests": args.requests, "loadavg_before": os.getloadavg()}
        print(f"""
bankvault dashboard benchmark
  machine     {header['cores']} cores ({cpu}), Linux {header['kernel']}, load {header['loadavg_before'][0]:.2f}
  catalog     PostgreSQL {pg_version}, shared_buffers {shared_buffers}, fsync off (the pages only read)
  history     {args.runs:,} runs over two years (two databases), {args.archives:,} archives with their files,
              {args.events:,} hash-chained audit events, drills, check results; small history first:
              the newest {SMALL_RUNS} runs
  pages       Django's test Client in this process (the whole middleware stack and the templates),
              DEBUG off; {WARMUP} untimed GETs, one GET with its queries captured, then {args.requests} timed
""", flush=True)

        users, ids = seed_config(counter.port)
        history = History(args.runs, args.archives, ids)
        history.seed(newest=True)
        seed_restores(users["operator"])
        with connection.cursor() as cur:
            cur.execute("ANALYZE")
        by_who = clients(users)
        small = {}
        print(f"small history ({SMALL_RUNS} runs): counting queries", flush=True)
        for _label, url, who, _held in PAGES:
            n_queries, queries = count_queries(by_who[who], url)
            small[url] = {"queries": n_queries, "rows": sum(q["rows"] for q in queries)}

        print(f"seeding {args.runs:,} runs, {args.archives:,} archives, {args.events:,} audit events ...", flush=True)
        t0 = time.perf_counter()
        history.seed(newest=False)
        t_rows = time.perf_counter() - t0
        from audit import chain

        first_seeded = chain.head()[0] + 1
        t_events, t_indexes = seed_events(args.events, history.end)
        t0 = time.perf_counter()
        with connection.cursor() as cur:
            cur.execute("VACUUM ANALYZE")  # as autovacuum would have left a two-year-old catalog
            cur.execute("SELECT (SELECT count(*) FROM backups_backuprun), (SELECT count(*) FROM backups_archive), "
                        "(SELECT count(*) FROM backups_archivefile), (SELECT count(*) FROM audit_auditevent), "
                        "(SELECT count(*) FROM monitoring_drill), (SELECT count(*) FROM monitoring_checkresult), "
                        "pg_database_size(current_database())")
            n_runs, n_archives, n_files, n_events, n_drills, n_checks, db_bytes = cur.fetchone()
        t_vacuum = time.perf_counter() - t0
        checked, bad = check_chain(first_seeded)
        seeding = {"rows_s": round(t_rows, 1), "events_s": round(t_events, 1), "indexes_s": round(t_indexes, 1),
                   "vacuum_analyze_s": round(t_vacuum, 1),
                   "runs": n_runs, "archives": n_archives, "archive_files": n_files, "events": n_events,
                   "drills": n_drills, "check_results": n_checks, "catalog_bytes": db_bytes,
                   "chain_checked": checked, "chain_mismatches": bad}
        print(f"  {n_runs:,} runs, {n_archives:,} archives ({n_files:,} files), {n_drills:,} drills, "
              f"{n_checks:,} check results: {t_rows:.1f} s\n"
              f"  {n_events:,} audit events in the table; {args.events:,} hashed with chain.link and COPied in "
              f"{t_events:.1f} s, its indexes rebuilt in {t_indexes:.1f} s\n"
              f"  VACUUM ANALYZE {t_vacuum:.1f} s; catalog {db_bytes / 1e6:.0f} MB\n"
              f"  chain re-hashed at the seam and the head: {checked:,} events, {bad} mismatches", flush=True)

        print("\nlarge history: timing pages", flush=True)
        rows = []
        for label, url, who, held in PAGES:
            conns_before = counter.count
            n_queries, queries = count_queries(by_who[who], url)
            row = {"label": label, "url": url, "held_to_target": held, "queries_small": small[url]["queries"],
                   "queries_large": n_queries, "same_queries": small[url]["queries"] == n_queries,
                   "rows_small": small[url]["rows"], "rows_large": sum(q["rows"] for q in queries),
                   "sql_ms": round(sum(q["ms"] for q in queries), 2), **time_page(by_who[who], url, args.requests),
                   "queries": [{"sql": q["text"], "ms": q["ms"], "rows": q["rows"]} for q in queries]}
            row["db_connections"] = counter.count - conns_before
            row["passed"] = row["p95_ms"] <= TARGET_MS and row["same_queries"] if held else None
            # Suspects of a page over the target, or of any page with a slow query: the slowest query
            # and the one that returned the most rows (Python pays for every row it turns into objects).
            suspects = [max(queries, key=lambda q: q["ms"]), max(queries, key=lambda q: q["rows"])] if queries else []
            row["plans"] = [{"sql": q["text"], "ms": q["ms"], "rows": q["rows"], "plan": explain(q["sql"], q["params"])}
                            for i, q in enumerate(suspects)
                            if (q["ms"] >= SLOW_QUERY_MS or row["p95_ms"] > TARGET_MS) and q not in suspects[:i]
                            and q["sql"].lstrip().upper().startswith("SELECT")]
            rows.append(row)
            print(f"  {label:<18} p50 {row['p50_ms']:6.1f} ms  p95 {row['p95_ms']:6.1f} ms  "
                  f"{n_queries} queries, {row['sql_ms']:.1f} ms of SQL; {row['full_gcs']} full GCs "
                  f"({row['full_gc_ms']:.0f} ms) in {row['requests']} requests", flush=True)

        print()
        print_table(["page", "url", "queries small", "queries large", "same?", "rows small", "rows large", "SQL ms",
                     "n", "p50 ms", "p95 ms", "max ms", f"p95<={TARGET_MS}"],
                    [[r["label"], r["url"], str(r["queries_small"]), str(r["queries_large"]),
                      "yes" if r["same_queries"] else "NO", f"{r['rows_small']:,}", f"{r['rows_large']:,}",
                      f"{r['sql_ms']:.1f}", str(r["requests"]),
                      f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['max_ms']:.1f}",
                      ("PASS" if r["passed"] else "FAIL") if r["held_to_target"]
                      else ("info" if r["p95_ms"] <= TARGET_MS else "info, over")] for r in rows])
        print(f"  small = with the newest {SMALL_RUNS} runs only, large = with the whole history; rows = rows the "
              "page's SELECTs returned; SQL ms = time in its queries (one GET, large); n = timed GETs")
        conns = sum(r["db_connections"] for r in rows)
        print(f"  connections the pages opened to the backed-up databases: {conns}"
              + ("" if not conns else " (" + ", ".join(f"{r['label']}: {r['db_connections']}" for r in rows
                                                       if r["db_connections"]) + ")"))

        print("\n  slowest query of each page, and the one that returned the most rows (large history, one GET):")
        for r in rows:
            slow = max(r["queries"], key=lambda q: q["ms"])
            big = max(r["queries"], key=lambda q: q["rows"])
            print(f"    {r['label']:<18} {slow['ms']:6.2f} ms   {short_sql(slow['sql'])[:96]}")
            if big is not slow:
                print(f"    {'':<18} {big['rows']:6,} rows {short_sql(big['sql'])[:96]}")
        shown = set()
        for r in rows:
            for p in r["plans"]:
                if p["sql"] in shown:
                    continue
                shown.add(p["sql"])
                print(f"\n  plan of a query of {r['label']} ({p['ms']:.1f} ms, {p['rows']:,} rows):\n    "
                      + short_sql(p["sql"]) + "\n    " + p["plan"].replace("\n", "\n    "))

        targets = [{"target": f"{r['url']}: p95 <= {TARGET_MS} ms and as many queries as with {SMALL_RUNS} runs",
                    "passed": r["passed"], "measured": f"p95 {r['p95_ms']:.1f} ms, {r['queries_small']} -> "
                                                       f"{r['queries_large']} queries"}
                   for r in rows if r["held_to_target"]]
        targets.append({"target": "the pages open no connection to a backed-up database", "passed": conns == 0,
                        "measured": f"{conns} connections"})
        print("\ntargets")
        for t in targets:
            print(f"  {'PASS' if t['passed'] else 'FAIL'}  {t['target']:<66} {t['measured']}")

        header["loadavg_after"] = os.getloadavg()
        header["self_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        header["wall_s"] = round(time.perf_counter() - t_start, 1)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        path = results / f"dashboard_bench-{stamp}.json"
        path.write_text(json.dumps({"timestamp": stamp, "header": header, "seeding": seeding, "pages": rows,
                                    "targets": targets}, indent=2, default=str) + "\n")
        print(f"\nwall time {header['wall_s']:.0f} s; results: {path.relative_to(ROOT)}")
        return 1 if args.strict and not all(t["passed"] for t in targets) else 0
    finally:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()  # before the portal cluster goes away under them
        for cluster in reversed(clusters):
            cluster.destroy()
        counter.close()
        shutil.rmtree(scratch, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
