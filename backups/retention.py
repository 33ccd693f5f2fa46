"""Retention: which archives each database keeps (grandfather-father-son, by its policies), which
WAL its kept base backups still need, and the cleanup that removes the rest.

    plan_archives()   pure: one database+kind's archives, its policies' rules and `now` ->
                      keep or delete, each with its reasons
    plan_database()   gathers the facts from the catalog (policies, legal holds, archives in use
                      by restores, drills and uploads) and plans both kinds and the WAL
    plan_wal()        which stored WAL files no kept base backup needs
    cleanup()         carries the plans out: expires archives (the row stays, state `expired`),
                      removes WAL, and records every deletion in the audit trail
    place_hold() / lift_hold()   the legal hold; nothing deletes an archive under one (the flag
                      is in the catalog, and a legal-hold.json marker in the archive's directory
                      keeps it protected should the catalog ever be rebuilt without it)

The rules, as pgBackRest/Borg users expect them:

* Each enabled policy of a database and kind keeps the newest good (complete) archive of each of
  its last ``keep_daily`` days, ``keep_weekly`` ISO weeks and ``keep_monthly`` months that have
  one (days, weeks and months in TIME_ZONE), and every archive younger than ``keep_days``
  (empty: RETENTION_DAYS). With several policies an archive is kept if any keeps it.
* A database+kind without an enabled policy loses nothing.
* Always kept, whatever the counts: the newest good archive of a database+kind; an archive under
  legal hold; one that an open restore request, a running drill or an upload still needs.
* Only complete, corrupt and incomplete archives are ever deleted (corrupt and incomplete ones
  hold no daily/weekly/monthly slot; they go once older than ``keep_days``).
* WAL: on each timeline, segments older than the start of the oldest kept base backup of that
  timeline or of one it descends from go, and so do whole timelines that no kept base backup
  needs (never the newest one). Timeline history files are never removed. Nothing is removed
  for a database without an enabled base-backup policy or without a kept base backup.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from pathlib import Path

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

import audit

from .engine import wal
from .engine.repository import LocalRepository, RepositoryError, default_repository, fsync_dir, os_error
from .models import Archive, ArchiveCopy, BackupKind, BackupPolicy, Database

log = logging.getLogger(__name__)

CLEANUP_ACTOR = "system:cleanup"
CANDIDATE_STATES = (Archive.State.COMPLETE, Archive.State.CORRUPT, Archive.State.INCOMPLETE)
EXPIRING_PREFIX = "expiring-"  # under the repository's tmp/: an expired archive's files on their way out
# Written into a held archive's directory, so the hold survives the loss of the catalog (the
# repository describes itself): retention never removes a directory that holds one.
HOLD_MARKER = "legal-hold.json"


class RetentionError(Exception):
    """A retention action cannot be done; the message says why, for an operator."""


# -- planning: pure ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One policy's retention counts."""
    name: str
    daily: int
    weekly: int
    monthly: int
    days: int

    @classmethod
    def of(cls, policy: BackupPolicy) -> Rule:
        days = policy.keep_days if policy.keep_days is not None else settings.RETENTION_DAYS
        return cls(policy.name, policy.keep_daily, policy.keep_weekly, policy.keep_monthly, days)

    def describe(self) -> str:
        return (f"{self.daily} daily, {self.weekly} weekly, {self.monthly} monthly, "
                f"everything younger than {self.days} days")


@dataclass
class Item:
    """What the planner needs to know about one archive."""
    pk: int
    kind: str
    state: str
    started_at: datetime
    legal_hold: bool = False
    pinned: list[str] = field(default_factory=list)  # who else needs it ("restore request 12 (approved)")
    path: str = ""
    bytes: int = 0
    timeline: int | None = None
    start_lsn: str = ""


@dataclass
class Decision:
    item: Item
    keep: bool
    reasons: list[str]


def _periods(local: datetime) -> dict[str, str]:
    iso = local.isocalendar()
    return {"daily": local.date().isoformat(), "weekly": f"{iso.year}-W{iso.week:02d}",
            "monthly": f"{local.year}-{local.month:02d}"}


def plan_archives(items: Iterable[Item], rules: list[Rule], now: datetime, tz: tzinfo | None = None) -> list[Decision]:
    """Keep or delete each archive of one database and kind (newest first), with the reasons.
    Expired archives are left out; states other than complete/corrupt/incomplete are kept."""
    tz = tz or timezone.get_default_timezone()
    items = sorted((i for i in items if i.state != Archive.State.EXPIRED),
                   key=lambda i: (i.started_at, i.pk), reverse=True)
    keep: dict[int, list[str]] = {i.pk: [] for i in items}
    drop: dict[int, list[str]] = {i.pk: [] for i in items}
    several = len(rules) > 1
    good = [i for i in items if i.state == Archive.State.COMPLETE]

    for item in items:
        if item.legal_hold:
            keep[item.pk].append("legal hold")
        keep[item.pk].extend(item.pinned)
        if item.state not in CANDIDATE_STATES:
            keep[item.pk].append(f"{item.state.replace('_', ' ')}: not a finished archive")
    if not rules:
        for item in items:
            keep[item.pk].append(f"no enabled policy for {item.kind} archives: retention does not apply")
    if good:
        keep[good[0].pk].append("newest good archive")

    for rule in rules:
        suffix = f" (policy {rule.name})" if several else ""
        cutoff = now - timedelta(days=rule.days)
        for item in items:
            if item.started_at > cutoff:
                keep[item.pk].append(f"younger than {rule.days} days{suffix}")
        for bucket, count in (("daily", rule.daily), ("weekly", rule.weekly), ("monthly", rule.monthly)):
            seen: set[str] = set()
            for item in good:
                if len(seen) >= count:
                    break
                period = _periods(timezone.localtime(item.started_at, tz))[bucket]
                if period not in seen:
                    seen.add(period)
                    keep[item.pk].append(f"{bucket} {period}{suffix}")
        for item in items:
            if item.state == Archive.State.COMPLETE:
                why = (f"not the newest archive of one of the last {rule.daily} days, {rule.weekly} weeks or "
                       f"{rule.monthly} months")
            else:
                why = item.state
            drop[item.pk].append(f"{why}, older than {rule.days} days{suffix}")

    return [Decision(item, bool(keep[item.pk]), keep[item.pk] or drop[item.pk]) for item in items]


# -- planning: WAL ---------------------------------------------------------------------------------------
@dataclass
class WalPlan:
    files: list[wal.StoredWal] = field(default_factory=list)   # to remove
    ranges: list[dict] = field(default_factory=list)           # [{timeline, first, last, segments}]
    kept_from: dict[int, str] = field(default_factory=dict)    # timeline -> first segment kept
    notes: list[str] = field(default_factory=list)             # why some or all WAL stays

    @property
    def bytes(self) -> int:
        total = 0
        for f in self.files:
            with contextlib.suppress(OSError):
                total += f.path.stat().st_size
        return total

    @property
    def segments(self) -> int:
        return sum(r["segments"] for r in self.ranges)


def _ancestors(others: dict[str, wal.StoredWal]) -> dict[int, set[int] | None]:
    """Timeline -> every timeline it descends from, read from its .history file (None: unreadable)."""
    result: dict[int, set[int] | None] = {1: set()}
    for name, item in others.items():
        if name.endswith(".history"):
            tli = int(name[:8], 16)
            try:
                text = wal.read_stored(item).decode(errors="replace")
                result[tli] = {parent for parent, _ in wal.parse_history(text)}
            except (wal.WalError, OSError, UnicodeError):
                result[tli] = None
    return result


def plan_wal(db: Database, kept_bases: list[tuple[int | None, str]], repo: LocalRepository | None = None,
             *, has_policy: bool = True) -> WalPlan:
    """Which stored WAL files of ``db`` no kept base backup needs. ``kept_bases``: (timeline,
    start LSN) of every base backup that stays."""
    result = WalPlan()
    area = wal.area_path(db, repo or default_repository())
    if not area.is_dir():
        return result
    if not has_policy:
        result.notes.append("no enabled base-backup policy: WAL is not expired")
        return result
    if not kept_bases:
        result.notes.append("no kept base backup: all WAL is kept")
        return result
    if any(tli is None or not lsn for tli, lsn in kept_bases):
        result.notes.append("a kept base backup has no recorded timeline or start LSN: all WAL is kept")
        return result
    segsize = db.wal_segment_size
    segments, others = wal.scan(area)
    parents = _ancestors(others)
    starts = [(tli, wal.segment_of_lsn(lsn, segsize)) for tli, lsn in kept_bases]
    by_tli: dict[int, list[tuple[int, wal.StoredWal]]] = {}
    for name, item in segments.items():
        tli, segno = wal.parse_segment(name, segsize)
        by_tli.setdefault(tli, []).append((segno, item))
    newest_tli = max(by_tli, default=0)

    threshold: dict[int, int | None] = {}  # segments below are removed; None: the whole timeline stays
    for tli in sorted(by_tli):
        lineage = parents.get(tli)
        if lineage is None:
            result.notes.append(f"timeline {tli} has no readable history file: its WAL is kept")
            threshold[tli] = None
            continue
        lineage = lineage | {tli}
        relevant = [seg for base_tli, seg in starts if base_tli in lineage]
        if relevant:
            threshold[tli] = min(relevant)
            result.kept_from[tli] = wal.segment_name(tli, threshold[tli], segsize)
        elif tli == newest_tli:
            result.notes.append(f"timeline {tli} is the newest: its WAL is kept")
            threshold[tli] = None
        else:
            threshold[tli] = 1 << 62  # no kept base backup can use it

    for tli, items in sorted(by_tli.items()):
        limit = threshold[tli]
        if limit is None:
            continue
        gone = sorted((segno, item) for segno, item in items if segno < limit)
        result.files.extend(item for _, item in gone)
        for segno, _ in gone:
            last = result.ranges[-1] if result.ranges else None
            if last and last["timeline"] == tli and last["_end"] == segno - 1:
                last["_end"] = segno
                last["last"] = wal.segment_name(tli, segno, segsize)
                last["segments"] += 1
            else:
                name = wal.segment_name(tli, segno, segsize)
                result.ranges.append({"timeline": tli, "first": name, "last": name, "segments": 1, "_end": segno})
    for r in result.ranges:
        r.pop("_end")
    # .backup and .partial files follow their segment; .history files always stay.
    for name, item in others.items():
        if wal.SEGMENT_NAME.match(name[:24]) and len(name) > 24:
            tli, segno = wal.parse_segment(name[:24], segsize)
            limit = threshold.get(tli)
            if limit is not None and segno < limit:
                result.files.append(item)
    return result


# -- planning: from the catalog -------------------------------------------------------------------------
@dataclass
class KindPlan:
    kind: str
    rules: list[Rule]
    decisions: list[Decision]

    @property
    def delete(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.keep]


@dataclass
class DatabasePlan:
    database: Database
    now: datetime
    kinds: list[KindPlan]
    wal: WalPlan

    @property
    def delete(self) -> list[Decision]:
        return [d for k in self.kinds for d in k.delete]

    @property
    def kept(self) -> list[Decision]:
        return [d for k in self.kinds for d in k.kept]


def rules_for(db: Database, kind: str) -> list[Rule]:
    return [Rule.of(p) for p in BackupPolicy.objects.filter(database=db, kind=kind, enabled=True).order_by("name")]


def _model(label: str):
    """A model of another app, looked up by label rather than imported: backups never imports
    recovery or monitoring (ARCHITECTURE), yet retention must respect what they are using."""
    from django.apps import apps

    try:
        return apps.get_model(label)
    except LookupError:
        return None


def base_for_target(db: Database, target: datetime | None) -> int | None:
    """The base backup a point-in-time recovery to ``target`` starts from (as pitr.choose_base)."""
    qs = Archive.objects.filter(database=db, kind=BackupKind.BASE, state=Archive.State.COMPLETE)
    if target is not None:
        qs = qs.filter(finished_at__lte=target)
    return qs.order_by("-finished_at").values_list("pk", flat=True).first()


def pinned_archives(db: Database) -> dict[int, list[str]]:
    """Archives of ``db`` that something still needs: open restore requests (pending, approved,
    running), running drills, uploads in progress."""
    pins: dict[int, list[str]] = {}

    def pin(pk, why):
        if pk:
            pins.setdefault(pk, []).append(why)

    mine = set(Archive.objects.filter(database=db).exclude(state=Archive.State.EXPIRED).values_list("pk", flat=True))
    for copy in ArchiveCopy.objects.filter(archive__database=db, state=ArchiveCopy.State.COPYING) \
            .select_related("remote"):
        pin(copy.archive_id, f"being copied to {copy.remote.name}")

    request_model = _model("recovery.RestoreRequest")
    if request_model is not None:
        open_states = getattr(request_model, "OPEN_STATES", ("pending", "approved", "running"))
        for req in request_model.objects.filter(state__in=open_states):
            why = f"needed by restore request {req.pk} ({req.state})"
            items = req.items or []
            ids = {req.archive_id} | {i.get("archive") for i in items if isinstance(i, dict)}
            for pk in ids & mine:
                pin(pk, why)
            covers = req.database_id == db.pk or any(isinstance(i, dict) and i.get("database") == db.pk
                                                      for i in items)
            if covers and req.kind in ("pitr", "tables") and not (ids & mine):
                pin(base_for_target(db, req.target_time), why)

    drill_model = _model("monitoring.Drill")
    if drill_model is not None:
        for drill in drill_model.objects.filter(database=db, state="running"):
            why = f"in use by running drill {drill.pk}"
            if drill.archive_id in mine:
                pin(drill.archive_id, why)
            if drill.kind == "pitr":
                pin(base_for_target(db, drill.target_time), why)
    return pins


def _item(a: Archive, pins: dict[int, list[str]]) -> Item:
    return Item(a.pk, a.kind, a.state, a.started_at, a.legal_hold, list(pins.get(a.pk, [])), a.path, a.bytes,
                a.timeline, a.start_lsn)


def held_on_disk(relpath: str, repo: LocalRepository) -> bool:
    try:
        return (repo.archive_dir(relpath) / HOLD_MARKER).exists()
    except RepositoryError:
        return False


def plan_database(db: Database, now: datetime | None = None, repo: LocalRepository | None = None) -> DatabasePlan:
    """What the next cleanup would do to ``db``: archives per kind, then the WAL that the base
    backups it keeps no longer need."""
    now = now or timezone.now()
    repo = repo or default_repository()
    pins = pinned_archives(db)
    archives = list(Archive.objects.filter(database=db).exclude(state=Archive.State.EXPIRED)
                    .only("pk", "kind", "state", "started_at", "legal_hold", "path", "bytes", "timeline",
                          "start_lsn"))
    for a in archives:
        if not a.legal_hold and held_on_disk(a.path, repo):
            pins.setdefault(a.pk, []).append(f"legal hold marker ({HOLD_MARKER}) in the repository")
    kinds = []
    for kind in (BackupKind.LOGICAL, BackupKind.BASE):
        items = [_item(a, pins) for a in archives if a.kind == kind]
        rules = rules_for(db, kind)
        kinds.append(KindPlan(kind, rules, plan_archives(items, rules, now)))
    base_plan = kinds[1]
    kept_bases = [(d.item.timeline, d.item.start_lsn) for d in base_plan.decisions if d.keep]
    wal_plan = plan_wal(db, kept_bases, repo, has_policy=bool(base_plan.rules))
    return DatabasePlan(db, now, kinds, wal_plan)


# -- carrying it out ------------------------------------------------------------------------------------
def _actor_label(actor) -> str:
    return actor.get_username() if hasattr(actor, "get_username") else str(actor)


def expire_archive(pk: int, reasons: list[str], actor, repo: LocalRepository | None = None,
                   now: datetime | None = None) -> Archive | None:
    """Expire one archive: re-check under a row lock that nothing keeps it (a hold placed, a
    restore filed, a newer good archive gone since the plan), mark it expired and audit that in
    one transaction, then remove its files. Returns None (changing nothing) when it must stay."""
    repo = repo or default_repository()
    with transaction.atomic():
        archive = Archive.objects.select_for_update().select_related("database").filter(pk=pk).first()
        if archive is None or archive.legal_hold or archive.state not in CANDIDATE_STATES:
            return None
        if pinned_archives(archive.database).get(archive.pk) or held_on_disk(archive.path, repo):
            return None
        if archive.state == Archive.State.COMPLETE and not Archive.objects.filter(
                database=archive.database_id, kind=archive.kind, state=Archive.State.COMPLETE,
                started_at__gt=archive.started_at).exists():
            return None  # it became the newest good archive
        previous = archive.state
        archive.state = Archive.State.EXPIRED
        archive.expired_at = now or timezone.now()
        archive.save(update_fields=["state", "expired_at"])
        audit.record(actor, "archive.expired", archive, details={
            "database": archive.database.name, "kind": archive.kind, "path": archive.path,
            "started_at": archive.started_at.isoformat(), "bytes": archive.bytes, "previous_state": previous,
            "reasons": reasons})
    # Outside the transaction: file I/O. The row says expired from here on, so no restore picks it;
    # if we die before the files are gone, the next cleanup finishes (finish_interrupted).
    remove_archive_files(archive.path, repo)
    _expire_remote_copies(archive, actor)
    return archive


def remove_archive_files(relpath: str, repo: LocalRepository) -> bool:
    """Move the archive's directory out of archives/ in one rename (so a crash leaves the whole
    archive, or a directory under tmp/ that is clearly not one), then delete it."""
    try:
        src = repo.archive_dir(relpath)
    except RepositoryError:
        return False
    if not src.exists():
        return False
    dest = repo.tmp / f"{EXPIRING_PREFIX}{uuid.uuid4().hex[:8]}-{src.name}"
    try:
        repo.tmp.mkdir(parents=True, exist_ok=True)
        os.rename(src, dest)
        fsync_dir(src.parent)
    except OSError as exc:
        raise os_error(exc, src, f"removing expired archive {relpath}") from None
    shutil.rmtree(dest, ignore_errors=True)
    return True


def _expire_remote_copies(archive: Archive, actor) -> None:
    """The hook for remote copies: backups.offsite.expire_copies(archive) decides what happens to
    them, when that module provides it. A failure there does not undo the local expiry."""
    try:
        from . import offsite  # type: ignore[attr-defined]
    except ImportError:
        return
    expire = getattr(offsite, "expire_copies", None)
    if expire is None:
        return
    try:
        if "actor" in inspect.signature(expire).parameters:
            expire(archive, actor=actor)
        else:
            expire(archive)
    except Exception:
        log.exception("expiring the remote copies of archive %s failed", archive.pk)


def finish_interrupted(repo: LocalRepository, databases: Iterable[Database] | None = None) -> int:
    """Finish deletions a crash interrupted: directories under tmp/expiring-*, and expired
    archives whose directory is still in place. Returns how many were finished."""
    done = 0
    if repo.tmp.is_dir():
        for entry in repo.tmp.iterdir():
            if entry.name.startswith(EXPIRING_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                done += 1
    qs = Archive.objects.filter(state=Archive.State.EXPIRED)
    if databases is not None:
        qs = qs.filter(database__in=list(databases))
    for path in qs.values_list("path", flat=True):
        if remove_archive_files(path, repo):
            done += 1
    return done


@contextlib.contextmanager
def _area_lock(area: Path):
    """The WAL compactor's lock: while we remove files it does not swap plain for .zst copies."""
    try:
        fd = os.open(area / ".compact.lock", os.O_CREAT | os.O_RDONLY, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def expire_wal(db: Database, actor, repo: LocalRepository | None = None) -> dict:
    """Remove the WAL of ``db`` that no kept base backup needs (planned afresh from the catalog
    and the area, under the compactor's lock), audit it, refresh the WAL catalog."""
    repo = repo or default_repository()
    has_policy = BackupPolicy.objects.filter(database=db, kind=BackupKind.BASE, enabled=True).exists()
    kept = list(Archive.objects.filter(database=db, kind=BackupKind.BASE).exclude(state=Archive.State.EXPIRED)
                .values_list("timeline", "start_lsn"))
    area = wal.area_path(db, repo)
    if not area.is_dir():
        return {"files": 0, "segments": 0, "bytes": 0}
    with _area_lock(area):
        the_plan = plan_wal(db, kept, repo, has_policy=has_policy)
        if not the_plan.files:
            return {"files": 0, "segments": 0, "bytes": 0, "notes": the_plan.notes}
        size = the_plan.bytes
        removed, error = 0, ""
        dirs = set()
        for item in the_plan.files:
            try:
                item.path.unlink()
                removed += 1
                dirs.add(item.path.parent)
            except FileNotFoundError:
                continue
            except OSError as exc:
                error = os_error(exc, item.path, "removing expired WAL").message
                break
        for d in dirs:
            with contextlib.suppress(OSError):
                fsync_dir(d)
            if d != area:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty: the subdirectory of an old log file
    details = {"database": db.name, "files": removed, "segments": the_plan.segments, "bytes": size,
               "ranges": the_plan.ranges, "kept_from": {str(k): v for k, v in the_plan.kept_from.items()}}
    if error:
        details["error"] = error
    audit.record(actor, "wal.expired", db, outcome="failure" if error else "success", details=details)
    wal.refresh_catalog(db, repo)
    if error:
        raise RetentionError(error)
    return {k: details[k] for k in ("files", "segments", "bytes", "ranges")}


class _CleanupLock:
    """One cleanup at a time per repository (beat and an operator's command may meet)."""

    def __init__(self, repo: LocalRepository):
        self.path = repo.root / ".retention.lock"
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RetentionError("another cleanup is running on this repository; try again when it ends") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


# A database busy with a backup or restore is cleaned after the others, waiting this long for it.
BUSY_WAIT = 600


def cleanup(actor=CLEANUP_ACTOR, *, databases: Iterable[Database] | None = None, now: datetime | None = None,
            repo: LocalRepository | None = None) -> dict:
    """Apply retention to every database (or the given ones). Returns a summary per database;
    a database whose cleanup fails does not stop the others (its error is in the summary and in
    the trail). Each database is cleaned under its job lock, so no backup, restore or drill of it
    runs meanwhile (one that holds the lock is waited for, after the others, up to BUSY_WAIT s)."""
    from . import locks

    repo = repo or default_repository()
    dbs = list(databases) if databases is not None else list(Database.objects.order_by("name"))
    summary: dict[str, dict] = {}
    with _CleanupLock(repo):
        finished = finish_interrupted(repo, dbs)
        busy = []
        for db in dbs:
            try:
                with locks.database_lock(db, "retention cleanup"):
                    summary[db.name] = _cleanup_database(db, actor, now, repo)
            except locks.Busy:
                busy.append(db)
        for db in busy:
            try:
                with locks.database_lock(db, "retention cleanup", wait=BUSY_WAIT):
                    summary[db.name] = _cleanup_database(db, actor, now, repo)
            except locks.Busy as exc:
                summary[db.name] = {"archives_expired": 0, "bytes": 0, "wal_files": 0, "wal_bytes": 0,
                                    "error": f"{exc.message} Run `manage.py archives cleanup --database {db.name}` "
                                             "when it is free."}
        summary = {db.name: summary[db.name] for db in dbs}
    failed = [name for name, e in summary.items() if "error" in e]
    audit.record(actor, "retention.cleanup", None, outcome="failure" if failed else "success",
                 details={"databases": summary, "interrupted_finished": finished})
    return summary


def _cleanup_database(db: Database, actor, now: datetime | None, repo: LocalRepository) -> dict:
    entry = {"archives_expired": 0, "bytes": 0, "wal_files": 0, "wal_bytes": 0}
    try:
        the_plan = plan_database(db, now, repo)
        for decision in the_plan.delete:
            archive = expire_archive(decision.item.pk, decision.reasons, actor, repo, now)
            if archive is not None:
                entry["archives_expired"] += 1
                entry["bytes"] += archive.bytes
        result = expire_wal(db, actor, repo)
        entry["wal_files"], entry["wal_bytes"] = result["files"], result["bytes"]
    except (RetentionError, RepositoryError, OSError) as exc:
        entry["error"] = getattr(exc, "message", None) or str(exc)
        log.error("retention cleanup of %s failed: %s", db.name, entry["error"])
    return entry


# -- legal hold -----------------------------------------------------------------------------------------
def _may_hold(actor) -> bool:
    # People need the permission; a command or task (a string actor) runs with the OS user's rights.
    return actor.has_perm("backups.set_legal_hold") if hasattr(actor, "has_perm") else True


def place_hold(pk: int, actor, reason: str, request=None) -> Archive:
    return _set_hold(pk, actor, reason, True, request)


def lift_hold(pk: int, actor, reason: str, request=None) -> Archive:
    return _set_hold(pk, actor, reason, False, request)


def _set_hold(pk: int, actor, reason: str, hold: bool, request=None) -> Archive:
    action = "archive.legal_hold.placed" if hold else "archive.legal_hold.lifted"
    reason = (reason or "").strip()
    if not _may_hold(actor):
        raise PermissionDenied("placing and lifting legal holds is for operators")
    if not reason:
        raise RetentionError("give a reason (the case or instruction the hold is for)")
    with transaction.atomic():
        archive = Archive.objects.select_for_update().select_related("database").filter(pk=pk).first()
        if archive is None:
            raise RetentionError(f"no archive with id {pk}")
        if hold and archive.state == Archive.State.EXPIRED:
            raise RetentionError(f"archive {pk} expired on {timezone.localtime(archive.expired_at):%Y-%m-%d %H:%M}; "
                                 "its files are gone and cannot be held")
        if hold and archive.legal_hold:
            raise RetentionError(f"archive {pk} is already under legal hold ({archive.legal_hold_reason})")
        if not hold and not archive.legal_hold:
            raise RetentionError(f"archive {pk} is not under legal hold")
        previous = archive.legal_hold_reason
        archive.legal_hold = hold
        archive.legal_hold_reason = reason if hold else ""
        archive.save(update_fields=["legal_hold", "legal_hold_reason"])
        details = {"database": archive.database.name, "path": archive.path, "reason": reason}
        if not hold:
            details["hold_reason"] = previous
        audit.record(actor, action, archive, details=details, request=request)
    if hold:
        _write_marker(archive, _actor_label(actor), reason)
    else:
        _remove_marker(archive)
    return archive


def _write_marker(archive: Archive, who: str, reason: str) -> None:
    """Best effort, after the commit: the catalog's flag is what everything checks first."""
    import json

    repo = default_repository()
    try:
        directory = repo.archive_dir(archive.path)
        if not directory.is_dir():
            return
        tmp = directory / f".{HOLD_MARKER}.tmp"
        tmp.write_text(json.dumps({"archive": archive.pk, "database": archive.database.name, "reason": reason,
                                   "placed_by": who, "placed_at": timezone.now().isoformat()}, indent=2))
        os.replace(tmp, directory / HOLD_MARKER)
        fsync_dir(directory)
    except (OSError, RepositoryError) as exc:
        log.warning("legal hold on archive %s is in the catalog, but its marker could not be written: %s",
                    archive.pk, exc)


def _remove_marker(archive: Archive) -> None:
    try:
        (default_repository().archive_dir(archive.path) / HOLD_MARKER).unlink(missing_ok=True)
    except (OSError, RepositoryError) as exc:
        # The archive stays protected until the marker goes: safe, and the log says why.
        log.warning("legal hold on archive %s lifted, but its marker could not be removed: %s", archive.pk, exc)
