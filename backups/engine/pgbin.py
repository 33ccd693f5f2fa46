"""Which PostgreSQL client/server binaries to run.

pg_dump refuses to dump a server newer than itself, and a dump made by an older pg_dump can
miss features of a newer server, so the rule (ARCHITECTURE, rules of the house) is: the newest
installed major that is >= the server's major. Debian installs each major side by side under
/usr/lib/postgresql/<major>/bin; an explicit directory can be configured instead.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

DEBIAN_ROOT = Path("/usr/lib/postgresql")


class BinaryNotFound(Exception):
    """No installed PostgreSQL tools can serve this server version."""


@dataclass(frozen=True)
class Installation:
    major: int
    bindir: Path

    def tool(self, name: str) -> str:
        return str(self.bindir / name)


def installed(root: Path = DEBIAN_ROOT, configured: str | None = None) -> list[Installation]:
    """Installed majors, newest first. A configured bindir, when given, is the only candidate."""
    if configured:
        bindir = Path(configured)
        return [Installation(_major_of(bindir), bindir)]
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.isdigit() and (entry / "bin" / "pg_dump").exists():
                found.append(Installation(int(entry.name), entry / "bin"))
    if not found:
        # Not Debian's layout: fall back to whatever is on PATH.
        pg_dump = shutil.which("pg_dump")
        if pg_dump:
            bindir = Path(pg_dump).resolve().parent
            found.append(Installation(_major_of(bindir), bindir))
    return sorted(found, key=lambda i: i.major, reverse=True)


def _major_of(bindir: Path) -> int:
    m = re.search(r"/(\d+)/bin/?$", str(bindir))
    if m:
        return int(m.group(1))
    import subprocess

    out = subprocess.run(
        [str(bindir / "pg_dump"), "--version"], capture_output=True, text=True, timeout=10
    ).stdout
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    if not m:
        raise BinaryNotFound(f"cannot tell the version of {bindir / 'pg_dump'}")
    return int(m.group(1))


def for_server(server_version_num: int | None = None) -> Installation:
    """The installation to use against a server (``server_version_num`` as in SHOW
    server_version_num, e.g. 150020); None picks the newest installed."""
    from django.conf import settings

    candidates = installed(configured=getattr(settings, "BANKVAULT_PG_BINDIR", None) or None)
    if not candidates:
        raise BinaryNotFound(
            "no PostgreSQL tools found: install postgresql-client (Debian: apt-get install "
            "postgresql-client-15) or set BANKVAULT_PG_BINDIR"
        )
    if server_version_num is None:
        return candidates[0]
    server_major = server_version_num // 10000
    usable = [c for c in candidates if c.major >= server_major]
    if not usable:
        have = ", ".join(str(c.major) for c in candidates)
        raise BinaryNotFound(
            f"the server runs PostgreSQL {server_major} but the newest installed tools are "
            f"{have}; install postgresql-client-{server_major} or newer"
        )
    return usable[0]


def server_bindir(major: int | None = None) -> Path:
    """Directory with initdb/pg_ctl/postgres for scratch clusters (tests, PITR, drills)."""
    for inst in installed(configured=os.environ.get("BANKVAULT_PG_BINDIR") or None):
        if (inst.bindir / "initdb").exists() and (major is None or inst.major == major):
            return inst.bindir
    raise BinaryNotFound(
        "no PostgreSQL server binaries (initdb) found"
        + (f" for major {major}" if major else "")
        + ": install postgresql-15 (Debian) or set BANKVAULT_PG_BINDIR"
    )
