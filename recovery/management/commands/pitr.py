"""Point-in-time recovery into a new cluster on this host (drills, investigations, and the
restore workflow's engine):

    manage.py pitr --database auth --target "2026-11-20 14:30:00" [--timezone Europe/Berlin] [--into-port 6543]
    manage.py pitr --database auth --target latest
    manage.py pitr --list
    manage.py pitr --destroy PORT

Prints the recovered cluster's connection string. The cluster keeps running (127.0.0.1 only,
the source's roles and passwords) until destroyed. Nothing touches the source database."""

import time

from django.core.management.base import BaseCommand, CommandError

import audit
from backups.engine.cluster import LocalCluster
from backups.models import Database
from recovery.engine import pitr


class Command(BaseCommand):
    help = "Recover a database to a point in time into a new local cluster."

    def add_arguments(self, parser):
        parser.add_argument("--database", metavar="NAME")
        parser.add_argument("--target", help="ISO 8601 time (optional fraction and offset) or 'latest'")
        parser.add_argument("--timezone", help="zone for a target without offset (default TIME_ZONE)")
        parser.add_argument("--into-port", type=int, help="port for the recovered cluster (default: a free one)")
        parser.add_argument("--timeline", type=int, help="recover along this timeline (default: the backup's)")
        parser.add_argument("--list", action="store_true", help="list recovered clusters on this host")
        parser.add_argument("--destroy", type=int, metavar="PORT", help="stop and remove a recovered cluster")

    def handle(self, *args, **o):
        if o["list"]:
            return self._list()
        if o["destroy"]:
            return self._destroy(o["destroy"])
        if not o["database"] or not o["target"]:
            raise CommandError("give --database NAME and --target TIME|latest (or --list / --destroy PORT)")
        db = Database.objects.filter(name=o["database"]).first()
        if db is None:
            raise CommandError(f"no database named {o['database']!r} is registered")
        actor = audit.cli_actor()
        try:
            target = pitr.parse_target(o["target"], o["timezone"])
            started = time.monotonic()
            rc = pitr.recover(db, target, port=o["into_port"], timeline=o["timeline"],
                              progress=lambda msg: self.stderr.write(f"{db.name}: {msg} ..."))
        except pitr.PitrError as exc:
            audit.record(actor, "recovery.pitr.failed", db, outcome="failure",
                         details={"target": o["target"], "error": exc.message})
            raise CommandError(f"{db.name}: {exc.message}") from None
        audit.record(actor, "recovery.pitr.succeeded", db, details={
            "target": target.isoformat() if target else "latest", "base_archive": rc.base.pk, "port": rc.port,
            "timeline": rc.timeline, "seconds": round(time.monotonic() - started, 3)})
        self.stdout.write(f"{db.name} recovered to {target.isoformat() if target else 'latest'} in "
                          f"{rc.seconds:.1f}s from base backup {rc.base.pk} ({rc.base.path})")
        self.stdout.write(f"connection: {rc.connection_string()}")
        self.stdout.write(f"data directory: {rc.datadir}")
        self.stdout.write(f"remove it with: manage.py pitr --destroy {rc.port}")

    def _clusters(self):
        root = pitr.scratch_root()
        for pidfile in sorted(root.glob("*/data/postmaster.pid")):
            lines = pidfile.read_text().splitlines()
            if len(lines) >= 4:
                yield int(lines[3]), pidfile.parent.parent

    def _list(self):
        found = False
        for port, base in self._clusters():
            found = True
            self.stdout.write(f"port {port}  {base}")
        if not found:
            self.stdout.write("no recovered clusters running")

    def _destroy(self, port):
        for p, base in self._clusters():
            if p == port:
                import os

                LocalCluster(base=base, port=port, os_user="postgres" if os.geteuid() == 0 else None).destroy()
                audit.record(audit.cli_actor(), "recovery.pitr.destroyed", ("cluster", port, str(base)))
                self.stdout.write(f"removed the recovered cluster on port {port} ({base})")
                return
        raise CommandError(f"no recovered cluster on port {port} (see --list)")
