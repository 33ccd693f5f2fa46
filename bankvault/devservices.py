"""Local services for `make run`, the test suite and the benchmarks: Redis and PostgreSQL
clusters on loopback, started here when nobody provides them and stopped by pid.

Production never imports this module."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backups.engine.cluster import free_port, port_answers, wait_until


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    directory: Path
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, port: int | None = None, directory: Path | None = None) -> RedisServer:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        directory = directory or Path(tempfile.mkdtemp(prefix="bv-redis-"))
        directory.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        pidfile = directory / "redis.pid"
        subprocess.run(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "yes", "--pidfile", str(pidfile), "--dir", str(directory),
             "--logfile", str(directory / "redis.log")],
            check=True, capture_output=True, timeout=30,
        )
        wait_until(lambda: redis_answers(port), 10, what=f"redis on port {port}")
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 5, what="redis pidfile"))
        return cls(port=port, directory=directory, pid=pid)

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.05)
            self.pid = None

    def restart(self) -> None:
        self.stop()
        fresh = RedisServer.start(self.port, self.directory)
        self.pid = fresh.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True


__all__ = ["RedisServer", "redis_answers", "free_port", "port_answers"]
