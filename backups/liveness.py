"""Proof of life for long jobs, and patience with the portal's own database.

A running backup, restore or drill holds a Heartbeat: a thread that touches the job's row every
BANKVAULT_HEARTBEAT_SECONDS (so the watchdog can tell a dead worker from a slow job) and that
notices when the job has moved nothing for BANKVAULT_HUNG_SECONDS — no bytes through any of
its streams (moved()), no progress on its row. A hung job's tools are stopped; the job then
fails on its own path, and the runner reports why (Heartbeat.hung).

db_retry() runs a state change again while the portal's database restarts, instead of losing
the outcome of a job that went well.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connections
from django.utils import timezone

from .engine import pgtools

log = logging.getLogger(__name__)
T = TypeVar("T")

# The byte counter lives with the pg tools (the engine's copy loops call pgtools.moved()).
moved, moved_total = pgtools.moved, pgtools.moved_total


class Heartbeat:
    """Touches ``model`` row ``pk`` (field heartbeat_at) while ``alive_states`` hold, and watches
    its progress fields and the moved() counter. Use as a context manager."""

    def __init__(self, model, pk: int, *, alive_states, watch_states=None,
                 progress_fields=("progress_done", "progress_item"), interval: float | None = None,
                 hung_after: float | None = None, busy: Callable[[], bool] | None = None):
        self.model, self.pk = model, pk
        # Asked only when nothing moved for hung_after: True if the job's server is still working
        # for it where no byte shows (an index build during a restore), so it is not hung.
        self.busy = busy
        self.alive_states = list(alive_states)
        self.watch_states = list(watch_states if watch_states is not None else alive_states)
        self.progress_fields = list(progress_fields)
        self.interval = interval if interval is not None else settings.BANKVAULT_HEARTBEAT_SECONDS
        self.hung_after = hung_after if hung_after is not None else settings.BANKVAULT_HUNG_SECONDS
        self.hung = False
        # False while the job waits on purpose (for a lock): it beats, but is not "hung".
        self.watching = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{model.__name__}-{pk}", daemon=True)

    @property
    def reason(self) -> str:
        minutes = self.hung_after / 60
        amount = f"{minutes:g} minutes" if minutes >= 1 else f"{self.hung_after:g} seconds"
        return (f"hung: nothing moved for {amount} (no bytes, no progress), so the job was stopped "
                "(BANKVAULT_HUNG_SECONDS)")

    def __enter__(self):
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def beat(self) -> dict | None:
        """One touch; returns the row's state and progress (None when the row is gone)."""
        qs = self.model.objects.filter(pk=self.pk)
        qs.filter(state__in=self.alive_states).update(heartbeat_at=timezone.now())
        return qs.values("state", *self.progress_fields).first()

    def _server_busy(self) -> bool:
        if self.busy is None:
            return False
        try:
            return bool(self.busy())
        except Exception as exc:  # a probe that cannot tell does not keep a hung job alive
            log.warning("%s %s: could not ask its server whether it is still working: %s",
                        self.model.__name__, self.pk, exc)
            return False

    def _loop(self):
        last_seen = None
        last_move = time.monotonic()
        try:
            while not self._stop.wait(self.interval):
                try:
                    row = self.beat()
                except (OperationalError, InterfaceError) as exc:  # the portal's database restarts
                    log.warning("heartbeat of %s %s: %s", self.model.__name__, self.pk, exc)
                    close_old_connections()
                    connections.close_all()
                    continue
                if row is None:
                    return
                seen = (moved_total(), tuple(row[f] for f in self.progress_fields))
                now = time.monotonic()
                if seen != last_seen or row["state"] not in self.watch_states or not self.watching:
                    last_seen, last_move = seen, now
                elif now - last_move >= self.hung_after and not self.hung:
                    if self._server_busy():
                        last_move = now
                        continue
                    self.hung = True
                    log.error("%s %s: %s", self.model.__name__, self.pk, self.reason)
                    pgtools.kill_active()
        finally:
            connections.close_all()  # this thread's own connection


def db_retry(fn: Callable[[], T], *, what: str, seconds: float | None = None) -> T:
    """Run ``fn`` (a state change on the portal's database); while that database is unreachable,
    try again for up to ``seconds`` (BANKVAULT_DB_RETRY_SECONDS)."""
    seconds = settings.BANKVAULT_DB_RETRY_SECONDS if seconds is None else seconds
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return fn()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: the portal's database is unreachable (%s); trying again in %.1f s", what,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__, delay)
            connections["default"].close()
            time.sleep(delay)
            delay = min(delay * 2, 5)
