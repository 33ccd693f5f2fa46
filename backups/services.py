"""Entry points that start work: used by the admin, the dashboard, commands and tasks."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from .models import BackupPolicy, BackupRun, Database

log = logging.getLogger(__name__)


def start_backup(database: Database, *, user=None, actor_label: str = "", kind: str | None = None,
                 policy: BackupPolicy | None = None) -> BackupRun:
    """Queue a manual backup and hand it to a worker once the transaction commits."""
    run = BackupRun.enqueue(database, trigger=BackupRun.Trigger.MANUAL, requested_by=user,
                            actor_label=actor_label, kind=kind, policy=policy)
    transaction.on_commit(lambda: dispatch(run))
    return run


def dispatch(run: BackupRun) -> None:
    from .tasks import execute_run

    try:
        execute_run.apply_async((run.pk,), retry=True, retry_policy={"max_retries": 2, "interval_start": 0.5})
    except Exception as exc:  # broker down: the run must not sit "queued" forever
        log.error("could not queue run %s: %s", run.pk, exc)
        run.fail(actor="system:portal", error=f"could not hand the backup to a worker: the task queue at "
                 f"{_safe_broker_url()} is unreachable ({exc.__class__.__name__})")


def _safe_broker_url() -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(settings.CELERY_BROKER_URL)
