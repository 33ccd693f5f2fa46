"""Scratch PostgreSQL clusters on loopback: for tests, benchmarks, the local sandbox, and the
clusters that point-in-time recovery and restore drills start.

initdb and postgres refuse to run as root. When we are root the server runs as an
unprivileged OS user (``postgres`` by default) through ``runuser``, in a directory that user
owns; otherwise it runs as ourselves.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import pgbin

DEFAULT_OS_USER = "postgres"


class ClusterError(Exception):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def _running_as_root() -> bool:
    return os.geteuid() == 0


def as_user_argv(argv: list[str], os_user: str | None) -> list[str]:
    """Prefix argv so it runs as ``os_user`` when we are root (postgres refuses root)."""
    if _running_as_root() and os_user:
        return ["runuser", "-u", os_user, "--", *argv]
    return argv


def chown_tree(path: Path, os_user: str | None) -> None:
    if not (_running_as_root() and os_user):
        return
    pw = pwd.getpwnam(os_user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


def make_owned_dir(prefix: str, os_user: str | None = DEFAULT_OS_USER, parent: str | None = None) -> Path:
    """A fresh temp directory owned by the server's OS user."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    chown_tree(path, os_user)
    return path


@dataclass
class LocalCluster:
    """A PostgreSQL cluster in ``base`` (data in ``base/data``), listening on 127.0.0.1:port only."""

    base: Path
    port: int
    os_user: str | None = DEFAULT_OS_USER
    bindir: Path = field(default_factory=pgbin.server_bindir)
    superuser: str = "postgres"

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base

    @property
    def logfile(self) -> Path:
        return self.base / "server.log"

    # -- creation -----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        base: Path | None = None,
        port: int | None = None,
        *,
        os_user: str | None = DEFAULT_OS_USER,
        settings: dict | None = None,
        tcp_auth: str = "trust",
        throwaway: bool = False,
        data_checksums: bool = True,
    ) -> LocalCluster:
        """initdb a new cluster. ``tcp_auth`` is the pg_hba method for 127.0.0.1
        (``scram-sha-256`` to make clients prove a password); the Unix socket in ``base`` is
        always trust for the OS user, which is how this code administers it. ``throwaway``
        turns fsync off: only for clusters whose data nobody will miss."""
        if not _running_as_root():
            os_user = None
        if base is None:
            base = make_owned_dir("bv-pg-", os_user)
        else:
            base.mkdir(parents=True, exist_ok=True)
            chown_tree(base, os_user)
        cluster = cls(base=base, port=port or free_port(), os_user=os_user)
        argv = [
            str(cluster.bindir / "initdb"),
            "-D", str(cluster.datadir),
            "-U", cluster.superuser,
            "--auth-local=trust",
            f"--auth-host={tcp_auth}",
            "-E", "UTF8",
            "--locale=C.UTF-8",
        ]
        if data_checksums:
            argv.append("--data-checksums")
        if throwaway:
            argv.append("--no-sync")
        cluster._run(argv, timeout=120)
        conf = {
            "listen_addresses": "127.0.0.1",
            "port": cluster.port,
            "unix_socket_directories": str(cluster.socket_dir),
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "shared_buffers": "128MB",
            "max_connections": 100,
            "log_min_messages": "warning",
        }
        if throwaway:
            conf.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        conf.update(settings or {})
        cluster.write_conf(conf)
        # Loopback only, for everything including replication (pg_basebackup, pg_receivewal).
        hba = (
            f"local all all trust\n"
            f"local replication all trust\n"
            f"host all all 127.0.0.1/32 {tcp_auth}\n"
            f"host replication all 127.0.0.1/32 {tcp_auth}\n"
        )
        cluster._write_owned(cluster.datadir / "pg_hba.conf", hba)
        return cluster

    def write_conf(self, settings: dict) -> None:
        """Append settings to postgresql.auto.conf (later lines win)."""
        lines = "".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items())
        path = self.datadir / "postgresql.auto.conf"
        existing = path.read_text() if path.exists() else ""
        self._write_owned(path, existing + lines)

    def _write_owned(self, path: Path, text: str) -> None:
        path.write_text(text)
        if _running_as_root() and self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        path.chmod(0o600)

    # -- lifecycle ----------------------------------------------------------------------
    def _run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            as_user_argv(argv, self.os_user),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )
        if proc.returncode != 0:
            raise ClusterError(
                f"{Path(argv[0]).name} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc

    def start(self, timeout: int = 60) -> None:
        try:
            self._run(
                [
                    str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                    "-w", "-t", str(timeout), "start",
                ],
                timeout=timeout + 10,
            )
        except ClusterError as exc:
            raise ClusterError(f"{exc}\n--- server log ---\n{self.log_tail()}") from None

    def stop(self, mode: str = "fast", timeout: int = 60) -> None:
        if not self.is_running():
            return
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", str(timeout), "stop"],
            timeout=timeout + 10,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        pidfile = self.datadir / "postmaster.pid"
        if not pidfile.exists():
            return False
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            return False
        except PermissionError:
            return True
        return True

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(mode="immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # -- access ---------------------------------------------------------------------------
    def conninfo(self, dbname: str = "postgres", user: str | None = None, **extra) -> str:
        parts = {"host": "127.0.0.1", "port": self.port, "dbname": dbname, "user": user or self.superuser}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def url(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"postgres://{user or self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", autocommit: bool = True, **kw):
        """A superuser connection over the Unix socket (trust), whatever the TCP auth is."""
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, dbname=dbname, user=self.superuser,
            autocommit=autocommit, **kw,
        )

    def sql(self, statement: str, dbname: str = "postgres", params=None) -> list[tuple]:
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


def _conf_value(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
