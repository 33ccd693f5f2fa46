"""Celery tasks: thin. Each loads a row by id and calls the engine, which records the outcome."""

import logging

from celery import shared_task

from . import walpush
from .engine import runner
from .engine import wal as wal_checks
from .models import BackupPolicy, BackupRun, Database, WalMode, slot_key

log = logging.getLogger(__name__)


@shared_task(name="backups.tasks.execute_run")
def execute_run(run_id: int) -> None:
    # A failure is recorded on the run with its reason and re-raised for Celery to see;
    # retrying a failed pg_dump blindly would only hide the problem.
    runner.execute(run_id)


@shared_task(name="backups.tasks.run_policy")
def run_policy(policy_id: int) -> None:
    """Started by celery-beat for a policy's schedule."""
    policy = BackupPolicy.objects.select_related("database").filter(pk=policy_id).first()
    if policy is None or not policy.enabled:
        return
    # One run per schedule slot: a duplicated or redelivered message finds the slot's run and
    # leaves it alone (claiming it would fail anyway); a slot missed while beat was down runs
    # once when beat is back, as the newest slot.
    run = BackupRun.enqueue(policy.database, trigger=BackupRun.Trigger.SCHEDULED, policy=policy,
                            actor_label="system:beat", slot_key=slot_key(policy))
    if run.state != BackupRun.State.QUEUED:
        log.info("slot %s of %s has run %s (%s) already", run.slot_key, policy, run.pk, run.state)
        return
    runner.execute(run.pk)


@shared_task(name="backups.tasks.check_wal_archiving")
def check_wal_archiving(timeout: float = 60) -> dict:
    """Hourly: force a WAL switch on every archiving database and confirm the segment reaches
    the repository, so a broken archive_command is found before anyone needs a restore."""
    results = {}
    for db in Database.objects.exclude(wal_mode=WalMode.NONE):
        results[db.name] = wal_checks.check_and_record(db, actor="system:beat", timeout=timeout)
        # Anything a push's background compactor left uncompressed (it was killed, the disk was full).
        area = wal_checks.area_path(db)
        if area.is_dir():
            walpush.compact(str(area))
    return results


@shared_task(name="backups.tasks.cleanup")
def cleanup() -> dict:
    """Monthly (and on demand): staging directories of runs that are no longer alive, WAL that a
    push's background compressor left uncompressed, then retention (backups.retention): archives
    that no policy keeps any more, and the WAL that no kept base backup needs."""
    from . import retention
    from .engine.repository import default_repository

    repo = default_repository()
    alive = set(BackupRun.objects.filter(state__in=BackupRun.ACTIVE_STATES).values_list("pk", flat=True))
    removed = repo.sweep_staging(keep_run_ids=alive, older_than=3600)
    compacted = 0
    wal_root = repo.root / "wal"
    if wal_root.is_dir():
        for area in wal_root.iterdir():
            if area.is_dir():
                compacted += walpush.compact(str(area))
    expired = retention.cleanup(retention.CLEANUP_ACTOR, repo=repo)
    return {"staging_removed": len(removed), "wal_compressed": compacted, "retention": expired}


@shared_task(name="backups.tasks.verify_archive")
def verify_archive(archive_id: int, user_id: int | None = None) -> dict:
    """A verification asked for from the dashboard (large archives take longer than a request)."""
    from django.contrib.auth import get_user_model

    from .models import Archive

    archive = Archive.objects.get(pk=archive_id)
    user = get_user_model().objects.filter(pk=user_id).first() if user_id else None
    ok, error = runner.verify(archive, user or "system:worker")
    return {"ok": ok, "error": error}


@shared_task(name="backups.tasks.copy_offsite", bind=True, max_retries=3)
def copy_offsite(self, archive_id: int, remote_id: int) -> dict | None:
    """Copy one archive to one remote repository and verify it there (queued after each
    successful run, per enabled remote of its policy). The outcome is recorded on the
    ArchiveCopy; only an unreachable endpoint is retried, with backoff."""
    import random

    from . import offsite

    try:
        copy = offsite.copy_by_id(archive_id, remote_id)
    except offsite.Unreachable as exc:
        raise self.retry(exc=exc, countdown=60 * 2 ** self.request.retries + random.randint(0, 30)) from exc
    return {"state": copy.state, "bytes": copy.bytes} if copy else None


@shared_task(name="backups.tasks.offsite_maintenance")
def offsite_maintenance() -> dict:
    """Daily: older copies to their remote's archive storage class, and copies of expired
    archives that could not be deleted before."""
    from . import offsite

    return offsite.maintenance("system:beat")
