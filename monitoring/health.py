"""Health checks: small functions, one question each, one Result per target.

    connectivity   can each database be reached (the pg_isready question), within a timeout
    disk           repository free space, and days until full at the recent growth rate
    freshness      each policy's newest good backup against its RPO objective
    wal            each archiving database: pg_stat_archiver, and the repository's WAL continuity
    workers        a Celery worker answers; celery-beat's heartbeat is recent
    keys           each recipient key of an enabled policy: expired (failing) or expiring soon (warning)

run_all() stores every result (history) and updates the current state of each check; a change
of state is what alerts (monitoring.alerts), not every run.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Sum
from django.utils import timezone

from backups.engine import wal
from backups.engine.pgtools import BackupError
from backups.models import Archive, BackupPolicy, BackupRun, Database, EncryptionKey, WalMode, next_slot

from .models import CheckResult, CheckState, Status

log = logging.getLogger(__name__)


@dataclass
class Result:
    name: str
    target: str
    status: str
    summary: str
    details: dict = field(default_factory=dict)


# -- the checks --------------------------------------------------------------------------------------
def connectivity(timeout: float | None = None) -> list[Result]:
    timeout = timeout or settings.MONITORING_CONNECT_TIMEOUT
    out = []
    for db in Database.objects.all():
        info = db.conninfo()
        info.connect_timeout = max(1, int(timeout))
        started = time.monotonic()
        try:
            with info.connect(autocommit=True) as conn:
                conn.execute("SELECT 1")
            ms = round((time.monotonic() - started) * 1000, 1)
            out.append(Result("connectivity", db.name, Status.OK, f"{db.name} answers ({ms} ms)", {"ms": ms}))
        except BackupError as exc:
            out.append(Result("connectivity", db.name, Status.FAILING, f"{db.name}: {exc.message}"))
    return out


def disk(repository: Path | None = None) -> list[Result]:
    root = Path(repository or settings.BANKVAULT_REPOSITORY)
    root.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(root)
    since = timezone.now() - timedelta(days=7)
    grown = (Archive.objects.filter(created_at__gte=since).aggregate(b=Sum("bytes"))["b"] or 0)
    per_day = grown / 7
    days_left = round(usage.free / per_day, 1) if per_day else None
    free_pct = round(100 * usage.free / usage.total, 1) if usage.total else 0
    details = {"free_bytes": usage.free, "total_bytes": usage.total, "free_pct": free_pct,
               "growth_bytes_per_day": int(per_day), "days_until_full": days_left}
    when = f", about {days_left} days until full" if days_left is not None else ""
    summary = f"{usage.free // 2**20} MiB free ({free_pct}%){when}"
    if free_pct < settings.MONITORING_DISK_FAILING_PCT or (days_left is not None and days_left < 3):
        status = Status.FAILING
    elif free_pct < settings.MONITORING_DISK_WARNING_PCT or (days_left is not None and days_left < 14):
        status = Status.WARNING
    else:
        status = Status.OK
    return [Result("disk", str(root), status, summary, details)]


def freshness(now=None) -> list[Result]:
    now = now or timezone.now()
    out = []
    for policy in BackupPolicy.objects.filter(enabled=True).select_related("database", "schedule"):
        rpo = policy.effective_rpo()
        last = BackupRun.objects.filter(database=policy.database, kind=policy.kind,
                                        state=BackupRun.State.SUCCEEDED).aggregate(t=Max("finished_at"))["t"]
        target = str(policy)
        details = {"rpo_minutes": int(rpo.total_seconds() // 60), "last_good": last.isoformat() if last else None}
        if last is not None:
            age = now - last
            details["age_minutes"] = int(age.total_seconds() // 60)
            if age <= rpo:
                out.append(Result("freshness", target, Status.OK,
                                  f"last good backup {_ago(age)} ago, within the RPO of {_span(rpo)}", details))
            else:
                out.append(Result("freshness", target, Status.FAILING,
                                  f"last good backup {_ago(age)} ago, older than the RPO of {_span(rpo)}", details))
            continue
        # Never backed up: a policy whose first slot (plus the RPO) has not come yet is pending.
        first_slot = next_slot(policy.schedule, policy.created_at)
        details["first_slot"] = first_slot.isoformat()
        if now < first_slot + rpo:
            out.append(Result("freshness", target, Status.PENDING,
                              f"no backup yet; the first scheduled slot is {first_slot:%Y-%m-%d %H:%M %Z}", details))
        else:
            out.append(Result("freshness", target, Status.FAILING,
                              f"no good backup since the policy was created {_ago(now - policy.created_at)} ago",
                              details))
    return out


def wal_archiving() -> list[Result]:
    out = []
    for db in Database.objects.exclude(wal_mode=WalMode.NONE):
        details = {"mode": db.wal_mode}
        problems, warnings = [], []
        if db.wal_mode == WalMode.ARCHIVE:
            try:
                with db.conninfo().connect(autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
                        "last_failed_wal, last_failed_time, current_setting('archive_mode') "
                        "FROM pg_stat_archiver").fetchone()
                archived, last_wal, last_time, failed, failed_wal, failed_time, mode = row
                details.update(archived_count=archived, last_archived_wal=last_wal,
                               last_archived_time=last_time.isoformat() if last_time else None,
                               failed_count=failed, last_failed_wal=failed_wal,
                               last_failed_time=failed_time.isoformat() if failed_time else None, archive_mode=mode)
                if mode == "off":
                    problems.append("archive_mode is off on the server")
                if failed_time and (last_time is None or failed_time > last_time):
                    problems.append(f"archive_command is failing (last failure {failed_wal} at "
                                    f"{timezone.localtime(failed_time):%H:%M:%S}, {failed} failures in all)")
            except BackupError as exc:
                warnings.append(f"archiver status unavailable: {exc.message}")
        try:
            for t in wal.refresh_catalog(db):
                if t.gaps:
                    problems.append(f"timeline {t.timeline} has WAL gaps: "
                                    + ", ".join(f"{a}..{b}" for a, b in t.gaps))
                details.setdefault("timelines", []).append(
                    {"timeline": t.timeline, "last_segment": t.last_segment,
                     "last_archived_at": t.last_archived_at.isoformat() if t.last_archived_at else None})
        except OSError as exc:
            problems.append(f"the WAL area cannot be read: {exc}")
        if problems:
            out.append(Result("wal", db.name, Status.FAILING, "; ".join(problems), details))
        elif warnings:
            out.append(Result("wal", db.name, Status.WARNING, "; ".join(warnings), details))
        else:
            last = details.get("last_archived_wal") or (details.get("timelines") or [{}])[-1].get("last_segment")
            out.append(Result("wal", db.name, Status.OK, f"archiving works; newest segment {last or 'none yet'}",
                              details))
    return out


def workers() -> list[Result]:
    from bankvault.celery import app

    out = []
    try:
        replies = app.control.ping(timeout=settings.MONITORING_WORKER_PING_TIMEOUT) or []
    except Exception as exc:  # broker down
        replies = []
        log.warning("worker ping failed: %s", exc)
    names = sorted(name for reply in replies for name in reply)
    out.append(Result("worker", "celery", Status.OK if names else Status.FAILING,
                      f"{len(names)} worker(s) answer: {', '.join(names)}" if names
                      else "no Celery worker answers: nothing scheduled will run", {"workers": names}))
    beat = CheckState.objects.filter(name="beat-heartbeat").first()
    limit = timedelta(seconds=settings.MONITORING_BEAT_STALE_SECONDS)
    if beat is None:
        out.append(Result("beat", "celery-beat", Status.PENDING, "no heartbeat from celery-beat yet"))
    elif timezone.now() - beat.checked_at > limit:
        out.append(Result("beat", "celery-beat", Status.FAILING,
                          f"celery-beat's last heartbeat was {_ago(timezone.now() - beat.checked_at)} ago"))
    else:
        out.append(Result("beat", "celery-beat", Status.OK,
                          f"heartbeat {_ago(timezone.now() - beat.checked_at)} ago"))
    return out


def encryption_keys(now=None) -> list[Result]:
    """Keys that enabled policies encrypt to. An expired key stops every backup encrypted to it
    (the pre-flight refuses it): failing. One expiring within BANKVAULT_KEY_EXPIRY_WARNING_DAYS:
    warning, while there is time to extend it."""
    now = now or timezone.now()
    soon = timedelta(days=settings.BANKVAULT_KEY_EXPIRY_WARNING_DAYS)
    out = []
    keys = EncryptionKey.objects.filter(policies__enabled=True).distinct().prefetch_related("policies__database")
    for key in keys:
        policies = sorted(str(p) for p in key.policies.all() if p.enabled)
        details = {"fingerprint": key.fingerprint, "owner": key.owner, "policies": policies,
                   "expires_at": key.expires_at.isoformat() if key.expires_at else None}
        target = f"{key.owner} ({key.fingerprint[-16:]})"
        if key.expires_at is None:
            out.append(Result("keys", target, Status.OK, "does not expire", details))
        elif key.expires_at <= now:
            out.append(Result("keys", target, Status.FAILING,
                              f"expired {_ago(now - key.expires_at)} ago: backups of {', '.join(policies)} are refused "
                              "until the key is extended and re-imported, or removed from the policy", details))
        elif key.expires_at - now <= soon:
            out.append(Result("keys", target, Status.WARNING,
                              f"expires in {_span(key.expires_at - now)} ({key.expires_at:%Y-%m-%d}); extend it "
                              f"(gpg --quick-set-expire) and re-import it, used by {', '.join(policies)}", details))
        else:
            out.append(Result("keys", target, Status.OK, f"valid until {key.expires_at:%Y-%m-%d}", details))
    return out


CHECKS = {"connectivity": connectivity, "disk": disk, "freshness": freshness, "wal": wal_archiving,
          "workers": workers, "keys": encryption_keys}


# -- running and remembering -------------------------------------------------------------------------
def run_all(only: list[str] | None = None) -> tuple[list[Result], list[tuple[CheckState, str]]]:
    """Run the checks, store the results, update the states. Returns (results, changes) where
    changes are (state, previous status) for every check whose status changed."""
    results: list[Result] = []
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        try:
            results += check()
        except Exception as exc:  # a check that breaks is itself a failure, not a crash
            log.exception("health check %s failed", name)
            results.append(Result(name, "", Status.FAILING, f"the check itself failed: {exc}"))
    changes = record(results)
    return results, changes


def record(results: list[Result]) -> list[tuple[CheckState, str]]:
    now = timezone.now()
    changes = []
    with transaction.atomic():
        CheckResult.objects.bulk_create([CheckResult(name=r.name, target=r.target, status=r.status,
                                                     summary=r.summary[:500], details=r.details, checked_at=now)
                                         for r in results])
        for r in results:
            state, created = CheckState.objects.select_for_update().get_or_create(
                name=r.name, target=r.target,
                defaults={"status": r.status, "summary": r.summary[:500], "since": now, "checked_at": now})
            previous = None if created else state.status
            if not created:
                if state.status != r.status:
                    state.since = now
                state.status, state.summary, state.checked_at = r.status, r.summary[:500], now
                state.save()
            if previous != r.status:
                changes.append((state, previous))
    return changes


def overall(states=None) -> str:
    states = list(states if states is not None else CheckState.objects.exclude(name="beat-heartbeat"))
    if any(s.status == Status.FAILING for s in states):
        return Status.FAILING
    if any(s.status == Status.WARNING for s in states):
        return Status.WARNING
    return Status.OK


def beat_heartbeat() -> None:
    now = timezone.now()
    CheckState.objects.update_or_create(name="beat-heartbeat", target="celery-beat",
                                        defaults={"status": Status.OK, "summary": "heartbeat", "checked_at": now})


def _ago(delta: timedelta) -> str:
    return _span(delta)


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
