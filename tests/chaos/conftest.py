"""The chaos suite's stage: real Celery worker and beat processes (killable), the session's own
Redis and portal cluster (restartable, see tests/plugin.py), real target clusters, and a table
of what every scenario expected and got, printed at the end of `make chaos`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS: list[Row] = []

# Short clocks, so that a lost worker is noticed in seconds rather than minutes.
CHAOS_ENV = {
    "BANKVAULT_HEARTBEAT_SECONDS": "1",
    "BANKVAULT_WORKER_LOST_SECONDS": "8",
    "BANKVAULT_REQUEUE_SECONDS": "20",
    "BANKVAULT_HUNG_SECONDS": "120",
    "BANKVAULT_DB_RETRY_SECONDS": "180",
    "BANKVAULT_RESTORE_LOCK_WAIT": "60",
}


@dataclass
class Row:
    scenario: str
    expected: int
    good: int
    failed_with_reason: int
    lost: int
    duplicates: int
    harmed: int
    seconds: float
    note: str = ""


def record(row: Row) -> Row:
    ROWS.append(row)
    return row


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    cols = ["scenario", "expected", "good", "failed (reason ok)", "lost", "duplicates", "harmed", "seconds"]
    data = [[r.scenario, r.expected, r.good, r.failed_with_reason, r.lost, r.duplicates, r.harmed,
             f"{r.seconds:.0f}"] for r in ROWS]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *data, strict=False)]
    line = "  ".join
    terminalreporter.write_line("")
    terminalreporter.write_line("chaos and soak: every run expected, what became of it")
    terminalreporter.write_line(line(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths,
                                                                                                    strict=True))))
    for row in data:
        terminalreporter.write_line(line(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                         for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    total = {k: sum(getattr(r, k) for r in ROWS) for k in ("lost", "duplicates", "harmed")}
    terminalreporter.write_line(f"total: lost {total['lost']}, duplicates {total['duplicates']}, "
                                f"live databases harmed {total['harmed']}")
    for r in ROWS:
        if r.note:
            terminalreporter.write_line(f"  {r.scenario}: {r.note}")
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "chaos.json").write_text(json.dumps([asdict(r) for r in ROWS], indent=2))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    from django.db import connections

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # the portal's database may be restarting under us
            connections.close_all()
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Procs:
    """Celery processes of one scenario, each in its own process group (killable as a whole)."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bankvault", *args],
                                env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def worker(self, name: str, *, concurrency: int = 1, env: dict | None = None) -> subprocess.Popen:
        from bankvault.celery import ALL_QUEUES

        return self.start(name, "worker", "--pool", "prefork", "--concurrency", str(concurrency), "-Q", ALL_QUEUES,
                          "--hostname", f"{name}@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip",
                          env=env)

    def beat(self, name: str = "beat") -> subprocess.Popen:
        return self.start(name, "beat", "--loglevel", "INFO", "--scheduler",
                          "django_celery_beat.schedulers:DatabaseScheduler",
                          "--schedule", str(self.logs / f"{name}-schedule"))

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything in its group, as the kernel's OOM killer would."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def stack(transactional_db, repo, portal_env, tmp_path, settings):
    """Workers and beat for one scenario, with the watchdog on a 3 s beat entry."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from tests.conftest import ensure_roles

    ensure_roles()
    for key, value in CHAOS_ENV.items():
        setattr(settings, key, float(value) if "." in value else int(value))
    every, _ = IntervalSchedule.objects.get_or_create(every=3, period="seconds")
    # The migration's own entry exists until the first transactional test flushes it.
    PeriodicTask.objects.update_or_create(name="bankvault: watchdog", defaults={
        "task": "monitoring.tasks.watchdog", "interval": every, "crontab": None, "expire_seconds": 3,
        "enabled": True})
    scratch = {"BANKVAULT_SCRATCH_DIR": str(settings.BANKVAULT_SCRATCH_DIR)}
    procs = Procs({**portal_env, **CHAOS_ENV, **scratch}, tmp_path)
    yield procs
    procs.stop_all()


def fingerprint(cluster, dbname: str) -> str:
    """md5 over every user table's rows, in a stable order: equal before and after = unharmed."""
    with cluster.connect(dbname) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
        ).fetchall()
        parts = []
        for (name,) in tables:
            parts.append(name + ":" + (conn.execute(
                f"SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {name} t").fetchone()[0]))
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
