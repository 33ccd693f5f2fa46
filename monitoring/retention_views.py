"""Retention pages: the dry run of the next cleanup (every reader), and placing or lifting a
legal hold on an archive (operators: backups.set_legal_hold)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from django_celery_beat.models import PeriodicTask

import audit
from backups import retention
from backups.models import Archive, Database

from .dashboard import _require_reader


def _next_cleanup():
    from backups.models import next_slot

    task = PeriodicTask.objects.filter(task="backups.tasks.cleanup", enabled=True).select_related("crontab").first()
    return next_slot(task.crontab) if task is not None and task.crontab is not None else None


@login_required
def retention_plan(request):
    _require_reader(request)
    plans = [retention.plan_database(db) for db in Database.objects.order_by("name")]
    return render(request, "monitoring/retention.html", {
        "plans": plans, "next_cleanup": _next_cleanup(),
        "total_delete": sum(len(p.delete) for p in plans),
        "total_bytes": sum(d.item.bytes for p in plans for d in p.delete)})


def _hold_view(request, pk, hold: bool):
    _require_reader(request)
    archive = get_object_or_404(Archive, pk=pk)
    action = "archive.legal_hold.placed" if hold else "archive.legal_hold.lifted"
    if not request.user.has_perm("backups.set_legal_hold"):
        audit.record(request.user, action, archive, outcome="denied", request=request,
                     details={"reason": "no permission backups.set_legal_hold"})
        raise PermissionDenied("legal holds are placed and lifted by operators")
    try:
        (retention.place_hold if hold else retention.lift_hold)(
            archive.pk, request.user, request.POST.get("reason", ""), request=request)
    except retention.RetentionError as exc:
        messages.error(request, f"Nothing changed: {exc}.")
    else:
        messages.success(request, f"Archive {archive.pk} is under legal hold: no cleanup or person can delete it."
                         if hold else f"Legal hold on archive {archive.pk} lifted; retention applies to it again.")
    return redirect("dashboard:archive", pk=archive.pk)


@login_required
@require_POST
def archive_hold(request, pk):
    return _hold_view(request, pk, True)


@login_required
@require_POST
def archive_release(request, pk):
    return _hold_view(request, pk, False)
