"""Back up registered databases now, in this process (no worker needed).

    manage.py backup --database auth [--database account]
    manage.py backup --all

Prints archive id, path, size and sha256 of each dump; exits non-zero if any backup failed."""

from concurrent.futures import ThreadPoolExecutor

from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django.template.defaultfilters import filesizeformat

import audit
from backups.engine import runner
from backups.engine.pgtools import BackupError
from backups.models import BackupKind, BackupRun, Database


class Command(BaseCommand):
    help = "Back up one or more registered databases now."

    def add_arguments(self, parser):
        parser.add_argument("--database", action="append", default=[], metavar="NAME")
        parser.add_argument("--all", action="store_true", help="every registered database")
        parser.add_argument("--kind", choices=BackupKind.values, default=BackupKind.LOGICAL)
        parser.add_argument("--parallel", type=int, default=2, help="databases backed up at once (default 2)")

    def handle(self, *args, database, all, kind, parallel, **opts):
        if all == bool(database):
            raise CommandError("name databases with --database NAME, or use --all")
        if all:
            dbs = list(Database.objects.all())
        else:
            found = {d.name: d for d in Database.objects.filter(name__in=database)}
            missing = [n for n in database if n not in found]
            if missing:
                raise CommandError(f"not registered: {', '.join(missing)}")
            dbs = [found[n] for n in dict.fromkeys(database)]
        if not dbs:
            raise CommandError("no databases registered")
        actor = audit.cli_actor()
        runs = [BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label=actor, kind=kind) for db in dbs]

        def one_here(run):
            try:
                return run, runner.execute(run.pk), None
            except BackupError as exc:
                return run, None, exc.message

        def one(run):
            try:
                return one_here(run)
            finally:
                connections.close_all()

        failures = 0
        if len(runs) == 1 or parallel <= 1:
            results = [one_here(run) for run in runs]
        else:
            # Each thread has its own database connection, closed when it is done.
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                results = list(pool.map(one, runs))
        for run, archive, error in results:
            if error:
                failures += 1
                self.stderr.write(f"{run.database.name}: FAILED (run {run.pk}): {error}")
                continue
            main = archive.main_file
            self.stdout.write(
                f"{run.database.name}: archive {archive.pk} {archive.path} "
                f"{filesizeformat(archive.bytes)} ({archive.bytes} bytes) sha256 {main.sha256}")
        if failures:
            raise CommandError(f"{failures} of {len(runs)} backups failed")
