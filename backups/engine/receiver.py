"""Streaming WAL archiving: one supervised pg_receivewal per database.

pg_receivewal writes into <area>/.stream/ with --synchronous, so every chunk of WAL it receives
is fsynced at once (without it, only every 10 s or at segment end) — that is what brings the
RPO under a second. A physical replication slot makes the server keep WAL the receiver has not
confirmed, so a receiver that is down loses nothing: restarted, it resumes where it stopped.
Finished segments are moved into the area in the same checksummed format as archive_command
mode (backups/walpush.py), so restores do not care which mode produced them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from .. import walpush
from . import pgbin, wal
from .pgtools import BackupError, classify, spawn

log = logging.getLogger(__name__)
FINISHED = re.compile(r"^([0-9A-F]{24}|[0-9A-F]{8}\.history)$")


def slot_name(db) -> str:
    return "bankvault_" + re.sub(r"[^a-z0-9_]", "_", db.name.lower())


class Receiver:
    """pg_receivewal for one database, restarted with backoff when it exits."""

    def __init__(self, db, repo=None):
        self.db = db
        self.area = wal.area_path(db, repo)
        self.stream_dir = self.area / ".stream"
        self.slot = slot_name(db)
        self.proc: subprocess.Popen | None = None
        self._err = None
        self._env_cm = None
        self._backoff = 1.0
        self._next_start = 0.0
        self.last_error = ""
        self._compactor = _Compactor(self.area)

    def _tool(self, name: str) -> str:
        return pgbin.for_server().tool(name)

    def ensure_slot(self, env: dict) -> None:
        proc = subprocess.run([self._tool("pg_receivewal"), "--create-slot", "--if-not-exists",
                               f"--slot={self.slot}"], env=env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise classify(proc.stderr, self.db.conninfo(), "pg_receivewal --create-slot", proc.returncode)

    def start(self) -> None:
        self.stream_dir.mkdir(parents=True, exist_ok=True)
        conn = self.db.conninfo()
        self._env_cm = conn.tool_env()
        env = self._env_cm.__enter__()
        try:
            self.ensure_slot(env)
            self.proc, self._err = spawn(
                [self._tool("pg_receivewal"), "-D", str(self.stream_dir), f"--slot={self.slot}",
                 "--synchronous", "--no-loop", "--verbose"], env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)
        except BaseException:
            self._close_env()
            raise
        log.info("%s: receiving WAL into %s (slot %s)", self.db.name, self.stream_dir, self.slot)

    def _close_env(self) -> None:
        # The passfile lives as long as the receiver, which reconnects with it.
        if self._env_cm is not None:
            with contextlib.suppress(Exception):
                self._env_cm.__exit__(None, None, None)
            self._env_cm = None

    def poll(self) -> None:
        """Keep the receiver running and move finished segments into the area."""
        if self.proc is not None and self.proc.poll() is not None:
            rc = self.proc.returncode
            err = classify(self._err.text(), self.db.conninfo(), "pg_receivewal", rc)
            self.last_error = err.message
            log.error("%s: pg_receivewal exited (%s); restarting in %.0fs", self.db.name, err.message, self._backoff)
            self.proc = None
            self._close_env()
            self._next_start = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 60)
        if self.proc is None and time.monotonic() >= self._next_start:
            try:
                self.start()
                self.last_error = ""
            except BackupError as exc:
                self.last_error = exc.message
                log.error("%s: cannot start pg_receivewal: %s", self.db.name, exc.message)
                self._next_start = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, 60)
        elif self.proc is not None:
            self._backoff = 1.0
        self.sweep()

    def sweep(self) -> int:
        moved = 0
        if not self.stream_dir.is_dir():
            return 0
        for path in sorted(self.stream_dir.iterdir()):
            if FINISHED.match(path.name):
                try:
                    walpush.push(str(self.area), str(path), path.name)
                except walpush.PushError as exc:
                    # Same name, different content: keep the file here for an operator to look at.
                    log.error("%s: %s", self.db.name, exc)
                    continue
                path.unlink()
                moved += 1
        if moved:
            self._compactor.wake()
        return moved

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # pg_receivewal flushes and exits cleanly
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._close_env()
        self.sweep()

    def flush_position(self) -> str | None:
        """The LSN the receiver has confirmed as flushed (from the server's view)."""
        with self.db.conninfo().connect(autocommit=True) as conn:
            row = conn.execute("SELECT confirmed_flush_lsn, restart_lsn FROM pg_replication_slots "
                               "WHERE slot_name = %s", (self.slot,)).fetchone()
        return (row[0] or row[1]) if row else None


class _Compactor(threading.Thread):
    """Compresses finished segments beside the receiver, so moving the next ones into the
    repository never waits for zstd."""

    def __init__(self, area: Path):
        super().__init__(name=f"compact-{area.name}", daemon=True)
        self.area = area
        self._wake = threading.Event()
        self.start()

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                walpush.compact(str(self.area))
            except OSError:
                log.exception("compressing WAL in %s failed; the plain copies stay", self.area)


def partial_segment(area: Path) -> Path | None:
    stream = area / ".stream"
    partials = sorted(stream.glob("*.partial")) if stream.is_dir() else []
    return partials[-1] if partials else None
