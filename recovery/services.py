"""Filing restore requests: validation and resolution of what exactly is to be restored, shared
by the dashboard form, the CLI and the API. Whether anything may run is recovery.rules'
business, not this module's."""

from __future__ import annotations

import re
from datetime import datetime

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db.models.expressions import RawSQL
from django.utils import timezone

from backups.models import Archive, BackupKind, Database

from .models import RestoreRequest

TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def _item(archive: Archive) -> dict:
    main = archive.main_file
    return {"database": archive.database_id, "name": archive.database.name, "archive": archive.pk,
            "path": archive.path, "sha256": main.sha256 if main else "", "manifest_sha256": archive.manifest_sha256}


def nearest_archive(db: Database, when: datetime) -> Archive | None:
    """The complete logical archive of ``db`` whose start is nearest to ``when`` (as
    db-recovery.sh --full 20241205_020000 chose its files)."""
    qs = Archive.objects.filter(database=db, kind=BackupKind.LOGICAL, state=Archive.State.COMPLETE)
    distance = RawSQL("abs(extract(epoch FROM (started_at - %s)))", (when,))
    return qs.annotate(distance=distance).order_by("distance", "-started_at").first()


def parse_stamp(text: str) -> datetime:
    """20241205_020000 (the old tool's archive stamp) or ISO 8601, in TIME_ZONE."""
    from recovery.engine import pitr

    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})_(\d{2})(\d{2})(\d{2})", text.strip())
    if m:
        text = "{}-{}-{} {}:{}:{}".format(*m.groups())
    return pitr.parse_target(text)


def file_request(user, *, kind: str, reason: str, mode: str = RestoreRequest.Mode.COPY,
                 database: Database | None = None, archive: Archive | None = None,
                 target_time: datetime | None = None, new_name: str = "", target_server: Database | None = None,
                 tables: list[str] | None = None, rollback_of: RestoreRequest | None = None,
                 change_ticket: str = "", latest: bool = False, via: str = "web",
                 request=None) -> RestoreRequest:
    """Ask the rules, validate, resolve the items, and create the request. ``latest`` (with
    no target_time) recovers to the newest archived WAL."""
    import audit

    from . import rules
    from .models import RuleViolation

    decision = rules.can_request(user)
    if not decision:
        # Before any validation, so a non-operator learns nothing about names or archives.
        audit.record(user, "restore.request.denied", None, outcome="denied",
                     details={"reason": decision.reason, "via": via}, request=request)
        raise RuleViolation(decision.reason)
    errors: dict[str, list[str]] = {}

    def err(field, msg):
        errors.setdefault(field, []).append(msg)

    tables = [t.strip() for t in (tables or []) if t.strip()]
    reason = (reason or "").strip()
    if not reason:
        err("reason", "Say why this restore is needed.")
    if kind not in RestoreRequest.Kind.values:
        err("kind", f"Unknown kind {kind!r}.")
    if mode not in RestoreRequest.Mode.values:
        err("mode", f"Unknown mode {mode!r}.")
    if target_time is not None and target_time > timezone.now():
        err("target_time", "The target time is in the future.")
    items: list[dict] = []

    if kind == RestoreRequest.Kind.ARCHIVE:
        if archive is None:
            err("archive", "Pick the archive to restore.")
        elif archive.kind != BackupKind.LOGICAL or archive.state != Archive.State.COMPLETE:
            err("archive", f"Archive {archive.pk} is a {archive.kind} archive in state {archive.state}; "
                           "only complete logical archives can be restored this way.")
        elif database is not None and archive.database_id != database.pk:
            err("archive", f"Archive {archive.pk} belongs to {archive.database.name}, not {database.name}.")
        else:
            database = archive.database
            items = [_item(archive)]
    elif kind == RestoreRequest.Kind.SYSTEM:
        if target_time is None:
            err("target_time", "Give the time whose archive set to restore.")
        else:
            for db in Database.objects.order_by("name"):
                found = nearest_archive(db, target_time)
                if found is None:
                    err("target_time", f"{db.name} has no complete logical archive.")
                else:
                    items.append(_item(found))
        if database is not None:
            err("database", "A system restore covers every database; do not name one.")
    elif kind == RestoreRequest.Kind.PITR:
        if target_time is None and not latest:
            err("target_time", "Give the point in time, or 'latest' for the newest archived state.")
        dbs = [database] if database else list(Database.objects.exclude(wal_mode="none").order_by("name"))
        if not dbs:
            err("database", "No database has WAL archiving, so none can be recovered to a point in time.")
        items = [{"database": d.pk, "name": d.name} for d in dbs]
    elif kind == RestoreRequest.Kind.TABLES:
        if database is None:
            err("database", "Name the database whose tables to restore.")
        if not tables:
            err("tables", "Name at least one table (schema.table) or schema.")
        for t in tables:
            if not TABLE_RE.match(t):
                err("tables", f"{t!r} is not schema.table or schema.")
        if archive is None and target_time is None and not latest:
            err("archive", "Restore tables from an archive, or from a point in time (target_time or 'latest').")
        if archive is not None:
            if archive.kind != BackupKind.LOGICAL or archive.state != Archive.State.COMPLETE:
                err("archive", "Tables come from a complete logical archive.")
            elif database is not None and archive.database_id != database.pk:
                err("archive", f"Archive {archive.pk} belongs to {archive.database.name}.")
            else:
                items = [_item(archive)]
        elif database is not None:
            items = [{"database": database.pk, "name": database.name}]
        new_name = new_name or f"restored_{(target_time or (archive.started_at if archive else timezone.now())):%Y%m%d}"
        mode = RestoreRequest.Mode.COPY  # tables always land beside the live data, never over it
    elif kind == RestoreRequest.Kind.ROLLBACK:
        if rollback_of is None:
            err("rollback_of", "Name the restore request to roll back.")
        elif rollback_of.state != RestoreRequest.State.SUCCEEDED or rollback_of.mode != RestoreRequest.Mode.REPLACE:
            err("rollback_of", "Only a succeeded replace restore can be rolled back.")
        else:
            items = [{"database": i["database_id"], "name": i["name"], "pre_restore": i["pre_restore"]}
                     for i in rollback_of.result.get("items", []) if i.get("pre_restore")]
            database = rollback_of.database
            mode = RestoreRequest.Mode.REPLACE
            if not items:
                err("rollback_of", "That restore left no pre-restore database to go back to.")

    if mode == RestoreRequest.Mode.COPY and kind not in (RestoreRequest.Kind.TABLES,):
        if not new_name:
            err("new_name", "A copy needs a new name.")
        elif len(items) > 1:
            err("new_name", "A copy of several databases is not supported; request them one by one.")
    if target_server is not None and mode != RestoreRequest.Mode.COPY:
        err("target_server", "Only a copy can go to another server.")
    busy = _open_requests_for({i["database"] for i in items})
    if busy:
        err(NON_FIELD_ERRORS, f"{', '.join(busy)} already has an open restore request (pending, approved or "
                              "running): cancel it or wait until it ends.")
    if errors:
        raise ValidationError(errors)
    return RestoreRequest.create(
        user, request=request, via=via, kind=kind, mode=mode, reason=reason, change_ticket=change_ticket,
        database=database, archive=archive, target_time=target_time, new_name=new_name,
        target_server=target_server, tables=tables, rollback_of=rollback_of, items=items)


def _open_requests_for(database_ids: set[int]) -> list[str]:
    """Databases among ``database_ids`` that an open request (of any kind, all-database ones
    included) already covers: one live restore per database."""
    busy = set()
    for req in RestoreRequest.objects.filter(state__in=RestoreRequest.OPEN_STATES):
        for item in req.items or []:
            if item.get("database") in database_ids:
                busy.add(item.get("name", str(item["database"])))
    return sorted(busy)
