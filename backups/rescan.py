"""Rebuild the catalog from the repository: `manage.py repository rescan`.

The repository is the truth (ARCHITECTURE: archives describe themselves); the catalog is its
copy. After the portal's own database is lost, a fresh one is migrated and this walks
``archives/<database>/<stamp>_<kind>_r<run>/manifest.json``, catalogs every archive it finds
and registers the databases they came from again — without a password, which no manifest
holds, so each is flagged ``needs_credentials`` until someone gives it.

Two phases, so that a dry run shows exactly what a real one would do and so that no disk I/O
happens inside a transaction (STYLE 5):

    scan(repo)   reads the repository and the catalog; changes nothing -> Plan
    apply(plan)  writes the catalog, one transaction per database, and the audit trail

Re-running changes nothing: an archive whose path is cataloged is "known" and only checked.
A damaged archive is cataloged as corrupt with the reason, never skipped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

import audit

from .engine import logical, manifest, wal
from .engine.pgtools import BackupError
from .engine.repository import LocalRepository, default_repository
from .models import Archive, ArchiveFile, BackupKind, BackupRun, Compression, Database, SSLMode, WalMode

DIR_NAME = re.compile(r"^(?P<stamp>\d{8}_\d{6})_(?P<kind>[a-z]+)_r(?P<run>\d+)$")
# Cap on the archive paths listed in one audit event (a repository holds tens of thousands).
AUDIT_LIST_CAP = 200


class RescanError(Exception):
    """The repository cannot be scanned at all (wrong path, volume not mounted)."""


@dataclass
class Found:
    """One directory under archives/<database>/ and what became of it."""

    relpath: str
    db_name: str
    kind: str
    stamp: datetime | None
    run_id: int | None
    manifest: dict | None = None
    manifest_sha256: str = ""
    problem: str = ""           # why it is damaged ("" = sound)
    incomplete: str = ""        # a base backup whose WAL is not all in the repository
    bytes_on_disk: int = 0
    status: str = ""            # new | known | damaged | skipped | uncataloged
    note: str = ""              # why it was skipped or could not be cataloged
    archive_id: int | None = None
    catalog_state: str = ""     # for known archives: the state in the catalog

    @property
    def state(self) -> str:
        if self.problem:
            return Archive.State.CORRUPT
        if self.incomplete:
            return Archive.State.INCOMPLETE
        return Archive.State.COMPLETE


@dataclass
class Plan:
    root: Path
    found: list[Found] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)    # (path, why)
    missing: list[tuple[int, str]] = field(default_factory=list)    # cataloged, directory gone
    register: dict[str, Found] = field(default_factory=dict)        # db name -> manifest it comes from
    unregistrable: dict[str, str] = field(default_factory=dict)     # db name -> why
    wal_areas: list[str] = field(default_factory=list)              # names of databases with a WAL area
    registered: list[str] = field(default_factory=list)             # filled by apply()

    def by_status(self, status: str) -> list[Found]:
        return [f for f in self.found if f.status == status]

    def counts(self) -> dict:
        new = self.by_status("new")
        return {
            "new": len([f for f in new if f.state == Archive.State.COMPLETE]),
            "incomplete": len([f for f in new if f.state == Archive.State.INCOMPLETE]),
            "damaged": len([f for f in new if f.problem]) + len(self.by_status("damaged")),
            "known": len(self.by_status("known")),
            "skipped": len(self.by_status("skipped")),
            "uncataloged": len(self.by_status("uncataloged")),
            "missing": len(self.missing),
            "ignored": len(self.ignored),
            "databases_registered": len(self.registered or self.register),
        }


# -- scanning (read only) ------------------------------------------------------------------------------
def scan(repo: LocalRepository | None = None, *, verify: bool = False) -> Plan:
    """Read the repository and compare it with the catalog. ``verify`` re-hashes every file
    (and reads each dump's table of contents) instead of checking presence and sizes."""
    repo = repo or default_repository()
    root = repo.root
    top = root / "archives"
    if not top.is_dir():
        raise RescanError(f"there is no archives/ directory under {root}: is BANKVAULT_REPOSITORY right and the "
                          "repository's volume mounted? Nothing was changed.")
    plan = Plan(root=root)
    cataloged = dict(Archive.objects.values_list("path", "pk"))
    active = set(BackupRun.objects.filter(state__in=BackupRun.ACTIVE_STATES)
                 .values_list("pk", "database__name"))
    for db_dir in sorted(p for p in top.iterdir()):
        if not db_dir.is_dir():
            plan.ignored.append((_rel(root, db_dir), "not a directory"))
            continue
        for entry in sorted(db_dir.iterdir()):
            rel = _rel(root, entry)
            m = DIR_NAME.match(entry.name)
            if not entry.is_dir() or not m:
                plan.ignored.append((rel, "not an archive directory (<YYYYMMDD_HHMMSS>_<kind>_r<run>)"))
                continue
            found = Found(relpath=rel, db_name=db_dir.name, kind=m["kind"], stamp=_stamp(m["stamp"]),
                          run_id=int(m["run"]))
            if rel in cataloged:
                found.status, found.archive_id = "known", cataloged[rel]
            elif (found.run_id, found.db_name) in active:
                # Its run is still writing the catalog row; cataloging it here would race the run.
                found.status, found.note = "skipped", f"its backup run {found.run_id} is still in progress"
                plan.found.append(found)
                continue
            else:
                found.status = "new"
            _inspect(entry, found, root, verify)
            plan.found.append(found)

    # Known archives: does the catalog still agree with the repository?
    known_rows = {a.path: a for a in Archive.objects.filter(path__in=[f.relpath for f in plan.by_status("known")])
                  .prefetch_related("files")}
    for f in plan.by_status("known"):
        row = known_rows[f.relpath]
        f.catalog_state = row.state
        if not f.problem and f.manifest is not None:
            if row.manifest_sha256 and row.manifest_sha256 != f.manifest_sha256:
                f.problem = (f"manifest.json changed since the archive was cataloged (sha256 "
                             f"{f.manifest_sha256[:12]}…, catalog {row.manifest_sha256[:12]}…)")
            elif {(x.path, x.sha256) for x in row.files.all()} != {(x["path"], x["sha256"])
                                                                     for x in f.manifest["files"]}:
                f.problem = "the catalog and the archive's manifest disagree about its files"
        if f.problem:
            f.status = "damaged"

    seen = {f.relpath for f in plan.found}
    for pk, path in Archive.objects.exclude(state=Archive.State.EXPIRED).values_list("pk", "path"):
        if path not in seen and path.startswith("archives/"):
            plan.missing.append((pk, path))

    # Databases to register again: the newest readable manifest of each name not in the catalog.
    registered = set(Database.objects.values_list("name", flat=True))
    # A sound archive's manifest before a damaged one's, then the newest (the current address).
    for f in plan.by_status("new"):
        if f.db_name in registered or f.manifest is None or not _source_ok(f.manifest, f.db_name):
            continue
        best = plan.register.get(f.db_name)
        if best is None or (not f.problem, str(f.manifest.get("started_at"))) > \
                (not best.problem, str(best.manifest.get("started_at"))):
            plan.register[f.db_name] = f
    for name, f in list(plan.register.items()):
        try:
            _database_from(f).full_clean(exclude=["password_encrypted"])
        except ValidationError as exc:
            plan.unregistrable[name] = "the manifest's source is not a valid registration: " + "; ".join(
                f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            del plan.register[name]
    for f in plan.by_status("new"):
        if f.db_name not in registered and f.db_name not in plan.register:
            why = plan.unregistrable.setdefault(
                f.db_name, "no readable manifest names this database, so it cannot be registered again")
            f.status, f.note = "uncataloged", why

    wal_top = root / "wal"
    if wal_top.is_dir():
        plan.wal_areas = sorted(p.name for p in wal_top.iterdir() if p.is_dir() and not p.name.startswith("."))
    return plan


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _stamp(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y%m%d_%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _source_ok(man: dict, db_name: str) -> bool:
    source = man.get("source")
    return isinstance(source, dict) and source.get("name") == db_name and bool(source.get("host"))


def _inspect(directory: Path, found: Found, root: Path, verify: bool) -> None:
    """Fill in the manifest and, if the archive is damaged, why. Never raises for damage."""
    try:
        found.bytes_on_disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    except OSError as exc:
        found.problem = f"the archive directory cannot be read: {exc.strerror or exc}"
        return
    try:
        man, sha = manifest.read(directory)
    except manifest.ManifestError as exc:
        found.problem = str(exc).replace(str(root) + "/", "")
        if (directory / manifest.NAME).is_file():
            from .engine.repository import sha256_file

            found.manifest_sha256 = sha256_file(directory / manifest.NAME)[0]
        return
    except OSError as exc:
        found.problem = f"manifest.json cannot be read: {exc.strerror or exc}"
        return
    found.manifest, found.manifest_sha256 = man, sha
    found.problem = _manifest_problem(man, found)
    if found.problem:
        return
    if verify:
        try:  # the same verification as `archives verify` (re-hash; a dump's TOC; encrypted ones too)
            logical.verify_archive(LocalRepository(root), found.relpath)
        except BackupError as exc:
            found.problem = exc.message
            return
    else:
        for entry in man["files"]:
            path = directory / entry["path"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                found.problem = f"{entry['path']} is missing from the archive"
                return
            except OSError as exc:
                found.problem = f"{entry['path']} cannot be read: {exc.strerror or exc}"
                return
            if size != entry["bytes"]:
                found.problem = (f"{entry['path']} has {size} bytes, its manifest entry {entry['bytes']}: "
                                 "the file is damaged or truncated")
                return
    if man["kind"] == BackupKind.BASE:
        segments = (man.get("wal") or {}).get("segments") or []
        absent = wal.missing(root / "wal" / found.db_name, segments)
        if absent:
            found.incomplete = (f"the base backup needs WAL segments {absent[0]}..{absent[-1]} ({len(absent)} "
                                f"missing), which are not in the repository")


def _manifest_problem(man: dict, found: Found) -> str:
    """What makes a readable manifest unusable for the catalog ("" = nothing)."""
    if man.get("kind") not in BackupKind.values:
        return f"manifest.json names an unknown kind of archive {man.get('kind')!r}"
    if man["kind"] != found.kind:
        return f"manifest.json says kind {man['kind']!r}, the directory name {found.kind!r}"
    source = man.get("source")
    if not isinstance(source, dict) or source.get("name") != found.db_name:
        name = source.get("name") if isinstance(source, dict) else None
        return f"manifest.json names database {name!r}, but the archive lies under archives/{found.db_name}/"
    for key in ("started_at", "finished_at"):
        try:
            when = datetime.fromisoformat(str(man.get(key)))
        except ValueError:
            return f"manifest.json has no valid {key}"
        if when.tzinfo is None:
            return f"manifest.json's {key} has no time zone"
    algo = (man.get("compression") or {}).get("algorithm")
    if algo not in Compression.values:
        return f"manifest.json names a compression bankvault does not read: {algo!r}"
    files = man.get("files")
    if not isinstance(files, list) or not files:
        return "manifest.json lists no files"
    for entry in files:
        if not isinstance(entry, dict) or not {"path", "role", "bytes", "sha256"} <= entry.keys():
            return "manifest.json has a file entry without path, role, bytes and sha256"
        path = str(entry["path"])
        if path.startswith("/") or ".." in Path(path).parts or not path:
            return f"manifest.json lists a file outside the archive: {path!r}"
        if entry["role"] not in ArchiveFile.Role.values:
            return f"manifest.json lists {path} with an unknown role {entry['role']!r}"
        if not isinstance(entry["bytes"], int) or not re.fullmatch(r"[0-9a-f]{64}", str(entry["sha256"])):
            return f"manifest.json's entry for {path} has no valid size or sha256"
    main = BackupKind.BASE if man["kind"] == BackupKind.BASE else "dump"
    if not any(e["role"] == main for e in files):
        return f"manifest.json lists no {main} file"
    return ""


def _database_from(f: Found) -> Database:
    """A Database row as the manifest describes its source; no password (none is in a manifest).
    Raises ValidationError when the source cannot be a registration."""
    src = f.manifest["source"]
    walinfo = f.manifest.get("wal") or {}
    port = src.get("port") or 5432
    if not isinstance(port, int):
        raise ValidationError({"port": [f"{port!r} is not a port number"]})
    db = Database(
        name=f.db_name, host=str(src.get("host") or ""), port=port,
        dbname=str(src.get("dbname") or ""), user=str(src.get("user") or ""),
        sslmode=src.get("sslmode") if src.get("sslmode") in SSLMode.values else SSLMode.PREFER,
        system_identifier=str(src.get("system_identifier") or "")[:32],
        last_size_bytes=src.get("size_bytes") if isinstance(src.get("size_bytes"), int) else None,
        needs_credentials=True,
    )
    if isinstance(walinfo.get("segment_size"), int):
        db.wal_segment_size = walinfo["segment_size"]
    return db


# -- applying (writes the catalog) -------------------------------------------------------------------------
def apply(plan: Plan, actor) -> Plan:
    """Write what scan() found: register databases, catalog new archives, mark known archives
    that are now damaged as corrupt, rebuild the WAL catalog, and record it all."""
    repo = LocalRepository(plan.root)
    for name in sorted({f.db_name for f in plan.found}):
        items = [f for f in plan.found if f.db_name == name]
        with transaction.atomic():
            db = Database.objects.filter(name=name).first()
            if db is None and name in plan.register:
                db = _register(plan.register[name], actor, plan)
            if db is None:
                continue
            for f in items:
                if f.status == "new":
                    _catalog(db, f)
                elif f.status == "damaged" and f.catalog_state not in (Archive.State.CORRUPT, Archive.State.EXPIRED):
                    Archive.objects.get(pk=f.archive_id).record_verification(False, f.problem, actor)
    for name in plan.wal_areas:
        db = Database.objects.filter(name=name).first()
        if db is not None:
            wal.refresh_catalog(db, repo)
    counts = plan.counts()
    damaged = [{"path": f.relpath, "error": f.problem} for f in plan.found
               if f.problem and f.status in ("new", "damaged")][:AUDIT_LIST_CAP]
    audit.record(actor, "repository.rescanned", None,
                 outcome="success" if not damaged and not plan.unregistrable else "failure",
                 details={"repository": str(plan.root), **counts,
                          "new_archives": [f.relpath for f in plan.found if f.status == "new"][:AUDIT_LIST_CAP],
                          "damaged_archives": damaged,
                          "missing_archives": [p for _, p in plan.missing][:AUDIT_LIST_CAP],
                          "databases": plan.registered, "not_registered": plan.unregistrable})
    return plan


def _has_segments(repo: LocalRepository, db: Database) -> bool:
    segments, _ = wal.scan(wal.area_path(db, repo))
    return bool(segments)


def _register(f: Found, actor, plan: Plan) -> Database:
    db = _database_from(f)
    if _has_segments(LocalRepository(plan.root), db):
        # Its WAL is in the repository, so it was archived: keep point-in-time recovery on offer.
        db.wal_mode = WalMode.ARCHIVE
    db.save()
    audit.record(actor, "config.database.created", db,
                 details={"changes": audit.diff(None, db.audit_fields()), "source": "repository rescan",
                          "manifest": f"{f.relpath}/{manifest.NAME}",
                          "awaiting": "the password: manage.py databases set-password, or the admin"})
    plan.registered.append(db.name)
    return db


def _catalog(db: Database, f: Found) -> None:
    man = f.manifest or {}
    walinfo = man.get("wal") or {}
    if f.manifest is not None and not _manifest_problem(man, f):
        started = datetime.fromisoformat(man["started_at"])
        finished = datetime.fromisoformat(man["finished_at"])
        entries = man["files"]
        nbytes = sum(e["bytes"] for e in entries)
        compression = man["compression"]["algorithm"]
    else:  # the manifest cannot be trusted: what the directory's name and the disk say
        started = finished = f.stamp or timezone.now()
        entries, nbytes, compression = [], f.bytes_on_disk, Compression.NONE
    error = f.problem or f.incomplete
    try:
        with transaction.atomic():
            archive = Archive.objects.create(
                run=None, database=db, kind=f.kind if f.kind in BackupKind.values else BackupKind.LOGICAL,
                path=f.relpath, state=f.state, started_at=started, finished_at=finished, bytes=nbytes,
                server_version=str((man.get("source") or {}).get("server_version") or "")[:64],
                compression=compression, manifest_sha256=f.manifest_sha256, verify_error=error,
                encrypted_for=_fingerprints(man.get("encryption")),
                timeline=walinfo.get("timeline") if isinstance(walinfo.get("timeline"), int) else None,
                start_lsn=str(walinfo.get("start_lsn") or "")[:20], stop_lsn=str(walinfo.get("stop_lsn") or "")[:20],
            )
            ArchiveFile.objects.bulk_create([
                ArchiveFile(archive=archive, path=e["path"], role=e["role"], bytes=e["bytes"], sha256=e["sha256"])
                for e in entries])
    except IntegrityError:  # another rescan (or the run itself) cataloged it meanwhile
        f.status = "known"
        return
    f.archive_id = archive.pk
    if Database.objects.filter(pk=db.pk, last_size_bytes__isnull=True).exists():
        size = (man.get("source") or {}).get("size_bytes")
        if isinstance(size, int):
            Database.objects.filter(pk=db.pk).update(last_size_bytes=size)


def _fingerprints(encryption) -> list[str]:
    """The recipients' key fingerprints from a manifest's "encryption" entry, as the runner
    catalogs them (None when the archive is not encrypted)."""
    keys = encryption.get("recipients") if isinstance(encryption, dict) else None
    return [fp for fp in keys if isinstance(fp, str) and re.fullmatch(r"[0-9A-F]{40}", fp)] \
        if isinstance(keys, list) else []
