"""The one wrapper through which bankvault runs pg tools and opens its own connections.

- argv lists only, never a shell string;
- the password goes into a 0600 passfile (PGPASSFILE) in a private directory, removed
  afterwards; never into argv, the environment's PGPASSWORD, or a log line;
- every run has a timeout;
- stderr is kept (minus secrets) and a failure becomes a BackupError whose message an operator
  can act on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class BackupError(Exception):
    """A failure with a message meant for an operator. ``detail`` carries tool output."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.message = message
        self.detail = detail


class DatabaseUnreachable(BackupError):
    pass


class AuthenticationFailed(BackupError):
    pass


class DatabaseMissing(BackupError):
    pass


class TlsRefused(BackupError):
    """TLS to the server could not be set up as the database's sslmode demands."""


class PermissionDenied(BackupError):
    pass


class ToolFailed(BackupError):
    pass


class LockTimeout(BackupError):
    pass


class ToolTimeout(BackupError):
    pass


# Bytes the engine's streams moved in this process: the Heartbeat's sign that a job is alive.
# Unlocked on purpose: a lost increment does not matter, only that the number changes.
_moved = [0]


def moved(n: int) -> None:
    """Count bytes a job's stream moved (called from the copy loops; cheap)."""
    _moved[0] += n


def moved_total() -> int:
    return _moved[0]


@dataclass
class ConnInfo:
    host: str
    port: int
    dbname: str
    user: str
    password: str = field(default="", repr=False)
    sslmode: str = "prefer"
    connect_timeout: int = 10

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname} as {self.user}"

    @property
    def sslrootcert(self) -> str:
        """The CA bundle that verifies the server in the verify-ca / verify-full modes
        (BANKVAULT_SSLROOTCERT), handed to psycopg and to every tool alike; "" leaves libpq's
        default, ~/.postgresql/root.crt of the user bankvault runs as."""
        if not self.sslmode.startswith("verify-"):
            return ""
        from django.conf import settings

        return str(getattr(settings, "BANKVAULT_SSLROOTCERT", "") or "")

    def connect_kwargs(self, dbname: str | None = None) -> dict:
        kw = dict(host=self.host, port=self.port, dbname=dbname or self.dbname, user=self.user,
                  sslmode=self.sslmode, connect_timeout=self.connect_timeout,
                  application_name="bankvault")
        if self.password:
            kw["password"] = self.password
        if self.sslrootcert:
            kw["sslrootcert"] = self.sslrootcert
        return kw

    def connect(self, dbname: str | None = None, **kw):
        """A psycopg connection; failures raise the same BackupErrors as the tools do."""
        import psycopg

        try:
            return psycopg.connect(**self.connect_kwargs(dbname), **kw)
        except psycopg.OperationalError as exc:
            raise classify(str(exc), self, tool="connection") from None

    @contextlib.contextmanager
    def tool_env(self) -> Iterator[dict]:
        """Environment for a pg tool: connection by PG* variables, password by passfile."""
        tmpdir = tempfile.mkdtemp(prefix="bv-pass-")
        try:
            os.chmod(tmpdir, 0o700)
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            env.update({
                "PGHOST": self.host, "PGPORT": str(self.port), "PGDATABASE": self.dbname,
                "PGUSER": self.user, "PGSSLMODE": self.sslmode,
                "PGCONNECT_TIMEOUT": str(self.connect_timeout), "PGAPPNAME": "bankvault",
                "LC_MESSAGES": "C",
            })
            if self.sslrootcert:
                env["PGSSLROOTCERT"] = self.sslrootcert
            passfile = Path(tmpdir) / "pgpass"
            fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                # Any database: pg_dumpall and restores connect to other databases too.
                f.write(f"{_pgpass_escape(self.host)}:{self.port}:*:{_pgpass_escape(self.user)}:"
                        f"{_pgpass_escape(self.password)}\n")
            env["PGPASSFILE"] = str(passfile)
            yield env
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


# -- error mapping -------------------------------------------------------------------------
_CA_BUNDLE = "the CA bundle (BANKVAULT_SSLROOTCERT; unset: ~/.postgresql/root.crt of the user bankvault runs as)"
_PATTERNS: list[tuple[re.Pattern, type[BackupError], str]] = [
    # TLS first: libpq words these as a failed connection, but nothing is wrong with the network.
    (re.compile(r"root certificate file .* does not exist", re.I), TlsRefused,
     "sslmode {sslmode} needs the CA certificate that signed the TLS certificate of {host}:{port}, and "
     + _CA_BUNDLE + " is missing; nothing was read from the server"),
    (re.compile(r"certificate verify failed|could not load root certificate|unable to get local issuer", re.I),
     TlsRefused,
     "the TLS certificate of {host}:{port} is not signed by a CA in " + _CA_BUNDLE + " ({reason}); "
     "bankvault did not talk to a server it cannot verify"),
    (re.compile(r"server certificate for .* does not match host name", re.I), TlsRefused,
     "the TLS certificate of {host}:{port} names another host ({reason}); register the database with "
     "a host name or address the certificate names (sslmode {sslmode} checks it)"),
    (re.compile(r"server does not support SSL, but SSL was required", re.I), TlsRefused,
     "the server at {host}:{port} does not offer TLS, but the database is registered with sslmode "
     "{sslmode}; enable ssl on the server or change the database's sslmode"),
    (re.compile(r"password authentication failed|no password supplied|"
                r"authentication failed for user|fe_sendauth", re.I),
     AuthenticationFailed,
     "the server at {host}:{port} rejected the credentials of user {user!r}; "
     "check the user and set the database's password again"),
    (re.compile(r'database "[^"]*" does not exist', re.I), DatabaseMissing,
     "database {dbname!r} does not exist on {host}:{port}; check the registered database name"),
    (re.compile(r'role "[^"]*" does not exist', re.I), AuthenticationFailed,
     "user {user!r} does not exist on {host}:{port}"),
    (re.compile(r"Connection refused|could not connect|could not translate host name|"
                r"timeout expired|No route to host|Network is unreachable|"
                r"server closed the connection unexpectedly|the database system is (starting up|shutting down)",
                re.I),
     DatabaseUnreachable,
     "cannot reach the database server at {host}:{port} ({reason}); is it running and "
     "reachable from this worker?"),
    # pg_dump --lock-wait-timeout shows up as a statement timeout on its LOCK TABLE.
    (re.compile(r"lock timeout|could not obtain lock|statement timeout.*Query was: LOCK TABLE", re.I | re.S),
     LockTimeout,
     "a table stayed locked by another session for longer than the backup may wait "
     "(BANKVAULT_LOCK_WAIT_TIMEOUT); look for long transactions or migrations on {dbname!r} ({reason})"),
    (re.compile(r"permission denied", re.I), PermissionDenied,
     "user {user!r} lacks a privilege the backup needs ({reason}); see the README's "
     "least-privilege backup role"),
]


def classify(stderr: str, conn: ConnInfo | None, tool: str, returncode: int | None = None) -> BackupError:
    text = scrub(stderr, conn)
    reason = _first_error_line(text)
    fmt = {"host": conn.host if conn else "?", "port": conn.port if conn else "?",
           "user": conn.user if conn else "?", "dbname": conn.dbname if conn else "?",
           "sslmode": conn.sslmode if conn else "?", "reason": reason}
    for pattern, cls, message in _PATTERNS:
        if pattern.search(text):
            return cls(message.format(**fmt), text)
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return ToolFailed(f"{tool} was killed by {name} before it finished", text)
    suffix = f" (exit {returncode})" if returncode is not None else ""
    return ToolFailed(f"{tool} failed{suffix}: {reason or 'no error output'}", text)


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if "error:" in line.lower() or "fatal:" in line.lower():
            return re.sub(r"^[\w_]+: (error|fatal): ", "", line, flags=re.I)[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def scrub(text: str, conn: ConnInfo | None) -> str:
    if conn and conn.password and text:
        text = text.replace(conn.password, "********")
    return text


# -- running tools ---------------------------------------------------------------------------
class StderrCollector:
    """Reads a process's stderr on a thread (so a chatty tool never blocks on a full pipe),
    keeps the tail, and hands each line to an optional callback (progress parsing)."""

    def __init__(self, stream, on_line=None, keep: int = 200):
        self._lines: deque[str] = deque(maxlen=keep)
        self._on_line = on_line
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self._lines.append(line)
            if self._on_line:
                try:
                    self._on_line(line)
                except Exception:  # progress must never break a backup
                    log.exception("progress callback failed")
        stream.close()

    def text(self, timeout: float = 5) -> str:
        self._thread.join(timeout)
        return "\n".join(self._lines)


# The tools this process has running: what a hung job's heartbeat stops (backups.liveness).
_active: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()


def track(proc: subprocess.Popen) -> subprocess.Popen:
    """Register a tool started elsewhere, so kill_active() reaches it too."""
    _active.add(proc)
    return proc


def kill_active() -> int:
    """Stop every tool this process still runs; returns how many were stopped."""
    n = 0
    for proc in list(_active):
        if proc.poll() is None:
            kill(proc)
            n += 1
    return n


def feed_stdin(proc: subprocess.Popen, chunk) -> None:
    """Write to a tool's stdin; a tool that stopped reading gets its stdin closed and no more
    (its exit status says why, for the caller to check)."""
    if proc.stdin.closed:
        return
    try:
        proc.stdin.write(chunk)
    except (BrokenPipeError, ValueError, OSError):
        close_stdin(proc)


def close_stdin(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.close()


def spawn(argv: list[str], env: dict, *, stdin=None, stdout=None,
          on_stderr_line=None) -> tuple[subprocess.Popen, StderrCollector]:
    """Start a tool with stderr collected on a thread. The caller owns stdout/stdin."""
    log.info("running %s", " ".join(argv))  # argv holds no secrets by construction
    proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                            start_new_session=True)
    track(proc)
    return proc, StderrCollector(proc.stderr, on_stderr_line)


def run(argv: list[str], conn: ConnInfo, *, timeout: float, tool: str | None = None,
        stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """Run a tool to completion; raise a BackupError on failure."""
    tool = tool or Path(argv[0]).name
    with conn.tool_env() as env:
        proc, err = spawn(argv, env, stdout=stdout)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            raise ToolTimeout(f"{tool} did not finish within {timeout:.0f}s and was stopped", err.text()) from None
    stderr = err.text()
    if proc.returncode != 0:
        raise classify(stderr, conn, tool, proc.returncode)
    return subprocess.CompletedProcess(argv, proc.returncode, out, scrub(stderr, conn))


def kill(proc: subprocess.Popen) -> None:
    """Stop a tool and everything it started (its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # not a session leader (a tool started without spawn())
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    except PermissionError:
        pass
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)
