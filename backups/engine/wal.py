"""The WAL side of the repository: where a database's WAL lives, what is there, what is
missing, and the commands that put it there.

    <repository>/wal/<database>/            the database's WAL area (see backups/walpush.py)
    <repository>/wal/<database>/.stream/    pg_receivewal's working directory (streaming mode)
    <repository>/bin/bankvault-walpush      the push/fetch script, readable by the server's user
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from .. import walpush
from .pgtools import BackupError
from .repository import LocalRepository, default_repository

SEGMENT_NAME = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
HISTORY_LINE = re.compile(r"^\s*(\d+)\s+([0-9A-F]+/[0-9A-F]+)", re.I)


class WalError(BackupError):
    pass


# -- LSNs and segment names ----------------------------------------------------------------------
def lsn_to_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segments_per_xlogid(segsize: int) -> int:
    return 0x100000000 // segsize


def segment_name(timeline: int, segno: int, segsize: int) -> str:
    per = segments_per_xlogid(segsize)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def segment_of_lsn(lsn: str | int, segsize: int) -> int:
    value = lsn_to_int(lsn) if isinstance(lsn, str) else lsn
    return value // segsize


def parse_segment(name: str, segsize: int) -> tuple[int, int]:
    """(timeline, segment number) of a 24-hex-digit segment name."""
    m = SEGMENT_NAME.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a WAL segment name")
    tli, log, seg = (int(x, 16) for x in m.groups())
    return tli, log * segments_per_xlogid(segsize) + seg


def segments_between(timeline: int, start_lsn: str, stop_lsn: str, segsize: int) -> list[str]:
    """Names of every segment holding WAL from start_lsn to stop_lsn, inclusive."""
    first, last = segment_of_lsn(start_lsn, segsize), segment_of_lsn(stop_lsn, segsize)
    return [segment_name(timeline, n, segsize) for n in range(first, last + 1)]


# -- the area ----------------------------------------------------------------------------------------
def area_path(db, repo: LocalRepository | None = None) -> Path:
    repo = repo or default_repository()
    return repo.root / "wal" / db.name


@dataclass(frozen=True)
class StoredWal:
    name: str           # 000000010000000000000003, or 00000002.history, or ....backup
    filename: str       # as stored, with sha256 and .zst
    path: Path
    sha256: str
    compressed: bool
    mtime: float
    encrypted: bool = False  # <name>-<sha256>.zst.gpg: push --encrypt-to; only the workers can read it

    @property
    def archived_at(self) -> datetime:
        return datetime.fromtimestamp(self.mtime, tz=UTC)


def scan(area: Path) -> tuple[dict[str, StoredWal], dict[str, StoredWal]]:
    """({segment name: StoredWal}, {history/backup name: StoredWal}) in an area."""
    segments: dict[str, StoredWal] = {}
    others: dict[str, StoredWal] = {}
    if not area.is_dir():
        return segments, others

    def add(directory: Path, entry: os.DirEntry):
        parsed = walpush.parse_stored(entry.name)
        if not parsed:
            return
        name, sha, suffix = parsed
        item = StoredWal(name, entry.name, directory / entry.name, sha, ".zst" in suffix, entry.stat().st_mtime,
                         suffix.endswith(".gpg"))
        (segments if SEGMENT_NAME.match(name) else others)[name] = item

    with os.scandir(area) as top:
        for entry in top:
            if entry.is_dir() and re.fullmatch(r"[0-9A-F]{16}", entry.name):
                with os.scandir(entry.path) as inner:
                    for sub in inner:
                        if sub.is_file():
                            add(Path(entry.path), sub)
            elif entry.is_file():
                add(area, entry)
    return segments, others


def read_stored(item: StoredWal) -> bytes:
    """The original content of an archived WAL file, checksum-verified (and decrypted, with
    gpg's integrity check, in this worker when it is encrypted)."""
    if item.encrypted:
        from . import gpg

        try:
            data = gpg.decrypt_file(item.path, f"WAL file {item.filename}")
        except gpg.GpgError as exc:
            raise WalError(exc.message, exc.detail) from exc
    else:
        data = item.path.read_bytes()
    if item.compressed:
        import zstandard

        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31)
        except zstandard.ZstdError as exc:
            raise WalError(f"WAL file {item.filename} cannot be decompressed ({exc}): it is damaged") from None
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise WalError(f"WAL file {item.filename} failed its checksum: it is damaged")
    return data


def parse_history(text: str) -> list[tuple[int, str]]:
    """[(parent timeline, switch LSN), ...] from a .history file, oldest first."""
    return [(int(m.group(1)), m.group(2).upper()) for line in text.splitlines()
            if (m := HISTORY_LINE.match(line))]


@dataclass
class TimelineState:
    timeline: int
    segnos: list[int]
    names: list[str]
    gaps: list[tuple[str, str]]
    first_archived_at: datetime | None
    last_archived_at: datetime | None
    parent: int | None = None
    branch_lsn: str = ""


def timelines(area: Path, segsize: int, scanned: tuple[dict, dict] | None = None) -> dict[int, TimelineState]:
    """Per timeline: its segments, gaps and history. `scanned` is a scan() of the area already made."""
    segments, others = scanned if scanned is not None else scan(area)
    by_tli: dict[int, list[tuple[int, StoredWal]]] = {}
    for name, item in segments.items():
        tli, segno = parse_segment(name, segsize)
        by_tli.setdefault(tli, []).append((segno, item))
    result: dict[int, TimelineState] = {}
    for tli, items in by_tli.items():
        items.sort(key=lambda x: x[0])
        segnos = [s for s, _ in items]
        gaps = []
        for prev, nxt in zip(segnos, segnos[1:], strict=False):
            if nxt != prev + 1:
                gaps.append((segment_name(tli, prev + 1, segsize), segment_name(tli, nxt - 1, segsize)))
        mtimes = [i.mtime for _, i in items]
        result[tli] = TimelineState(
            tli, segnos, [i.name for _, i in items], gaps,
            datetime.fromtimestamp(min(mtimes), tz=UTC), datetime.fromtimestamp(max(mtimes), tz=UTC))
    for name, item in others.items():
        if name.endswith(".history"):
            tli = int(name[:8], 16)
            with contextlib.suppress(WalError, OSError):
                history = parse_history(read_stored(item).decode(errors="replace"))
                if history and tli in result:
                    result[tli].parent, result[tli].branch_lsn = history[-1]
    return result


def refresh_catalog(db, repo: LocalRepository | None = None) -> list:
    """Rebuild the WalTimeline rows of a database from its WAL area."""
    from ..models import WalTimeline

    states = timelines(area_path(db, repo), db.wal_segment_size)
    now = timezone.now()
    rows = []
    for tli, st in sorted(states.items()):
        row, _ = WalTimeline.objects.update_or_create(
            database=db, timeline=tli,
            defaults=dict(first_segment=st.names[0], last_segment=st.names[-1], segment_count=len(st.names),
                          gaps=[list(g) for g in st.gaps], first_archived_at=st.first_archived_at,
                          last_archived_at=st.last_archived_at, parent_timeline=st.parent,
                          branch_lsn=st.branch_lsn, scanned_at=now))
        rows.append(row)
    WalTimeline.objects.filter(database=db).exclude(timeline__in=list(states)).delete()
    return rows


def missing(area: Path, names: list[str]) -> list[str]:
    return [n for n in names if not walpush.stored(str(area), n)]


def verify_segments(area: Path, names: list[str]) -> None:
    """Every named segment is present and its content matches its checksum."""
    from . import gpg

    segments, _ = scan(area)
    for name in names:
        item = segments.get(name)
        if item is None:
            raise WalError(f"WAL segment {name} is not in the repository")
        try:
            read_stored(item)
        except WalError as exc:
            # Encrypted to keys held only in escrow: present is all this worker can tell.
            if not isinstance(exc.__cause__, gpg.MissingPrivateKey):
                raise


def wait_for_segments(area: Path, names: list[str], timeout: float, poll: float = 0.5) -> list[str]:
    """Wait until every named segment is archived; returns those still missing at the end."""
    deadline = time.monotonic() + timeout
    while True:
        absent = missing(area, names)
        if not absent or time.monotonic() >= deadline:
            return absent
        time.sleep(poll)


# -- setting up archiving ------------------------------------------------------------------------------
def install_push_script(repo: LocalRepository | None = None) -> Path:
    """Copy walpush.py to <repository>/bin, where the database server's OS user can read it
    (a virtualenv or checkout under /root is not readable by `postgres`)."""
    repo = repo or default_repository()
    target = Path(walpush.install(str(repo.root / "bin")))
    for path in (repo.root, repo.root / "bin"):
        path.chmod(path.stat().st_mode | 0o055)  # traversable by the server's user
    return target


def prepare_area(db, os_user: str | None = "postgres", repo: LocalRepository | None = None) -> Path:
    """Create the WAL area, owned by the server's OS user so its archive_command can write."""
    area = area_path(db, repo)
    area.mkdir(parents=True, exist_ok=True)
    (area.parent).chmod(area.parent.stat().st_mode | 0o055)
    if os.geteuid() == 0 and os_user:
        pw = pwd.getpwnam(os_user)
        for path in (area, area / ".stream"):
            path.mkdir(exist_ok=True)
            os.chown(path, pw.pw_uid, pw.pw_gid)
    return area


def python_for_server() -> str:
    return getattr(settings, "BANKVAULT_WAL_PYTHON", "/usr/bin/python3")


def archive_command(db, repo: LocalRepository | None = None) -> str:
    from . import gpg

    root = (repo or default_repository()).root
    return walpush.command_line(python_for_server(), root / "bin" / "bankvault-walpush", "push",
                                area_path(db, repo), extra=gpg.walpush_args(db, repo))


def restore_command(db, repo: LocalRepository | None = None) -> str:
    root = (repo or default_repository()).root
    return walpush.command_line(python_for_server(), root / "bin" / "bankvault-walpush", "fetch",
                                area_path(db, repo))


def conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def force_switch_and_wait(db, timeout: float = 60) -> dict:
    """Make the server close its current WAL segment and wait until it is in the repository:
    the check that catches a missing or wrong archive_command before anyone needs a restore."""
    import psycopg

    area = area_path(db)
    try:
        return _switch_and_wait(db, area, timeout)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise WalError(f"user {db.user!r} may not force a WAL switch ({str(exc).strip()}); as a superuser run "
                       f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {db.user} in database {db.dbname}") from None
    except psycopg.Error as exc:
        raise WalError(f"the WAL check failed on the server: {str(exc).strip()}") from None


def _switch_and_wait(db, area: Path, timeout: float) -> dict:
    with db.conninfo().connect(autocommit=True) as conn:
        # Write something first: pg_switch_wal() does nothing on an empty segment. It returns
        # the end of the segment it closed, which pg_walfile_name() maps to that segment.
        conn.execute("SELECT txid_current()")
        segsize, archive_mode, archive_cmd = conn.execute(
            "SELECT (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
            "current_setting('archive_mode'), current_setting('archive_command')").fetchone()
        sysid = server_system_identifier(conn)
        current = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
    if db.wal_segment_size != segsize or (sysid and db.system_identifier != sysid):
        db.wal_segment_size, db.system_identifier = segsize, sysid or db.system_identifier
        db.save(update_fields=["wal_segment_size", "system_identifier"])
    started = time.monotonic()
    absent = wait_for_segments(area, [current], timeout)
    if absent:
        hint = ("archive_mode is off on the server" if archive_mode == "off" and db.wal_mode == "archive"
                else f"the server's archive_command is {archive_cmd!r}; expected {archive_command(db)!r}"
                if db.wal_mode == "archive" else "is `manage.py wal_receiver` running?")
        raise WalError(f"WAL segment {current} did not reach {area} within {timeout:.0f}s: {hint}")
    return {"segment": current, "seconds": round(time.monotonic() - started, 3), "area": str(area)}


def check_and_record(db, actor, timeout: float = 60) -> dict:
    """force_switch_and_wait() with its outcome in the audit trail; never raises for a failed
    check (the result says why)."""
    import audit

    try:
        result = {"ok": True, **force_switch_and_wait(db, timeout=timeout)}
    except BackupError as exc:
        result = {"ok": False, "error": exc.message}
    audit.record(actor, "database.wal_checked", db, outcome="success" if result["ok"] else "failure",
                 details=result)
    return result


def server_system_identifier(conn) -> str:
    """The cluster's system identifier, or "" when this role may not read pg_control."""
    try:
        with conn.transaction():
            return conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0]
    except Exception:
        return ""


def restore_windows(db, repo: LocalRepository | None = None) -> list[dict]:
    """Periods to which ``db`` can be recovered: from each complete base backup's end to the
    newest WAL reachable from it without a gap."""
    from ..models import Archive, BackupKind

    repo = repo or default_repository()
    # Plain tuples: a year of daily base backups is thousands of rows, and model instances of
    # them cost far more than the query (the dashboard calls this on every database page).
    bases = list(Archive.objects.filter(database=db, kind=BackupKind.BASE, state=Archive.State.COMPLETE)
                 .exclude(start_lsn="").order_by("finished_at")
                 .values_list("pk", "timeline", "start_lsn", "stop_lsn", "finished_at"))
    if not bases:
        return []
    segsize = db.wal_segment_size
    area = area_path(db, repo)
    scanned = scan(area)
    stored = scanned[0]
    states = timelines(area, segsize, scanned)
    have = {tli: set(state.segnos) for tli, state in states.items()}
    newest = {tli: max(state.segnos) for tli, state in states.items() if state.segnos}
    windows = []
    for pk, timeline, start_lsn, stop_lsn, finished_at in bases:
        if timeline not in have:
            continue
        seg = segment_of_lsn(start_lsn, segsize)
        last = None
        while seg in have[timeline]:
            last = seg
            seg += 1
        if last is None or last < segment_of_lsn(stop_lsn, segsize):
            continue
        until = stored[segment_name(timeline, last, segsize)].archived_at
        gap_after = seg if newest[timeline] > seg else None
        windows.append({"base": pk, "timeline": timeline, "from": finished_at, "until": until,
                        "gap_after": segment_name(timeline, gap_after, segsize) if gap_after else None})
    # Merge overlapping windows (a newer base backup inside an older one's reach adds nothing).
    merged: list[dict] = []
    for w in sorted(windows, key=lambda w: w["from"]):
        if merged and w["from"] <= merged[-1]["until"] and w["timeline"] == merged[-1]["timeline"]:
            merged[-1]["until"] = max(merged[-1]["until"], w["until"])
            merged[-1]["gap_after"] = w["gap_after"] if w["until"] >= merged[-1]["until"] else merged[-1]["gap_after"]
            merged[-1]["bases"].append(w["base"])
        else:
            merged.append({**w, "bases": [w["base"]]})
    return merged
