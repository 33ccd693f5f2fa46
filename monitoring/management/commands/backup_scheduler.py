"""The old backup-scheduler.sh, as schedules in the database (celery-beat) instead of cron.

    manage.py backup_scheduler --setup          default schedules (idempotent):
                                                daily full backup 02:00, weekly deep backup (base
                                                backup + deep verification) Sunday 01:00, monthly
                                                cleanup on the 1st at 03:00, health checks every 6 h,
                                                decrypt canary Saturday 04:30
    manage.py backup_scheduler --status         every beat schedule: active?, last and next run
    manage.py backup_scheduler --monitor        the text report: recent backups, sizes, schedules
    manage.py backup_scheduler --health-check   run the checks now; exit 0 when healthy, else 1
                                                with one line per failing check (a HEALTHCHECK)
"""

from datetime import timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Sum
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

import audit
from audit import context as audit_context
from backups.engine.pgtools import BackupError
from backups.models import BackupKind, BackupPolicy, BackupRun, Database, WalMode
from backups.probe import probe

from ... import alerts, health
from ...models import Status

SYSTEM_TASKS = [
    # (name, task, crontab fields or ("interval", seconds), expire seconds)
    ("bankvault: monthly cleanup", "backups.tasks.cleanup", {"minute": "0", "hour": "3", "day_of_month": "1"},
     6 * 3600),
    ("bankvault: health checks", "monitoring.tasks.run_health_checks", {"minute": "15", "hour": "*/6"}, 3 * 3600),
    ("bankvault: heartbeat", "monitoring.tasks.heartbeat", ("interval", 60), 50),
    # Encrypted archives: prove weekly that the workers' private key still opens the newest ones.
    ("bankvault: weekly decrypt canary", "monitoring.tasks.decrypt_canary",
     {"minute": "30", "hour": "4", "day_of_week": "6"}, 6 * 3600),
    ("bankvault: watchdog", "monitoring.tasks.watchdog", ("interval", 30), 25),
]


def crontab(**fields) -> CrontabSchedule:
    full = {"minute": "0", "hour": "*", "day_of_week": "*", "day_of_month": "*", "month_of_year": "*",
            "timezone": ZoneInfo(settings.TIME_ZONE), **fields}
    return CrontabSchedule.objects.filter(**full).first() or CrontabSchedule.objects.create(**full)


class Command(BaseCommand):
    help = "Set up, show and check bankvault's schedules (the old backup-scheduler.sh)."

    def add_arguments(self, parser):
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--setup", action="store_true")
        group.add_argument("--status", action="store_true")
        group.add_argument("--monitor", action="store_true")
        group.add_argument("--health-check", action="store_true")

    def handle(self, *args, **o):
        with audit_context.bind(actor=audit.cli_actor()):  # also for the beat entries' own events
            return self._handle(o)

    def _handle(self, o):
        if o["setup"]:
            return self.setup()
        if o["status"]:
            return self.status()
        if o["monitor"]:
            return self.monitor()
        return self.health_check()

    # -- --setup -----------------------------------------------------------------------------------
    def setup(self):
        actor = audit.cli_actor()
        with transaction.atomic():
            for db in Database.objects.order_by("name"):
                self._policy(db, "daily", BackupKind.LOGICAL, crontab(minute="0", hour="2"), actor)
                if db.wal_mode == WalMode.NONE:
                    self.stdout.write(f"{db.name}: no WAL archiving, so no weekly deep (base) backup; see "
                                      f"`manage.py databases archive-command {db.name}`")
                else:
                    self._policy(db, "weekly-deep", BackupKind.BASE, crontab(minute="0", hour="1", day_of_week="0"),
                                 actor, verify_deep=True)
            for name, task, when, expire in SYSTEM_TASKS:
                if isinstance(when, tuple):
                    every, _ = IntervalSchedule.objects.get_or_create(every=when[1], period="seconds")
                    schedule = {"interval": every, "crontab": None}
                else:
                    schedule = {"crontab": crontab(**when), "interval": None}
                _, created = PeriodicTask.objects.get_or_create(
                    name=name, defaults={"task": task, "expire_seconds": expire, **schedule})
                self.stdout.write(f"{'created' if created else 'exists '}  {name}")
        self.stdout.write("schedules are set up (celery-beat reads them from the database)")

    def _policy(self, db, name, kind, schedule, actor, **extra):
        if BackupPolicy.objects.filter(database=db, kind=kind).exists():
            self.stdout.write(f"exists   {db.name}: a {kind} policy")
            return
        policy = BackupPolicy.objects.create(database=db, name=name, kind=kind, schedule=schedule, **extra)
        audit.record(actor, "config.policy.created", policy,
                     details={"changes": audit.diff(None, policy.audit_fields())})
        self.stdout.write(f"created  {db.name}: {name} ({kind}, {schedule})")

    # -- --status ------------------------------------------------------------------------------------
    def status(self):
        for task in PeriodicTask.objects.select_related("crontab", "interval").order_by("name"):
            sched = task.crontab or task.interval
            state = "ACTIVE  " if task.enabled else "DISABLED"
            nxt = ""
            if task.enabled and sched is not None:
                remaining = sched.schedule.remaining_estimate(task.last_run_at or timezone.now())
                nxt = f"next {timezone.localtime(timezone.now() + max(remaining, timedelta(0))):%Y-%m-%d %H:%M}"
            last = f"last {timezone.localtime(task.last_run_at):%Y-%m-%d %H:%M}" if task.last_run_at else "never run"
            self.stdout.write(f"{state} {task.name:<40} {str(sched):<32} {last:<22} {nxt}")

    # -- --monitor -------------------------------------------------------------------------------------
    def monitor(self):
        self.stdout.write("=== Backup Status Report ===")
        self.stdout.write("Recent Backups (last 7 days):")
        since = timezone.now() - timedelta(days=7)
        runs = BackupRun.objects.filter(queued_at__gte=since).select_related("database").order_by("-queued_at")[:50]
        for run in runs:
            mark = {"succeeded": "✅", "failed": "❌"}.get(run.state, "⏳")
            archive = getattr(run, "archive", None) if run.state == "succeeded" else None
            what = archive.path if archive else run.error[:60] or run.state
            size = f" ({filesizeformat(run.bytes)})" if run.bytes else ""
            stamp = timezone.localtime(run.queued_at).strftime("%Y%m%d_%H%M%S")
            self.stdout.write(f"{mark} {run.database.name} {run.kind} {stamp} {what}{size}")
        if not runs:
            self.stdout.write("   none")
        self.stdout.write("")
        self.stdout.write("Database Sizes:")
        for db in Database.objects.order_by("name"):
            try:
                size = filesizeformat(probe(db)["size_bytes"])
            except BackupError as exc:
                size = f"unreachable ({exc.message[:60]})"
            stored = db.archives.aggregate(b=Sum("bytes"))["b"] or 0
            self.stdout.write(f"  {db.name}: {size}; archives in the repository: {filesizeformat(stored)}")
        self.stdout.write("")
        self.stdout.write("Backup Schedule:")
        for task in PeriodicTask.objects.select_related("crontab", "interval").order_by("name"):
            mark = "✅" if task.enabled else "⛔"
            self.stdout.write(f"{mark} {task.name}: {'ACTIVE' if task.enabled else 'DISABLED'} "
                              f"({task.crontab or task.interval})")

    # -- --health-check ------------------------------------------------------------------------------
    def health_check(self):
        results, changes = health.run_all()
        alerts.process(changes)
        bad = [r for r in results if r.status == Status.FAILING]
        for r in results:
            if r.status == Status.FAILING:
                self.stderr.write(f"FAILING {r.name} {r.target}: {r.summary}")
            elif r.status == Status.WARNING:
                self.stdout.write(f"WARNING {r.name} {r.target}: {r.summary}")
        if bad:
            raise CommandError(f"{len(bad)} check(s) failing")
        self.stdout.write(f"healthy: {len(results)} checks")
