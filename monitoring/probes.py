"""Machine-readable health: /healthz for load balancers and container HEALTHCHECKs (no auth,
no secrets, only the overall status) and /metrics in the Prometheus text format (no auth by
default; METRICS_TOKEN asks for a bearer token). Both read stored states; neither runs a check
or opens a connection to a target on request."""

import hmac

from django.conf import settings
from django.db.models import Max, OuterRef, Subquery
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from backups.engine import wal
from backups.models import Archive, BackupRun, Database, WalMode, WalTimeline

from . import health
from .models import CheckState, Drill, Status

STATUS_VALUE = {Status.OK: 0, Status.WARNING: 1, Status.FAILING: 2, Status.PENDING: 3}


@never_cache
@require_GET
def healthz(request):
    status = health.overall()
    return JsonResponse({"status": status}, status=503 if status == Status.FAILING else 200)


def _authorized(request) -> bool:
    token = settings.METRICS_TOKEN
    if not token:
        return True
    given = request.META.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), token.encode())


def _labels(**values) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in values.items())
    return "{" + inner + "}"


@never_cache
@require_GET
def metrics(request):
    if not _authorized(request):
        return HttpResponse("bearer token required\n", status=401, content_type="text/plain")
    now = timezone.now()
    good = BackupRun.objects.filter(database=OuterRef("pk"), state=BackupRun.State.SUCCEEDED).order_by("-finished_at")
    dbs = list(Database.objects.annotate(
        last_success=Subquery(good.values("finished_at")[:1]),
        last_bytes=Subquery(good.values("bytes")[:1]),
        last_started=Subquery(good.values("started_at")[:1]),
    ).order_by("name"))
    first_base = {r["database"]: r["t"] for r in Archive.objects.filter(
        kind="base", state=Archive.State.COMPLETE).values("database").annotate(t=Max("finished_at"))}
    wal_last = {r["database"]: r["t"] for r in WalTimeline.objects.values("database").annotate(
        t=Max("last_archived_at"))}
    drills = {d.database_id: d for d in Drill.objects.filter(state=Drill.State.SUCCEEDED)
              .order_by("database_id", "-started_at").distinct("database_id")}
    lines = [
        "# HELP bankvault_last_backup_success_timestamp_seconds Finish time of the newest good backup.",
        "# TYPE bankvault_last_backup_success_timestamp_seconds gauge",
    ]
    for db in dbs:
        if db.last_success:
            lines.append(f"bankvault_last_backup_success_timestamp_seconds{_labels(database=db.name)} "
                         f"{db.last_success.timestamp():.3f}")
    lines += ["# HELP bankvault_last_backup_size_bytes Size of the newest good backup.",
              "# TYPE bankvault_last_backup_size_bytes gauge"]
    lines += [f"bankvault_last_backup_size_bytes{_labels(database=db.name)} {db.last_bytes}"
              for db in dbs if db.last_success]
    lines += ["# HELP bankvault_last_backup_duration_seconds Duration of the newest good backup.",
              "# TYPE bankvault_last_backup_duration_seconds gauge"]
    lines += [f"bankvault_last_backup_duration_seconds{_labels(database=db.name)} "
              f"{(db.last_success - db.last_started).total_seconds():.3f}"
              for db in dbs if db.last_success and db.last_started]
    lines += ["# HELP bankvault_wal_archive_lag_seconds Time since the newest WAL segment reached the repository.",
              "# TYPE bankvault_wal_archive_lag_seconds gauge"]
    lines += [f"bankvault_wal_archive_lag_seconds{_labels(database=db.name)} "
              f"{(now - wal_last[db.pk]).total_seconds():.3f}"
              for db in dbs if db.wal_mode != WalMode.NONE and wal_last.get(db.pk)]
    lines += ["# HELP bankvault_recoverable_from_timestamp_seconds Oldest point in time that can be recovered.",
              "# TYPE bankvault_recoverable_from_timestamp_seconds gauge",
              "# HELP bankvault_recoverable_until_timestamp_seconds Newest point in time that can be recovered.",
              "# TYPE bankvault_recoverable_until_timestamp_seconds gauge"]
    for db in dbs:
        if db.wal_mode != WalMode.NONE and first_base.get(db.pk):
            windows = wal.restore_windows(db)
            if windows:
                lines.append(f"bankvault_recoverable_from_timestamp_seconds{_labels(database=db.name)} "
                             f"{windows[0]['from'].timestamp():.3f}")
                lines.append(f"bankvault_recoverable_until_timestamp_seconds{_labels(database=db.name)} "
                             f"{max(w['until'] for w in windows).timestamp():.3f}")
    lines += ["# HELP bankvault_check_status Health check state: 0 ok, 1 warning, 2 failing, 3 pending.",
              "# TYPE bankvault_check_status gauge"]
    lines += [f"bankvault_check_status{_labels(check=s.name, target=s.target)} {STATUS_VALUE.get(s.status, 2)}"
              for s in CheckState.objects.exclude(name="beat-heartbeat")]
    lines += ["# HELP bankvault_drill_rto_seconds Measured restore time of the newest successful drill.",
              "# TYPE bankvault_drill_rto_seconds gauge"]
    lines += [f"bankvault_drill_rto_seconds{_labels(database=d.database.name, kind=d.kind)} {d.rto_seconds:.3f}"
              for d in drills.values() if d.rto_seconds is not None]
    return HttpResponse("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4; charset=utf-8")
