"""The watchdog: nothing stays "running" forever, nothing queued is forgotten.

Every 30 seconds (beat entry "bankvault: watchdog", queue `checks`):

- a backup run, restore or drill whose heartbeat is older than BANKVAULT_WORKER_LOST_SECONDS
  lost its worker (killed, host gone): it is failed with that reason, its partial files are
  removed, and a scheduled backup is queued again — once;
- a queued run (or an approved restore) that nobody claimed for BANKVAULT_REQUEUE_SECONDS had
  its message lost (a broker restarted without persistence): it is queued again — once; a
  duplicate is harmless, since only one worker can claim it;
- the newest finished run of each database is a check ("last-run"): a failed run alerts once,
  the next good one recovers it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

import audit
from backups import services as backup_services
from backups.engine.repository import default_repository
from backups.models import Archive, BackupRun, Database, StateError
from recovery.models import RestoreRequest

from . import alerts, health
from .models import CheckState, Drill, Status

log = logging.getLogger(__name__)
ACTOR = "system:watchdog"


def _stale(now, field="heartbeat_at"):
    """Active rows whose heartbeat is too old — or that never beat and started too long ago."""
    limit = now - timedelta(seconds=settings.BANKVAULT_WORKER_LOST_SECONDS)
    return Q(**{f"{field}__lt": limit}) | Q(**{f"{field}__isnull": True, "started_at__lt": limit})


def _when(value) -> str:
    return f"{timezone.localtime(value):%Y-%m-%d %H:%M:%S %Z}" if value else "never"


def lost_runs(now) -> list[dict]:
    done = []
    qs = BackupRun.objects.filter(state__in=[BackupRun.State.RUNNING, BackupRun.State.WAITING_FOR_WAL])
    for run in qs.filter(_stale(now)).select_related("database", "policy"):
        reason = (f"worker lost: no heartbeat from {run.worker or 'its worker'} since {_when(run.heartbeat_at)}; "
                  "its partial files were removed")
        try:
            run.fail(reason, actor=ACTOR)
        except StateError:  # it ended meanwhile
            continue
        removed = default_repository().sweep_staging(
            keep_run_ids=set(BackupRun.objects.filter(state__in=BackupRun.ACTIVE_STATES).values_list("pk", flat=True)))
        for archive in Archive.objects.filter(run=run, state=Archive.State.WAITING_FOR_WAL):
            archive.mark_wal_state(Archive.State.INCOMPLETE, ACTOR, "the worker was lost while waiting for WAL")
        retry = None
        if run.trigger == BackupRun.Trigger.SCHEDULED and run.retry_of_id is None and run.slot_key:
            retry = BackupRun.enqueue(run.database, trigger=BackupRun.Trigger.SCHEDULED, policy=run.policy,
                                      actor_label=ACTOR, kind=run.kind, slot_key=f"{run.slot_key}+retry",
                                      retry_of=run)
            if retry.state == BackupRun.State.QUEUED:
                transaction.on_commit(lambda r=retry: backup_services.dispatch(r))
        log.error("run %s of %s: %s", run.pk, run.database.name, reason)
        done.append({"run": run.pk, "database": run.database.name, "staging_removed": len(removed),
                     "retry": retry.pk if retry else None})
    return done


def lost_restores(now) -> list[dict]:
    from recovery.engine import restore

    done = []
    for req in RestoreRequest.objects.filter(state=RestoreRequest.State.RUNNING).filter(_stale(now)) \
            .select_related("target_server"):
        dropped = []
        for item in req.items:
            db = Database.objects.filter(pk=item.get("database")).first()
            if db is None:
                continue
            server = req.target_server or db
            final = db.dbname if req.mode == RestoreRequest.Mode.REPLACE else (req.new_name or db.dbname)
            # Only the request's own work databases: never the live one, never a pre-restore copy.
            names = list(dict.fromkeys([f"{final}__restore_{req.pk}"[:63], f"{db.dbname}__tables_{req.pk}"[:63]]))
            try:
                with server.restore_conninfo("postgres").connect(autocommit=True) as conn:
                    present = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                                                          [names]).fetchall()]
            except Exception as exc:  # the target may be down too; the reason says what is left
                log.warning("could not look for work databases of request %s on %s: %s", req.pk, server.name, exc)
                present = []
            dropped += [name for name in present if restore.drop_quietly(server, name)]
        reason = (f"worker lost: no heartbeat from {req.worker or 'its worker'} since {_when(req.heartbeat_at)}; "
                  "the live database was not touched" + (f"; removed {', '.join(dropped)}" if dropped else ""))
        try:
            req.fail(reason, actor=ACTOR)
        except StateError:
            continue
        done.append({"request": req.pk, "dropped": dropped})
    return done


def lost_drills(now) -> list[dict]:
    done = []
    for drill in Drill.objects.filter(state=Drill.State.RUNNING).filter(_stale(now)).select_related("database"):
        n = Drill.objects.filter(pk=drill.pk, state=Drill.State.RUNNING).update(
            state=Drill.State.FAILED, finished_at=now,
            error=f"worker lost: no heartbeat since {_when(drill.heartbeat_at)}")
        if n:
            audit.record(ACTOR, "drill.failed", drill, outcome="failure",
                         details={"database": drill.database.name, "error": "worker lost"})
            done.append({"drill": drill.pk})
    return done


def requeue(now) -> list[dict]:
    """Queued runs and approved restores nobody claimed: their message was lost. Once each."""
    limit = now - timedelta(seconds=settings.BANKVAULT_REQUEUE_SECONDS)
    done = []
    for run in BackupRun.objects.filter(state=BackupRun.State.QUEUED, queued_at__lt=limit, requeued_at__isnull=True):
        if BackupRun.objects.filter(pk=run.pk, requeued_at__isnull=True).update(requeued_at=now):
            audit.record(ACTOR, "backup.run.requeued", run, details={"database_id": run.database_id,
                                                                     "queued_at": run.queued_at.isoformat()})
            transaction.on_commit(lambda r=run: backup_services.dispatch(r))
            done.append({"run": run.pk})
    from recovery.models import _dispatch

    for req in RestoreRequest.objects.filter(state=RestoreRequest.State.APPROVED, decided_at__lt=limit,
                                             requeued_at__isnull=True):
        if RestoreRequest.objects.filter(pk=req.pk, requeued_at__isnull=True).update(requeued_at=now):
            audit.record(ACTOR, "restore.request.requeued", req)
            transaction.on_commit(lambda pk=req.pk: _dispatch(pk))
            done.append({"request": req.pk})
    return done


def last_run_checks() -> list[tuple]:
    """Each database's newest finished run as a check: a failed run alerts once; the next good
    one recovers it."""
    newest = BackupRun.objects.filter(database=OuterRef("pk"), state__in=[BackupRun.State.SUCCEEDED,
                                                                          BackupRun.State.FAILED]) \
        .order_by("-finished_at")
    current = {s.target: s.status for s in CheckState.objects.filter(name="last-run")}
    results = []
    for db in Database.objects.annotate(run_state=Subquery(newest.values("state")[:1]),
                                        run_id=Subquery(newest.values("pk")[:1]),
                                        run_error=Subquery(newest.values("error")[:1])):
        if db.run_state is None:
            continue
        failed = db.run_state == BackupRun.State.FAILED
        if current.get(db.name) == (Status.FAILING if failed else Status.OK):
            continue  # recorded already: history only on change (this runs every 30 s)
        results.append(health.Result(
            "last-run", db.name, Status.FAILING if failed else Status.OK,
            f"run {db.run_id} failed: {db.run_error[:300]}" if failed else f"run {db.run_id} succeeded",
            {"run": db.run_id}))
    return health.record(results)


def sweep(now=None) -> dict:
    now = now or timezone.now()
    report = {"lost_runs": lost_runs(now), "lost_restores": lost_restores(now), "lost_drills": lost_drills(now),
              "requeued": requeue(now)}
    report["alerts"] = len(alerts.process(last_run_checks()))
    return report
