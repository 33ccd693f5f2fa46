"""Restoring logical archives without ever destroying the live database before its
replacement is proven.

For each database of a request:

    verify    every file of the archive against its sha256
    preflight tools and versions, extensions, disk space, roles, privileges, names — or refuse,
              with the list of what is missing, before anything is created
    restore   into a NEW database <name>__restore_<id> (created like the source: encoding,
              locale), roles first if the target lacks them, pg_restore -j with owners and grants
    prove     pg_restore's exit status, then exact row counts of every table against the manifest
    carry     the database's own comment, settings, per-role settings, owner and grants
    swap      replace: no new connections, terminate the live ones, then rename live ->
              <name>__pre_restore_<id> and new -> live in ONE transaction (kept for rollback);
              copy: rename new -> the requested name

Any failure before the swap leaves the live database exactly as it was, and drops the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from django.conf import settings
from psycopg import sql

from backups.engine import gpg, manifest, pgbin
from backups.engine.logical import Feeder, count_rows, open_entry, verify_files
from backups.engine.pgtools import BackupError, ConnInfo, classify, kill, moved, scrub, spawn
from backups.engine.repository import CHUNK
from backups.models import Database

log = logging.getLogger(__name__)


class RestoreError(BackupError):
    def __init__(self, message: str, detail: str = "", report: dict | None = None):
        super().__init__(message, detail)
        self.report = report or {}


class PreflightFailed(RestoreError):
    pass


def ident(name: str) -> str:
    """How pg_dump writes an identifier (bare when it can, else double-quoted)."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass
class Source:
    """A logical archive to restore from: a directory with manifest.json and its files."""

    directory: Path
    manifest: dict
    label: str

    @classmethod
    def open(cls, directory: Path, label: str) -> Source:
        man, _ = manifest.read(directory)
        if man.get("kind") != "logical":
            raise RestoreError(f"{label} is a {man.get('kind')} archive; a logical archive is needed")
        source = cls(directory, man, label)
        source.check_decryptable()
        return source

    @property
    def encryption(self) -> dict:
        return self.manifest.get("encryption") or {}

    def check_decryptable(self) -> None:
        """An encrypted archive: prove now, before any database is created or touched, that the
        workers' private key and passphrase open it (missing key, wrong passphrase)."""
        if not self.encryption:
            return
        smallest = min(self.manifest["files"], key=lambda f: f["bytes"])
        try:
            gpg.probe(self.directory / smallest["path"], f"{self.label} ({smallest['path']})",
                      self.encryption.get("recipients", ()))
        except gpg.GpgError as exc:
            raise RestoreError(f"{exc.message}; nothing was restored and no database was touched",
                               exc.detail) from None

    def open_file(self, role: str):
        """A role's file, decrypted and decompressed."""
        return open_entry(self.directory, self.manifest, self.file(role), f"{self.label} ({role})")

    def file(self, role: str) -> dict | None:
        return next((f for f in self.manifest["files"] if f["role"] == role), None)

    @property
    def dbname(self) -> str:
        return self.manifest["source"]["dbname"]


@dataclass
class Work:
    """One restore's view of the dump: streamed from the archive (the default), or decompressed
    once into scratch when pg_restore should run with several jobs."""

    scratch: Path
    source: Source
    inst: pgbin.Installation
    dump: Path | None = None
    toc: list[str] = field(default_factory=list)
    space: dict = field(default_factory=dict)

    def stream(self):
        return self.source.open_file("dump")


# -- reading the dump ---------------------------------------------------------------------------
def prepare(source: Source, scratch: Path, target_version: int, jobs: int = 1) -> Work:
    """Verify the archive and read its table of contents.

    bankvault's dumps are streamed when written, so they carry no data offsets: with -j the
    workers of pg_restore would step through the file block by block to find their tables
    (measured: 20% slower than one job). So the dump is streamed into a single pg_restore,
    which needs no scratch copy either; only jobs > 1 decompresses it to a file first."""
    # The checksums are verified while pg_restore reads the table of contents; nothing is
    # created before both are done.
    verified: list[BaseException | None] = []

    def verify():
        try:
            verify_files(source.directory, source.manifest)
            verified.append(None)
        except BaseException as exc:
            verified.append(exc)

    checker = threading.Thread(target=verify, name="verify-archive", daemon=True)
    checker.start()
    toc_error = None
    try:
        work = _read_toc(source, scratch, target_version, jobs)
    except BaseException as exc:
        toc_error = exc
    checker.join()
    # A damaged archive may first show as an unreadable stream; the checksum says it precisely.
    if verified[0] is not None:
        exc = verified[0]
        raise RestoreError(f"{source.label} failed its checksum verification, so nothing was restored: "
                           f"{getattr(exc, 'message', exc)}") from None
    if toc_error is not None:
        raise toc_error
    return work


def _read_toc(source: Source, scratch: Path, target_version: int, jobs: int) -> Work:
    inst = pgbin.for_server(max(target_version, source.manifest["source"].get("server_version_num") or 0))
    work = Work(scratch, source, inst)
    if jobs > 1:
        entry = source.file("dump")
        need = int(entry.get("uncompressed_bytes") or entry["bytes"] * 5)
        free = shutil.disk_usage(scratch).free
        work.space = {"check": "local scratch space", "ok": free > need * 1.1,
                      "detail": f"{free // 2**20} MiB free in {scratch.parent} for the {need // 2**20} MiB dump"}
        if not work.space["ok"]:
            raise PreflightFailed(f"pre-flight refused the restore: {work.space['detail']} (BANKVAULT_SCRATCH_DIR)",
                                  report={"checks": [work.space]})
        work.dump = scratch / "dump.pgdump"
        with work.stream() as src, open(work.dump, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                moved(len(chunk))
            if hasattr(src, "finish"):
                src.finish()  # an encrypted dump counts only with gpg's integrity verdict
    listing = _pg_restore_output(work, ["--create", "--list"])
    work.toc = [ln for ln in listing.splitlines() if ln and not ln.startswith(";")]
    return work


def _pg_restore_output(work: Work, args: list[str]) -> str:
    """Run pg_restore on the dump (file or stream) and return what it prints."""
    stdin = subprocess.PIPE if work.dump is None else subprocess.DEVNULL
    argv = [work.inst.tool("pg_restore"), *args] + ([str(work.dump)] if work.dump else [])
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    feeder = Feeder(work.stream(), proc.stdin) if work.dump is None else None
    err_reader = threading.Thread(target=lambda: setattr(proc, "err_text", proc.stderr.read()), daemon=True)
    err_reader.start()
    out = proc.stdout.read()
    rc = proc.wait()
    err_reader.join(timeout=30)
    if feeder:
        feeder.check("the dump")
    if rc != 0:
        raise RestoreError(f"pg_restore cannot read the dump of {work.source.label}: "
                           f"{getattr(proc, 'err_text', b'').decode(errors='replace').strip()[-300:]}")
    return out.decode(errors="replace")


def _restore_sql(work: Work, lines: list[str], *args: str) -> str:
    """SQL that pg_restore would run for the given TOC lines."""
    listing = work.scratch / f"list-{secrets.token_hex(4)}"
    listing.write_text("\n".join(lines) + "\n")
    try:
        return _pg_restore_output(work, [*args, "-L", str(listing), "-f", "-"])
    finally:
        listing.unlink()


def _statements(script: str) -> str:
    """A pg_restore script without psql meta-commands, comments and session SETs."""
    keep = []
    for line in script.splitlines():
        if line.startswith(("\\", "--")) or re.match(r"^(SET |SELECT pg_catalog\.set_config)", line):
            continue
        keep.append(line)
    return "\n".join(keep).strip()


TOC_DESCS = sorted([
    "TABLE DATA", "DATABASE PROPERTIES", "DEFAULT ACL", "FK CONSTRAINT", "CHECK CONSTRAINT", "SEQUENCE SET",
    "SEQUENCE OWNED BY", "MATERIALIZED VIEW DATA", "MATERIALIZED VIEW", "FOREIGN TABLE", "FOREIGN SERVER",
    "FOREIGN DATA WRAPPER", "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY", "TEXT SEARCH PARSER",
    "TEXT SEARCH TEMPLATE", "LARGE OBJECT", "BLOB METADATA", "EVENT TRIGGER", "OPERATOR CLASS",
    "OPERATOR FAMILY", "ACCESS METHOD", "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA", "USER MAPPING",
    "ROW SECURITY", "PROCEDURAL LANGUAGE", "SECURITY LABEL",
], key=len, reverse=True)


def toc_desc(line: str) -> str:
    """The description field of a TOC line ("TABLE DATA", "ACL", "DATABASE PROPERTIES" ...)."""
    rest = " ".join(line.split(";", 1)[1].split()[2:])
    for desc in TOC_DESCS:
        if rest == desc or rest.startswith(desc + " "):
            return desc
    return rest.split(" ", 1)[0]


ROLE_LIST_RE = re.compile(r"\b(?:TO|FROM)\s+(.+?)(?:\s+WITH\s+GRANT\s+OPTION|\s+GRANTED\s+BY\s+\S+)?;", re.S)
OWNER_RE = re.compile(r"\bOWNER TO (\"(?:[^\"]|\"\")+\"|[^\s;]+);")
FOR_ROLE_RE = re.compile(r"\bFOR ROLE (\"(?:[^\"]|\"\")+\"|[^\s]+)")


def _unquote(token: str) -> str:
    token = token.strip()
    if token.startswith('"') and token.endswith('"'):
        return token[1:-1].replace('""', '"')
    return token


def roles_needed(work: Work) -> set[str]:
    """Roles the dump's objects belong or are granted to (including the database's own grants
    and per-role settings)."""
    # The owner is the last field; an empty one leaves a trailing space ("BLOBS - BLOBS ").
    wanted = {line.rsplit(" ", 1)[1] for line in work.toc if not line.endswith(" ")}
    lines = [ln for ln in work.toc if toc_desc(ln) in ("ACL", "DEFAULT ACL", "DATABASE PROPERTIES")]
    script = _statements(_restore_sql(work, lines, "--create", "--schema-only")) if lines else ""
    for statement in re.split(r";\s*\n", script):
        statement = statement.strip()
        if statement.startswith(("GRANT ", "REVOKE ")):
            m = ROLE_LIST_RE.search(statement + ";")
            for part in re.split(r",\s*", m.group(1)) if m else []:
                part = part.strip()
                if part.upper().startswith("GROUP "):
                    part = part[6:]
                if part and part.upper() != "PUBLIC":
                    wanted.add(_unquote(part))
        elif m := re.match(r"ALTER ROLE (\"(?:[^\"]|\"\")+\"|\S+) IN DATABASE ", statement):
            wanted.add(_unquote(m.group(1)))
        wanted |= {_unquote(m.group(1)) for m in OWNER_RE.finditer(statement + ";")}
        wanted |= {_unquote(m.group(1)) for m in FOR_ROLE_RE.finditer(statement)}
    return {w for w in wanted if w and w != "-"}


def database_properties(work: Work, old_name: str, new_name: str) -> tuple[str, str]:
    """(CREATE DATABASE for new_name with the source's encoding and locale, the statements that
    carry the source database's owner, comment, settings, per-role settings and grants)."""
    lines = [ln for ln in work.toc if " DATABASE " in ln and toc_desc(ln) in (
        "DATABASE", "DATABASE PROPERTIES", "COMMENT", "ACL", "SECURITY LABEL")]
    script = _statements(_restore_sql(work, lines, "--create", "--schema-only"))
    pattern = re.compile(r"(\bDATABASE\s+)" + re.escape(ident(old_name)) + r"(?=[\s;])")
    script = pattern.sub(lambda m: m.group(1) + ident(new_name), script)
    create, rest = "", []
    for statement in re.split(r";\n", script):
        statement = statement.strip()
        if not statement:
            continue
        if statement.startswith("CREATE DATABASE"):
            create = statement
        else:
            rest.append(statement + ";")
    return create, "\n".join(rest)


# -- preflight ----------------------------------------------------------------------------------
def _check(report: list, name: str, ok: bool, detail: str) -> bool:
    report.append({"check": name, "ok": bool(ok), "detail": detail})
    return ok


def preflight(server: Database, source: Source, work: Work, *, names: dict[str, str], replace: bool) -> dict:
    """What the restore will do and whether it can; raises PreflightFailed listing every problem."""
    report: list[dict] = []
    conn_info = server.restore_conninfo("postgres")
    man = source.manifest
    with conn_info.connect(autocommit=True) as conn:
        version, num, is_super, createdb, createrole = conn.execute(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int, rolsuper, "
            "rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()
        src_num = man["source"].get("server_version_num") or 0
        _check(report, "versions", num // 10000 >= src_num // 10000,
               f"archive from PostgreSQL {man['source']['server_version']}, target runs {version}, "
               f"pg_restore {work.inst.major}")
        _check(report, "privileges", is_super or createdb,
               f"restore user {conn_info.user!r}: superuser={is_super}, createdb={createdb}")
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for purpose, name in names.items():
            if purpose == "live":
                _check(report, "live database", name in existing, f"{name} exists on {server.host}:{server.port}")
                if replace and name in existing and not is_super:
                    owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                                         (name,)).fetchone()[0]
                    _check(report, "ownership", owner == conn_info.user,
                           f"replacing {name} needs its owner ({owner}) or a superuser as restore user")
            else:
                _check(report, f"name {purpose}", name not in existing, f"{name} is "
                       f"{'taken' if name in existing else 'free'} on {server.host}:{server.port}")
        wanted_ext = {line.split()[-2] for line in work.toc if toc_desc(line) == "EXTENSION"}
        available = {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions")}
        missing_ext = sorted(wanted_ext - available)
        _check(report, "extensions", not missing_ext,
               f"needs {', '.join(sorted(wanted_ext)) or 'none'}"
               + (f"; missing on the target: {', '.join(missing_ext)}" if missing_ext else ""))
        roles = roles_needed(work)
        present = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles")}
        missing_roles = sorted(roles - present)
        can_create = is_super or createrole
        _check(report, "roles", not missing_roles or can_create,
               f"needs {', '.join(sorted(roles))}" + (
                   f"; missing: {', '.join(missing_roles)}" + (
                       " (will be created from the archive's roles, without passwords)" if can_create
                       else f" — create them, or give {conn_info.user!r} CREATEROLE") if missing_roles else ""))
        data_dir = None
        with contextlib.suppress(psycopg.Error):
            data_dir = conn.execute("SELECT current_setting('data_directory')").fetchone()[0]
    if work.space:
        report.append(work.space)
    need_server = int(man["source"].get("size_bytes") or 0)
    if data_dir and server.host in ("127.0.0.1", "localhost", "::1") and os.path.isdir(data_dir):
        free = shutil.disk_usage(data_dir).free
        _check(report, "target disk space", free > need_server * 1.2,
               f"{free // 2**20} MiB free for a database of {need_server // 2**20} MiB (with 20% headroom)")
    else:
        _check(report, "target disk space", True, f"not measurable remotely; the database was "
               f"{need_server // 2**20} MiB at backup time")
    result = {"checks": report, "missing_roles": missing_roles, "create_roles": bool(missing_roles and can_create)}
    failed = [c for c in report if not c["ok"]]
    if failed:
        raise PreflightFailed("pre-flight refused the restore: " + "; ".join(c["detail"] for c in failed),
                              report=result)
    return result


def create_missing_roles(server: Database, source: Source, roles: list[str]) -> list[str]:
    """Create roles from the archive's globals (pg_dumpall --globals-only, no passwords)."""
    entry = source.file("globals")
    if entry is None:
        raise RestoreError(f"the archive holds no roles (globals) to create {', '.join(roles)} from")
    with source.open_file("globals") as f:
        script = f.read().decode()
        if hasattr(f, "finish"):
            f.finish()
    wanted = {ident(r) for r in roles}
    statements = []
    for line in script.splitlines():
        m = re.match(r"^(CREATE ROLE|ALTER ROLE) (\"(?:[^\"]|\"\")+\"|\S+?)[ ;]", line)
        if m and m.group(2) in wanted:
            statements.append(line)
    created = []
    with server.restore_conninfo("postgres").connect(autocommit=True) as conn, conn.transaction():
        for statement in statements:
            conn.execute(statement)
        for role in roles:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            created.append(role)
    return created


# -- running pg_restore --------------------------------------------------------------------------
def run_pg_restore(work: Work, conn: ConnInfo, dbname: str, jobs: int, progress=None, extra: list[str] = ()) -> None:
    total = max(1, len(work.toc))
    done = {"n": 0}

    def on_line(line):  # stderr thread: count, no database access
        if re.search(r"(finished item|processing data for table|creating |processing item)", line):
            done["n"] += 1

    streaming = work.dump is None
    argv = [work.inst.tool("pg_restore"), "--verbose", "--exit-on-error", "-d", dbname, *extra]
    argv += [] if streaming else [f"--jobs={max(1, jobs)}", str(work.dump)]
    with conn.tool_env() as env:
        env["PGDATABASE"] = dbname
        # Nothing restored counts until the swap, whose synchronous commit flushes all WAL before
        # it, the restore's included; so pg_restore's many small commits need not wait for disk.
        env["PGOPTIONS"] = (env.get("PGOPTIONS", "") + " -c synchronous_commit=off").strip()
        proc, err = spawn(argv, env, stdin=subprocess.PIPE if streaming else subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, on_stderr_line=on_line)
        feeder = Feeder(work.stream(), proc.stdin) if streaming else None
        deadline = time.monotonic() + settings.BANKVAULT_TOOL_TIMEOUT
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if progress:
                    progress(min(done["n"], total), total, f"restoring into {dbname}")
                if time.monotonic() > deadline:
                    kill(proc)
                    raise RestoreError("pg_restore did not finish within BANKVAULT_TOOL_TIMEOUT and was stopped")
    if feeder:
        feeder.check("the dump")
    if proc.returncode != 0:
        e = classify(err.text(), conn, "pg_restore", proc.returncode)
        raise RestoreError(f"pg_restore failed: {e.message}", scrub(err.text(), conn)[-4000:])


def verify_counts(conn: ConnInfo, dbname: str, source: Source, only: set[tuple[str, str]] | None = None,
                  rename: dict[str, str] | None = None) -> int:
    """Exact row count of every table against the manifest. Returns how many were checked."""
    expected = {(t["schema"], t["name"]): t["rows"] for t in source.manifest["tables"] if t["rows"] is not None}
    if only is not None:
        expected = {k: v for k, v in expected.items() if k in only}
    rename = rename or {}
    mapped = {(rename.get(s, s), n): v for (s, n), v in expected.items()}
    info = ConnInfo(**{**conn.__dict__, "dbname": dbname})
    with info.connect(autocommit=False) as pg:
        found = count_rows(pg, list(mapped))
    wrong = [f"{s}.{n}: expected {v}, found {found.get((s, n))}" for (s, n), v in mapped.items()
             if found.get((s, n)) != v]
    if wrong:
        raise RestoreError("the restored data does not match the archive's row counts: " + "; ".join(wrong[:10]))
    return len(mapped)


# -- the swap -------------------------------------------------------------------------------------
def _terminate(conn, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND pid <> pg_backend_pid()", (name,))
        left = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()[0]
        if not left:
            return
        if time.monotonic() > deadline:
            raise RestoreError(f"{left} session(s) on {name} did not end within {timeout:.0f}s")
        time.sleep(0.1)


def swap(server: Database, live: str, new: str, pre: str) -> None:
    """live -> pre and new -> live in one transaction, after live's sessions are gone. On
    any failure the live database is as it was (connections allowed again)."""
    info = server.restore_conninfo("postgres")
    try:
        conn = info.connect(autocommit=True)
    except BackupError as exc:
        raise RestoreError(f"cannot reach {server.host}:{server.port} to swap in the restored database; "
                           f"the live database {live} was not touched ({exc.message})") from None
    with conn:
        L, N, P = sql.Identifier(live), sql.Identifier(new), sql.Identifier(pre)
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(L))
        try:
            _terminate(conn, live)
            with conn.transaction():
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(L, P))
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(N, L))
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(L))
            raise
        # The previous database stays for rollback, closed to applications.
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(L))


def drop_quietly(server: Database, name: str) -> bool:
    try:
        with server.restore_conninfo("postgres").connect(autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        return True
    except Exception as exc:  # the server may be down; say so in the result
        log.warning("could not drop %s: %s", name, exc)
        return False


# -- one database --------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A database restored and proven under its work name, not yet swapped in."""

    server: Database
    live_name: str
    final_name: str
    work_name: str
    pre_name: str | None
    result: dict


def restore_database(server: Database, source: Source, *, live_name: str, final_name: str, replace: bool,
                     request_id: int, progress=None, jobs: int = 1) -> Prepared:
    """Restore ``source`` on ``server`` under a work name and prove it. The live database is
    not touched; finish() swaps it in (replace) or gives it its name (copy); discard() drops it.
    Raises RestoreError, having dropped whatever it created."""
    started = time.monotonic()
    work_name = f"{final_name}__restore_{request_id}"[:63]
    pre_name = f"{live_name}__pre_restore_{request_id}"[:63] if replace else None
    scratch = Path(settings.BANKVAULT_SCRATCH_DIR) / f"restore-{request_id}-{secrets.token_hex(3)}"
    scratch.mkdir(parents=True, mode=0o700)
    created = False
    try:
        with server.restore_conninfo("postgres").connect(autocommit=True) as c:
            target_num = c.execute("SELECT current_setting('server_version_num')::int").fetchone()[0]

        def step(what):
            if progress:
                progress(0, 0, what)

        step(f"verifying {source.label}")
        work = prepare(source, scratch, target_num, jobs)
        names = {"work": work_name}
        if replace:
            names.update({"live": live_name, "pre-restore": pre_name})
        else:
            names["final"] = final_name
        report = preflight(server, source, work, names=names, replace=replace)
        roles_created = []
        if report["missing_roles"]:
            roles_created = create_missing_roles(server, source, report["missing_roles"])
        create_sql, props_sql = database_properties(work, source.dbname, work_name)
        admin = server.restore_conninfo("postgres")
        with admin.connect(autocommit=True) as conn:
            conn.execute(create_sql or sql.SQL("CREATE DATABASE {}").format(sql.Identifier(work_name)))
        created = True
        run_pg_restore(work, admin, work_name, jobs, progress)
        step("checking row counts")
        checked = verify_counts(admin, work_name, source)
        if props_sql:
            with admin.connect(autocommit=True) as conn:
                conn.execute(props_sql)
        created = False  # from here on the caller owns it (finish or discard)
        return Prepared(server, live_name, final_name, work_name, pre_name, {
            "database": live_name, "restored_as": final_name, "pre_restore": pre_name,
            "tables_verified": checked, "roles_created": roles_created, "preflight": report["checks"],
            "seconds": round(time.monotonic() - started, 3), "source": source.label})
    except RestoreError:
        raise
    except BackupError as exc:
        raise RestoreError(exc.message, exc.detail) from None
    except psycopg.Error as exc:
        raise RestoreError(f"the target server refused a step of the restore: {str(exc).strip()}") from None
    finally:
        if created and not drop_quietly(server, work_name):
            log.warning("restored copy %s remains on %s:%s for inspection", work_name, server.host, server.port)
        shutil.rmtree(scratch, ignore_errors=True)


def finish(p: Prepared) -> dict:
    """Swap the proven database in (replace) or rename it to its final name (copy)."""
    if p.pre_name:
        swap(p.server, p.live_name, p.work_name, p.pre_name)
    else:
        try:
            with p.server.restore_conninfo("postgres").connect(autocommit=True) as conn:
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(p.work_name), sql.Identifier(p.final_name)))
        except (BackupError, psycopg.Error) as exc:
            raise RestoreError(f"could not give the restored copy its name {p.final_name}: "
                               f"{getattr(exc, 'message', str(exc)).strip()}") from None
    return p.result


def discard(p: Prepared) -> bool:
    return drop_quietly(p.server, p.work_name)


__all__ = ["Source", "RestoreError", "PreflightFailed", "restore_database", "finish", "discard", "swap",
           "preflight"]
