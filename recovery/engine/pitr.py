"""Point-in-time recovery: a base backup plus archived WAL, replayed into a fresh cluster up to
a target time (or to the end of the WAL), then promoted.

    plan()     pick the newest base backup that ends before the target, check that the WAL
               from its start to the target is all there on the right timeline
    recover()  verify the backup's checksums, unpack it as the server's OS user into a
               scratch directory, pre-stage verified WAL into a spool (restore_command copies
               from there), start on a free loopback port, wait until promoted

The recovered cluster listens on 127.0.0.1 only; TCP clients authenticate with the source's
own roles and passwords (scram), the Unix socket lives in a directory only its OS user and
root can enter. It never archives (archive_mode=off), so it cannot write into the source's
WAL area.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from backups import walpush
from backups.engine import gpg, manifest, physical, receiver, wal
from backups.engine.cluster import ClusterError, LocalCluster, chown_tree, port_answers
from backups.engine.logical import verify_files
from backups.engine.pgtools import BackupError, ConnInfo
from backups.engine.repository import LocalRepository, default_repository
from backups.engine.wal import restore_windows  # noqa: F401  (part of this module's interface)
from backups.models import Archive, BackupKind, Database

log = logging.getLogger(__name__)


class PitrError(BackupError):
    pass


# -- targets -------------------------------------------------------------------------------------------
def parse_target(text: str, tz_name: str | None = None) -> datetime | None:
    """ISO 8601 (optional fractional seconds and offset) or 'latest' (None). Without an offset
    the zone is ``tz_name``, else TIME_ZONE."""
    text = text.strip()
    if text.lower() == "latest":
        return None
    try:
        value = parse_datetime(text.replace("T", " ", 1) if "T" in text else text)
    except ValueError:
        value = None
    if value is None:
        raise PitrError(f"target {text!r} is not a time: use ISO 8601 like '2026-11-20 14:30:00', "
                        "'2026-11-20T14:30:00.250+01:00', or 'latest'")
    if value.tzinfo is None:
        name = tz_name or settings.TIME_ZONE
        try:
            value = value.replace(tzinfo=ZoneInfo(name))
        except ZoneInfoNotFoundError:
            raise PitrError(f"unknown time zone {name!r}") from None
    return value


# -- planning -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    database: Database
    base: Archive
    target: datetime | None
    timeline: int
    segments: list[str]          # what the spool will hold, in replay order
    history: list[str] = field(default_factory=list)
    partial: Path | None = None  # streaming mode: the last segment, still being written


def _base_manifest(base: Archive, repo: LocalRepository) -> dict:
    man, _ = manifest.read(repo.archive_dir(base.path))
    return man


def choose_base(db: Database, target: datetime | None) -> Archive:
    complete = Archive.objects.filter(database=db, kind=BackupKind.BASE, state=Archive.State.COMPLETE)
    if not complete.exists():
        raise PitrError(f"{db.name} has no complete base backup; point-in-time recovery needs one "
                        f"(manage.py backup --database {db.name} --kind base)")
    candidates = complete.order_by("-finished_at")
    if target is not None:
        candidates = candidates.filter(finished_at__lte=target)
    base = candidates.first()
    if base is None:
        oldest = complete.order_by("finished_at").first()
        raise PitrError(f"the target {target.isoformat()} is before the oldest base backup of {db.name}, "
                        f"which ends at {timezone.localtime(oldest.finished_at).isoformat()}; no earlier state "
                        "can be recovered")
    return base


def _lineage(states: dict[int, wal.TimelineState], timeline: int) -> list[tuple[int, str]]:
    """[(timeline, switch LSN out of it)] from the oldest ancestor to ``timeline`` (switch ''
    for ``timeline`` itself), from the area's .history files."""
    chain = [(timeline, "")]
    seen = {timeline}
    current = timeline
    while current in states and states[current].parent is not None:
        parent = states[current].parent
        if parent in seen:
            break
        chain.insert(0, (parent, states[current].branch_lsn))
        seen.add(parent)
        current = parent
    return chain


def plan(db: Database, target: datetime | None, timeline: int | None = None,
         repo: LocalRepository | None = None) -> Plan:
    repo = repo or default_repository()
    if target is not None and target > timezone.now():
        raise PitrError(f"the target {target.isoformat()} is in the future")
    base = choose_base(db, target)
    man = _base_manifest(base, repo)
    segsize = man["wal"]["segment_size"]
    area = wal.area_path(db, repo)
    states = wal.timelines(area, segsize)
    base_tli = man["wal"]["timeline"]
    tli = timeline or base_tli
    start_seg = wal.segment_of_lsn(man["wal"]["start_lsn"], segsize)
    stop_lsn = wal.lsn_to_int(man["wal"]["stop_lsn"])

    # Which timeline each stretch of WAL comes from: the backup's own, unless a later one was
    # asked for, which must descend from the backup's timeline *after* the backup ended. A
    # child timeline takes over at the segment that holds its switch point.
    path: list[tuple[int, int | None]] = []  # (timeline, last segno read from it; None = to the end)
    if tli != base_tli:
        chain = _lineage(states, tli)
        tlis = [t for t, _ in chain]
        if base_tli not in tlis:
            raise PitrError(f"timeline {tli} does not descend from timeline {base_tli} of the base backup; "
                            "its WAL cannot be applied to this backup")
        for t, switch in chain[tlis.index(base_tli):]:
            if switch and t == base_tli and wal.lsn_to_int(switch) < stop_lsn:
                raise PitrError(
                    f"timeline {tli} branched off timeline {base_tli} at {switch}, before this base backup "
                    f"ended ({man['wal']['stop_lsn']}); restoring it would cross timelines wrongly. Use a "
                    f"base backup taken before the branch, or recover timeline {base_tli}")
            path.append((t, wal.segment_of_lsn(switch, segsize) - 1 if switch else None))
    else:
        path.append((tli, None))

    stored, _ = wal.scan(area)
    segments: list[str] = []
    seg = start_seg
    reached = target is None
    for i, (t, last) in enumerate(path):
        final_stretch = i == len(path) - 1
        have = set(states[t].segnos) if t in states else set()
        end = last if last is not None else max(have, default=seg - 1)
        while seg <= end and not (final_stretch and reached and target is not None):
            name = wal.segment_name(t, seg, segsize)
            if seg not in have:
                if last is None and not any(n > seg for n in have):
                    break  # the end of the archived WAL
                resume = min((n for n in have if n > seg), default=end + 1)
                since = stored[segments[-1]].archived_at if segments else base.finished_at
                raise PitrError(
                    f"WAL gap: segment(s) {name}..{wal.segment_name(t, resume - 1, segsize)} of {db.name} are "
                    f"missing from the repository; no restore point after {_describe_time(since)} can be "
                    "reached from this base backup. Take a new base backup and check WAL archiving.")
            segments.append(name)
            # The first segment archived after the target holds the WAL up to it.
            if final_stretch and target is not None and stored[name].archived_at >= target:
                reached = True
            seg += 1
    # Streaming mode: the newest WAL is in pg_receivewal's .partial (fsynced, not yet whole).
    partial = None
    final_tli = path[-1][0]
    head = receiver.partial_segment(area)
    if head is not None and (not reached or target is None):
        name = head.name.removesuffix(".partial")
        if wal.SEGMENT_NAME.match(name) and wal.parse_segment(name, segsize) == (final_tli, seg):
            partial = head
            segments.append(name)
            reached = reached or (target is not None and head.stat().st_mtime >= target.timestamp())
    needed_last = wal.segment_of_lsn(man["wal"]["stop_lsn"], segsize)
    if len(segments) < needed_last - start_seg + 1:
        raise PitrError(f"the WAL that base backup {base.pk} itself needs is not all in the repository")
    if not reached:
        last_time = stored[segments[-1]].archived_at if segments else None
        raise PitrError(
            f"the archived WAL of {db.name} ends at {_describe_time(last_time)}, before the target "
            f"{target.isoformat()}: the WAL after it has not reached the repository yet (force a switch with "
            f"`manage.py databases check {db.name} --wal`), or archiving is broken")
    history = [f"{t:08X}.history" for t, _ in path if t != base_tli]
    return Plan(db, base, target, tli, segments, history, partial)


def _describe_time(value: datetime | None) -> str:
    return timezone.localtime(value).isoformat() if value else "unknown"


# -- recovery -------------------------------------------------------------------------------------------
@dataclass
class RecoveredCluster:
    cluster: LocalCluster
    database: Database
    base: Archive
    target: datetime | None
    timeline: int
    seconds: float
    scratch: Path

    @property
    def port(self) -> int:
        return self.cluster.port

    @property
    def datadir(self) -> Path:
        return self.cluster.datadir

    def connection_string(self, dbname: str | None = None, user: str | None = None) -> str:
        return (f"postgresql://{user or self.database.user}@127.0.0.1:{self.port}/"
                f"{dbname or self.database.dbname}")

    def local_conninfo(self, dbname: str | None = None) -> ConnInfo:
        """Superuser access over the cluster's private Unix socket (for dumps and checks)."""
        return ConnInfo(host=str(self.cluster.socket_dir), port=self.port, dbname=dbname or self.database.dbname,
                        user=self.cluster.superuser, sslmode="disable")

    def destroy(self) -> None:
        self.cluster.destroy()
        shutil.rmtree(self.scratch, ignore_errors=True)


def scratch_root() -> Path:
    root = Path(settings.BANKVAULT_SCRATCH_DIR)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    return root


def _os_user() -> str | None:
    return settings.BANKVAULT_PG_OS_USER if os.geteuid() == 0 else None


class _Stager(threading.Thread):
    """Copies the planned WAL, verified, into the spool ahead of replay, so each
    restore_command is a local copy instead of a decompress-and-verify."""

    def __init__(self, area: Path, spool: Path, names: list[str], os_uid: int | None, os_gid: int | None,
                 partial: Path | None = None):
        super().__init__(name="wal-stager", daemon=True)
        self.area, self.spool, self.names, self.partial = area, spool, names, partial
        self.uid, self.gid = os_uid, os_gid
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            stored, others = wal.scan(self.area)
            histories = sorted(n for n in others if n.endswith(".history"))
            # The plan tells restore_command which names to wait for; anything else it asks
            # the archive for directly.
            self._put(".plan", "\n".join(histories + self.names).encode())
            # Timeline history first: PostgreSQL reads these at start and at promotion (to pick
            # a timeline ID nobody used yet).
            for name in histories:
                self._put(name, wal.read_stored(others[name]))
            for name in self.names:
                if self._halt.is_set():
                    return
                if self.partial is not None and name == self.partial.name.removesuffix(".partial"):
                    data = self.partial.read_bytes()  # fsynced by pg_receivewal; no checksum yet
                else:
                    data = wal.read_stored(stored[name])  # verifies the checksum
                self._put(name, data)
        except BaseException as exc:
            self.error = exc
            # Make restore_command abort recovery rather than end it early.
            with contextlib.suppress(OSError):
                (self.spool / ".failed").write_text(str(exc))
        finally:
            with contextlib.suppress(OSError):
                (self.spool / ".done").write_text("")

    def _put(self, name: str, data: bytes) -> None:
        tmp = self.spool / f".{name}.tmp"
        tmp.write_bytes(data)
        if self.uid is not None:
            os.chown(tmp, self.uid, self.gid)
        os.rename(tmp, self.spool / name)

    def stop(self) -> None:
        self._halt.set()


def _install_fetch(scratch: Path) -> Path:
    target = scratch / "bankvault-walpush"
    shutil.copyfile(walpush.__file__, target)
    target.chmod(0o755)
    return target


def recover(db: Database, target: datetime | None, *, port: int | None = None, timeline: int | None = None,
            repo: LocalRepository | None = None, timeout: float | None = None, progress=None) -> RecoveredCluster:
    """Recover ``db`` to ``target`` (None = end of the archived WAL) into a new cluster and
    return it running. Raises PitrError with an operator-readable reason; leaves nothing behind
    on failure."""
    repo = repo or default_repository()
    started = time.monotonic()
    timeout = timeout or settings.BANKVAULT_PITR_TIMEOUT
    the_plan = plan(db, target, timeline, repo)
    base = the_plan.base
    archive_dir = repo.archive_dir(base.path)
    man = _base_manifest(base, repo)
    try:
        verify_files(archive_dir, man)
    except BackupError as exc:
        raise PitrError(f"base backup {base.pk} ({base.path}) failed verification: {exc.message}") from None
    _check_decryptable(db, base, archive_dir, man, the_plan, repo)
    if port is not None and port_answers(port):
        raise PitrError(f"port {port} is already in use on 127.0.0.1; choose another --into-port")

    os_user = _os_user()
    uid = gid = None
    if os_user:
        import pwd

        pw = pwd.getpwnam(os_user)
        uid, gid = pw.pw_uid, pw.pw_gid
    scratch = scratch_root() / f"{db.name}-{timezone.now():%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    scratch.mkdir(mode=0o700)
    cluster = None
    try:
        datadir = scratch / "data"
        spool = scratch / "spool"
        datadir.mkdir(mode=0o700)
        spool.mkdir(mode=0o700)
        script = _install_fetch(scratch)
        chown_tree(scratch, os_user)
        if progress:
            progress("unpacking the base backup")
        stager = _Stager(wal.area_path(db, repo), spool, the_plan.segments, uid, gid, the_plan.partial)
        stager.start()  # WAL staging overlaps with unpacking
        try:
            physical.extract(archive_dir, man, datadir, os_user)
        except BackupError as exc:
            raise PitrError(exc.message) from None
        cluster = LocalCluster(base=scratch, port=port or _free_port(), os_user=os_user)
        _configure(cluster, the_plan, script, spool, wal.area_path(db, repo))
        if progress:
            progress("replaying WAL")
        try:
            cluster.start(timeout=int(timeout))
        except ClusterError:
            stager.stop()
            raise PitrError(_failure_reason(cluster.log_tail(), the_plan, stager)) from None
        _wait_promoted(cluster, timeout - (time.monotonic() - started), the_plan, stager)
        stager.join(timeout=5)
        with cluster.connect() as conn:
            tli = int(conn.execute("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)").fetchone()[0], 16)
        shutil.rmtree(spool, ignore_errors=True)
        return RecoveredCluster(cluster, db, base, target, tli, time.monotonic() - started, scratch)
    except BaseException:
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.stop(mode="immediate")
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _check_decryptable(db: Database, base: Archive, archive_dir: Path, man: dict, the_plan: Plan,
                       repo: LocalRepository) -> None:
    """Encrypted base backup or WAL: prove that the workers' private key and passphrase open
    them before anything is unpacked (the WAL is decrypted here, in the worker, by the stager;
    the recovered cluster's restore_command only copies from the spool)."""
    probes = []
    enc = man.get("encryption") or {}
    if enc:
        base_file = physical.base_tar_member(man)
        probes.append((archive_dir / base_file["path"], f"base backup {base.pk} ({base_file['path']})",
                       enc.get("recipients", ())))
    stored, _ = wal.scan(wal.area_path(db, repo))
    first = next((stored[n] for n in the_plan.segments if n in stored and stored[n].encrypted), None)
    if first is not None:
        probes.append((first.path, f"WAL segment {first.name} of {db.name}", ()))
    for path, label, recipients in probes:
        try:
            gpg.probe(path, label, recipients)
        except gpg.GpgError as exc:
            raise PitrError(f"{exc.message}; nothing was unpacked or started", exc.detail) from None


def _free_port() -> int:
    from backups.engine.cluster import free_port

    return free_port()


def _configure(cluster: LocalCluster, the_plan: Plan, script: Path, spool: Path, area: Path) -> None:
    datadir = cluster.datadir
    for leftover in ("postmaster.pid", "postmaster.opts", "standby.signal", "recovery.signal"):
        with contextlib.suppress(FileNotFoundError):
            (datadir / leftover).unlink()
    if not (datadir / "postgresql.conf").exists():
        # Debian keeps postgresql.conf in /etc, outside the data directory and the backup.
        cluster._write_owned(datadir / "postgresql.conf", "# written by bankvault point-in-time recovery\n")
    # PostgreSQL runs restore_command through the shell once per segment and waits for it.
    # A staged (already verified) segment is a plain cp; only what the stager has not brought
    # yet (or will not bring) goes to the Python fetch, which waits for it or asks the archive.
    q = shlex.quote
    fetch = " ".join([q(wal.python_for_server()), "-S", q(str(script)), "fetch", "--area", q(str(area)),
                      "--spool", q(str(spool)), "%f", "%p"])
    restore = f"if test -f {q(str(spool))}/%f; then cp {q(str(spool))}/%f %p; else {fetch}; fi"
    conf = {
        "listen_addresses": "127.0.0.1",
        "port": cluster.port,
        "unix_socket_directories": str(cluster.socket_dir),
        "restore_command": restore,
        "recovery_target_action": "promote",
        "recovery_target_timeline": str(the_plan.timeline),
        "archive_mode": "off",
        "hot_standby": "on",
        # Settings of the source that must not follow the copy.
        "synchronous_standby_names": "",
        "primary_conninfo": "",
        "primary_slot_name": "",
        "logging_collector": "off",
        "ssl": "off",
    }
    if the_plan.target is not None:
        conf["recovery_target_time"] = the_plan.target.isoformat(sep=" ")
        conf["recovery_target_inclusive"] = "on"
    cluster.write_conf(conf)
    cluster._write_owned(datadir / "pg_hba.conf", (
        "# bankvault recovered cluster: loopback only; the socket directory is private\n"
        "local all all trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"))
    cluster._write_owned(datadir / "recovery.signal", "")


def _wait_promoted(cluster: LocalCluster, timeout: float, the_plan: Plan, stager: _Stager) -> None:
    deadline = time.monotonic() + max(timeout, 5)
    while True:
        if not cluster.is_running():
            stager.stop()
            raise PitrError(_failure_reason(cluster.log_tail(), the_plan, stager))
        try:
            with cluster.connect(connect_timeout=2) as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return
        except Exception:
            pass
        if time.monotonic() > deadline:
            stager.stop()
            raise PitrError(f"recovery did not finish within {timeout:.0f}s (BANKVAULT_PITR_TIMEOUT)")
        time.sleep(0.05)


def _failure_reason(log_tail: str, the_plan: Plan, stager: _Stager) -> str:
    if stager.error is not None:
        reason = getattr(stager.error, "message", None) or str(stager.error)
        return f"recovery stopped: {reason}"
    if "recovery ended before configured recovery target was reached" in log_tail:
        return ("no transaction committed after the target is in the archived WAL, so PostgreSQL cannot "
                "confirm the target was reached; recover to 'latest' to get the newest archived state, or "
                "wait until WAL after the target is archived")
    if "failed its checksum" in log_tail or "is damaged" in log_tail:
        line = next((ln for ln in log_tail.splitlines() if "damaged" in ln), "")
        return f"recovery stopped at a damaged WAL file: {line.strip()}"
    lines = [ln for ln in log_tail.splitlines() if "FATAL" in ln or "PANIC" in ln or "ERROR" in ln]
    return "the recovered cluster did not start: " + (lines[-1].strip() if lines else log_tail[-500:].strip())


__all__ = ["PitrError", "parse_target", "plan", "recover", "restore_windows", "RecoveredCluster"]
