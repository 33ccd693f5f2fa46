"""Register and inspect target databases from scripts.

    manage.py databases add NAME --host H --port P --dbname D --user U --password-env VAR [--sslmode M]
    manage.py databases set-password NAME --password-env VAR [--user U] [--no-check]
    manage.py databases list [--json]
    manage.py databases check NAME [--wal]
    manage.py databases archive-command NAME
    manage.py databases wal-mode NAME none|archive|stream

The password is read from the named environment variable, never from argv (which any user on
the host can read in /proc)."""

import json
import os

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

import audit
from backups.engine import gpg
from backups.engine import wal as walmod
from backups.engine.pgtools import BackupError
from backups.models import Database, SSLMode, WalMode
from backups.probe import describe_tls, probe


class Command(BaseCommand):
    help = "Register, list and check the PostgreSQL databases bankvault backs up."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="register a database (or update one with the same name)")
        add.add_argument("name")
        add.add_argument("--host", required=True)
        add.add_argument("--port", type=int, default=5432)
        add.add_argument("--dbname", required=True)
        add.add_argument("--user", required=True)
        add.add_argument("--password-env", metavar="VAR",
                         help="name of the environment variable holding the password")
        add.add_argument("--sslmode", choices=SSLMode.values, default=SSLMode.PREFER)
        add.add_argument("--wal-mode", choices=WalMode.values,
                         help="how WAL reaches the repository (default: unchanged, 'none' for a new database)")
        pw = sub.add_parser("set-password", help="give a registered database its password (e.g. after a rescan)")
        pw.add_argument("name")
        pw.add_argument("--password-env", metavar="VAR", required=True,
                        help="name of the environment variable holding the password")
        pw.add_argument("--user", help="the role bankvault connects as (default: unchanged)")
        pw.add_argument("--no-check", action="store_true",
                        help="store it without first connecting with it (the server is down)")
        lst = sub.add_parser("list", help="list registered databases")
        lst.add_argument("--json", action="store_true")
        chk = sub.add_parser("check", help="connect and print the server version and size")
        chk.add_argument("name")
        chk.add_argument("--wal", action="store_true",
                         help="also force a WAL switch and confirm the segment reaches the repository")
        chk.add_argument("--timeout", type=float, default=60, help="seconds to wait for the segment (--wal)")
        arc = sub.add_parser("archive-command", help="print the archive_command/restore_command for a database")
        arc.add_argument("name")
        arc.add_argument("--os-user", default="postgres",
                         help="the database server's OS user, who must write the WAL area (default postgres)")
        mode = sub.add_parser("wal-mode", help="set how WAL reaches the repository")
        mode.add_argument("name")
        mode.add_argument("mode", choices=WalMode.values)

    def handle(self, *args, action, **opts):
        return getattr(self, f"do_{action.replace('-', '_')}")(**opts)

    def do_add(self, name, host, port, dbname, user, password_env, sslmode, wal_mode=None, **_):
        password = ""
        if password_env:
            if password_env not in os.environ:
                raise CommandError(f"environment variable {password_env} is not set")
            password = os.environ[password_env]
        db = Database.objects.filter(name=name).first()
        created = db is None
        before = None if created else db.audit_fields()
        db = db or Database(name=name)
        db.host, db.port, db.dbname, db.user, db.sslmode = host, port, dbname, user, sslmode
        if wal_mode:
            db.wal_mode = wal_mode
        if password:
            db.set_password(password)
            db.needs_credentials = False
        try:
            db.full_clean()
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
        with transaction.atomic():
            db.save()
            audit.record(audit.cli_actor(), f"config.database.{'created' if created else 'changed'}", db,
                         details={"changes": audit.diff(before, db.audit_fields())})
        self.stdout.write(f"{'registered' if created else 'updated'} {db.name} ({db.host}:{db.port}/{db.dbname})")

    def do_set_password(self, name, password_env, user=None, no_check=False, **_):
        db = _get(name)
        if password_env not in os.environ:
            raise CommandError(f"environment variable {password_env} is not set")
        password = os.environ[password_env]
        if not password:
            raise CommandError(f"environment variable {password_env} is empty")
        before = db.audit_fields()
        if user:
            db.user = user
        db.set_password(password)
        if not no_check:
            # Prove it before storing it: a wrong password found at 02:00 is a missed backup.
            try:
                probe(db)
            except BackupError as exc:
                raise CommandError(f"{db.name}: the password was NOT stored: {exc.message} "
                                   "(--no-check stores it without connecting)") from None
        db.needs_credentials = False
        with transaction.atomic():
            db.save(update_fields=["user", "password_encrypted", "needs_credentials", "updated_at"])
            audit.record(audit.cli_actor(), "config.database.changed", db,
                         details={"changes": audit.diff(before, db.audit_fields()), "checked": not no_check})
        self.stdout.write(f"{db.name}: password stored{'' if no_check else ' (connected with it)'}; "
                          "backups of it can run")

    def do_list(self, json: bool = False, **_):
        rows = [{"name": d.name, "host": d.host, "port": d.port, "dbname": d.dbname, "user": d.user,
                 "sslmode": d.sslmode, "has_password": d.has_password, "needs_credentials": d.needs_credentials}
                for d in Database.objects.all()]
        if json:
            self.stdout.write(_json(rows))
            return
        if not rows:
            self.stdout.write("no databases registered")
        for r in rows:
            self.stdout.write(f"{r['name']:<16} {r['host']}:{r['port']}/{r['dbname']} user={r['user']} "
                              f"sslmode={r['sslmode']}{'' if r['has_password'] else ' (no password)'}"
                              f"{' NEEDS CREDENTIALS (databases set-password)' if r['needs_credentials'] else ''}")

    def do_check(self, name, wal=False, timeout=60, **_):
        db = _get(name)
        try:
            info = probe(db)
        except BackupError as exc:
            audit.record(audit.cli_actor(), "database.checked", db, outcome="failure", details={"error": exc.message})
            raise CommandError(f"{db.name}: {exc.message}") from None
        audit.record(audit.cli_actor(), "database.checked", db, details=info)
        self.stdout.write(f"{db.name}: PostgreSQL {info['server_version']}, size {info['size_pretty']} "
                          f"({info['size_bytes']} bytes){' (standby)' if info['in_recovery'] else ''}")
        self.stdout.write(f"{db.name}: {describe_tls(info['tls'])}")
        if not wal:
            return
        if db.wal_mode == WalMode.NONE:
            raise CommandError(f"{db.name}: WAL archiving is not set up (WAL mode 'none'); see "
                               f"`manage.py databases archive-command {db.name}`")
        result = walmod.check_and_record(db, audit.cli_actor(), timeout=timeout)
        if not result["ok"]:
            raise CommandError(f"{db.name}: WAL check FAILED: {result['error']}")
        self.stdout.write(f"{db.name}: WAL OK, segment {result['segment']} reached the repository "
                          f"in {result['seconds']:.2f}s")

    def do_archive_command(self, name, os_user, **_):
        db = _get(name)
        keys = gpg.database_keys(db)
        if keys:
            # The public keys the server's archive_command encrypts to, checked like a backup's.
            try:
                keys_dir = gpg.install_wal_keys(keys)
            except gpg.GpgError as exc:
                raise CommandError(f"{db.name}: WAL is to be encrypted, but {exc.message}") from None
            audit.record(audit.cli_actor(), "config.wal.keys_installed", db,
                         details={"fingerprints": [k.fingerprint for k in keys], "directory": str(keys_dir)})
        script = walmod.install_push_script()
        area = walmod.prepare_area(db, os_user=os_user)
        self.stdout.write(f"# {db.name}: put these into the server's postgresql.conf (or ALTER SYSTEM SET ...),")
        self.stdout.write("# then restart the server if archive_mode was off. The WAL area must stay writable by")
        self.stdout.write(f"# the server's OS user ({os_user}); the script needs only {walmod.python_for_server()}.")
        self.stdout.write("archive_mode = on")
        self.stdout.write(f"archive_command = {walmod.conf_quote(walmod.archive_command(db))}")
        self.stdout.write("archive_timeout = 60")
        self.stdout.write("# for reference (bankvault's recovery writes its own):")
        self.stdout.write(f"restore_command = {walmod.conf_quote(walmod.restore_command(db))}")
        self.stdout.write(f"# WAL area: {area}   script: {script}")
        if keys:
            self.stdout.write(f"# WAL segments are encrypted to {', '.join(k.fingerprint for k in keys)} (public keys "
                              f"in {keys_dir}). Run this again, and apply the new archive_command, whenever the")
            self.stdout.write("# keys of the database's policies change. The restore_command above cannot decrypt: "
                              "bankvault's recovery decrypts WAL in its worker.")
        if db.wal_mode != WalMode.ARCHIVE:
            self.stdout.write(f"# note: {db.name} is in WAL mode {db.wal_mode!r}; set it with "
                              f"`manage.py databases wal-mode {db.name} archive`")

    def do_wal_mode(self, name, mode, **_):
        db = _get(name)
        before = db.audit_fields()
        db.wal_mode = mode
        with transaction.atomic():
            db.save(update_fields=["wal_mode", "updated_at"])
            audit.record(audit.cli_actor(), "config.database.changed", db,
                         details={"changes": audit.diff(before, db.audit_fields())})
        self.stdout.write(f"{db.name}: WAL mode {mode}")


def _get(name: str) -> Database:
    try:
        return Database.objects.get(name=name)
    except Database.DoesNotExist:
        known = ", ".join(Database.objects.values_list("name", flat=True)) or "none"
        raise CommandError(f"no database named {name!r} is registered (registered: {known})") from None


def _json(value) -> str:
    return json.dumps(value, indent=2, default=str)
