"""The hash chain of the audit trail.

    hash(n) = sha256( hash(n-1) + "\\n" + canonical(event n as stored) )

canonical() is JSON with sorted keys of every field as the database keeps it: the timestamp is
the database's clock_timestamp() at microsecond precision (what PostgreSQL stores), details
after a JSON round trip (what jsonb gives back). Inserts take a transaction-level advisory lock,
so the chain stays linear with any number of writers; a unique prev_hash makes a fork
impossible even if the lock were bypassed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC

from django.db import connection, transaction

GENESIS = "0" * 64
LOCK_KEY = 0x62616E6B  # "bank": the advisory lock that serializes audit inserts
FIELDS = ["sequence", "created_at", "actor_id", "actor_label", "action", "outcome", "target_type",
          "target_id", "target_label", "source_ip", "user_agent", "request_id", "details"]


def normalize(details) -> dict:
    """What jsonb will give back: plain JSON types, no tuples, datetimes as text."""
    return json.loads(json.dumps(details or {}, default=str))


def canonical(values: dict) -> str:
    row = {}
    for field in FIELDS:
        v = values.get(field)
        if field == "created_at":
            v = v.astimezone(UTC).isoformat(timespec="microseconds")  # whatever the session's TimeZone
        row[field] = v
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def link(prev_hash: str, values: dict) -> str:
    return hashlib.sha256((prev_hash + "\n" + canonical(values)).encode()).hexdigest()


def append(**values):
    """Insert one event at the head of the chain. Must run inside a transaction (it opens one
    if needed); the advisory lock is held until that transaction ends."""
    # Everything that does not depend on the head is done before the lock is taken: the lock
    # serializes every writer, so only what must happen under it counts against throughput.
    values = {**values, "details": normalize(values.get("details"))}
    fields, insert_sql = _insert_statement()
    connection.ensure_connection()
    if connection.get_autocommit() and not connection.in_atomic_block:
        return _append_alone(values, fields, insert_sql)
    # Inside the caller's transaction. No savepoint: an event that cannot be written fails the
    # caller's whole transaction anyway (a change without its audit event must not commit).
    with transaction.atomic(savepoint=False):
        pg = connection.connection
        # One round trip for BEGIN, the lock and the head: pipelined statements still run one
        # after the other, and the head query takes its snapshot only once the lock is held
        # (READ COMMITTED), so it sees the event the previous holder committed.
        with pg.pipeline():
            locked = pg.execute(LOCK_SQL, [LOCK_KEY])
            top = pg.execute(HEAD_SQL)
        event = _event(values, locked.fetchone()[1], top.fetchone())
        # One plain INSERT while the lock is held: the lock serializes every writer, so each
        # statement saved here is throughput (Model.save() would add signals and a pk query).
        with connection.cursor() as cur:
            cur.execute(insert_sql, [f.get_db_prep_save(getattr(event, f.attname), connection) for f in fields])
            event.pk = cur.fetchone()[0]
    event._state.adding, event._state.db = False, connection.alias
    return event


LOCK_SQL = "SELECT pg_advisory_xact_lock(%s), clock_timestamp()"
HEAD_SQL = "SELECT sequence, hash FROM audit_auditevent ORDER BY sequence DESC LIMIT 1"


def _event(values: dict, now, head):
    from .models import AuditEvent

    sequence, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
    values.update(sequence=sequence, created_at=now)
    return AuditEvent(**{k: v for k, v in values.items() if k != "actor_id"},
                      actor_id=values.get("actor_id"), prev_hash=prev, hash=link(prev, values))


def _append_alone(values: dict, fields: list, insert_sql: str):
    """An event that is a transaction of its own (no caller's transaction is open): two round
    trips in all — BEGIN + lock + head, then INSERT + COMMIT — pipelined on the connection,
    which Django keeps in autocommit mode and so leaves these statements alone."""
    pg = connection.connection
    try:
        with pg.pipeline() as pipeline:
            pg.execute("BEGIN")
            locked = pg.execute(LOCK_SQL, [LOCK_KEY])
            top = pg.execute(HEAD_SQL)
            pipeline.sync()
            event = _event(values, locked.fetchone()[1], top.fetchone())
            inserted = pg.execute(insert_sql,
                                  [f.get_db_prep_save(getattr(event, f.attname), connection) for f in fields])
            pg.execute("COMMIT")
        event.pk = inserted.fetchone()[0]
    except BaseException:
        with contextlib.suppress(Exception):
            pg.execute("ROLLBACK")
        raise
    event._state.adding, event._state.db = False, connection.alias
    return event


_statement: tuple[list, str] | None = None


def _insert_statement() -> tuple[list, str]:
    """The event's columns and the INSERT for them, built once per process."""
    global _statement
    if _statement is None:
        from .models import AuditEvent

        fields = [f for f in AuditEvent._meta.concrete_fields if not f.primary_key]
        columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
        _statement = (fields, f"INSERT INTO {connection.ops.quote_name(AuditEvent._meta.db_table)} ({columns}) "
                              f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING id")
    return _statement


def head() -> tuple[int, str]:
    """(sequence, hash) of the newest event; (0, GENESIS) for an empty trail."""
    with connection.cursor() as cur:
        cur.execute("SELECT sequence, hash FROM audit_auditevent ORDER BY sequence DESC LIMIT 1")
        row = cur.fetchone()
    return (row[0], row[1]) if row else (0, GENESIS)


@dataclass
class Break:
    sequence: int
    event_id: int | None
    problem: str

    def __str__(self):
        where = f"event #{self.sequence}" + (f" (id {self.event_id})" if self.event_id else "")
        return f"{where}: {self.problem}"


def events(chunk: int = 5000) -> Iterator:
    """Every event in chain order, streamed (a server-side cursor; memory stays flat)."""
    from .models import AuditEvent

    yield from AuditEvent.objects.order_by("sequence").values("id", "prev_hash", "hash", *FIELDS)\
        .iterator(chunk_size=chunk)


def verify(checkpoints: list[dict] | None = None) -> tuple[int, list[Break]]:
    """Recompute the whole chain. Returns (events checked, breaks): every break names the
    first event where the stored trail stops matching its own hashes, a sequence gap, or a
    checkpoint it contradicts."""
    breaks: list[Break] = []
    expected_prev = GENESIS
    expected_seq = 1
    count = 0
    by_seq = {c["sequence"]: c for c in (checkpoints or [])}
    for row in events():
        count += 1
        seq = row["sequence"]
        if seq != expected_seq:
            breaks.append(Break(expected_seq, None, f"missing: the next stored event is #{seq}"))
            expected_seq = seq
        if row["prev_hash"] != expected_prev:
            breaks.append(Break(seq, row["id"], "its prev_hash does not match the hash of the event before it"))
        recomputed = link(row["prev_hash"], row)
        if recomputed != row["hash"]:
            breaks.append(Break(seq, row["id"], "its content was altered after it was written "
                                                "(the stored hash does not match its fields)"))
        if seq in by_seq and by_seq[seq]["hash"] != row["hash"]:
            breaks.append(Break(seq, row["id"], f"it contradicts the checkpoint of {by_seq[seq]['time']} "
                                                f"({by_seq[seq]['location']}): the trail was rewritten"))
        expected_prev = row["hash"]
        expected_seq = seq + 1
        if len(breaks) >= 20:
            break
    for c in checkpoints or []:
        if c["sequence"] >= expected_seq:
            breaks.append(Break(c["sequence"], None, f"the checkpoint of {c['time']} ({c['location']}) names "
                                                     "an event that is no longer in the trail: events were removed"))
    return count, breaks
