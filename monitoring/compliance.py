"""Compliance reports: what an auditor asks for once a month.

- the **event log** of a period, filtered like an export (audit.exports.Filters);
- the **period summary**: per database, scheduled against successful backups and the longest
  stretch without a good backup measured against the RPO objective; WAL archive gaps; restore
  drills and real restores with their duration and approvers; failed sign-ins; configuration
  changes; and the verification of the whole hash chain.

summary() returns plain data (what the tests check); monitoring.reports renders it as CSV or
PDF. A Report is one generation: iterate it for the bytes, then record() it — every report is
itself an audit event ("audit.report.generated"), with the sha256 of what was handed out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

import audit
from audit import chain, checkpoints
from audit.exports import FilterError, Filters
from audit.models import AuditEvent
from backups.models import Archive, BackupRun, Database
from recovery.models import Approval, RestoreRequest

from .models import Drill

KINDS = ("events", "summary")
FORMATS = ("csv", "pdf")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "pdf": "application/pdf"}
CONFIG_LIST_LIMIT = 1000  # config changes listed one by one; the count is always complete


def default_rpo_hours() -> float:
    return float(getattr(settings, "BANKVAULT_DEFAULT_RPO_HOURS", 26))


def pdf_max_rows() -> int:
    """A PDF is for reading: beyond this many events it says so and points to the CSV."""
    return int(getattr(settings, "BANKVAULT_REPORT_PDF_MAX_ROWS", 2000))


# -- schedules and objectives --------------------------------------------------------------------
def crontab_slots(crontab, start: datetime, end: datetime) -> int:
    """How many times celery-beat's crontab fires in [start, end), in the crontab's own time
    zone. Celery requires day of month AND day of week to match (unlike classic cron's OR)."""
    if end <= start:
        return 0
    sched = crontab.schedule
    tz = crontab.timezone or timezone.get_current_timezone()
    minutes, hours = sorted(sched.minute), sorted(sched.hour)
    day = start.astimezone(tz).date() - timedelta(days=1)  # a slot late on the day before may fall inside
    last = end.astimezone(tz).date()
    n = 0
    while day <= last:
        # celery: 0 = Sunday; Python: 0 = Monday
        if (day.month in sched.month_of_year and day.day in sched.day_of_month
                and (day.weekday() + 1) % 7 in sched.day_of_week):
            for h in hours:
                for m in minutes:
                    at = datetime.combine(day, time(h, m), tzinfo=tz)
                    if start <= at < end:
                        n += 1
        day += timedelta(days=1)
    return n


def rpo_objective(policies) -> tuple[float, str]:
    """The objective a database's backups are held to: the strictest RPO of its enabled
    policies (their own `rpo_minutes`, else their schedule's period plus two hours, as the
    freshness check uses), or the portal default for a database without a policy."""
    found = [(p.effective_rpo().total_seconds() / 3600, p) for p in policies if p.enabled]
    if found:
        hours, policy = min(found, key=lambda x: x[0])
        return round(hours, 2), f"policy {policy.name}"
    return default_rpo_hours(), "default (BANKVAULT_DEFAULT_RPO_HOURS)"


# -- the summary ---------------------------------------------------------------------------------
def _gap(points: list[datetime]) -> tuple[timedelta, datetime, datetime]:
    longest, at = timedelta(0), (points[0], points[0])
    for a, b in zip(points, points[1:]):
        if b - a > longest:
            longest, at = b - a, (a, b)
    return longest, at[0], at[1]


def _backups(db: Database, start: datetime, end: datetime) -> dict:
    runs = BackupRun.objects.filter(database=db)
    in_period = runs.filter(queued_at__gte=start, queued_at__lt=end)
    counts = in_period.aggregate(
        scheduled=Count("pk", filter=Q(trigger=BackupRun.Trigger.SCHEDULED)),
        scheduled_succeeded=Count("pk", filter=Q(trigger=BackupRun.Trigger.SCHEDULED,
                                                 state=BackupRun.State.SUCCEEDED)),
        scheduled_failed=Count("pk", filter=Q(trigger=BackupRun.Trigger.SCHEDULED, state=BackupRun.State.FAILED)),
        manual=Count("pk", filter=Q(trigger=BackupRun.Trigger.MANUAL)),
        manual_succeeded=Count("pk", filter=Q(trigger=BackupRun.Trigger.MANUAL, state=BackupRun.State.SUCCEEDED)),
    )
    # A good backup: a run that succeeded and whose archive was not found corrupt or incomplete
    # since; manual ones count too (they protect the data just the same).
    good = list(runs.filter(state=BackupRun.State.SUCCEEDED, finished_at__gte=start, finished_at__lt=end)
                .exclude(archive__state__in=[Archive.State.CORRUPT, Archive.State.INCOMPLETE])
                .order_by("finished_at").values_list("finished_at", flat=True))
    policies = list(db.policies.all())
    slots = sum(crontab_slots(p.schedule, start, end) for p in policies if p.enabled)
    longest, gap_from, gap_to = _gap([start, *good, end])
    objective, source = rpo_objective(policies)
    hours = longest.total_seconds() / 3600
    return {
        "database": db.name,
        "policies": [{"name": p.name, "kind": p.kind, "schedule": str(p.schedule), "enabled": p.enabled}
                     for p in policies],
        "expected_slots": slots,
        **counts,
        "good_backups": len(good),
        "last_good": good[-1] if good else None,
        "longest_gap_hours": round(hours, 2),
        "longest_gap_from": gap_from,
        "longest_gap_to": gap_to,
        "rpo_objective_hours": objective,
        "rpo_objective_source": source,
        "rpo_met": hours <= objective,
    }


def _wal(db: Database) -> list[dict]:
    return [{"database": db.name, "timeline": t.timeline, "first_segment": t.first_segment,
             "last_segment": t.last_segment, "segments": t.segment_count, "gaps": [list(g) for g in t.gaps or []],
             "scanned_at": t.scanned_at} for t in db.wal_timelines.all()]


def _restores(start: datetime, end: datetime) -> list[dict]:
    """Restores that ran (started) in the period, with their measured duration and who approved."""
    reqs = (RestoreRequest.objects.filter(started_at__gte=start, started_at__lt=end)
            .select_related("database", "requester").order_by("started_at", "pk"))
    approvers: dict[int, list[str]] = {}
    for request_id, username in (Approval.objects.filter(request__in=reqs, decision=Approval.Decision.APPROVE)
                                 .order_by("created_at", "pk").values_list("request_id", "user__username")):
        approvers.setdefault(request_id, []).append(username)
    out = []
    for r in reqs:
        duration = r.duration
        out.append({
            "id": r.pk, "kind": r.kind, "mode": r.mode,
            "database": r.database.name if r.database_id else "all databases",
            "state": r.state, "requester": r.requester.get_username(), "change_ticket": r.change_ticket,
            "reason": r.reason, "started_at": r.started_at, "finished_at": r.finished_at,
            "duration_seconds": round(duration.total_seconds(), 1) if duration else None,
            "approvers": approvers.get(r.pk, []),
        })
    return out


def _period_events(start: datetime, end: datetime):
    return AuditEvent.objects.filter(created_at__gte=start, created_at__lt=end)


def _failed_signins(start: datetime, end: datetime) -> dict:
    # recorded with the attempted username as the target's label (audit.signals)
    rows = (_period_events(start, end).filter(action="auth.login.failed").values("target_label")
            .annotate(n=Count("pk")).order_by("-n", "target_label"))
    per_user = [{"username": r["target_label"], "count": r["n"]} for r in rows]
    # the sign-in lockout (django-axes) records its refusals as auth.login.locked
    locked = _period_events(start, end).filter(action="auth.login.locked").count()
    return {"total": sum(r["count"] for r in per_user), "per_username": per_user, "lockouts": locked}


def _config_changes(start: datetime, end: datetime) -> dict:
    qs = _period_events(start, end).filter(action__startswith="config.").order_by("sequence")
    total = qs.count()
    items = [{"sequence": e["sequence"], "created_at": e["created_at"], "actor": e["actor_label"],
              "action": e["action"], "target": e["target_label"] or f"{e['target_type']} {e['target_id']}".strip(),
              "fields": sorted((e["details"] or {}).get("changes", {}))}
             for e in qs.values("sequence", "created_at", "actor_label", "action", "target_type", "target_id",
                                "target_label", "details")[:CONFIG_LIST_LIMIT]]
    return {"total": total, "listed": len(items), "items": items}


def verify_chain() -> dict:
    stored = checkpoints.read()
    count, breaks = chain.verify(stored)
    return {"ok": not breaks, "events": count, "checkpoints": len(stored),
            "first_break": str(breaks[0]) if breaks else None, "breaks": [str(b) for b in breaks]}


def _drills(start: datetime, end: datetime) -> dict:
    items = [{"id": d.pk, "database": d.database.name, "kind": d.kind, "archive": d.archive.path if d.archive else "",
              "started_at": d.started_at, "rto_seconds": d.rto_seconds, "state": d.state,
              "tables_verified": d.tables_verified, "error": d.error}
             for d in Drill.objects.filter(started_at__gte=start, started_at__lt=end)
             .select_related("database", "archive").order_by("started_at", "pk")]
    done = [d["rto_seconds"] for d in items if d["state"] == Drill.State.SUCCEEDED and d["rto_seconds"] is not None]
    return {"count": len(items), "items": items,
            "failed": sum(d["state"] == Drill.State.FAILED for d in items),
            "longest_rto_seconds": max(done) if done else None,
            "note": "Each drill restored the newest archive (or a point in time) into a throwaway cluster; "
                    "its duration is the measured recovery time (RTO)."}


def summary(start: datetime, end: datetime, *, now: datetime | None = None) -> dict:
    """Everything the period summary shows, as plain data. A period that has not ended yet is
    measured up to `now` (no backups are expected from the future)."""
    now = now or timezone.now()
    until = min(end, now)
    if until < start:
        until = start
    head = chain.head()
    databases = list(Database.objects.order_by("name").prefetch_related("policies__schedule", "wal_timelines"))
    return {
        "start": start, "end": end, "measured_until": until, "generated_at": now,
        "chain_head": {"sequence": head[0], "hash": head[1]},
        "default_rpo_hours": default_rpo_hours(),
        "backups": [_backups(db, start, until) for db in databases],
        "wal": [t for db in databases for t in _wal(db)],
        "drills": _drills(start, end),
        "retention": {"days": settings.AUDIT_RETENTION_DAYS,
                      "oldest_event": AuditEvent.objects.order_by("sequence").values_list("created_at", flat=True)
                      .first()},
        "restores": _restores(start, end),
        "failed_signins": _failed_signins(start, end),
        "config_changes": _config_changes(start, end),
        "chain": verify_chain(),
    }


# -- periods -------------------------------------------------------------------------------------
def period_label(start: datetime | None, end: datetime | None) -> str:
    """"2026-11-01 to 2026-11-30" for whole days (the end day included), else exact instants
    with the end excluded."""
    tz = timezone.get_current_timezone()

    def whole_day(d):
        return d is not None and d.astimezone(tz).time() == time.min

    if start is None and end is None:
        return "the whole trail"
    if whole_day(start) and whole_day(end):
        return (f"{start.astimezone(tz):%Y-%m-%d} to {(end.astimezone(tz) - timedelta(days=1)):%Y-%m-%d} "
                f"({tz.key if hasattr(tz, 'key') else tz})")
    fmt = "%Y-%m-%d %H:%M:%S %Z"
    return (f"{start.astimezone(tz).strftime(fmt) if start else 'the beginning'} up to "
            f"{end.astimezone(tz).strftime(fmt) if end else 'now'} (end excluded)")


# -- one generation ------------------------------------------------------------------------------
@dataclass
class Report:
    """One report: iterate it for its bytes, then record() it. For the event log the chain head
    read at creation bounds the rows, as in an export."""

    kind: str
    fmt: str
    filters: Filters
    now: datetime | None = None
    head: tuple[int, str] = (0, chain.GENESIS)
    bytes: int = 0
    info: dict = field(default_factory=dict)  # rows / total / truncated, filled while rendering
    complete: bool = False
    _sha: object = field(default_factory=hashlib.sha256, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FilterError(f"report {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.fmt not in FORMATS:
            raise FilterError(f"format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        if self.kind == "summary":
            if not (self.filters.start and self.filters.end):
                raise FilterError("a summary needs a period: from and to")
            if self.filters.describe() != "all events":
                raise FilterError("a summary covers everything in its period: actor, action, outcome and target "
                                  "filters apply to the event log only")
        self.now = self.now or timezone.now()
        self.head = chain.head()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.fmt]

    @property
    def filename(self) -> str:
        f = self.filters
        span = (f"{f.start:%Y%m%d}-{(f.end - timedelta(seconds=1)):%Y%m%d}" if f.start and f.end
                else self.now.strftime("%Y%m%d-%H%M%S"))
        return f"bankvault-audit-{'summary' if self.kind == 'summary' else 'events'}-{span}.{self.fmt}"

    def _chunks(self) -> Iterator[bytes]:
        from . import reports

        if self.kind == "summary":
            data = summary(self.filters.start, self.filters.end, now=self.now)
            data["chain_head"] = {"sequence": self.head[0], "hash": self.head[1]}
            self.info.update(chain_ok=data["chain"]["ok"], databases=len(data["backups"]))
            if self.fmt == "csv":
                yield from (line.encode() for line in reports.summary_csv(data))
            else:
                yield reports.summary_pdf(data)
        elif self.fmt == "csv":
            yield from reports.events_csv(self.filters, self.head, self.now, self.info)
        else:
            yield reports.events_pdf(self.filters, self.head, self.now, self.info, limit=pdf_max_rows())

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks():
            self._sha.update(chunk)
            self.bytes += len(chunk)
            yield chunk
        self.complete = True

    def record(self, actor, *, request=None, output: str | None = None):
        return audit.record(actor, "audit.report.generated", None, outcome="success" if self.complete else "failure",
                            request=request,
                            details={"report": self.kind, "format": self.fmt, "filters": self.filters.as_dict(),
                                     "period": period_label(self.filters.start, self.filters.end),
                                     "head_sequence": self.head[0], "head_hash": self.head[1],
                                     "sha256": self.sha256, "bytes": self.bytes, "complete": self.complete,
                                     "output": output, **self.info})


def as_utc(value: datetime | date | None) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return value.isoformat()
