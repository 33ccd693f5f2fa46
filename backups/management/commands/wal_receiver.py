"""Streaming WAL archiving, as a long-running service:

    manage.py wal_receiver [--database NAME ...]

Runs one supervised pg_receivewal per database whose WAL mode is 'stream' (or the named
ones), restarts any that exit, moves finished segments into the repository, and picks up
databases added or switched to streaming while it runs. Stop it with SIGTERM or Ctrl-C."""

import logging
import signal
import time

from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from backups.engine.receiver import Receiver
from backups.models import Database, WalMode

log = logging.getLogger("backups.wal_receiver")


class Command(BaseCommand):
    help = "Stream WAL of every streaming-mode database into the repository (pg_receivewal, supervised)."

    def add_arguments(self, parser):
        parser.add_argument("--database", action="append", default=[], metavar="NAME")
        parser.add_argument("--interval", type=float, default=0.5, help="seconds between sweeps")

    def handle(self, *args, database, interval, **opts):
        stopping = []
        signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
        signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
        receivers: dict[int, Receiver] = {}
        last_reload = 0.0
        if database:
            missing = set(database) - set(Database.objects.filter(name__in=database).values_list("name", flat=True))
            if missing:
                raise CommandError(f"not registered: {', '.join(sorted(missing))}")
        self.stdout.write("wal_receiver: started")
        try:
            while not stopping:
                if time.monotonic() - last_reload > 10:
                    close_old_connections()
                    wanted = Database.objects.filter(wal_mode=WalMode.STREAM)
                    if database:
                        wanted = wanted.filter(name__in=database)
                    wanted = {d.pk: d for d in wanted}
                    for pk in set(receivers) - set(wanted):
                        receivers.pop(pk).stop()
                    for pk, db in wanted.items():
                        if pk not in receivers:
                            receivers[pk] = Receiver(db)
                    last_reload = time.monotonic()
                for receiver in receivers.values():
                    receiver.poll()
                time.sleep(interval)
        finally:
            for receiver in receivers.values():
                receiver.stop()
            self.stdout.write("wal_receiver: stopped")
