"""The dashboard: is every database recoverable, at a glance — and the pages behind that answer.

Every page does a fixed number of queries however much history there is (runs, archives,
audit events): the newest-per-database facts come from correlated subqueries served by the
(database, -time) indexes, lists are keyset-paginated, charts aggregate in the database."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Avg, Count, F, Max, OuterRef, Subquery, Sum
from django.db.models.functions import TruncDay
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST
from django_celery_beat.models import PeriodicTask

import audit
from backups import services as backup_services
from backups.engine import wal
from backups.engine.repository import RepositoryError, default_repository
from backups.models import Archive, BackupKind, BackupRun, Database, WalMode
from recovery import rules
from recovery.models import RestoreRequest

from .models import CheckResult, CheckState, Drill, Status

PAGE = 50


def _require_reader(request):
    if not rules.can_read(request.user):
        raise PermissionDenied("bankvault is for operators, approvers, auditors and administrators")


def _states() -> dict[tuple[str, str], CheckState]:
    return {(s.name, s.target): s for s in CheckState.objects.exclude(name="beat-heartbeat")}


def _databases():
    """Databases with the facts a card shows, in one query."""
    good = BackupRun.objects.filter(database=OuterRef("pk"), state=BackupRun.State.SUCCEEDED).order_by("-finished_at")
    last = BackupRun.objects.filter(database=OuterRef("pk")).order_by("-queued_at")
    active = BackupRun.objects.filter(database=OuterRef("pk"), state__in=BackupRun.ACTIVE_STATES).order_by("-queued_at")
    drill = Drill.objects.filter(database=OuterRef("pk")).order_by("-started_at")
    return Database.objects.annotate(
        last_good_at=Subquery(good.values("finished_at")[:1]),
        last_good_bytes=Subquery(good.values("bytes")[:1]),
        last_state=Subquery(last.values("state")[:1]),
        last_error=Subquery(last.values("error")[:1]),
        active_run=Subquery(active.values("pk")[:1]),
        drill_state=Subquery(drill.values("state")[:1]),
        drill_at=Subquery(drill.values("started_at")[:1]),
        drill_rto=Subquery(drill.values("rto_seconds")[:1]),
    ).order_by("name")


def _schedules() -> list[dict]:
    now = timezone.now()
    out = []
    for task in PeriodicTask.objects.select_related("crontab", "interval").order_by("name"):
        sched = task.crontab or task.interval
        nxt = None
        if task.enabled and sched is not None:
            nxt = now + max(sched.schedule.remaining_estimate(task.last_run_at or now), timedelta(0))
        out.append({"name": task.name, "schedule": str(sched), "enabled": task.enabled,
                    "last_run_at": task.last_run_at, "next_run_at": nxt})
    return out


def _disk() -> dict:
    root = Path(settings.BANKVAULT_REPOSITORY)
    try:
        usage = shutil.disk_usage(root if root.exists() else root.parent)
    except OSError:
        return {}
    return {"free": usage.free, "total": usage.total, "used_pct": round(100 * (1 - usage.free / usage.total), 1)}


@login_required
def overview(request):
    _require_reader(request)
    states = _states()
    dbs = list(_databases())
    policies: dict[int, list] = {}
    from backups.models import BackupPolicy

    for p in BackupPolicy.objects.filter(enabled=True).select_related("schedule", "database"):
        policies.setdefault(p.database_id, []).append(p)
    now = timezone.now()
    cards = []
    for db in dbs:
        fresh = [states.get(("freshness", str(p))) for p in policies.get(db.pk, [])]
        worst = health_worst([s.status for s in fresh if s] + [
            s.status for s in (states.get(("connectivity", db.name)), states.get(("wal", db.name))) if s])
        rpo = min((p.effective_rpo() for p in policies.get(db.pk, [])), default=None)
        cards.append({
            "db": db, "status": worst,
            "age": now - db.last_good_at if db.last_good_at else None, "rpo": rpo,
            "stale": bool(rpo and db.last_good_at and now - db.last_good_at > rpo),
            "freshness": fresh, "connectivity": states.get(("connectivity", db.name)),
            "wal": states.get(("wal", db.name)),
        })
    running = list(BackupRun.objects.filter(state__in=BackupRun.ACTIVE_STATES).select_related("database")
                   .order_by("-queued_at")[:20])
    restores = list(RestoreRequest.objects.filter(state__in=RestoreRequest.OPEN_STATES)
                    .select_related("database").order_by("-created_at")[:20])
    drills = list(Drill.objects.filter(state=Drill.State.RUNNING).select_related("database")[:20])
    return render(request, "monitoring/overview.html", {
        "cards": cards, "overall": health_worst([s.status for s in states.values()]),
        "schedules": _schedules(), "disk": _disk(), "disk_state": next(
            (s for (n, _), s in states.items() if n == "disk"), None),
        "running": running, "restores": restores, "drills": drills,
        "can_backup": request.user.has_perm("backups.run_backup"),
    })


def health_worst(statuses: list[str]) -> str:
    for status in (Status.FAILING, Status.WARNING, Status.PENDING):
        if status in statuses:
            return status
    return Status.OK if statuses else Status.PENDING


@login_required
def database_detail(request, name):
    _require_reader(request)
    db = get_object_or_404(Database, name=name)
    days = 90 if request.GET.get("days") == "90" else 30
    since = timezone.now() - timedelta(days=days)
    daily = list(BackupRun.objects.filter(database=db, state=BackupRun.State.SUCCEEDED, queued_at__gte=since,
                                          started_at__isnull=False, finished_at__isnull=False)
                 .annotate(day=TruncDay("finished_at")).values("day", "kind")
                 .annotate(size=Max("bytes"), seconds=Avg(F("finished_at") - F("started_at")), n=Count("id"))
                 .order_by("day"))
    chart = {"days": days, "labels": sorted({d["day"].date().isoformat() for d in daily}), "series": {}}
    for d in daily:
        key = d["kind"]
        chart["series"].setdefault(key, {"size": {}, "seconds": {}})
        chart["series"][key]["size"][d["day"].date().isoformat()] = d["size"]
        chart["series"][key]["seconds"][d["day"].date().isoformat()] = round(d["seconds"].total_seconds(), 2)
    states = _states()
    context = {
        "db": db, "days": days, "chart": chart,
        "runs": BackupRun.objects.filter(database=db).select_related("database").order_by("-queued_at")[:25],
        "archives": Archive.objects.filter(database=db).select_related("database").order_by("-started_at")[:25],
        "drills": Drill.objects.filter(database=db).order_by("-started_at")[:5],
        "policies": list(db.policies.select_related("schedule")),
        "states": [s for (n, t), s in states.items() if t == db.name or t.startswith(f"{db.name}/")],
        "windows": _windows(db),
        "totals": Archive.objects.filter(database=db).aggregate(n=Count("id"), bytes=Sum("bytes")),
        "can_backup": request.user.has_perm("backups.run_backup"),
        "can_verify": request.user.has_perm("backups.verify_archive"),
    }
    return render(request, "monitoring/database.html", context)


def _windows(db):
    if db.wal_mode == WalMode.NONE:
        return []
    try:
        return wal.restore_windows(db)
    except OSError:
        return []


def _filtered_page(request, qs, fields: tuple[str, ...]):
    """One page (newest first, keyset on id) of ``qs`` filtered by ?database= and ``fields``
    from the query string: (rows, the id to continue before or None, the filters as given)."""
    filters = {k: request.GET.get(k, "").strip() for k in ("database", *fields)}
    if filters["database"]:
        qs = qs.filter(database__name=filters["database"])
    for field in fields:
        if filters[field]:
            qs = qs.filter(**{field: filters[field]})
    before = request.GET.get("before", "")
    if before.isdigit():
        qs = qs.filter(id__lt=int(before))
    page = list(qs.order_by("-id")[:PAGE + 1])
    return page[:PAGE], page[PAGE - 1].pk if len(page) > PAGE else None, filters


@login_required
def runs(request):
    _require_reader(request)
    rows, next_before, filters = _filtered_page(
        request, BackupRun.objects.select_related("database"), ("state", "trigger", "kind"))
    return render(request, "monitoring/runs.html", {
        "runs": rows, "next_before": next_before, "filters": filters,
        "states": BackupRun.State.choices, "triggers": BackupRun.Trigger.choices,
        "kinds": BackupKind.choices, "databases": Database.objects.order_by("name").values_list("name", flat=True)})


@login_required
def run_detail(request, pk):
    _require_reader(request)
    run = get_object_or_404(BackupRun.objects.select_related("database", "policy"), pk=pk)
    return render(request, "monitoring/run.html", {"run": run, "archive": Archive.objects.filter(run=run).first()})


@login_required
def run_progress(request, pk):
    _require_reader(request)
    run = get_object_or_404(BackupRun.objects.select_related("database"), pk=pk)
    return render(request, "monitoring/_run_progress.html", {"run": run,
                                                             "archive": Archive.objects.filter(run=run).first()})


@login_required
def drill_detail(request, pk):
    _require_reader(request)
    drill = get_object_or_404(Drill.objects.select_related("database", "archive"), pk=pk)
    return render(request, "monitoring/drill.html", {"drill": drill})


@login_required
def drill_progress(request, pk):
    _require_reader(request)
    drill = get_object_or_404(Drill.objects.select_related("database"), pk=pk)
    return render(request, "monitoring/_drill_progress.html", {"drill": drill})


@login_required
@require_POST
def backup_now(request, name):
    _require_reader(request)
    if not request.user.has_perm("backups.run_backup"):
        raise PermissionDenied("starting backups is for operators")
    db = get_object_or_404(Database, name=name)
    kind = request.POST.get("kind", BackupKind.LOGICAL)
    if kind not in BackupKind.values:
        raise PermissionDenied("unknown backup kind")
    if kind == BackupKind.BASE and db.wal_mode == WalMode.NONE:
        messages.error(request, f"{db.name} has no WAL archiving: a base backup could not be restored.")
        return redirect("dashboard:database", name=db.name)
    with transaction.atomic():
        run = backup_services.start_backup(db, user=request.user, kind=kind)
    messages.success(request, f"Backup of {db.name} queued (run {run.pk}).")
    return redirect("dashboard:run", pk=run.pk)


@login_required
def archives(request):
    _require_reader(request)
    rows, next_before, filters = _filtered_page(
        request, Archive.objects.select_related("database"), ("kind", "state"))
    return render(request, "monitoring/archives.html", {
        "archives": rows, "next_before": next_before, "filters": filters,
        "kinds": BackupKind.choices, "states": Archive.State.choices,
        "databases": Database.objects.order_by("name").values_list("name", flat=True),
        "can_verify": request.user.has_perm("backups.verify_archive")})


@login_required
def archive_detail(request, pk):
    _require_reader(request)
    archive = get_object_or_404(Archive.objects.select_related("database", "run"), pk=pk)
    return render(request, "monitoring/archive.html", {
        "archive": archive, "files": archive.files.all(),
        "copies": archive.copies.select_related("remote").order_by("remote__name"),
        "can_verify": request.user.has_perm("backups.verify_archive"),
        "can_download": request.user.has_perm("backups.download_archive"),
        "can_request": rules.can_request(request.user).ok})


@login_required
@require_POST
def archive_verify(request, pk):
    _require_reader(request)
    if not request.user.has_perm("backups.verify_archive"):
        raise PermissionDenied("verifying archives is for operators")
    archive = get_object_or_404(Archive, pk=pk)
    from backups.engine import runner

    # Small archives verify at once; the page shows the outcome. (The worker task
    # backups.tasks.verify_archive does the same for scheduled re-verification.)
    ok, error = runner.verify(archive, request.user)
    if ok:
        messages.success(request, f"Archive {archive.pk} verified: every file matches its checksum and "
                                  "the dump can be read.")
    else:
        messages.error(request, f"Archive {archive.pk} FAILED verification: {error}")
    return redirect("dashboard:archive", pk=archive.pk)


@login_required
def archive_download(request, pk, name):
    """One file of an archive, as stored (compressed, encrypted if it was). A copy of the data
    leaves the vault: operators only, and every download — or refusal — is an audit event."""
    _require_reader(request)
    archive = get_object_or_404(Archive.objects.select_related("database"), pk=pk)
    if not request.user.has_perm("backups.download_archive"):
        audit.record(request.user, "archive.download.denied", archive, outcome="denied",
                     details={"file": name}, request=request)
        raise PermissionDenied("downloading archives is for operators")
    entry = archive.files.filter(path=name).first()
    if entry is None and name != "manifest.json":
        raise Http404("no such file in this archive")
    try:
        path = default_repository().archive_dir(archive.path) / name
        handle = path.open("rb")
    except (OSError, RepositoryError) as exc:
        error = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        audit.record(request.user, "archive.downloaded", archive, outcome="failure",
                     details={"file": name, "error": error}, request=request)
        messages.error(request, f"{name} cannot be read from the repository ({error}); verify the archive.")
        return redirect("dashboard:archive", pk=archive.pk)
    audit.record(request.user, "archive.downloaded", archive, request=request, details={
        "file": name, "bytes": entry.bytes if entry else path.stat().st_size,
        "sha256": entry.sha256 if entry else archive.manifest_sha256})
    response = FileResponse(handle, as_attachment=True, filename=Path(name).name,
                            content_type="application/octet-stream")
    if entry:
        response["X-Checksum-SHA256"] = entry.sha256
    return response


@login_required
def health_history(request):
    _require_reader(request)
    states = sorted(_states().values(), key=lambda s: (s.status != Status.FAILING, s.status != Status.WARNING,
                                                        s.name, s.target))
    qs = CheckResult.objects.order_by("-id")
    name = request.GET.get("check", "").strip()
    if name:
        qs = qs.filter(name=name)
    before = request.GET.get("before", "")
    if before.isdigit():
        qs = qs.filter(id__lt=int(before))
    page = list(qs[:PAGE + 1])
    return render(request, "monitoring/health.html", {
        "states": states, "results": page[:PAGE], "next_before": page[PAGE - 1].pk if len(page) > PAGE else None,
        "check": name, "failing": sum(1 for s in states if s.status == Status.FAILING)})


__all__ = ["overview", "database_detail", "runs", "run_detail", "run_progress", "backup_now", "archives",
           "archive_detail", "archive_verify", "health_history"]
