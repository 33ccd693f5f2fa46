"""Executes one approved RestoreRequest: claim it (which re-checks the two-person rule under a
row lock), run the kind's procedure, record the outcome. The Celery task is a thin wrapper."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import psycopg
from django.conf import settings
from psycopg import sql

from backups import locks
from backups.engine import logical
from backups.engine.pgtools import BackupError
from backups.engine.repository import default_repository
from backups.liveness import Heartbeat, db_retry
from backups.models import Archive, Database

from ..models import RestoreRequest, RuleViolation, StateError
from . import pitr, restore

log = logging.getLogger(__name__)
Kind = RestoreRequest.Kind


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def execute(request_id: int, worker: str | None = None) -> dict | None:
    """Run an approved request. Returns its result, or None when it was not ours to run (not
    approved, already running or done, or refused by the re-check — which fails it closed)."""
    req = RestoreRequest.objects.select_related("database", "archive", "target_server", "requester") \
        .get(pk=request_id)
    if req.state != RestoreRequest.State.APPROVED:
        # Not ours to run (a forged or redelivered message): the claim refuses it and audits why,
        # without waiting for a job slot first.
        _claim(req, worker)
        return None
    with locks.host_slot():
        if not _claim(req, worker):
            return None
        progress = req.report_progress
        try:
            with Heartbeat(RestoreRequest, req.pk, alive_states=[RestoreRequest.State.RUNNING],
                           busy=lambda: _server_working(req)) as heartbeat, \
                    contextlib.ExitStack() as held:
                heartbeat.watching = False  # waiting for a backup to finish is not hanging
                for db in _databases_replaced(req):
                    progress(0, 0, f"waiting until nothing else runs on {db.name}")
                    held.enter_context(locks.database_lock(db, f"restore request {req.pk}",
                                                           wait=settings.BANKVAULT_RESTORE_LOCK_WAIT))
                heartbeat.watching = True
                try:
                    result = _run_kind(req, progress)
                except BackupError as exc:
                    if heartbeat.hung:
                        raise restore.RestoreError(heartbeat.reason, exc.detail) from exc
                    raise
        except BackupError as exc:
            db_retry(lambda e=exc: req.fail(e.message, {"report": getattr(e, "report", {}),
                                                         "detail": e.detail[-2000:]}),
                     what=f"restore request {request_id}: fail")
            raise
        except Exception as exc:
            log.exception("restore request %s failed unexpectedly", request_id)
            db_retry(lambda e=exc: req.fail(f"internal error: {e.__class__.__name__}: {e}"),
                     what=f"restore request {request_id}: fail")
            raise
        db_retry(lambda: req.succeed(result), what=f"restore request {request_id}: succeed")
    return result


def _claim(req: RestoreRequest, worker: str | None) -> bool:
    try:
        db_retry(lambda: req.claim(worker or worker_name()), what=f"restore request {req.pk}: claim")
    except (RuleViolation, StateError) as exc:
        log.warning("restore request %s (%s) not run: %s", req.pk, req.state, exc)
        return False
    return True


def _server_working(req: RestoreRequest) -> bool:
    """Whether a target server of the request still runs a statement of its restore (pg_restore
    building an index moves no bytes for as long as the build takes)."""
    servers = {}
    for item in req.items or [{"database": req.database_id}]:
        db = Database.objects.filter(pk=item.get("database") or req.database_id).first()
        if db is not None:
            server = req.target_server or db
            servers[server.pk] = server
    for server in servers.values():
        with server.restore_conninfo("postgres").connect(autocommit=True) as conn:
            if conn.execute("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE state = 'active' "
                            "AND application_name IN ('pg_restore', 'psql', 'bankvault') "
                            "AND datname LIKE %s AND pid <> pg_backend_pid())",
                            [f"%\\_\\_restore\\_{req.pk}"]).fetchone()[0]:
                return True
    return False


def _databases_replaced(req: RestoreRequest) -> list[Database]:
    """The live databases a request changes (replace, rollback), in a fixed order so that two
    jobs never wait on each other's locks. A copy changes no live database."""
    if req.mode != RestoreRequest.Mode.REPLACE and req.kind != Kind.ROLLBACK:
        return []
    ids = {item.get("database") for item in req.items if item.get("database")}
    if req.database_id:
        ids.add(req.database_id)
    return list(Database.objects.filter(pk__in=ids).order_by("pk"))


def _server_and_names(req: RestoreRequest, db: Database) -> tuple[Database, str, str, bool]:
    replace = req.mode == RestoreRequest.Mode.REPLACE
    server = req.target_server or db
    final = db.dbname if replace else req.new_name
    return server, db.dbname, final, replace


def _source_for(item: dict) -> restore.Source:
    archive = Archive.objects.get(pk=item["archive"])
    if archive.main_file is None or archive.main_file.sha256 != item["sha256"]:
        raise restore.RestoreError(f"archive {archive.pk} no longer matches the approved request")
    located = _open_archive(archive)
    return restore.Source.open(located.directory, located.label)


# Archives fetched from an off-site copy for the request this thread is running; removed when it ends.
_fetched = threading.local()


def _open_archive(archive: Archive):
    """The local archive directory, or — when it is missing or damaged — a verified fetch of
    its first complete off-site copy into scratch (the source's label, the request's result and
    the audit event archive.copy.fetched name the copy)."""
    from backups import offsite

    located = offsite.open_readable(archive, actor="system:worker", purpose=getattr(_fetched, "purpose", "restore"),
                                    repo=default_repository())
    if located.temporary:
        if not hasattr(_fetched, "items"):
            located.cleanup()
            raise restore.RestoreError("internal error: an off-site fetch outside a restore request")
        _fetched.items.append(located)
    return located


def _run_kind(req, progress) -> dict:
    _fetched.items, _fetched.purpose = [], f"restore request {req.pk}"
    try:
        return KINDS[req.kind](req, progress)
    finally:
        for located in _fetched.items:
            located.cleanup()
        del _fetched.items, _fetched.purpose


def _restore_all(req, pairs: list[tuple[Database, restore.Source]], progress) -> dict:
    """Restore and prove every database first, then swap them in: a failure anywhere leaves
    every live database as it was."""
    prepared: list[restore.Prepared] = []
    try:
        for i, (db, source) in enumerate(pairs, 1):
            server, live, final, replace = _server_and_names(req, db)
            p = restore.restore_database(
                server, source, live_name=live, final_name=final, replace=replace, request_id=req.pk,
                jobs=settings.BANKVAULT_RESTORE_JOBS,
                progress=lambda done, total, item, i=i: progress(done, total, f"[{i}/{len(pairs)}] {item}"))
            p.result.update(database_id=db.pk, name=db.name)
            prepared.append(p)
    except BaseException:
        for p in prepared:
            restore.discard(p)
        raise
    results = []
    for p in prepared:
        try:
            results.append(restore.finish(p))
        except BaseException:
            for rest in prepared[len(results) + 1:]:
                restore.discard(rest)
            if results:
                raise restore.RestoreError(
                    f"swapping {p.live_name} failed after {', '.join(r['database'] for r in results)} were already "
                    "swapped; those keep their pre-restore databases for a rollback request") from None
            raise
    return {"items": results}


def run_archive(req, progress) -> dict:
    item = req.items[0]
    return _restore_all(req, [(Database.objects.get(pk=item["database"]), _source_for(item))], progress)


def run_system(req, progress) -> dict:
    return _restore_all(req, [(Database.objects.get(pk=i["database"]), _source_for(i)) for i in req.items], progress)


def _dump_recovered(rc: pitr.RecoveredCluster, db: Database, stage: Path, tables: list[str] | None = None) -> \
        restore.Source:
    """A logical archive of ``db`` taken out of a recovered cluster, in ``stage``."""
    opts = logical.LogicalOptions(compression="zstd", threads=settings.BANKVAULT_COMPRESS_THREADS)
    produced = logical.produce(rc.local_conninfo(db.dbname), stage, opts, source_name=db.name,
                               meta={"pitr": {"target": rc.target.isoformat() if rc.target else "latest",
                                              "base_archive": rc.base.pk}})
    label = f"{db.name} at {rc.target.isoformat() if rc.target else 'latest'}"
    return restore.Source(stage, produced.manifest, label)


def _when(req) -> str:
    return req.target_time.isoformat() if req.target_time else "latest"


def run_pitr(req, progress) -> dict:
    pairs, recovered, stages = [], [], []
    try:
        for item in req.items:
            db = Database.objects.get(pk=item["database"])
            progress(0, 0, f"recovering {db.name} to {_when(req)}")
            rc = pitr.recover(db, req.target_time)
            recovered.append(rc)
            stage = Path(settings.BANKVAULT_SCRATCH_DIR) / f"pitr-dump-{req.pk}-{secrets.token_hex(3)}"
            stage.mkdir(parents=True, mode=0o700)
            stages.append(stage)
            progress(0, 0, f"dumping {db.name} out of the recovered cluster")
            pairs.append((db, _dump_recovered(rc, db, stage)))
            rc.destroy()
            recovered.remove(rc)
        result = _restore_all(req, pairs, progress)
        result["target_time"] = _when(req)
        return result
    finally:
        for rc in recovered:
            rc.destroy()
        for stage in stages:
            shutil.rmtree(stage, ignore_errors=True)


def run_tables(req, progress) -> dict:
    """Selected tables, restored beside the live data in a new schema of the live database."""
    db = req.database
    stage = None
    rc = None
    try:
        if req.archive_id:
            source = _source_for(req.items[0])
        else:
            progress(0, 0, f"recovering {db.name} to {_when(req)}")
            rc = pitr.recover(db, req.target_time)
            stage = Path(settings.BANKVAULT_SCRATCH_DIR) / f"pitr-tables-{req.pk}-{secrets.token_hex(3)}"
            stage.mkdir(parents=True, mode=0o700)
            source = _dump_recovered(rc, db, stage)
            rc.destroy()
            rc = None
        return {"items": [restore_tables(req, db, source, progress)]}
    finally:
        if rc is not None:
            rc.destroy()
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def restore_tables(req, db: Database, source: restore.Source, progress) -> dict:
    scratch = Path(settings.BANKVAULT_SCRATCH_DIR) / f"tables-{req.pk}-{secrets.token_hex(3)}"
    scratch.mkdir(parents=True, mode=0o700)
    helper_db = f"{db.dbname}__tables_{req.pk}"[:63]
    schema = req.new_name
    admin = db.restore_conninfo("postgres")
    created = False
    try:
        with admin.connect(autocommit=True) as c:
            target_num = c.execute("SELECT current_setting('server_version_num')::int").fetchone()[0]
        work = restore.prepare(source, scratch, target_num)
        wanted = set()
        for spec in req.tables:
            s_name, _, t_name = spec.partition(".")
            matches = {(t["schema"], t["name"]) for t in source.manifest["tables"]
                       if t["schema"] == s_name and (not t_name or t["name"] == t_name)}
            if not matches:
                raise restore.PreflightFailed(f"pre-flight refused the restore: {spec} is not in {source.label}")
            wanted |= matches
        names = [n for _, n in wanted]
        if len(names) != len(set(names)):
            raise restore.PreflightFailed("pre-flight refused the restore: tables of the same name from several "
                                          f"schemas cannot share the new schema {schema}")
        with db.restore_conninfo(db.dbname).connect(autocommit=True) as live:
            if live.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone():
                raise restore.PreflightFailed(f"pre-flight refused the restore: schema {schema} already exists in "
                                              f"{db.dbname}; choose another name")
        # Restore just those tables (definition and data) into a helper database...
        lines = [ln for ln in work.toc if restore.toc_desc(ln) in ("TABLE", "TABLE DATA", "SCHEMA")
                 and _toc_object(ln) in wanted | {(s, None) for s, _ in wanted}]
        listing = scratch / "tables.list"
        listing.write_text("\n".join(lines) + "\n")
        with admin.connect(autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(helper_db)))
        created = True
        progress(0, len(wanted), f"restoring {len(wanted)} table(s)")
        restore.run_pg_restore(work, admin, helper_db, 1, progress, extra=["-L", str(listing)])
        # ...move them into the new schema there...
        with db.restore_conninfo(helper_db).connect(autocommit=True) as h:
            h.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            for s_name, t_name in sorted(wanted):
                h.execute(sql.SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(
                    sql.Identifier(s_name), sql.Identifier(t_name), sql.Identifier(schema)))
        restore.verify_counts(admin, helper_db, source, only=wanted, rename={s: schema for s, _ in wanted})
        # ...and copy that schema into the live database, which gains it and nothing else.
        _copy_schema(work, db, helper_db, schema)
        checked = restore.verify_counts(db.restore_conninfo(db.dbname), db.dbname, source, only=wanted,
                                        rename={s: schema for s, _ in wanted})
        return {"database": db.dbname, "schema": schema, "tables": sorted(f"{s}.{t}" for s, t in wanted),
                "tables_verified": checked, "source": source.label}
    except psycopg.Error as exc:
        raise restore.RestoreError(f"the server refused a step of the table restore: {str(exc).strip()}") from None
    finally:
        if created:
            restore.drop_quietly(db, helper_db)
        shutil.rmtree(scratch, ignore_errors=True)


def _toc_object(line: str) -> tuple[str, str | None]:
    parts = line.split(";", 1)[1].split()
    desc = restore.toc_desc(line)
    rest = parts[2 + len(desc.split()):]
    if desc == "SCHEMA":
        return (rest[1] if len(rest) > 1 else "", None)
    return (rest[0], rest[1]) if len(rest) >= 2 else ("", None)


def _copy_schema(work: restore.Work, db: Database, helper_db: str, schema: str) -> None:
    info = db.restore_conninfo(helper_db)
    with info.tool_env() as env:
        dump = subprocess.Popen([work.inst.tool("pg_dump"), "--format=custom", "--schema", schema, helper_db],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        load = subprocess.run([work.inst.tool("pg_restore"), "--exit-on-error", "-d", db.dbname],
                              env=env, stdin=dump.stdout, capture_output=True)
        dump.stdout.close()
        dump_err = dump.stderr.read().decode(errors="replace")
        dump.wait()
    if dump.returncode or load.returncode:
        raise restore.RestoreError("copying the restored tables into the live database failed: "
                                   + (load.stderr.decode(errors="replace") or dump_err).strip()[-500:])


def run_rollback(req, progress) -> dict:
    """Swap each pre-restore database back into place; the database it replaces is kept as
    <name>__rolled_back_<id>."""
    results = []
    for item in req.items:
        db = Database.objects.get(pk=item["database"])
        progress(0, 0, f"rolling back {db.name}")
        kept = f"{db.dbname}__rolled_back_{req.pk}"[:63]
        restore.swap(db, db.dbname, item["pre_restore"], kept)
        results.append({"database": db.dbname, "restored_from": item["pre_restore"], "kept_as": kept})
    return {"items": results}


KINDS = {Kind.ARCHIVE: run_archive, Kind.SYSTEM: run_system, Kind.PITR: run_pitr, Kind.TABLES: run_tables,
         Kind.ROLLBACK: run_rollback}

__all__ = ["execute"]
