#!/usr/bin/env python3
"""`make run`: the whole bankvault stack on this machine, in the foreground.

    scripts/devstack.py run [--port 8000]   set up (or reuse) everything, then run web, worker, beat
    scripts/devstack.py stop                stop what devstack left running (clusters, its Redis)
    scripts/devstack.py status              what runs
    scripts/devstack.py manage ARGS...      manage.py with the environment `run` uses

State lives in var/ (BANKVAULT_VAR_DIR): the clusters in var/pg (portal, auth, account), the
sandbox passwords in var/sandbox-secrets.json, the repository, static files. A second `run`
reuses all of it. Services that answer already (Redis on 6379, a PostgreSQL on 5432 that trusts
`postgres`) are used as they are and left running.

No environment variable is needed; ones already set win: DATABASE_URL (then no portal database
is set up), CELERY_BROKER_URL (then no Redis), BANKVAULT_REPOSITORY. For trying the fallbacks:
BANKVAULT_DEVSTACK_SYSTEM_PG_PORT (5432), BANKVAULT_DEVSTACK_REDIS_PORT (6379),
BANKVAULT_DEVSTACK_WEB_PORT (8000).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backups.engine import pgbin  # noqa: E402
from backups.engine.cluster import ClusterError, LocalCluster, port_answers  # noqa: E402
from bankvault.demo import SERVICES  # noqa: E402
from bankvault.devservices import RedisServer, redis_answers  # noqa: E402

# Same default as settings.VAR_DIR, made absolute so children agree whatever their cwd.
VAR = Path(os.environ.get("BANKVAULT_VAR_DIR") or ROOT / "var").absolute()
BIN = Path(sys.executable).parent  # the venv's bin: gunicorn, celery
PG_OS_USER = "postgres"  # what LocalCluster runs the server as when we are root
PORTAL_PORT = 5439
PORTAL_DBNAME = "bankvault"
BACKUP_ROLE = "bankvault_backup"
SYSTEM_PG_PORT = int(os.environ.get("BANKVAULT_DEVSTACK_SYSTEM_PG_PORT") or 5432)
REDIS_PORT = int(os.environ.get("BANKVAULT_DEVSTACK_REDIS_PORT") or 6379)
WEB_PORT = int(os.environ.get("BANKVAULT_DEVSTACK_WEB_PORT") or 8000)
SECRETS_FILE = VAR / "sandbox-secrets.json"
STATE_FILE = VAR / "devstack.json"  # the URLs `run` chose (no passwords), for `manage`/`status`
LOCK_FILE = VAR / "devstack.lock"
REDIS_DIR = VAR / "redis"
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the NUL


class DevstackError(Exception):
    """Something the user has to fix; the message says what and how."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while setting up."""


# -- output ----------------------------------------------------------------------------------
_out_lock = threading.Lock()
_COLORS = {"devstack": "1", "web": "36", "worker": "33", "beat": "35"}


def emit(name: str, line: str) -> None:
    label = f"{name:<8}|"
    if sys.stdout.isatty():
        label = f"\033[{_COLORS.get(name, '0')}m{label}\033[0m"
    with _out_lock:
        sys.stdout.write(f"{label} {line}\n")
        sys.stdout.flush()


def say(line: str) -> None:
    emit("devstack", line)


def boxed(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    with _out_lock:
        sys.stdout.write("\n  +" + "-" * width + "+\n")
        for x in lines:
            sys.stdout.write(f"  |  {x:<{width - 2}}|\n")
        sys.stdout.write("  +" + "-" * width + "+\n\n")
        sys.stdout.flush()


def rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def port_owner(port: int) -> str:
    """'postgres (pid 123)' for whoever listens on the port, as far as ss can tell us."""
    ss = shutil.which("ss")
    if ss:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([ss, "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                                 timeout=5).stdout
            m = re.search(r'users:\(\("([^"]+)",pid=(\d+)', out)
            if m:
                return f"{m.group(1)} (pid {m.group(2)})"
    return f"another program (find it with: ss -ltnp 'sport = :{port}')"


# -- where the clusters live ---------------------------------------------------------------
def fallback_pg_root() -> Path:
    digest = hashlib.sha256(str(VAR).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"bankvault-{digest}" / "pg"


def _blocking_dir(path: Path, user: str) -> Path | None:
    """The first existing directory on the way to `path` that `user` may not enter."""
    pw = pwd.getpwnam(user)
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for current in [*reversed(path.parents), path]:  # from / down
        try:
            st = current.stat()
        except FileNotFoundError:
            return None  # the rest is created by us, traversable
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return current
    return None


def pg_root() -> tuple[Path, str | None]:
    """Directory for the clusters, and why it is not var/pg when it is not."""
    default = VAR / "pg"
    too_long = max(len(str(default / name / f".s.PGSQL.{port}"))
                   for name, port in [("portal", PORTAL_PORT)] + [(n, s["port"]) for n, s in SERVICES.items()])
    if too_long > SOCKET_PATH_MAX:
        return fallback_pg_root(), (f"{rel(default)} is too deep for a PostgreSQL Unix socket "
                                    f"({too_long} > {SOCKET_PATH_MAX} bytes)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            raise DevstackError(
                f"as root the clusters run as the '{PG_OS_USER}' OS user, which does not exist: "
                "install PostgreSQL (`make setup` does: apt-get install postgresql)") from None
        blocker = _blocking_dir(default, PG_OS_USER)
        if blocker is not None:
            mode = stat.filemode(blocker.stat().st_mode)
            return fallback_pg_root(), (
                f"the '{PG_OS_USER}' OS user that runs the clusters cannot enter {blocker} ({mode}); "
                f"to keep them in {rel(default)}, put the checkout where that user can reach it")
    return default, None


def mkdir_traversable(path: Path) -> None:
    """mkdir -p with 0755 on what we create, whatever the umask: postgres must pass through."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        d.chmod(0o755)


# -- clusters ---------------------------------------------------------------------------------
def repository_root() -> Path:
    return Path(os.environ.get("BANKVAULT_REPOSITORY") or VAR / "repository").absolute()


def prepare_wal_area(name: str) -> tuple[str, Path]:
    """The push script and the sandbox's WAL area, where the postgres OS user (who runs
    archive_command) can reach and write them."""
    from backups import walpush

    repo = repository_root()
    mkdir_traversable(repo / "wal" / name)
    script = walpush.install(str(repo / "bin"))
    for path in (repo, repo / "bin", repo / "wal"):
        path.chmod(path.stat().st_mode | 0o055)
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_OS_USER)
        for path in (repo / "wal" / name, repo / "wal" / name / ".stream"):
            path.mkdir(exist_ok=True)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        if not _traversable_by(PG_OS_USER, repo / "wal" / name):
            raise DevstackError(f"the {PG_OS_USER} OS user cannot reach {repo} (archive_command runs as it); "
                                "set BANKVAULT_REPOSITORY to a directory outside /root")
    return script, repo / "wal" / name


def _traversable_by(user: str, path: Path) -> bool:
    pw = pwd.getpwnam(user)
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {pw.pw_gid}
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return False
    return True


def sandbox_settings(name: str) -> dict:
    """postgresql.conf settings of a sandbox cluster: applied at creation and re-applied (with
    a restart) whenever this returns something else, so existing clusters follow.

    WAL archiving in archive_command mode: bankvault's push script, run by the server as the
    postgres OS user with the system Python (FIELD-NOTES: it cannot read /root), into the
    sandbox's WAL area; a segment is closed at least every 60 s."""
    from backups import walpush

    script, area = prepare_wal_area(name)
    return {"archive_mode": "on", "archive_timeout": 60,
            "archive_command": walpush.command_line("/usr/bin/python3", script, "push", area)}


def _conf_text(value) -> str:
    """How a setting compares: unquoted, lower-case, as LocalCluster.write_conf writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1].replace("''", "'")
    return text.lower()


def _auto_conf(cluster: LocalCluster) -> dict:
    """postgresql.auto.conf as {name: comparable value}; later lines win, as in PostgreSQL."""
    current = {}
    path = cluster.datadir / "postgresql.auto.conf"
    for line in path.read_text().splitlines() if path.exists() else []:
        m = re.match(r"\s*([A-Za-z_.]+)\s*=\s*(.*?)\s*$", line)
        if m and not line.lstrip().startswith("#"):
            current[m.group(1).lower()] = _conf_text(m.group(2))
    return current


def _conf_drift(cluster: LocalCluster, wanted: dict) -> dict:
    """The wanted settings that postgresql.auto.conf does not have."""
    current = _auto_conf(cluster)
    return {k: v for k, v in wanted.items() if current.get(k.lower()) != _conf_text(v)}


def _pidfile_port(base: Path) -> int | None:
    """The port a running (or crashed) postmaster of base/data listens on."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((base / "data" / "postmaster.pid").read_text().splitlines()[3])
    return None


def existing_cluster(base: Path, port: int) -> LocalCluster | None:
    """The cluster in base/data, run by the binaries of its own major (not the newest)."""
    version = base / "data" / "PG_VERSION"
    if not version.exists():
        return None
    major = int(version.read_text().strip().split(".")[0])
    return LocalCluster(base=base, port=port, bindir=pgbin.server_bindir(major))


def ensure_cluster(name: str, base: Path, port: int, stack: Cleanup, **create_kw) -> LocalCluster:
    """Reuse, start or create the cluster in `base`; what this run starts, it stops at exit."""
    wanted = {"port": port, **(create_kw.get("settings") or {})}
    cluster = existing_cluster(base, port)
    if cluster is not None and not cluster.is_running() and "port" not in _auto_conf(cluster):
        # LocalCluster.create writes its settings right after initdb; without them this is a
        # creation that was interrupted, and it would start on the default port 5432.
        say(f"{name}: removing the unfinished cluster in {rel(base / 'data')}")
        shutil.rmtree(base / "data")
        cluster = None
    if cluster is not None:
        if cluster.is_running():
            running_on = _pidfile_port(base)
            if running_on != port:
                raise DevstackError(f"the {name} cluster in {rel(base)} runs on port {running_on}, not {port}; "
                                    f"stop it (scripts/devstack.py stop) and run again")
            if not port_answers(port):
                raise DevstackError(
                    f"the {name} cluster in {rel(base)} has a postmaster.pid but nothing answers on port {port}; "
                    f"see {rel(cluster.logfile)}, and if no postgres runs there, delete "
                    f"{rel(cluster.datadir)}/postmaster.pid")
            drift = _conf_drift(cluster, wanted)
            if drift:
                cluster.write_conf(drift)
                cluster.restart()
                say(f"{name}: was running; restarted it for new settings ({', '.join(drift)})")
            else:
                say(f"{name}: already running on port {port} ({rel(base)}), will be left running")
            return cluster
        _require_free_port(port, name, base)
        drift = _conf_drift(cluster, wanted)
        if drift:
            cluster.write_conf(drift)
        cluster.start()
        stack.push(f"{name} cluster", cluster.stop)
        say(f"{name}: started the cluster in {rel(base)} on port {port}"
            + (f" (new settings: {', '.join(drift)})" if drift else ""))
        return cluster
    if (base / "data").exists():
        # initdb was interrupted on an earlier run; what it left cannot be started.
        say(f"{name}: removing the unfinished cluster in {rel(base / 'data')}")
        shutil.rmtree(base / "data")
    _require_free_port(port, name, base)
    mkdir_traversable(base.parent)
    cluster = LocalCluster.create(base=base, port=port, **create_kw)
    cluster.start()
    stack.push(f"{name} cluster", cluster.stop)
    say(f"{name}: created a cluster in {rel(base)} on port {port}")
    return cluster


def _require_free_port(port: int, name: str, base: Path) -> None:
    if port_answers(port):
        raise DevstackError(
            f"port {port} is in use by {port_owner(port)}, which is not the {name} cluster in {rel(base)}; "
            f"stop that program (or move it to another port) and run again")


# -- services -----------------------------------------------------------------------------------
def ensure_redis(stack: Cleanup) -> str | None:
    """The broker URL we chose, or None when CELERY_BROKER_URL was given."""
    if os.environ.get("CELERY_BROKER_URL"):
        say("redis: using CELERY_BROKER_URL from the environment")
        return None
    url = f"redis://127.0.0.1:{REDIS_PORT}/0"
    if redis_answers(REDIS_PORT):
        say(f"redis: using the server that answers on 127.0.0.1:{REDIS_PORT}")
        return url
    if port_answers(REDIS_PORT):
        raise DevstackError(f"port {REDIS_PORT} is in use by {port_owner(REDIS_PORT)}, which does not answer "
                            f"like Redis; stop it, or set CELERY_BROKER_URL to a Redis you have")
    try:
        server = RedisServer.start(port=REDIS_PORT, directory=REDIS_DIR)
    except RuntimeError as exc:  # not installed
        raise DevstackError(f"{exc}; `make setup` installs it") from None
    except subprocess.CalledProcessError as exc:
        raise DevstackError(f"redis-server did not start: {(exc.stderr or b'').decode(errors='replace').strip()} "
                            f"(log: {rel(REDIS_DIR / 'redis.log')})") from None
    except TimeoutError as exc:
        _stop_our_redis()
        raise DevstackError(f"redis-server did not come up: {exc} (log: {rel(REDIS_DIR / 'redis.log')})") from None
    stack.push(f"redis (pid {server.pid})", server.stop)
    say(f"redis: started redis-server on 127.0.0.1:{REDIS_PORT} (pid {server.pid}, {rel(REDIS_DIR)})")
    return url


def _our_redis_pid() -> int | None:
    """The redis-server that devstack started earlier, if it still runs."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((REDIS_DIR / "redis.pid").read_text().strip())
        if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def _stop_our_redis() -> int | None:
    pid = _our_redis_pid()
    if pid:
        RedisServer(port=REDIS_PORT, directory=REDIS_DIR, pid=pid).stop()
    return pid


def system_pg_url() -> tuple[str | None, str]:
    """The portal URL on the system server when it lets `postgres` in without a password,
    creating the database there if needed; else None and why not."""
    import psycopg
    from psycopg import sql

    if not port_answers(SYSTEM_PG_PORT):
        return None, f"nothing listens on 127.0.0.1:{SYSTEM_PG_PORT}"
    # Connect exactly as Django will with the URL we would hand it (libpq env included).
    try:
        with psycopg.connect(host="127.0.0.1", port=SYSTEM_PG_PORT, user="postgres", dbname="postgres",
                             connect_timeout=3, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [PORTAL_DBNAME]).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PORTAL_DBNAME)))
                say(f"portal db: created database {PORTAL_DBNAME} on 127.0.0.1:{SYSTEM_PG_PORT}")
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        return None, f"127.0.0.1:{SYSTEM_PG_PORT} does not let postgres in without a password ({first})"
    except psycopg.Error as exc:
        return None, f"cannot create database {PORTAL_DBNAME} on 127.0.0.1:{SYSTEM_PG_PORT} ({exc})"
    return f"postgres://postgres@127.0.0.1:{SYSTEM_PG_PORT}/{PORTAL_DBNAME}", ""


def ensure_portal_db(stack: Cleanup, root: Path) -> str | None:
    """The portal's DATABASE_URL we chose, or None when DATABASE_URL was given."""
    if os.environ.get("DATABASE_URL"):
        say("portal db: using DATABASE_URL from the environment")
        return None
    url, why_not = system_pg_url()
    if url:
        say(f"portal db: using the PostgreSQL on 127.0.0.1:{SYSTEM_PG_PORT} ({url})")
        return url
    from psycopg import sql

    say(f"portal db: {why_not}; using a cluster of our own")
    cluster = ensure_cluster("portal", root / "portal", PORTAL_PORT, stack)
    with cluster.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [PORTAL_DBNAME]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PORTAL_DBNAME)))
    return cluster.url(PORTAL_DBNAME)


# -- sandbox clusters ---------------------------------------------------------------------------
def load_secrets() -> dict:
    try:
        return json.loads(SECRETS_FILE.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DevstackError(f"{rel(SECRETS_FILE)} cannot be read ({exc}); delete it and run again "
                            "(new passwords are then set on the sandbox clusters)") from None


def save_secrets(data: dict) -> None:
    tmp = SECRETS_FILE.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, SECRETS_FILE)


def prepare_sandbox(cluster: LocalCluster, name: str, dbname: str, demo_sql: str, password: str) -> None:
    """Database, demo data and backup role; each part only when missing, so a first run that
    was interrupted half-way is completed by the next one."""
    import psycopg
    from psycopg import sql

    with cluster.connect() as conn:  # superuser over the Unix socket (trust)
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    with cluster.connect(dbname, autocommit=False) as conn:
        empty = not conn.execute("SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = 'public')").fetchone()[0]
        if empty:
            try:
                conn.execute(demo_sql)  # one transaction: all of the demo or nothing
            except psycopg.Error as exc:
                raise DevstackError(f"loading the demo schema into {name} ({dbname}) failed: {exc} "
                                    "(the demo needs PostgreSQL 13 or newer)") from None
        conn.commit()
    with cluster.connect() as conn:
        role = sql.Identifier(BACKUP_ROLE)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [BACKUP_ROLE]).fetchone()
        # Set every run: the password in var/ is the truth, even after var/ was recreated.
        # The least-privilege backup role of the README: read all data (pg_dump), replication
        # (pg_basebackup, pg_receivewal), monitoring views, and forcing a WAL switch (check --wal).
        conn.execute(sql.SQL("{} ROLE {} WITH LOGIN REPLICATION PASSWORD {}").format(
            sql.SQL("ALTER" if exists else "CREATE"), role, sql.Literal(password)))
        conn.execute(sql.SQL("GRANT pg_read_all_data, pg_monitor TO {}").format(role))
    with cluster.connect(dbname) as conn:  # function privileges are per database
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {}").format(sql.Identifier(BACKUP_ROLE)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(dbname), role))
    if empty:
        say(f"{name}: loaded the demo data into {dbname}")


def ensure_sandboxes(stack: Cleanup, root: Path) -> dict[str, dict]:
    """{name: {port, dbname, password}} for auth and account, up and prepared."""
    stored = load_secrets()
    out = {}
    for name, service in SERVICES.items():
        password = stored.get(name) or secrets.token_urlsafe(24)
        if stored.get(name) != password:
            stored[name] = password
            save_secrets(stored)  # before the role gets it, so the two cannot diverge
        # scram on TCP: clients such as the portal must prove the password, as in production.
        cluster = ensure_cluster(name, root / name, service["port"], stack,
                                 tcp_auth="scram-sha-256", settings=sandbox_settings(name))
        prepare_sandbox(cluster, name, service["dbname"], service["sql"], password)
        out[name] = {"port": service["port"], "dbname": service["dbname"], "password": password}
    return out


# -- Django -----------------------------------------------------------------------------------------
def django_setup(env: dict) -> None:
    os.environ.update(env)
    os.chdir(ROOT)
    import django

    django.setup()


def migrate() -> None:
    from django.core.management import call_command
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    pending = len(executor.migration_plan(executor.loader.graph.leaf_nodes()))
    if pending:
        say(f"migrate: applying {pending} migrations")
        call_command("migrate", interactive=False, verbosity=0)
    say("migrate: the portal database is up to date")


def collectstatic() -> None:
    from django.conf import settings
    from django.core.management import call_command

    call_command("collectstatic", interactive=False, verbosity=0)
    say(f"static: collected into {rel(Path(settings.STATIC_ROOT))}")


def register_sandboxes(sandboxes: dict[str, dict]) -> None:
    import io

    from django.core.management import call_command

    from backups.crypto import SecretUnreadable
    from backups.models import Database

    for name, sb in sandboxes.items():
        wanted = {"host": "127.0.0.1", "port": sb["port"], "dbname": sb["dbname"], "user": BACKUP_ROLE,
                  "wal_mode": "archive"}
        db = Database.objects.filter(name=name).first()
        same = db is not None and all(getattr(db, k) == v for k, v in wanted.items())
        with contextlib.suppress(SecretUnreadable):  # SECRET_KEY changed: register again
            same = same and db.get_password() == sb["password"]
        if not same:
            # The command validates and audits; the password reaches it through the
            # environment, never argv.
            var = "BANKVAULT_DEVSTACK_SANDBOX_PASSWORD"
            os.environ[var] = sb["password"]
            try:
                out = io.StringIO()
                call_command("databases", "add", name, "--host", wanted["host"], "--port", str(sb["port"]),
                             "--dbname", sb["dbname"], "--user", BACKUP_ROLE, "--password-env", var,
                             "--wal-mode", "archive", stdout=out)
            finally:
                del os.environ[var]
            say(f"register: {out.getvalue().strip()}")
        else:
            say(f"register: {name} is registered (127.0.0.1:{sb['port']}/{sb['dbname']})")
    ensure_schedules()


def ensure_schedules() -> None:
    """The default schedules of `backup_scheduler --setup` (daily backup, weekly deep backup,
    monthly cleanup, health checks), on the first start only: a schedule the user deleted or
    changed afterwards stays that way."""
    import io

    from django.core.management import call_command
    from django_celery_beat.models import PeriodicTask

    from monitoring.management.commands.backup_scheduler import SYSTEM_TASKS

    if PeriodicTask.objects.filter(name=SYSTEM_TASKS[0][0]).exists():
        say("schedules: set up already (manage.py backup_scheduler --status lists them)")
        return
    out = io.StringIO()
    call_command("backup_scheduler", "--setup", stdout=out)
    for line in out.getvalue().splitlines():
        say(f"schedules: {line}")


def ensure_admin(reset_hint: str) -> str | None:
    """The new admin's password, or None when an admin exists."""
    from django.contrib.auth import get_user_model
    from django.db import transaction

    import audit

    User = get_user_model()
    if User.objects.filter(username="admin").exists():
        say(f"admin: user admin exists; forgot its password? {reset_hint}")
        return None
    password = secrets.token_urlsafe(12)
    with transaction.atomic():
        user = User.objects.create_superuser("admin", email="", password=password)
        audit.record(audit.cli_actor(), "config.user.created", user,
                     details={"username": "admin", "superuser": True, "by": "devstack"})
    say("admin: created superuser admin (password shown once the web server answers)")
    return password


# -- children ------------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    argv: list[str]
    stop_timeout: float
    proc: subprocess.Popen | None = None
    reader: threading.Thread | None = None


def _die_with_parent(parent: int):
    def hook():
        # If devstack is killed outright, its children get SIGTERM instead of living on.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def _pump(child: Child) -> None:
    for raw in iter(child.proc.stdout.readline, b""):
        emit(child.name, raw.decode(errors="replace").rstrip("\r\n"))


def start_children(children: list[Child], env: dict) -> None:
    hook = _die_with_parent(os.getpid())
    for c in children:
        # Own process group: a Ctrl-C in the terminal reaches only devstack, which then stops
        # the children in order instead of all at once.
        c.proc = subprocess.Popen(c.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, process_group=0, preexec_fn=hook)
        say(f"{c.name}: started (pid {c.proc.pid})")
    # Readers start after the last fork: preexec_fn and running threads do not mix well.
    for c in children:
        c.reader = threading.Thread(target=_pump, args=(c,), name=f"pump-{c.name}", daemon=True)
        c.reader.start()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_child(c: Child, hurry: threading.Event) -> None:
    if c.proc is None:
        return
    if c.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + c.stop_timeout
        while c.proc.poll() is None and time.monotonic() < deadline and not hurry.is_set():
            time.sleep(0.1)
        if c.proc.poll() is None:
            say(f"{c.name}: did not stop{'' if hurry.is_set() else f' within {c.stop_timeout:.0f}s'}; killing it")
    # Also whatever it forked (gunicorn workers, celery pool processes) and left behind.
    if _group_alive(c.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.proc.pid, signal.SIGKILL)
    c.proc.wait()
    if c.reader:
        c.reader.join(timeout=2)
    say(f"{c.name}: stopped")


def web_answers(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(f"http://127.0.0.1:{port}/admin/login/", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


# -- cleanup, lock, state -------------------------------------------------------------------------------
@dataclass
class Cleanup:
    """What this run started, stopped in reverse order at the end."""

    items: list = field(default_factory=list)

    def push(self, label: str, fn) -> None:
        self.items.append((label, fn))

    def unwind(self) -> None:
        while self.items:
            label, fn = self.items.pop()
            try:
                fn()
                say(f"stopped {label}")
            except Exception as exc:  # keep stopping the rest
                say(f"could not stop {label}: {exc}")


def acquire_lock() -> int:
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DevstackError(f"another `devstack.py run` (pid {lock_holder() or '?'}) is using {rel(VAR)}; "
                            "stop it first (Ctrl-C in its terminal, or scripts/devstack.py stop)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_holder() -> int | None:
    """The pid of a running `devstack.py run` on this var/, if any."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        with contextlib.suppress(ValueError):
            return int(os.read(fd, 32).decode().strip())
        return 0
    finally:
        os.close(fd)


def read_state() -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(STATE_FILE.read_text())
    return {}


def devstack_env(database_url: str | None, broker_url: str | None, port: int) -> dict:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "bankvault.settings")
    if database_url:
        env["DATABASE_URL"] = database_url
    if broker_url:
        env["CELERY_BROKER_URL"] = broker_url
    env["BANKVAULT_VAR_DIR"] = str(VAR)
    env.setdefault("BANKVAULT_REPOSITORY", str(VAR / "repository"))
    env.setdefault("BANKVAULT_BASE_URL", f"http://127.0.0.1:{port}")
    env["PYTHONUNBUFFERED"] = "1"  # children's lines show up as they happen
    return env


# -- commands ---------------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    for tool in ("gunicorn", "celery"):
        if not (BIN / tool).exists():
            raise DevstackError(f"{BIN / tool} is missing; run `make setup` (or `make run`) first")
    if not VAR.exists():
        mkdir_traversable(VAR)
    lock_fd = acquire_lock()  # noqa: F841 (held until we exit)
    say(f"var: {VAR}")

    stop = threading.Event()
    hurry = threading.Event()
    supervising = False

    def on_signal(signum, frame):
        if stop.is_set():
            hurry.set()  # a second Ctrl-C: kill instead of waiting
            return
        stop.set()
        if not supervising:
            raise Interrupted()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    stack = Cleanup()
    children: list[Child] = []
    status = 0
    try:
        _require_free_web_port(args.port)  # before anything is started, not after a minute
        broker_url = ensure_redis(stack)
        root, why = pg_root()
        if why:
            say(f"note: {why}; the clusters live in {root}")
        mkdir_traversable(root)
        database_url = ensure_portal_db(stack, root)
        sandboxes = ensure_sandboxes(stack, root)
        STATE_FILE.write_text(json.dumps({"database_url": database_url, "broker_url": broker_url,
                                          "web_port": args.port, "pg_root": str(root)}, indent=2))
        env = devstack_env(database_url, broker_url, args.port)

        django_setup(env)
        migrate()
        collectstatic()
        register_sandboxes(sandboxes)
        admin_password = ensure_admin(reset_hint=manage_hint("changepassword admin"))
        from django.db import connections

        connections.close_all()  # the parent keeps no connection while it supervises

        _require_free_web_port(args.port)  # again: something may have taken it meanwhile
        children = [
            Child("web", [str(BIN / "gunicorn"), "bankvault.wsgi:application", "--bind", f"127.0.0.1:{args.port}",
                          "--config", str(ROOT / "gunicorn.conf.py"),
                          # devstack supervises it; the socket would land in ~/.gunicorn
                          "--no-control-socket"], stop_timeout=15),
            # Two workers, so a long backup never delays a restore or a health check.
            Child("worker", [str(BIN / "celery"), "-A", "bankvault", "worker", "--loglevel", "INFO",
                             "--concurrency", "2", "-Q", "backups,wal", "--hostname", "backups@%h"],
                  stop_timeout=30),
            Child("worker-restores", [str(BIN / "celery"), "-A", "bankvault", "worker", "--loglevel", "INFO",
                                      "--concurrency", "2", "-Q", "restores,checks,celery",
                                      "--hostname", "restores@%h"], stop_timeout=30),
            Child("beat", [str(BIN / "celery"), "-A", "bankvault", "beat", "--loglevel", "INFO",
                           "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
                           "--schedule", str(VAR / "celerybeat-schedule")], stop_timeout=10),
        ]
        supervising = True
        if stop.is_set():
            raise Interrupted()
        start_children(children, env)
        status = supervise(children, stop, args.port, admin_password)
    except Interrupted:
        say("interrupted; stopping what was started")
        status = 130
    except (DevstackError, ClusterError, pgbin.BinaryNotFound) as exc:
        say(f"error: {exc}")
        status = 1
    except Exception:
        traceback.print_exc()
        say("error: the set-up failed unexpectedly (traceback above); stopping what was started")
        status = 1
    finally:
        supervising = True  # from here on a signal only hurries the shutdown
        stop.set()
        for c in reversed(children):  # beat, worker, web
            stop_child(c, hurry)
        stack.unwind()
        _say_left_running()
    return status


def _require_free_web_port(port: int) -> None:
    if port_answers(port):
        raise DevstackError(f"port {port} is in use by {port_owner(port)}; stop it, or run "
                            f"`{rel(Path(sys.executable))} scripts/devstack.py run --port {port + 1}`")


def supervise(children: list[Child], stop: threading.Event, port: int, admin_password: str | None) -> int:
    started = time.monotonic()
    ready = warned = False
    while not stop.is_set():
        for c in children:
            rc = c.proc.poll()
            if rc is not None:
                how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
                say(f"{c.name} {how} unexpectedly; see its lines above. Stopping the others.")
                if admin_password:
                    _print_admin(port, admin_password)  # it was created; do not lose it
                return 1
        if not ready and web_answers(port):
            ready = True
            say(f"ready in {time.monotonic() - started:.1f}s: http://127.0.0.1:{port}/  (Ctrl-C stops everything)")
            if admin_password:
                _print_admin(port, admin_password)
                admin_password = None
        elif not ready and not warned and time.monotonic() - started > 60:
            warned = True
            say(f"web does not answer on http://127.0.0.1:{port}/admin/login/ after 60s; still waiting")
        stop.wait(0.3)
    say("stopping (Ctrl-C again to kill instead of waiting)")
    if admin_password:
        _print_admin(port, admin_password)
    return 0


def _print_admin(port: int, password: str) -> None:
    boxed([
        "bankvault admin (the password is shown only this once)",
        "",
        f"URL:      http://127.0.0.1:{port}/admin/",
        "user:     admin",
        f"password: {password}",
        "",
        f"later: {manage_hint('changepassword admin')}",
    ])


def manage_hint(args: str) -> str:
    return f"{rel(Path(sys.executable))} scripts/devstack.py manage {args}"


def _say_left_running() -> None:
    left = [f"{name} cluster" for name, base in _clusters() if _pid_alive(base)]
    if _our_redis_pid():
        left.append("redis-server in var/redis")
    if left:
        say(f"left running (they were running before): {', '.join(left)}; scripts/devstack.py stop stops them")


def _clusters() -> list[tuple[str, Path]]:
    """(name, base) of every cluster in var/pg and in the /var/tmp fallback."""
    found = []
    for root in (VAR / "pg", fallback_pg_root()):
        if root.is_dir():
            found += [(d.name, d) for d in sorted(root.iterdir()) if (d / "data" / "PG_VERSION").exists()]
    return found


def _pid_alive(base: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((base / "data" / "postmaster.pid").read_text().splitlines()[0])
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def cmd_stop(args) -> int:
    holder = lock_holder()
    if holder:
        # A `run` stops its own children and services in order; ask it to.
        say(f"asking the running `devstack.py run` (pid {holder}) to stop")
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while lock_holder() and time.monotonic() < deadline:
            time.sleep(0.2)
        if lock_holder():
            say(f"pid {holder} is still running; stopping the clusters anyway")
        else:
            say(f"pid {holder} has stopped, and with it what it had started")
    status = stopped = 0
    for name, base in _clusters():
        if not _pid_alive(base):
            continue
        try:
            existing_cluster(base, _pidfile_port(base) or 0).stop()
            say(f"stopped the {name} cluster ({base})")
            stopped += 1
        except (ClusterError, pgbin.BinaryNotFound) as exc:
            say(f"could not stop the {name} cluster in {base}: {exc}")
            status = 1
    pid = _stop_our_redis()
    if pid:
        say(f"stopped redis (pid {pid})")
    if not (holder or stopped or pid or status):
        say("nothing of devstack's was running")
    return status


def cmd_status(args) -> int:
    holder = lock_holder()
    state = read_state()
    say(f"devstack run: {f'running (pid {holder})' if holder else 'not running'}")
    broker = state.get("broker_url")
    if broker:
        port = int(re.search(r":(\d+)/", broker).group(1))
        say(f"broker: {broker} {'answers' if redis_answers(port) else 'does not answer'}")
    else:
        say("broker: CELERY_BROKER_URL from the environment / not set up yet")
    ours = _our_redis_pid()
    if ours:
        say(f"redis: devstack's redis-server runs (pid {ours}, {rel(REDIS_DIR)})")
    say(f"portal db: {state.get('database_url') or 'DATABASE_URL from the environment / not set up yet'}")
    clusters = dict(_clusters())
    for name in ("portal", *SERVICES):
        base = clusters.get(name)
        if base is None:
            say(f"{name} cluster: not created")
            continue
        running = f"running on port {_pidfile_port(base)}" if _pid_alive(base) else "stopped"
        say(f"{name} cluster: {running} ({rel(base)})")
    port = state.get("web_port", WEB_PORT)
    say(f"web: http://127.0.0.1:{port}/ {'answers' if web_answers(port) else 'does not answer'}")
    return 0


def cmd_manage(args) -> int:
    """manage.py with the URLs the last `run` chose (the portal database may be var/pg's)."""
    state = read_state()
    env = devstack_env(state.get("database_url") if not os.environ.get("DATABASE_URL") else None,
                       state.get("broker_url") if not os.environ.get("CELERY_BROKER_URL") else None,
                       state.get("web_port", WEB_PORT))
    argv = [sys.executable, str(ROOT / "manage.py"), *args.args]
    return subprocess.run(argv, cwd=ROOT, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devstack.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="set up and run the stack in the foreground (make run)")
    run.add_argument("--port", type=int, default=WEB_PORT, help=f"web server port (default {WEB_PORT})")
    sub.add_parser("stop", help="stop the clusters in var/pg and a Redis devstack started")
    sub.add_parser("status", help="print what runs")
    manage = sub.add_parser("manage", help="run manage.py with the devstack environment")
    manage.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        return {"run": cmd_run, "stop": cmd_stop, "status": cmd_status, "manage": cmd_manage}[args.command](args)
    except (DevstackError, ClusterError, pgbin.BinaryNotFound) as exc:
        say(f"error: {exc}")
        return 1
    except PermissionError as exc:
        say(f"error: {exc}; was var/ created by another user (e.g. root)? "
            f"run as that user, or remove {rel(VAR)} (make clean-var)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
