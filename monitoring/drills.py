"""Restore drills: prove, on a schedule, that the newest archive restores — and measure how long
it takes (the real RTO). A drill restores into a throwaway cluster that nobody else can reach,
so it needs no approval; it checks the result against the archive's manifest, records the
time, and removes the cluster whatever happened."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.utils import timezone

import audit
from backups import offsite
from backups.engine.cluster import LocalCluster, make_owned_dir
from backups.engine.pgtools import BackupError
from backups.engine.repository import default_repository
from backups.liveness import Heartbeat
from backups.models import Archive, BackupKind, BackupPolicy, Database, WalMode
from recovery.engine import pitr, restore

from . import alerts, health
from .models import Drill, Status

log = logging.getLogger(__name__)


def run_for_policy(policy_id: int) -> list[Drill]:
    policy = BackupPolicy.objects.select_related("database").filter(pk=policy_id).first()
    if policy is None or not policy.drill:
        return []
    drills = [run_archive_drill(policy.database)]
    if policy.database.wal_mode != WalMode.NONE:
        drills.append(run_pitr_drill(policy.database))
    return drills


def _heartbeat(drill: Drill) -> Heartbeat:
    """A running drill beats like a backup run: the watchdog tells a lost worker from a long
    restore, and a drill that moves nothing for BANKVAULT_HUNG_SECONDS is stopped."""
    return Heartbeat(Drill, drill.pk, alive_states=[Drill.State.RUNNING])


def _finish(drill: Drill, error: str, started: float, tables: int = 0) -> Drill:
    drill.finished_at = timezone.now()
    drill.rto_seconds = round(time.monotonic() - started, 3)
    drill.state = Drill.State.FAILED if error else Drill.State.SUCCEEDED
    drill.error = error
    drill.tables_verified = tables
    # Not heartbeat_at: the heartbeat thread owns it, and this copy of the row is stale.
    drill.save(update_fields=["finished_at", "rto_seconds", "state", "error", "tables_verified", "archive"])
    audit.record("system:drill", f"drill.{drill.state}", drill, outcome="failure" if error else "success",
                 details={"database": drill.database.name, "kind": drill.kind, "archive": drill.archive_id,
                          "rto_seconds": drill.rto_seconds, "tables_verified": tables, "error": error})
    # A drill is a check too: its state change alerts like any other.
    result = health.Result(f"drill-{drill.kind}", drill.database.name, Status.FAILING if error else Status.OK,
                           error or f"restored in {drill.rto_seconds:.1f} s, {tables} tables verified",
                           {"drill": drill.pk, "rto_seconds": drill.rto_seconds})
    alerts.process(health.record([result]))
    return drill


def run_archive_drill(db: Database) -> Drill:
    archive = Archive.objects.filter(database=db, kind=BackupKind.LOGICAL, state=Archive.State.COMPLETE) \
        .order_by("-started_at").first()
    drill = Drill.objects.create(database=db, kind=Drill.Kind.ARCHIVE, archive=archive)
    started = time.monotonic()
    if archive is None:
        return _finish(drill, f"{db.name} has no complete archive to drill with", started)
    with _heartbeat(drill) as heartbeat:
        cluster = located = None
        try:
            drill.report_progress(0, 0, "starting a throwaway cluster")
            root = settings.BANKVAULT_SCRATCH_DIR
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o755)
            cluster = LocalCluster.create(make_owned_dir(f"drill-{drill.pk}-", parent=str(root)), throwaway=True)
            cluster.start()
            # A Database row in memory only: the throwaway cluster trusts its superuser on loopback.
            server = Database(name=f"drill-{drill.pk}", host="127.0.0.1", port=cluster.port, dbname="postgres",
                              user=cluster.superuser)
            # The local archive, or (missing or damaged) a verified fetch of its off-site copy.
            located = offsite.open_readable(archive, actor="system:drill", purpose=f"drill {drill.pk}",
                                            repo=default_repository())
            source = restore.Source.open(located.directory, located.label)
            drill.report_progress(0, 0, f"restoring archive {archive.pk}")
            prepared = restore.restore_database(server, source, live_name=db.dbname, final_name=db.dbname,
                                                replace=False, request_id=drill.pk, progress=drill.report_progress,
                                                jobs=settings.BANKVAULT_RESTORE_JOBS)
            result = restore.finish(prepared)
            return _finish(drill, "", started, result["tables_verified"])
        except BackupError as exc:
            return _finish(drill, heartbeat.reason if heartbeat.hung else exc.message, started)
        except Exception as exc:
            log.exception("drill %s failed unexpectedly", drill.pk)
            return _finish(drill, f"internal error: {exc.__class__.__name__}: {exc}", started)
        finally:
            if cluster is not None:
                cluster.destroy()
            if located is not None:
                located.cleanup()


def run_pitr_drill(db: Database) -> Drill:
    """Recover to the newest archived point (base backup + WAL replay) and check that the
    recovered cluster answers with the database in it."""
    drill = Drill.objects.create(database=db, kind=Drill.Kind.PITR)
    started = time.monotonic()
    with _heartbeat(drill) as heartbeat:
        recovered = None
        try:
            # PITR reports steps, not bytes: unpack, replay, then the check below.
            steps = {"n": 0}

            def step(item: str) -> None:
                steps["n"] += 1
                drill.report_progress(steps["n"], 4, item)

            drill.report_progress(0, 4, "recovering base backup and WAL")
            recovered = pitr.recover(db, None, progress=step)
            drill.archive = recovered.base
            drill.report_progress(3, 4, "counting the recovered tables")
            with recovered.cluster.connect(db.dbname) as conn:
                tables = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                      "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                                      ).fetchone()[0]
            return _finish(drill, "", started, tables)
        except BackupError as exc:
            return _finish(drill, heartbeat.reason if heartbeat.hung else exc.message, started)
        except Exception as exc:
            log.exception("drill %s failed unexpectedly", drill.pk)
            return _finish(drill, f"internal error: {exc.__class__.__name__}: {exc}", started)
        finally:
            if recovered is not None:
                recovered.destroy()


def decrypt_canary() -> list[health.Result]:
    """The weekly proof that the workers can still read what they encrypted: for each database,
    its newest complete encrypted archive, every file re-hashed against the manifest and
    decrypted to its end with gpg's integrity check (and decompressed), plus its newest
    encrypted WAL segment. One check result per database (a failure alerts), each read audited."""
    from backups.engine import gpg, logical, manifest, wal

    repo = default_repository()
    results = []
    for db in Database.objects.order_by("name"):
        archive = (Archive.objects.filter(database=db, state=Archive.State.COMPLETE).exclude(encrypted_for=[])
                   .order_by("-started_at").first())
        if archive is None:
            if gpg.database_keys(db):
                results.append(health.Result("decrypt-canary", db.name, Status.PENDING,
                                             "no encrypted archive yet to prove readable"))
            continue
        started = time.monotonic()
        details: dict = {"archive": archive.pk, "path": archive.path, "recipients": archive.encrypted_for}
        error = ""
        try:
            directory = repo.archive_dir(archive.path)
            man, _ = manifest.read(directory)
            logical.verify_files(directory, man)
            encrypted = [f for f in man["files"] if f["path"].endswith(gpg.SUFFIX)]
            gpg.probe(directory / encrypted[0]["path"], f"archive {archive.pk} ({encrypted[0]['path']})",
                      archive.encrypted_for)
            plain = 0
            for entry in encrypted:
                name = entry["path"].removesuffix(gpg.SUFFIX)
                algo = "zstd" if name.endswith(".zst") else "gzip" if name.endswith(".gz") else "none"
                with logical.open_entry(directory, {**man, "compression": {"algorithm": algo}}, entry,
                                        f"archive {archive.pk} ({entry['path']})") as src:
                    while chunk := src.read(1 << 20):
                        plain += len(chunk)
                    src.finish()
            details.update(files=len(encrypted), plaintext_bytes=plain)
            stored, _ = wal.scan(wal.area_path(db, repo))
            newest = max((s for s in stored.values() if s.encrypted), key=lambda s: s.mtime, default=None)
            if newest is not None:
                wal.read_stored(newest)
                details["wal_segment"] = newest.name
        except manifest.ManifestError as exc:
            error = str(exc)
        except BackupError as exc:
            error = exc.message
        except OSError as exc:
            error = f"the archive cannot be read: {exc}"
        details["seconds"] = round(time.monotonic() - started, 3)
        audit.record("system:canary", "archive.decrypt_canary", archive, outcome="failure" if error else "success",
                     details={"database": db.name, **details, **({"error": error} if error else {})})
        if error:
            results.append(health.Result("decrypt-canary", db.name, Status.FAILING,
                                         f"the workers cannot read archive {archive.pk} ({archive.path}): {error}",
                                         details))
        else:
            wal_note = f" and WAL segment {details['wal_segment']}" if "wal_segment" in details else ""
            results.append(health.Result("decrypt-canary", db.name, Status.OK,
                                         f"decrypted archive {archive.pk} ({details['files']} files){wal_note} with "
                                         f"gpg's integrity check in {details['seconds']:.1f} s", details))
    alerts.process(health.record(results))
    return results
