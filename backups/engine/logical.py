"""Logical backups: one pg_dump --format=custom per run, streamed through compression and
hashing into a staging directory, plus the artifacts a policy asks for derived from that
dump with pg_restore (no second pass over the live database).

The flow, for one run:

    connect (REPEATABLE READ) -> export snapshot -----------------------------+
        |                                                                     |
        +-> thread: exact row count of every table, in that snapshot          |
        +-> thread: pg_dumpall --globals-only --no-role-passwords             |
        +-> pg_dump -Fc -Z0 --snapshot=S  | compress | sha256 -> dump file <--+
    derived artifacts: dump -> pg_restore [-s|-a] -f - | compress | sha256
    manifest.json -> verify (re-hash every file, pg_restore --list) -> rename into place

With encryption (a policy's recipient keys), every file is compressed, then encrypted by gpg,
then hashed: the sha256 covers the encrypted bytes. The plaintext never touches the disk, and
the worker may hold no private key to read it back, so derived artifacts are made from the
dump's bytes as they stream by (one pg_restore per artifact, fed alongside the compressor), and
read-back verification decrypts only where the workers hold a recipient's private key.

Row counts come from the same snapshot as the dump, so a restore can be checked against
them exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import compress, gpg, manifest, pgbin
from .pgtools import (
    BackupError,
    ConnInfo,
    ToolFailed,
    ToolTimeout,
    classify,
    close_stdin,
    feed_stdin,
    kill,
    moved,
    scrub,
    spawn,
)
from .repository import CHUNK, HashingWriter, LocalRepository, RepositoryError, os_error, sha256_file

log = logging.getLogger(__name__)

FILE_NAMES = {"dump": "dump.pgdump", "plain": "plain.sql", "schema": "schema.sql",
              "data": "data.sql", "globals": "globals.sql"}
DERIVED_ARGS = {"plain": [], "schema": ["--schema-only"], "data": ["--data-only"]}
TOOL_VERSION = "bankvault 0.1"


@dataclass
class LogicalOptions:
    compression: str = "zstd"
    level: int | None = None
    threads: int = 2
    artifacts: tuple[str, ...] = ("dump",)
    # gpg.Recipients (entered) when the archive is encrypted; None = not encrypted.
    recipients: object = None

    def suffix(self) -> str:
        return compress.SUFFIX[self.compression] + (gpg.SUFFIX if self.recipients is not None else "")


@dataclass
class Produced:
    """What produce() left in the staging directory."""

    manifest: dict
    manifest_sha256: str
    files: list[dict] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)


class Progress:
    """Throttled progress reporting to a callback(done, total, item)."""

    def __init__(self, callback=None, every: float = 0.5):
        self.callback = callback
        self.every = every
        self.item = ""
        self._last = 0.0

    def __call__(self, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.callback and (force or now - self._last >= self.every):
            self._last = now
            self.callback(done, total, self.item)


# -- inspecting the source -------------------------------------------------------------------
# relpages, not pg_relation_size(): the latter takes a lock and would wait behind any
# exclusive lock on a table before the dump even starts. The size only drives progress.
TABLES_SQL = """
SELECT n.nspname, c.relname, greatest(c.relpages, 0)::bigint * current_setting('block_size')::int
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  -- tables that belong to an extension are the extension's business, not the dump's
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""


def server_info(cur) -> dict:
    cur.execute("""
        SELECT current_setting('server_version'), current_setting('server_version_num')::int,
               pg_database_size(current_database()), pg_encoding_to_char(d.encoding),
               d.datcollate, pg_get_userbyid(d.datdba), pg_is_in_recovery()
        FROM pg_database d WHERE d.datname = current_database()""")
    version, num, size, encoding, collate, owner, in_recovery = cur.fetchone()
    info = {"server_version": version, "server_version_num": num, "size_bytes": size,
            "encoding": encoding, "collate": collate, "owner": owner, "in_recovery": in_recovery}
    try:
        cur.execute("SAVEPOINT sysid")
        cur.execute("SELECT system_identifier::text FROM pg_control_system()")
        info["system_identifier"] = cur.fetchone()[0]
        cur.execute("RELEASE SAVEPOINT sysid")
    except Exception:  # not granted to this user: optional
        cur.execute("ROLLBACK TO SAVEPOINT sysid")
    return info


def count_rows(conn, tables: list[tuple[str, str]], parallel: bool = True) -> dict[tuple[str, str], int]:
    """Exact row counts, in batches of one UNION ALL query each. ``parallel=False`` keeps the
    count to one backend, for a count that runs beside other work and is not waited for."""
    from psycopg import sql

    counts: dict[tuple[str, str], int] = {}
    with conn.cursor() as cur:
        if not parallel:
            cur.execute("SET max_parallel_workers_per_gather = 0")
        for start in range(0, len(tables), 200):
            batch = tables[start:start + 200]
            parts = [
                sql.SQL("SELECT {}::int, count(*) FROM ONLY {}.{}").format(
                    sql.Literal(i), sql.Identifier(schema), sql.Identifier(name))
                for i, (schema, name) in enumerate(batch)
            ]
            cur.execute(sql.SQL(" UNION ALL ").join(parts))
            for i, n in cur.fetchall():
                counts[batch[i]] = n
    return counts


# -- streaming a tool's output into an archive file ------------------------------------------
def stream_to_file(proc: subprocess.Popen, path: Path, opts: LogicalOptions,
                   progress: Progress | None = None, total: int = 0, tees: list | tuple = (),
                   check: gpg.StreamCheck | None = None) -> dict:
    """Read proc.stdout to EOF, compress, (encrypt,) hash and write to ``path``. Each of
    ``tees`` (_Derived) is fed the same raw bytes; ``check``, the encrypted bytes as written.
    The file is read back as it is written (ReadBack): what it holds must be what was hashed."""
    writer = HashingWriter(path, read_back=True)
    encryptor = opts.recipients.encryptor(writer, check) if opts.recipients is not None else None
    comp = compress.compressor(opts.compression, encryptor or writer, opts.level, opts.threads)
    raw = 0
    try:
        read = proc.stdout.read
        while chunk := read(CHUNK):
            comp.write(chunk)
            for tee in tees:
                tee.feed(chunk)
            raw += len(chunk)
            if progress:
                progress(raw, max(total, raw))
        comp.close()
        if encryptor is not None:
            encryptor.close()
        sha = writer.close()
        entry = {"path": path.name, "bytes": writer.bytes, "sha256": sha, "uncompressed_bytes": raw}
        compare(entry, *writer.read_back)
    except OSError as exc:
        if encryptor is not None:
            encryptor.abort()
        writer.abort()
        kill(proc)
        raise os_error(exc, path, f"writing {path.name}") from None
    except BaseException:
        if encryptor is not None:
            encryptor.abort()
        writer.abort()
        kill(proc)
        raise
    return entry


class _Watchdog:
    """Kills a process that runs longer than the configured tool timeout."""

    def __init__(self, proc: subprocess.Popen, timeout: float):
        self.fired = False
        self._timer = threading.Timer(timeout, self._fire, args=(proc,))
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, proc):
        self.fired = True
        kill(proc)

    def cancel(self):
        self._timer.cancel()


def _finish(proc: subprocess.Popen, err, conn: ConnInfo, tool: str, watchdog: _Watchdog, timeout: float) -> str:
    rc = proc.wait()
    watchdog.cancel()
    stderr = err.text()
    if watchdog.fired:
        raise ToolTimeout(f"{tool} did not finish within {timeout:.0f}s and was stopped "
                          "(BANKVAULT_TOOL_TIMEOUT)", scrub(stderr, conn))
    if rc != 0:
        raise classify(stderr, conn, tool, rc)
    return scrub(stderr, conn)


def run_to_file(argv: list[str], env: dict, conn: ConnInfo, path: Path, opts: LogicalOptions, *,
                tool: str, stdin_source=None, progress: Progress | None = None, total: int = 0,
                on_stderr_line=None, tees: list | tuple = (), check: gpg.StreamCheck | None = None) -> dict:
    """Run a tool whose stdout becomes one archive file. ``stdin_source``, if given, is a
    readable binary stream fed to the tool's stdin on a thread."""
    timeout = settings.BANKVAULT_TOOL_TIMEOUT
    proc, err = spawn(argv, env, stdin=subprocess.PIPE if stdin_source else subprocess.DEVNULL,
                      stdout=subprocess.PIPE, on_stderr_line=on_stderr_line)
    watchdog = _Watchdog(proc, timeout)
    feeder = Feeder(stdin_source, proc.stdin) if stdin_source is not None else None
    try:
        entry = stream_to_file(proc, path, opts, progress, total, tees, check)
    finally:
        if feeder:
            feeder.join(timeout=30)
        for tee in tees:
            tee.close_input()
    if feeder:
        feeder.check("the dump")
    _finish(proc, err, conn, tool, watchdog, timeout)
    return entry


class _Derived:
    """A derived artifact (plain/schema/data SQL) of an encrypted archive, made from the dump's
    bytes as they stream by: pg_restore reads them on its stdin, and its output is compressed,
    encrypted and hashed on a thread like any archive file."""

    def __init__(self, role: str, argv: list[str], env: dict, conn: ConnInfo, path: Path, opts: LogicalOptions):
        self.role, self.conn, self.tool = role, conn, f"pg_restore ({role} artifact)"
        self.timeout = settings.BANKVAULT_TOOL_TIMEOUT
        self.proc, self.err = spawn(argv, env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.watchdog = _Watchdog(self.proc, self.timeout)
        self.entry: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, args=(path, opts), name=f"derive-{role}", daemon=True)
        self.thread.start()

    def _write(self, path: Path, opts: LogicalOptions) -> None:
        try:
            self.entry = stream_to_file(self.proc, path, opts)
        except BaseException as exc:
            self.error = exc

    def feed(self, chunk) -> None:
        feed_stdin(self.proc, chunk)  # pg_restore may stop early; its exit status says why

    def close_input(self) -> None:
        close_stdin(self.proc)

    def abort(self) -> None:
        self.close_input()
        kill(self.proc)
        self.thread.join(timeout=30)
        self.watchdog.cancel()

    def result(self) -> dict:
        self.close_input()
        self.thread.join()
        if self.error is not None:
            kill(self.proc)
            self.watchdog.cancel()
            raise self.error
        _finish(self.proc, self.err, self.conn, self.tool, self.watchdog, self.timeout)
        self.entry["role"] = self.role
        return self.entry


class Feeder(threading.Thread):
    """Copies a (decompressing) source into a tool's stdin. A reader that stops early is
    normal (pg_restore --list reads only the TOC); a source that cannot be read — a damaged
    compressed stream — is kept as ``error`` for the caller to report."""

    def __init__(self, source, sink, to_the_end: bool = True):
        super().__init__(name="feed", daemon=True)
        self.source, self.sink, self.error = source, sink, None
        self.to_the_end = to_the_end
        self.start()

    def run(self) -> None:
        try:
            while True:
                try:
                    chunk = self.source.read(CHUNK)
                except Exception as exc:  # zstd/gzip stream damaged; gpg's integrity check failed
                    self.error = exc
                    break
                if not chunk:
                    break
                try:
                    self.sink.write(chunk)
                except (BrokenPipeError, ValueError, OSError):
                    break
                moved(len(chunk))
        finally:
            with contextlib.suppress(OSError):
                self.sink.close()
            # An encrypted source vouches for its content only at its end: read on to it even
            # when the tool stopped early, so gpg's integrity verdict is always had.
            finish = getattr(self.source, "finish", None) if self.to_the_end else None
            if finish is not None and self.error is None:
                try:
                    finish()
                except Exception as exc:
                    self.error = exc
            with contextlib.suppress(Exception):
                self.source.close()

    def check(self, what: str) -> None:
        # Reading an encrypted source to its end may take a while; it must be waited for.
        self.join(timeout=None if self.to_the_end and hasattr(self.source, "finish") else 30)
        if isinstance(self.error, (gpg.MissingPrivateKey, gpg.WrongPassphrase)):
            raise self.error
        if isinstance(self.error, BackupError):
            raise VerificationFailed(f"{what} cannot be used: {self.error.message}")
        if self.error is not None:
            raise VerificationFailed(f"{what} cannot be decompressed: {self.error}; the file is damaged")


# -- the backup ---------------------------------------------------------------------------------
_TABLE_LINE = re.compile(r'dumping contents of table "([^"]+)"')


def produce(conn: ConnInfo, stage: Path, opts: LogicalOptions, *, source_name: str,
            progress_cb=None, meta: dict | None = None) -> Produced:
    """Make a complete, verified logical archive of ``conn`` in ``stage``.

    Raises BackupError (or a subclass) with an operator-readable message on any failure; the
    caller removes the staging directory."""
    import psycopg

    started_at = timezone.now()
    progress = Progress(progress_cb)
    pg = conn.connect(autocommit=False)
    try:
        pg.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        lock_wait = settings.BANKVAULT_LOCK_WAIT_TIMEOUT
        with pg.cursor() as cur:
            cur.execute("SET TRANSACTION READ ONLY")
            # The row count waits for locks no longer than pg_dump does (below).
            cur.execute(f"SET lock_timeout = '{int(lock_wait)}s'")
            info = server_info(cur)
            inst = pgbin.for_server(info["server_version_num"])
            cur.execute(TABLES_SQL)
            table_rows = cur.fetchall()
            snapshot = None
            if not info["in_recovery"]:
                cur.execute("SELECT pg_export_snapshot(), pg_current_wal_lsn()::text")
                snapshot, lsn = cur.fetchone()
            else:
                cur.execute("SELECT pg_last_wal_replay_lsn()::text")
                lsn = cur.fetchone()[0]
        tables = [(s, n) for s, n, _ in table_rows]
        est_total = sum(size for *_, size in table_rows) or info["size_bytes"]

        counted: dict = {}
        count_error: list[BaseException] = []

        def _count():
            try:
                # Beside a dump that reads every table and always takes longer, parallel
                # workers would not end the count sooner, only take cores from the dump.
                counted.update(count_rows(pg, tables, parallel=False))
            except BaseException as exc:  # reported after the dump
                count_error.append(exc)

        counter = threading.Thread(target=_count, name="row-count", daemon=True)
        files: list[dict] = []
        with conn.tool_env() as env:
            globals_result: dict = {}

            def _globals():
                try:
                    globals_result["entry"] = run_to_file(
                        [inst.tool("pg_dumpall"), "--globals-only", "--no-role-passwords",
                         "-l", conn.dbname],
                        env, conn, stage / (FILE_NAMES["globals"] + opts.suffix()), opts, tool="pg_dumpall")
                except BaseException as exc:
                    globals_result["error"] = exc

            globals_thread = threading.Thread(target=_globals, name="globals", daemon=True)
            counter.start()
            globals_thread.start()

            def on_line(line: str):
                m = _TABLE_LINE.search(line)
                if m:
                    progress.item = f"dumping {m.group(1)}"

            # No -f: the dump goes to stdout ("-f -" would create a file named "-").
            argv = [inst.tool("pg_dump"), "--format=custom", "--compress=0", "--verbose", "--no-sync",
                    f"--lock-wait-timeout={int(lock_wait)}s"]
            if snapshot:
                argv.append(f"--snapshot={snapshot}")
            argv.append(conn.dbname)
            dump_path = stage / (FILE_NAMES["dump"] + opts.suffix())
            derived: list[_Derived] = []
            check = unreadable = None
            if opts.recipients is not None:
                # The dump is decrypted as it is written: gpg's verdict at the end says whether
                # the workers' key opened it (an escrow-only key does not; the backup counts).
                try:
                    check = gpg.StreamCheck(dump_path.name, opts.recipients.fingerprints)
                except gpg.MissingPrivateKey:  # no keyring at all
                    unreadable = no_private_key(opts.recipients.fingerprints)
                try:
                    for role in opts.artifacts:
                        if role != "dump":
                            derived.append(_Derived(role, [inst.tool("pg_restore"), *DERIVED_ARGS[role], "-f", "-"],
                                                    env, conn, stage / (FILE_NAMES[role] + opts.suffix()), opts))
                except BaseException:
                    for d in derived:
                        d.abort()
                    if check is not None:
                        check.abort()
                    raise
            try:
                dump = run_to_file(argv, env, conn, dump_path, opts, tool="pg_dump", progress=progress,
                                   total=est_total, on_stderr_line=on_line, tees=derived, check=check)
            except BaseException:
                # The server may be gone (restarted, down): nothing left to cancel, and the dump's
                # own error is the one to report, not the cancellation's.
                with contextlib.suppress(psycopg.Error):
                    pg.cancel_safe()
                for d in derived:
                    d.abort()
                if check is not None:
                    check.abort()
                raise
            finally:
                counter.join()
                globals_thread.join()
            dump["role"] = "dump"
            dump["format"] = "custom"
            files.append(dump)
            if check is not None:  # everything was fed: gpg's verdict now, before anything can fail
                try:
                    unreadable = stream_verdict(check)
                except BaseException:
                    for d in derived:
                        d.abort()
                    raise
            derived_entries = []
            if derived:
                progress.item = "finishing the derived artifacts"
                progress(0, 0, force=True)
                try:
                    derived_entries = [d.result() for d in derived]
                except BaseException:
                    for d in derived:
                        d.abort()
                    raise
            if count_error:
                raise classify(str(count_error[0]), conn, "row count")
            if "error" in globals_result:
                raise globals_result["error"]
            globals_entry = globals_result["entry"]
            globals_entry["role"] = "globals"
            files.append(globals_entry)
            files += derived_entries
            # Derived artifacts, from the dump we just wrote (unencrypted archives).
            for role in opts.artifacts if opts.recipients is None else ():
                if role == "dump":
                    continue
                progress.item = f"writing {role} artifact"
                progress(0, 0, force=True)
                path = stage / (FILE_NAMES[role] + compress.SUFFIX[opts.compression])
                entry = run_to_file(
                    [inst.tool("pg_restore"), *DERIVED_ARGS[role], "-f", "-"], env, conn, path, opts,
                    tool=f"pg_restore ({role} artifact)",
                    stdin_source=compress.open_decompressed(dump_path, opts.compression))
                entry["role"] = role
                files.append(entry)
        pg.rollback()
    finally:
        pg.close()

    finished_at = timezone.now()
    man = {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "tool": {"name": TOOL_VERSION, "pg_dump": pg_tool_version(inst.tool("pg_dump")),
                 "host": socket.gethostname()},
        "kind": "logical",
        "source": {"name": source_name, "host": conn.host, "port": conn.port, "dbname": conn.dbname,
                   "user": conn.user, "sslmode": conn.sslmode, **info},
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "consistency": {"snapshot_exported": bool(snapshot), "wal_lsn": lsn,
                        "row_counts_exact": bool(snapshot)},
        "compression": {"algorithm": opts.compression,
                        "level": opts.level or compress.DEFAULT_LEVEL[opts.compression]},
        "encryption": opts.recipients.describe() if opts.recipients is not None else None,
        "files": files,
        "tables": [{"schema": s, "name": n, "rows": counted.get((s, n))} for s, n in tables],
        **(meta or {}),
    }
    progress.item = "verifying"
    progress(est_total, est_total, force=True)
    # Every file was read back as it was written (stream_to_file); an encrypted dump was also
    # decrypted as it was written (or could not be, and why is known).
    verify_written(stage, man, inst, decrypted_as_written=unreadable, read_back=True)
    man_sha = manifest.write(stage, man)
    return Produced(manifest=man, manifest_sha256=man_sha, files=files)


_VERSIONS: dict[str, str] = {}


def pg_tool_version(tool: str) -> str:
    if tool not in _VERSIONS:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
        _VERSIONS[tool] = out.stdout.strip()
    return _VERSIONS[tool]


# -- verification ---------------------------------------------------------------------------------
class VerificationFailed(BackupError):
    pass


def compare(entry: dict, sha: str, size: int) -> None:
    """A file's manifest entry against the sha256 and size found reading it back."""
    if size != entry["bytes"] or sha != entry["sha256"]:
        raise VerificationFailed(
            f"{entry['path']} does not match its manifest entry (expected {entry['bytes']} bytes, "
            f"sha256 {entry['sha256'][:12]}…; found {size} bytes, sha256 {sha[:12]}…): "
            "the file is damaged")


def verify_files(directory: Path, man: dict) -> None:
    """Re-read every file listed in the manifest and compare size and sha256."""
    for entry in man["files"]:
        path = directory / entry["path"]
        try:
            sha, size = sha256_file(path)
        except FileNotFoundError:
            raise VerificationFailed(f"{entry['path']} is missing from the archive") from None
        except OSError as exc:
            raise os_error(exc, path, f"reading {entry['path']} back") from None
        compare(entry, sha, size)


def open_entry(directory: Path, man: dict, entry: dict, label: str = ""):
    """A readable stream of one archive file's original content (decrypted, decompressed).
    Encrypted streams check gpg's integrity verdict at their end (see gpg.ContentReader)."""
    enc = man.get("encryption") or {}
    return gpg.open_content(directory / entry["path"], man["compression"]["algorithm"], bool(enc),
                            label=label or entry["path"], recipients=enc.get("recipients", ()))


def no_private_key(recipients) -> str:
    """What a manifest says when the workers hold no private key of ``recipients``."""
    return ("the workers hold no private key of " + ", ".join(recipients) +
            " (escrow-only keys?), so read-back verification was limited to checksums; "
            "the decrypt canary is what proves such an archive readable")


def stream_verdict(check: gpg.StreamCheck) -> str:
    """The in-stream decryption's verdict on the dump: "" when gpg confirmed its integrity, the
    reason when the key or passphrase did not open it. Anything else fails the backup."""
    try:
        check.verdict()
    except gpg.MissingPrivateKey:
        return no_private_key(check.recipients)
    except gpg.WrongPassphrase as exc:
        return f"{exc.message}; read-back verification was limited to checksums"
    except gpg.GpgError as exc:
        raise VerificationFailed(f"the encrypted dump does not decrypt: {exc.message}", exc.detail) from None
    return ""


def content_unverifiable(directory: Path, man: dict) -> str:
    """For an encrypted archive: why the workers cannot read its content back ("" when they
    can: a recipient's private key is in BANKVAULT_GPG_HOME and the passphrase opens it)."""
    enc = man.get("encryption") or {}
    if not enc:
        return ""
    if not gpg.can_decrypt(enc.get("recipients", ())):
        return no_private_key(enc.get("recipients", ()))
    dump = next(f for f in man["files"] if f["role"] == "dump")
    try:
        gpg.probe(directory / dump["path"], dump["path"], enc.get("recipients", ()))
    except (gpg.MissingPrivateKey, gpg.WrongPassphrase) as exc:
        return f"{exc.message}; read-back verification was limited to checksums"
    return ""


def verify_written(directory: Path, man: dict, inst: pgbin.Installation | None = None,
                   decrypted_as_written: str | None = None, read_back: bool = False) -> None:
    """Both checks after writing: every file re-hashed as stored, and pg_restore --list on the
    dump. The re-hash reads back what was written (usually from the page cache): it proves the
    write path stored exactly the bytes that were hashed, not that the medium keeps them;
    `archives verify` and restore drills re-read later, from the disk. A new backup's files
    were read back while they were written (``read_back``: stream_to_file compared them), so
    only the listing is left here. Otherwise the re-hash (I/O and hashing in this process) and
    pg_restore --list (another process) run side by side and take the time of one.

    An encrypted dump is read through gpg to its end (its integrity check) when the workers
    hold a recipient's private key; when they do not — keys held only in escrow — the backup
    still counts, and man["verification"] says that only the checksums were verified.
    ``decrypted_as_written`` is a new backup's in-stream verdict ("" when gpg confirmed the
    dump's integrity as it was written, else why it could not decrypt it): gpg vouched for
    those bytes and the re-hash proves them stored, so pg_restore --list reads only the head."""
    in_stream = decrypted_as_written is not None
    limited = decrypted_as_written if in_stream else content_unverifiable(directory, man)
    if man.get("encryption"):
        how = "decrypted with gpg's integrity check" + (" as written" if in_stream else "") + "; pg_restore --list"
        man["verification"] = {"checksums": True, "content": not limited,
                               **({"limited": limited} if limited else {"how": how})}
    if limited:
        log.warning("archive in %s: %s", directory, limited)
        if not read_back:
            verify_files(directory, man)
        return
    toc_error: list[BaseException] = []

    def toc():
        try:
            verify_dump_toc(directory, man, inst, to_the_end=not in_stream)
            if man.get("encryption"):  # the small globals file: its integrity too
                entry = next(f for f in man["files"] if f["role"] == "globals")
                with open_entry(directory, man, entry) as src:
                    while src.read(CHUNK):
                        pass
                    src.finish()
        except BaseException as exc:
            toc_error.append(exc)

    if read_back:
        toc()
    else:
        thread = threading.Thread(target=toc, name="verify-toc", daemon=True)
        thread.start()
        try:
            verify_files(directory, man)
        finally:
            thread.join()
    if toc_error:
        raise toc_error[0]


def verify_dump_toc(directory: Path, man: dict, inst: pgbin.Installation | None = None,
                    to_the_end: bool = True) -> int:
    """pg_restore --list on the dump: the archive must be readable by the pg tools and hold
    a TABLE DATA entry for every table that had rows. Returns the number of TOC entries.
    An encrypted dump is decrypted to its end, for gpg's integrity verdict, unless
    ``to_the_end`` is False (gpg already vouched for these bytes)."""
    entry = next(f for f in man["files"] if f["role"] == "dump")
    inst = inst or pgbin.for_server(man["source"].get("server_version_num"))
    try:
        source = open_entry(directory, man, entry, "the dump")
    except OSError as exc:
        raise VerificationFailed(f"cannot open the dump: {exc}") from None
    proc, err = spawn([inst.tool("pg_restore"), "--list"], dict(os.environ, LC_MESSAGES="C"),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    watchdog = _Watchdog(proc, 600)
    feeder = Feeder(source, proc.stdin, to_the_end=to_the_end)
    out = proc.stdout.read()
    rc = proc.wait()
    watchdog.cancel()
    feeder.check("the dump")
    if watchdog.fired:
        raise VerificationFailed("pg_restore --list did not finish within 10 minutes")
    if rc != 0:
        raise VerificationFailed("pg_restore cannot read the dump: " + (err.text().strip()[-500:] or f"exit {rc}"))
    listing = out.decode(errors="replace")
    data_entries = set(re.findall(r"TABLE DATA (\S+) (\S+) ", listing))
    for t in man["tables"]:
        if t["rows"] and (t["schema"], t["name"]) not in data_entries and \
                (_quote(t["schema"]), _quote(t["name"])) not in data_entries:
            raise VerificationFailed(f"the dump holds no data for table {t['schema']}.{t['name']}")
    return sum(1 for line in listing.splitlines() if line and not line.startswith(";"))


def _quote(ident: str) -> str:
    return ident if re.fullmatch(r"[a-z_][a-z0-9_$]*", ident) else '"' + ident.replace('"', '""') + '"'


def verify_archive(repo: LocalRepository, relpath: str) -> dict:
    """Full verification of an archive in the repository. Returns the manifest."""
    directory = repo.archive_dir(relpath)
    try:
        man, _ = manifest.read(directory)
    except manifest.ManifestError as exc:
        raise VerificationFailed(str(exc)) from None
    if man.get("kind") == "logical":
        verify_written(directory, man)
    else:
        verify_files(directory, man)
    return man


def options_for(run) -> LogicalOptions:
    policy = run.policy
    if policy is not None:
        return LogicalOptions(compression=policy.compression, level=policy.compression_level,
                              threads=policy.parallel_jobs, artifacts=tuple(policy.artifacts))
    return LogicalOptions(compression=run.database.default_compression,
                          threads=settings.BANKVAULT_COMPRESS_THREADS)


__all__ = ["LogicalOptions", "Produced", "produce", "verify_archive", "verify_files",
           "VerificationFailed", "ToolFailed", "RepositoryError"]
