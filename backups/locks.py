"""Mutual exclusion for jobs that must not overlap.

- One job per database at a time: no two backups of one database at once, and a restore never
  runs while a backup of its database does. A PostgreSQL advisory lock in the portal's own
  database, held on a connection of its own for as long as the job runs: when the worker dies,
  its connection dies with it and the lock is free again — there is no stale lock to clean up.
- A limit on heavy jobs per host (BANKVAULT_HOST_JOBS), across all the worker processes on it:
  one flock()ed slot file each, released by the kernel when the process ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from django.conf import settings
from django.db import connection

from .engine.pgtools import BackupError

log = logging.getLogger(__name__)

LOCK_CLASS = 0x62766462  # "bvdb": advisory locks of bankvault's per-database jobs


class Busy(BackupError):
    """The database is held by another job."""


def _portal_conninfo() -> dict:
    params = dict(connection.get_connection_params())
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("prepare_threshold", None)
    params.pop("server_side_binding", None)
    return params


def holder(db_id: int) -> str:
    """Who holds the database's lock, as the holder described itself (its application_name)."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT a.application_name, a.backend_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.granted LIMIT 1",
            [LOCK_CLASS, db_id])
        row = cur.fetchone()
    if not row:
        return "another job"
    name, since = row
    return f"{name.removeprefix('bankvault: ')} (since {since:%Y-%m-%d %H:%M:%S %Z})"


@contextlib.contextmanager
def database_lock(db, purpose: str, *, wait: float = 0) -> Iterator[None]:
    """Hold ``db``'s job lock for the block. ``purpose`` names the holder for whoever finds the
    database busy ("backup run 12"). Waits up to ``wait`` seconds, then raises Busy."""
    params = _portal_conninfo()
    params["application_name"] = f"bankvault: {purpose}"[:63]
    params["autocommit"] = True
    conn = psycopg.connect(**params)
    keeper = None
    try:
        deadline = time.monotonic() + wait
        while True:
            if conn.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_CLASS, db.pk]).fetchone()[0]:
                break
            if time.monotonic() >= deadline:
                who = holder(db.pk)
                raise Busy(f"{db.name} is busy: {who} holds it" +
                           (f"; waited {wait:.0f} s" if wait else "") + ". Nothing was started.")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        keeper = _Keeper(conn, params, db, purpose)
        yield
    finally:
        if keeper is not None:
            keeper.stop()
            conn = keeper.conn
            # Released before the session ends: a backend exits after close() returns, so the
            # next job could otherwise still find the database held for a moment.
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", [LOCK_CLASS, db.pk])
        conn.close()  # ends the session, and with it the lock


class _Keeper(threading.Thread):
    """Watches the lock's connection. A restart of the portal's database ends the session and
    with it the lock while the job goes on; the keeper reconnects and takes the lock again
    (within one BANKVAULT_HEARTBEAT_SECONDS of the database's return, before most new jobs
    could have claimed anything), and says so loudly if another job got there first."""

    def __init__(self, conn, params: dict, db, purpose: str):
        super().__init__(name=f"lock-keeper-{db.pk}", daemon=True)
        self.conn, self.params, self.db, self.purpose = conn, params, db, purpose
        self.interval = max(0.05, float(settings.BANKVAULT_HEARTBEAT_SECONDS))
        self.lost = False  # another job took the lock while ours was gone: nothing left to keep
        self._halt = threading.Event()
        self.start()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=self.interval + 10)

    def _alive(self) -> bool:
        try:
            self.conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            if self.lost or self._alive():
                continue
            log.warning("%s: the lock on %s went with the portal database's connection; taking it again",
                        self.purpose, self.db.name)
            while not self._halt.is_set():
                try:
                    conn = psycopg.connect(**self.params)
                    break
                except psycopg.Error:
                    self._halt.wait(min(self.interval, 1.0))
            else:
                return
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = conn
            try:
                ok = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_CLASS, self.db.pk]).fetchone()[0]
            except psycopg.Error:
                continue  # gone again: try on the next tick
            if ok:
                log.warning("%s: holds the lock on %s again", self.purpose, self.db.name)
            else:
                self.lost = True
                log.error("%s: while the portal's database restarted, another job took the lock on %s; "
                          "both run now", self.purpose, self.db.name)


def _slot_dir() -> Path:
    path = Path(settings.BANKVAULT_SCRATCH_DIR) / "slots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def host_slot(*, wait: float | None = None, poll: float = 1.0) -> Iterator[int]:
    """One of BANKVAULT_HOST_JOBS slots on this host for the block (0 = no limit). Waits for a
    free slot (``wait`` seconds at most, None = as long as it takes), then raises Busy."""
    limit = settings.BANKVAULT_HOST_JOBS
    if limit <= 0:
        yield -1
        return
    directory = _slot_dir()
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        for slot in range(limit):
            fd = os.open(directory / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield slot
            finally:
                os.close(fd)  # releases the flock
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise Busy(f"all {limit} job slots of this host are taken (BANKVAULT_HOST_JOBS); nothing was started")
        time.sleep(poll)
