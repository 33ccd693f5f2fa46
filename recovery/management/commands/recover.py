"""Restores from the command line, with the old db-recovery.sh's names. Every form files a
restore REQUEST in the name of --user and prints its id and URL; nothing runs until other
people have approved it (dashboard or API).

    manage.py recover --list [--database NAME]
    manage.py recover --database auth --archive ARCHIVE_ID [--copy-as NAME] --user U --reason TEXT
    manage.py recover --full 20241205_020000 --user U --reason TEXT
    manage.py recover --pitr "2024-12-05 14:30:00" [--database NAME] [--copy-as NAME] --user U --reason TEXT
    manage.py recover --tables ledger.accounts [--tables ...] --database auth (--archive ID | --pitr TIME)
                      [--into-schema NAME] --user U --reason TEXT
    manage.py recover --rollback REQUEST_ID --user U --reason TEXT
    manage.py recover --interactive --user U
"""

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

import audit
from backups.engine import wal
from backups.models import Archive, BackupKind, Database
from recovery import services
from recovery.engine import pitr
from recovery.models import RestoreRequest, RuleViolation


class Command(BaseCommand):
    help = "List what can be restored, or file a restore request (which needs approvals)."

    def add_arguments(self, parser):
        parser.add_argument("--list", action="store_true", help="archives and restore points per database")
        parser.add_argument("--database", metavar="NAME")
        parser.add_argument("--archive", type=int, metavar="ARCHIVE_ID")
        parser.add_argument("--full", metavar="STAMP", help="every database from the archive set nearest STAMP")
        parser.add_argument("--pitr", metavar="TIME", help="point in time (ISO 8601, optional offset)")
        parser.add_argument("--timezone", help="zone for --pitr/--full without offset (default TIME_ZONE)")
        parser.add_argument("--tables", action="append", default=[], metavar="SCHEMA.TABLE")
        parser.add_argument("--into-schema", metavar="NAME", help="schema for --tables (default restored_<date>)")
        parser.add_argument("--copy-as", metavar="NAME", help="restore as a copy named NAME (live untouched)")
        parser.add_argument("--target-server", metavar="NAME", help="with --copy-as: a registered restore-test server")
        parser.add_argument("--rollback", type=int, metavar="REQUEST_ID", help="roll back a replace restore")
        parser.add_argument("--interactive", action="store_true", help="the old menu")
        parser.add_argument("--user", metavar="USERNAME", help="the portal user filing the request")
        parser.add_argument("--reason", help="why (required)")
        parser.add_argument("--ticket", default="", help="change ticket reference")

    def handle(self, *args, **o):
        if o["list"]:
            return self._list(o["database"])
        if o["interactive"]:
            return self._interactive(o)
        return self._file(o)

    # -- filing ------------------------------------------------------------------------------------
    def _user(self, username):
        if not username:
            raise CommandError("name the portal user filing the request with --user USERNAME")
        user = get_user_model().objects.filter(username=username).first()
        if user is None or not user.is_active:
            raise CommandError(f"no active portal user {username!r}")
        return user

    def _db(self, name, required=True):
        if not name:
            if required:
                raise CommandError("name the database with --database NAME")
            return None
        db = Database.objects.filter(name=name).first()
        if db is None:
            raise CommandError(f"no database named {name!r} is registered")
        return db

    def _time(self, text, tz):
        if text.strip().lower() == "latest":
            return None
        try:
            if tz:
                return pitr.parse_target(services.parse_stamp(text).replace(tzinfo=None).isoformat(), tz)
            return services.parse_stamp(text)
        except pitr.PitrError as exc:
            raise CommandError(exc.message) from None

    def _file(self, o):
        forms = [bool(o["archive"] and not o["tables"]), bool(o["full"]), bool(o["pitr"] and not o["tables"]),
                 bool(o["tables"]), bool(o["rollback"])]
        if sum(forms) != 1:
            raise CommandError("choose one of --archive, --full, --pitr, --tables or --rollback (or --list)")
        user = self._user(o["user"])
        copy = o["copy_as"] or ""
        fields = {"reason": o["reason"] or "", "change_ticket": o["ticket"],
                  "mode": RestoreRequest.Mode.COPY if copy else RestoreRequest.Mode.REPLACE, "new_name": copy}
        if o["target_server"]:
            fields["target_server"] = self._db(o["target_server"])
        if o["tables"]:
            fields.update(kind="tables", database=self._db(o["database"]), tables=o["tables"],
                          new_name=o["into_schema"] or "")
            if o["archive"]:
                fields["archive"] = Archive.objects.filter(pk=o["archive"]).first()
            elif o["pitr"]:
                fields["target_time"] = self._time(o["pitr"], o["timezone"])
                fields["latest"] = o["pitr"].strip().lower() == "latest"
        elif o["archive"]:
            archive = Archive.objects.filter(pk=o["archive"]).first()
            if archive is None:
                raise CommandError(f"no archive with id {o['archive']}")
            fields.update(kind="archive", archive=archive, database=self._db(o["database"], required=False))
        elif o["full"]:
            fields.update(kind="system", target_time=self._time(o["full"], o["timezone"]))
        elif o["pitr"]:
            fields.update(kind="pitr", target_time=self._time(o["pitr"], o["timezone"]),
                          latest=o["pitr"].strip().lower() == "latest",
                          database=self._db(o["database"], required=False))
        else:
            fields.update(kind="rollback", rollback_of=RestoreRequest.objects.filter(pk=o["rollback"]).first())
        self._submit(user, fields)

    def _submit(self, user, fields):
        try:
            req = services.file_request(user, via=f"cli ({audit.cli_actor()})", **fields)
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
        except RuleViolation as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"restore request {req.pk} filed ({req.get_kind_display()}, {req.mode}); "
                          f"it runs after {req.required_approvals} approvals by others")
        self.stdout.write(f"id: {req.pk}")
        self.stdout.write(f"url: {req.url()}")
        return req

    # -- the old menu ----------------------------------------------------------------------------------
    def _interactive(self, o):
        user = self._user(o["user"])
        dbs = list(Database.objects.order_by("name"))
        options = [(f"Restore {d.name.capitalize()} Service", ("one", d)) for d in dbs]
        options.append(("Restore " + ("Both" if len(dbs) == 2 else "All") + " Services", ("all", None)))
        options.append(("Point-in-Time Recovery", ("pitr", None)))
        options.append(("Exit", ("exit", None)))
        self.stdout.write("=== Recovery Options ===")
        for i, (label, _) in enumerate(options, 1):
            self.stdout.write(f"{i}. {label}")
        choice = input("Select an option: ").strip()
        if not choice.isdigit() or not 1 <= int(choice) <= len(options):
            raise CommandError(f"no option {choice!r}")
        what, db = options[int(choice) - 1][1]
        if what == "exit":
            return
        reason = o["reason"] or input("Reason (required): ").strip()
        fields = {"reason": reason, "change_ticket": o["ticket"], "mode": RestoreRequest.Mode.REPLACE}
        if what == "one":
            archive = Archive.objects.filter(database=db, kind=BackupKind.LOGICAL, state="complete") \
                .order_by("-started_at").first()
            if archive is None:
                raise CommandError(f"{db.name} has no complete archive")
            self.stdout.write(f"newest archive of {db.name}: #{archive.pk} {archive.path}")
            fields.update(kind="archive", archive=archive, database=db)
        elif what == "all":
            fields.update(kind="system", target_time=timezone.now())
        else:
            when = input("Point in time (e.g. 2024-12-05 14:30:00): ").strip()
            name = input("Database (empty = all): ").strip()
            fields.update(kind="pitr", target_time=self._time(when, o["timezone"]),
                          database=self._db(name, required=False))
        self._submit(user, fields)

    # -- listing -------------------------------------------------------------------------------------------
    def _list(self, name):
        dbs = Database.objects.all()
        if name:
            dbs = dbs.filter(name=name)
        for db in dbs:
            self.stdout.write(f"== {db.name} ({db.host}:{db.port}/{db.dbname}, WAL mode {db.wal_mode})")
            archives = Archive.objects.filter(database=db).order_by("-started_at")[:20]
            for a in archives:
                when = timezone.localtime(a.started_at).strftime("%Y%m%d_%H%M%S")
                self.stdout.write(f"   archive {a.pk:>5}  {when}  {a.kind:<8} {a.state:<15} "
                                  f"{filesizeformat(a.bytes):>10}  {a.path}")
            if not archives:
                self.stdout.write("   no archives")
            if db.wal_mode == "none" and not Archive.objects.filter(database=db, kind=BackupKind.BASE).exists():
                continue
            wal.refresh_catalog(db)
            for t in db.wal_timelines.all():
                gaps = f", GAPS: {', '.join(f'{a}..{b}' for a, b in t.gaps)}" if t.gaps else ""
                self.stdout.write(f"   WAL timeline {t.timeline}: {t.first_segment} .. {t.last_segment} "
                                  f"({t.segment_count} segments{gaps})")
            windows = wal.restore_windows(db)
            if not windows:
                self.stdout.write("   point in time: none (no complete base backup with its WAL)")
            for w in windows:
                gap = f"  (gap after: {w['gap_after']})" if w["gap_after"] else ""
                start = f"{timezone.localtime(w['from']):%Y-%m-%d %H:%M:%S}"
                if w["until"] < w["from"]:
                    self.stdout.write(f"   point in time: 'latest' (the state at {start}); later times once more "
                                      f"WAL is archived (timeline {w['timeline']}){gap}")
                    continue
                self.stdout.write(f"   point in time: {start} .. {timezone.localtime(w['until']):%Y-%m-%d %H:%M:%S}"
                                  f" and 'latest' (timeline {w['timeline']}){gap}")
