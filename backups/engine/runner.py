"""Executes one BackupRun: claim it, produce the archive, move it into the repository,
catalog it, record the outcome. Called by the Celery task, the `backup` command and tests
alike, so there is exactly one way a backup happens."""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .. import locks, offsite
from ..liveness import Heartbeat, db_retry
from ..models import Archive, ArchiveFile, BackupKind, BackupRun, Database, WalMode
from . import gpg, logical, physical, wal
from .pgtools import BackupError
from .repository import LocalRepository, default_repository

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def execute(run_id: int, *, worker: str | None = None, repo: LocalRepository | None = None) -> Archive | None:
    """Run a queued BackupRun to its end. Returns the Archive, or None when the run was not
    ours to run (already claimed by another worker: a duplicated message costs nothing).
    On failure the run is marked failed with the reason, and the BackupError is re-raised."""
    run = BackupRun.objects.select_related("database", "policy").get(pk=run_id)
    if run.state != BackupRun.State.QUEUED:
        log.info("run %s is %s; not running it again", run_id, run.state)
        return None
    # Wait for one of this host's job slots while still queued, then claim: a duplicated
    # message loses the claim and costs nothing.
    with locks.host_slot():
        if not db_retry(lambda: run.claim(worker or worker_name()), what=f"run {run_id}: claim"):
            log.info("run %s was claimed by another worker; not running it again", run_id)
            return None
        repo = repo or default_repository()
        try:
            with locks.database_lock(run.database, f"backup run {run.pk}"), \
                    Heartbeat(BackupRun, run.pk, alive_states=BackupRun.ACTIVE_STATES,
                              watch_states=[BackupRun.State.RUNNING]) as heartbeat:
                try:
                    archive = _backup(run, repo)
                except BackupError as exc:
                    if heartbeat.hung:
                        raise BackupError(heartbeat.reason, exc.detail) from exc
                    raise
        except BackupError as exc:
            db_retry(lambda e=exc: run.fail(e.message, e.detail), what=f"run {run_id}: fail")
            raise
        except Exception as exc:
            log.exception("backup run %s failed unexpectedly", run_id)
            db_retry(lambda e=exc: run.fail(f"internal error: {e.__class__.__name__}: {e}"), what=f"run {run_id}: fail")
            raise
        db_retry(lambda: run.succeed(archive), what=f"run {run_id}: succeed")
    offsite.enqueue_copies(run, archive)  # one copy task per remote of the policy, sent on commit
    return archive


def _backup(run: BackupRun, repo: LocalRepository) -> Archive:
    if run.database.needs_credentials:  # registered again from a manifest, which holds no password
        raise BackupError(
            f"{run.database.name} was registered again from the repository (repository rescan) and has no password "
            f"yet: give it with `manage.py databases set-password {run.database.name} --password-env VAR` (or in "
            "the admin), then back up again")
    if run.kind == BackupKind.BASE:
        return _base_backup(run, repo)
    db = run.database
    opts = logical.options_for(run)
    conn = db.conninfo()
    # The recipient keys are checked (catalog, expiry, usable) before anything is written.
    with gpg.recipients_for(gpg.keys_for_run(run)) as recipients, repo.staging(run.pk) as stage:
        opts.recipients = recipients
        produced = logical.produce(
            conn, stage, opts, source_name=db.name,
            progress_cb=run.report_progress,
            meta={"run": {"id": run.pk, "trigger": run.trigger,
                          "policy": str(run.policy) if run.policy else None}},
        )
        started = datetime.fromisoformat(produced.manifest["started_at"])
        relpath = f"archives/{db.name}/{started:%Y%m%d_%H%M%S}_{run.kind}_r{run.pk}"
        final = repo.commit(stage, relpath)
    try:
        return _catalog_retrying(run, produced, relpath)
    except Exception:
        # The archive on disk is complete and self-describing; a catalog failure must not
        # delete it (a rescan can pick it up), but the run reports the failure.
        log.exception("archive %s is in the repository but could not be cataloged", final)
        raise


def _base_backup(run: BackupRun, repo: LocalRepository) -> Archive:
    """pg_basebackup, then wait until every WAL segment from its start to its stop LSN is in
    the repository and verified; only then is the backup complete."""
    db = run.database
    if db.wal_mode == WalMode.NONE:
        raise wal.WalError(
            f"{db.name} has no WAL archiving (WAL mode 'none'): a base backup cannot be restored without "
            f"its WAL. Set up archiving first (manage.py databases archive-command {db.name}).")
    with gpg.recipients_for(gpg.keys_for_run(run)) as recipients, repo.staging(run.pk) as stage:
        produced = physical.produce_base(
            db.conninfo(), stage, source_name=db.name, progress_cb=run.report_progress,
            on_waiting=run.wait_for_wal, recipients=recipients,
            meta={"run": {"id": run.pk, "trigger": run.trigger,
                          "policy": str(run.policy) if run.policy else None}})
        started = datetime.fromisoformat(produced.manifest["started_at"])
        relpath = f"archives/{db.name}/{started:%Y%m%d_%H%M%S}_{run.kind}_r{run.pk}"
        repo.commit(stage, relpath)
    archive = _catalog_retrying(run, produced, relpath, state=Archive.State.WAITING_FOR_WAL)
    segments = produced.manifest["wal"]["segments"]
    run.wait_for_wal()
    area = wal.area_path(db, repo)
    absent = wal.wait_for_segments(area, segments, settings.BANKVAULT_WAL_WAIT_TIMEOUT)
    error = ""
    if absent:
        error = (f"the base backup needs WAL segments {absent[0]}..{absent[-1]} ({len(absent)} missing), which "
                 f"did not reach the repository within {settings.BANKVAULT_WAL_WAIT_TIMEOUT}s; check WAL "
                 f"archiving with `manage.py databases check {db.name} --wal`")
    else:
        try:
            wal.verify_segments(area, segments)
        except wal.WalError as exc:
            error = f"the base backup's WAL is damaged: {exc.message}"
    if error:
        archive.mark_wal_state(Archive.State.INCOMPLETE, run.actor, error)
        raise wal.WalError(error)
    if run.policy is not None and run.policy.verify_deep:
        run.report_progress(0, 0, "deep verification (pg_verifybackup)")
        try:
            physical.deep_verify(repo.archive_dir(relpath), produced.manifest)
        except wal.BackupError as exc:
            archive.mark_wal_state(Archive.State.CORRUPT, run.actor, exc.message)
            raise
    archive.mark_wal_state(Archive.State.COMPLETE, run.actor)
    Archive.objects.filter(pk=archive.pk).update(verified_at=timezone.now())
    return archive


def _catalog_retrying(run: BackupRun, produced: logical.Produced, relpath: str,
                      state: str = Archive.State.COMPLETE) -> Archive:
    """catalog(), again while the portal's database restarts. The rows go in one transaction,
    so a retry starts clean — unless the commit went through and only its answer was lost,
    which the lookup first finds."""
    def once() -> Archive:
        return Archive.objects.filter(run=run, path=relpath).first() or catalog(run, produced, relpath, state)

    return db_retry(once, what=f"run {run.pk}: catalog")


def catalog(run: BackupRun, produced: logical.Produced, relpath: str, state: str = Archive.State.COMPLETE) -> Archive:
    man = produced.manifest
    walinfo = man.get("wal") or {}
    with transaction.atomic():
        if man["source"].get("size_bytes"):
            Database.objects.filter(pk=run.database_id).update(last_size_bytes=man["source"]["size_bytes"])
        archive = Archive.objects.create(
            run=run, database=run.database, kind=run.kind, path=relpath, state=state,
            started_at=datetime.fromisoformat(man["started_at"]),
            finished_at=datetime.fromisoformat(man["finished_at"]),
            bytes=produced.bytes, server_version=man["source"]["server_version"],
            compression=man["compression"]["algorithm"],
            manifest_sha256=produced.manifest_sha256,
            verified_at=datetime.fromisoformat(man["finished_at"]) if state == Archive.State.COMPLETE else None,
            timeline=walinfo.get("timeline"), start_lsn=walinfo.get("start_lsn", ""),
            stop_lsn=walinfo.get("stop_lsn", ""),
            encrypted_for=(man.get("encryption") or {}).get("recipients", []),
        )
        ArchiveFile.objects.bulk_create([
            ArchiveFile(archive=archive, path=f["path"], role=f["role"], bytes=f["bytes"], sha256=f["sha256"])
            for f in produced.files
        ])
    return archive


def verify(archive: Archive, actor, repo: LocalRepository | None = None) -> tuple[bool, str]:
    """Re-verify an archive in the repository against its manifest and the catalog."""
    repo = repo or default_repository()
    error = ""
    try:
        man = logical.verify_archive(repo, archive.path)
        listed = {f.path: f.sha256 for f in archive.files.all()}
        in_manifest = {f["path"]: f["sha256"] for f in man["files"]}
        if listed != in_manifest:
            error = "the catalog and the archive's manifest disagree about its files"
    except BackupError as exc:
        error = exc.message
    archive.record_verification(not error, error, actor)
    return not error, error
