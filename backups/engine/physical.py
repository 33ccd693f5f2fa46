"""Base backups with pg_basebackup, the physical half of point-in-time recovery.

pg_basebackup writes tar files compressed on the server (zstd, with the server's own worker
threads) and the server's backup_manifest into the staging directory; bankvault checksums every
file, records the WAL range the backup needs (start/stop LSN, timeline) in manifest.json, and
the runner then waits until that WAL is in the repository: before that the backup cannot be
restored, so it is not called complete.

Encrypted (the policy names recipient keys): pg_basebackup streams one tar to stdout, with its
backup_manifest injected as the tar's last member, and the worker compresses (zstd), encrypts
(gpg) and hashes it into base/base.tar.zst.gpg, so no plaintext touches the repository. The
server cannot compress then: pg_basebackup cannot inject the manifest into a server-compressed
stream, and the manifest is what deep verification checks the files against.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import gpg, manifest, pgbin, wal
from .cluster import as_user_argv
from .logical import (
    TOOL_VERSION,
    LogicalOptions,
    Produced,
    Progress,
    _finish,
    _Watchdog,
    open_entry,
    pg_tool_version,
    stream_to_file,
    verify_files,
)
from .pgtools import BackupError, ConnInfo, kill, moved, spawn
from .repository import CHUNK, sha256_file

_PROGRESS = re.compile(r"(\d+)/(\d+) kB")
_START = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)", re.I)
_END = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)", re.I)
_WAITING = "waiting for required WAL segments to be archived"
ENCRYPTED_ZSTD_LEVEL = 3


def _role(name: str) -> str:
    if name == "backup_manifest":
        return "backup_manifest"
    return "base" if name.startswith("base.tar") else "tablespace"


class _TarWatcher:
    """Fed the tar stream as it passes by (a tee of stream_to_file), keeps the small members
    bankvault needs from it: pg_basebackup writing to stdout logs no WAL range, which is in the
    injected backup_manifest (and backup_label)."""

    WANTED = ("backup_manifest", "backup_label")
    LIMIT = 256 << 20

    def __init__(self):
        self.members: dict[str, bytes] = {}
        self._header = bytearray()
        self._pending = 0      # bytes of the current member (data and padding) still to come
        self._keep = 0         # of those, data bytes to keep
        self._current: bytearray | None = None
        self._name = ""
        self._done = False

    def feed(self, chunk) -> None:
        view = memoryview(chunk)
        while view and not self._done:
            if self._pending:
                n = min(self._pending, len(view))
                if self._current is not None and self._keep:
                    k = min(self._keep, n)
                    self._current += view[:k]
                    self._keep -= k
                self._pending -= n
                view = view[n:]
                if not self._pending:
                    self._close_member()
                continue
            need = 512 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) < 512:
                return
            block, self._header = bytes(self._header), bytearray()
            if not block.strip(b"\0"):
                self._done = True  # end-of-archive blocks
                return
            name = block[:100].split(b"\0", 1)[0].decode(errors="replace")
            if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
                name = block[345:500].split(b"\0", 1)[0].decode(errors="replace") + "/" + name
            size = self._size(block[124:136])
            self._pending = (size + 511) // 512 * 512
            self._name = name.removeprefix("./")
            if self._name in self.WANTED and size <= self.LIMIT:
                self._current, self._keep = bytearray(), size
            if not self._pending:
                self._close_member()

    def _close_member(self) -> None:
        if self._current is not None:
            self.members[self._name] = bytes(self._current)
            self._current = None

    @staticmethod
    def _size(field: bytes) -> int:
        if field[0] & 0x80:  # base-256, for members of 8 GiB and more
            return int.from_bytes(field[1:], "big")
        text = field.split(b"\0", 1)[0].strip()
        return int(text, 8) if text else 0


def produce_base(conn: ConnInfo, stage: Path, *, source_name: str, progress_cb=None, meta: dict | None = None,
                 compress: str | None = None, on_waiting=None, recipients=None) -> Produced:
    """Make a base backup of ``conn``'s cluster in ``stage``; encrypted to ``recipients``
    (gpg.Recipients) when given. Raises BackupError."""
    started_at = timezone.now()
    progress = Progress(progress_cb)
    with conn.connect(autocommit=True) as pg:
        version, num, segsize, size = pg.execute(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int, "
            "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
            "(SELECT sum(pg_database_size(oid)) FROM pg_database)::bigint").fetchone()
        sysid = wal.server_system_identifier(pg)
    inst = pgbin.for_server(num)
    compress = compress or settings.BANKVAULT_BASEBACKUP_COMPRESS
    out_dir = stage / "base"
    encrypted = recipients is not None
    if encrypted:
        # One tar to stdout (manifest inside), compressed and encrypted here; see the docstring.
        out_dir.mkdir()
        opts = LogicalOptions(compression="zstd", level=ENCRYPTED_ZSTD_LEVEL,
                              threads=settings.BANKVAULT_COMPRESS_THREADS, recipients=recipients)
        compress = f"client-zstd:level={ENCRYPTED_ZSTD_LEVEL} (bankvault, then gpg)"
    argv = [inst.tool("pg_basebackup"), "-D", "-" if encrypted else str(out_dir), "--format=tar",
            "--wal-method=none", "--checkpoint=fast", "--progress", "--verbose",
            *([] if encrypted else [f"--compress={compress}"]),
            f"--label=bankvault {source_name} {started_at:%Y-%m-%dT%H:%M:%SZ}"]
    points: dict = {}

    def on_line(line: str):  # runs on the stderr reader thread: no database access here
        if m := _PROGRESS.search(line):
            points["done"], points["total"] = int(m.group(1)) * 1024, int(m.group(2)) * 1024
        if m := _START.search(line):
            points["start"], points["timeline"] = m.group(1), int(m.group(2))
        if m := _END.search(line):
            points["stop"] = m.group(1)

        if _WAITING in line:
            points["waiting"] = True

    timeout = settings.BANKVAULT_TOOL_TIMEOUT
    wal_timeout = settings.BANKVAULT_WAL_WAIT_TIMEOUT
    written: dict = {}
    watcher = _TarWatcher()
    with conn.tool_env() as env:
        proc, err = spawn(argv, env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if encrypted else subprocess.DEVNULL, on_stderr_line=on_line)
        watchdog = _Watchdog(proc, timeout)
        writer = None
        if encrypted:
            def write():
                try:
                    written["entry"] = stream_to_file(proc, out_dir / ("base.tar" + opts.suffix()), opts,
                                                      tees=[watcher])
                except BaseException as exc:  # it stopped pg_basebackup; reported below
                    written["error"] = exc

            writer = threading.Thread(target=write, name="base-writer", daemon=True)
            writer.start()
        # With archive_mode on, the server finishes the backup only once it has archived the
        # WAL the backup needs, and pg_basebackup cannot be told not to wait. That wait is
        # bankvault's waiting_for_wal, bounded here rather than left to hang.
        waiting_since = None
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if "total" in points and waiting_since is None:
                progress.item = "copying data files"
                progress(points["done"], points["total"])
            if points.get("waiting") and waiting_since is None:
                waiting_since = time.monotonic()
                if on_waiting:
                    on_waiting()
            if waiting_since is not None and time.monotonic() - waiting_since > wal_timeout:
                kill(proc)
                watchdog.cancel()
                if writer is not None:
                    writer.join(timeout=30)
                raise wal.WalError(
                    f"the server finished copying the base backup but its WAL was not archived within "
                    f"{wal_timeout}s: archive_command is failing or too slow on {conn.host}:{conn.port} (the server "
                    f"log and pg_stat_archiver say why; `manage.py databases check {source_name} --wal` tests it)")
        if writer is not None:
            writer.join()
            if "error" in written:  # the writer's failure (disk full...) is the cause, not the kill
                watchdog.cancel()
                raise written["error"]
        _finish(proc, err, conn, "pg_basebackup", watchdog, timeout)

    files = []
    progress.item = "checksumming"
    progress(size, size, force=True)
    if encrypted:
        entry = written["entry"]
        files.append({**entry, "path": f"base/{entry['path']}", "role": "base"})
    else:
        for path in sorted(out_dir.iterdir()):
            sha, nbytes = sha256_file(path)
            files.append({"path": f"base/{path.name}", "role": _role(path.name), "bytes": nbytes, "sha256": sha})
    try:
        # Encrypted: the server's manifest went by inside the tar (which is all that is stored).
        server_manifest = json.loads(watcher.members["backup_manifest"] if encrypted
                                     else (out_dir / "backup_manifest").read_text())
        ranges = server_manifest["WAL-Ranges"]
        timeline = int(ranges[-1]["Timeline"])
        start_lsn, stop_lsn = ranges[0]["Start-LSN"], ranges[-1]["End-LSN"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        if not {"start", "stop", "timeline"} <= points.keys():
            raise BackupError(f"pg_basebackup finished but its WAL range is unknown ({exc})") from None
        timeline, start_lsn, stop_lsn = points["timeline"], points["start"], points["stop"]

    finished_at = timezone.now()
    man = {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "tool": {"name": TOOL_VERSION, "pg_basebackup": pg_tool_version(inst.tool("pg_basebackup")),
                 "host": socket.gethostname()},
        "kind": "base",
        "source": {"name": source_name, "host": conn.host, "port": conn.port, "dbname": conn.dbname,
                   "user": conn.user, "sslmode": conn.sslmode, "server_version": version,
                   "server_version_num": num, "system_identifier": sysid, "size_bytes": size},
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "wal": {"timeline": timeline, "start_lsn": start_lsn, "stop_lsn": stop_lsn, "segment_size": segsize,
                "segments": wal.segments_between(timeline, start_lsn, stop_lsn, segsize)},
        "compression": {"algorithm": "zstd" if "zstd" in compress else compress.split(":")[0],
                        "where": "server" if compress.startswith("server-") else "client", "spec": compress},
        "encryption": {**recipients.describe(), "backup_manifest": "inside the encrypted tar"} if encrypted
        else None,
        "files": files,
        "tables": [],
        **(meta or {}),
    }
    man_sha = manifest.write(stage, man)
    return Produced(manifest=man, manifest_sha256=man_sha, files=files)


def base_tar_member(man: dict) -> dict:
    return next(f for f in man["files"] if f["role"] == "base")


def started_at(man: dict) -> datetime:
    return datetime.fromisoformat(man["started_at"])


__all__ = ["produce_base", "verify_files"]


def extract(archive_dir: Path, man: dict, datadir: Path, os_user: str | None) -> None:
    """Unpack base.tar.zst into datadir as the server's OS user (tar reads our decompressed
    stream, so that user needs no access to the repository). An encrypted backup is decrypted
    here, in the worker, and counts only if gpg confirms its integrity at the end."""
    entries = [f for f in man["files"] if f["role"] in ("base", "tablespace")]
    if any(f["role"] == "tablespace" for f in entries):
        raise BackupError("this base backup has extra tablespaces; recovering those is not supported yet")
    base = entries[0]
    name = base["path"].removesuffix(gpg.SUFFIX)
    algo = "zstd" if name.endswith(".zst") else "gzip" if name.endswith(".gz") else "none"
    man = {**man, "compression": {**man["compression"], "algorithm": algo}}
    proc = subprocess.Popen(as_user_argv(["tar", "-xf", "-", "-C", str(datadir)], os_user),
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    error = None
    try:
        with open_entry(archive_dir, man, base, f"base backup {base['path']}") as src:
            try:
                while chunk := src.read(CHUNK):
                    proc.stdin.write(chunk)
                    moved(len(chunk))
            except BrokenPipeError:
                pass  # tar stops at the end-of-archive blocks
            if hasattr(src, "finish"):
                src.finish()  # gpg's integrity verdict, whatever tar read
    except Exception as exc:  # damaged stream; failed integrity check
        error = exc
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    stderr = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0 or error:
        reason = getattr(error, "message", None) or error or stderr.strip()[-300:]
        raise BackupError(f"the base backup cannot be unpacked: {reason}")


def deep_verify(archive_dir: Path, man: dict) -> dict:
    """Unpack the base backup into scratch and check every data file against the server's own
    backup_manifest with pg_verifybackup (PostgreSQL 15 cannot read the manifest's files inside
    a tar). Returns what was checked; raises BackupError naming the damage."""
    import os
    import shutil

    from .cluster import chown_tree, make_owned_dir

    os_user = settings.BANKVAULT_PG_OS_USER if os.geteuid() == 0 else None
    root = Path(settings.BANKVAULT_SCRATCH_DIR)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    scratch = make_owned_dir("deep-verify-", os_user, parent=str(root))
    try:
        datadir = scratch / "data"
        datadir.mkdir(mode=0o700)
        chown_tree(scratch, os_user)
        extract(archive_dir, man, datadir, os_user)
        manifest_file = archive_dir / "base" / "backup_manifest"
        if not manifest_file.exists():  # encrypted: it came out of the tar
            manifest_file = datadir / "backup_manifest"
        shutil.copyfile(manifest_file, scratch / "backup_manifest")
        chown_tree(scratch, os_user)
        inst = pgbin.for_server(man["source"].get("server_version_num"))


        proc = subprocess.run(as_user_argv([inst.tool("pg_verifybackup"), "--no-parse-wal", "-m",
                                            str(scratch / "backup_manifest"), str(datadir)], os_user),
                              capture_output=True, text=True, timeout=settings.BANKVAULT_TOOL_TIMEOUT, cwd="/")
        if proc.returncode != 0:
            raise BackupError("pg_verifybackup found the base backup damaged: "
                              + (proc.stderr or proc.stdout).strip()[-500:])
        files = sum(1 for _ in datadir.rglob("*") if _.is_file())
        return {"files": files, "tool": inst.tool("pg_verifybackup")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
