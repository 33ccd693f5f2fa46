"""What bankvault backs up (Database), how (BackupPolicy), each execution (BackupRun) and what
it produced (Archive and its files)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import IntegrityError, InterfaceError, OperationalError, connections, models, transaction
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask

import audit
from audit import context as audit_context

from . import crypto
from .engine.pgtools import ConnInfo

WORKER = "system:worker"  # the actor of what a worker does with a run


class StateError(Exception):
    """A transition was asked for from a state that does not allow it."""


class Compression(models.TextChoices):
    ZSTD = "zstd", "zstd"
    GZIP = "gzip", "gzip"
    NONE = "none", "none"


class SSLMode(models.TextChoices):
    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


class BackupKind(models.TextChoices):
    LOGICAL = "logical", "logical (pg_dump)"
    BASE = "base", "base backup (pg_basebackup)"


class WalMode(models.TextChoices):
    NONE = "none", "no WAL archiving"
    ARCHIVE = "archive", "archive_command (push per segment)"
    STREAM = "stream", "streaming (pg_receivewal)"


name_validator = RegexValidator(
    r"^[a-z][a-z0-9_-]{0,62}$",
    "Use lowercase letters, digits, '-' and '_', starting with a letter (max 63).",
)


class Database(models.Model):
    """A PostgreSQL database that bankvault backs up, named by its service ("auth").

    The password is stored encrypted (see backups.crypto) and is never shown back: forms take a
    new one or keep the old one."""

    name = models.CharField(max_length=63, unique=True, validators=[name_validator],
                            help_text="Service name, e.g. auth or account.")
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(default=5432, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    dbname = models.CharField("database name", max_length=63)
    user = models.CharField(max_length=63)
    password_encrypted = models.TextField(blank=True, editable=False)
    sslmode = models.CharField("SSL mode", max_length=12, choices=SSLMode.choices, default=SSLMode.PREFER)
    default_compression = models.CharField(
        max_length=8, choices=Compression.choices, default=Compression.ZSTD,
        help_text="Used by manual backups started without a policy.",
    )
    restore_user = models.CharField(
        max_length=63, blank=True,
        help_text="Role bankvault restores as on this server: needs CREATEDB, and to replace the live database "
                  "its ownership (or superuser). Empty = the backup user.")
    restore_password_encrypted = models.TextField(blank=True, editable=False)
    wal_mode = models.CharField(
        "WAL archiving", max_length=8, choices=WalMode.choices, default=WalMode.NONE,
        help_text="How WAL reaches the repository, for point-in-time recovery. "
                  "`manage.py databases archive-command NAME` prints the server settings.",
    )
    # Registered again from an archive's manifest by `repository rescan`: no password is ever in a
    # manifest, so someone must give it (databases set-password, or the admin) before the next backup.
    needs_credentials = models.BooleanField(default=False, editable=False)
    # The database's size at its newest good backup (shown on the dashboard without a query to it).
    last_size_bytes = models.BigIntegerField(null=True, blank=True, editable=False)
    # Learned from the server (databases check); needed to name and count WAL segments.
    wal_segment_size = models.BigIntegerField(default=16 * 1024 * 1024)
    system_identifier = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [
            ("run_backup", "Can start a backup"),
            ("check_database", "Can check a database connection"),
        ]

    def __str__(self):
        return self.name

    # The password never leaves this object except into a 0600 passfile (pgtools).
    def set_password(self, raw: str) -> None:
        self.password_encrypted = crypto.encrypt(raw)

    def get_password(self) -> str:
        return crypto.decrypt(self.password_encrypted)

    @property
    def has_password(self) -> bool:
        return bool(self.password_encrypted)

    def set_restore_password(self, raw: str) -> None:
        self.restore_password_encrypted = crypto.encrypt(raw)

    def restore_conninfo(self, dbname: str | None = None) -> ConnInfo:
        """Credentials for creating, renaming and filling databases on this server."""
        if not self.restore_user:
            info = self.conninfo()
        else:
            info = ConnInfo(host=self.host, port=self.port, dbname=self.dbname, user=self.restore_user,
                            password=crypto.decrypt(self.restore_password_encrypted), sslmode=self.sslmode,
                            connect_timeout=settings.BANKVAULT_CONNECT_TIMEOUT)
        if dbname:
            info.dbname = dbname
        return info

    def conninfo(self) -> ConnInfo:
        return ConnInfo(
            host=self.host, port=self.port, dbname=self.dbname, user=self.user,
            password=self.get_password(), sslmode=self.sslmode,
            connect_timeout=settings.BANKVAULT_CONNECT_TIMEOUT,
        )

    def audit_fields(self) -> dict:
        """The configuration as the audit trail sees it (password masked)."""
        return {
            "name": self.name, "host": self.host, "port": self.port, "dbname": self.dbname,
            "user": self.user, "sslmode": self.sslmode, "default_compression": self.default_compression,
            "wal_mode": self.wal_mode, "password": "********" if self.has_password else "",
            "restore_user": self.restore_user,
            "restore_password": "********" if self.restore_password_encrypted else "",
        }


class EncryptionKey(models.Model):
    """A GnuPG public key that archives can be encrypted to. Only the public half is stored here;
    the private key lives with the workers (BANKVAULT_GPG_HOME, passphrase from the environment),
    never in the database."""

    fingerprint = models.CharField(max_length=40, unique=True,
                                   validators=[RegexValidator(r"^[0-9A-F]{40}$", "40 upper-case hex digits")])
    owner = models.CharField(max_length=255, help_text="The key's user id, e.g. Backup Team <backup@bank.example>.")
    public_key = models.TextField(help_text="ASCII-armored public key.")
    expires_at = models.DateTimeField(null=True, blank=True)
    comment = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["owner", "fingerprint"]

    def __str__(self):
        return f"{self.owner} ({self.fingerprint[-16:]})"

    def audit_fields(self) -> dict:
        return {"fingerprint": self.fingerprint, "owner": self.owner,
                "expires_at": self.expires_at.isoformat() if self.expires_at else None, "comment": self.comment}


class RemoteRepository(models.Model):
    """A second place for archives: an S3-compatible bucket (prefix within it). The secret key is
    stored encrypted like the database passwords."""

    class Kind(models.TextChoices):
        S3 = "s3", "S3-compatible object storage"

    name = models.CharField(max_length=63, unique=True, validators=[name_validator])
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.S3)
    endpoint_url = models.URLField(blank=True, help_text="Empty = AWS; else e.g. https://s3.bank.example")
    region = models.CharField(max_length=64, blank=True)
    bucket = models.CharField(max_length=63)
    prefix = models.CharField(max_length=255, blank=True, help_text="Key prefix inside the bucket, e.g. bankvault/")
    access_key_id = models.CharField(max_length=128)
    secret_key_encrypted = models.TextField(blank=True, editable=False)
    storage_class = models.CharField(max_length=32, blank=True, help_text="Empty = the bucket's default.")
    # Lifecycle (optional): archives older than this many days move to archive_storage_class.
    archive_after_days = models.PositiveIntegerField(null=True, blank=True)
    archive_storage_class = models.CharField(max_length=32, blank=True)
    verify_tls = models.BooleanField(default=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "remote repositories"

    def __str__(self):
        return self.name

    def set_secret_key(self, raw: str) -> None:
        self.secret_key_encrypted = crypto.encrypt(raw)

    def get_secret_key(self) -> str:
        return crypto.decrypt(self.secret_key_encrypted)

    def audit_fields(self) -> dict:
        return {"name": self.name, "kind": self.kind, "endpoint_url": self.endpoint_url, "region": self.region,
                "bucket": self.bucket, "prefix": self.prefix, "access_key_id": self.access_key_id,
                "secret_key": "********" if self.secret_key_encrypted else "", "storage_class": self.storage_class,
                "archive_after_days": self.archive_after_days, "enabled": self.enabled}


class BackupPolicy(models.Model):
    """How and when a database is backed up. The policy owns a django-celery-beat
    PeriodicTask and keeps it in step whenever it is saved."""

    database = models.ForeignKey(Database, on_delete=models.CASCADE, related_name="policies")
    name = models.CharField(max_length=63, default="daily")
    kind = models.CharField(max_length=16, choices=BackupKind.choices, default=BackupKind.LOGICAL)
    schedule = models.ForeignKey(CrontabSchedule, on_delete=models.PROTECT,
                                 help_text="When celery-beat starts this policy.")
    plain_sql = models.BooleanField("plain SQL artifact", default=False,
                                    help_text="Also keep a plain SQL script derived from the dump.")
    schema_only = models.BooleanField("schema-only artifact", default=False)
    data_only = models.BooleanField("data-only artifact", default=False)
    compression = models.CharField(max_length=8, choices=Compression.choices, default=Compression.ZSTD)
    compression_level = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(19)],
        help_text="Empty = the algorithm's default (zstd 3, gzip 6).",
    )
    parallel_jobs = models.PositiveSmallIntegerField(
        default=2, validators=[MinValueValidator(1), MaxValueValidator(32)],
        help_text="Threads for compression, and parallel jobs for pg_restore.",
    )
    enabled = models.BooleanField(default=True)
    verify_deep = models.BooleanField(
        "deep verification", default=False,
        help_text="Base backups: also unpack the backup and check every data file against the server's "
                  "manifest with pg_verifybackup (slower; the weekly deep backup).")
    rpo_minutes = models.PositiveIntegerField(
        "RPO objective (minutes)", null=True, blank=True,
        help_text="The freshness objective: a good backup is never older than this. Empty = the schedule's "
                  "period plus two hours.")
    drill = models.BooleanField(
        "restore drills", default=False,
        help_text="Restore the newest archive into a throwaway cluster on the drill schedule, check it against "
                  "its manifest and record the restore time (the measured RTO).")
    drill_schedule = models.ForeignKey(
        CrontabSchedule, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
        help_text="When drills run; empty = weekly, Saturday 05:00.")
    drill_task = models.OneToOneField(PeriodicTask, null=True, blank=True, editable=False,
                                      on_delete=models.SET_NULL, related_name="+")
    encrypt_to = models.ManyToManyField(
        EncryptionKey, blank=True, related_name="policies", verbose_name="encrypt to",
        help_text="Encrypt archives (and, for the database's WAL, segments) to these public keys. None = not "
                  "encrypted.")
    copy_to = models.ManyToManyField(
        RemoteRepository, blank=True, related_name="policies", verbose_name="copy to",
        help_text="Copy each finished archive to these remote repositories, verified after upload.")
    # Retention (grandfather-father-son) of this policy's database and kind of archive.
    keep_daily = models.PositiveIntegerField(default=7, help_text="Newest archive of each of the last N days.")
    keep_weekly = models.PositiveIntegerField(default=4, help_text="Newest archive of each of the last N weeks.")
    keep_monthly = models.PositiveIntegerField(default=12, help_text="Newest archive of each of the last N months.")
    keep_days = models.PositiveIntegerField(
        null=True, blank=True, help_text="Keep every archive at least this many days. Empty = RETENTION_DAYS.")
    periodic_task = models.OneToOneField(PeriodicTask, null=True, blank=True, editable=False,
                                         on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "backup policies"
        ordering = ["database__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["database", "name"], name="policy_unique_name_per_database"),
        ]

    def __str__(self):
        return f"{self.database.name}/{self.name}"

    @property
    def artifacts(self) -> list[str]:
        extra = [("plain", self.plain_sql), ("schema", self.schema_only), ("data", self.data_only)]
        return ["dump"] + [name for name, wanted in extra if wanted]

    def audit_fields(self) -> dict:
        return {
            "database": self.database.name, "name": self.name, "kind": self.kind,
            "schedule": str(self.schedule), "artifacts": self.artifacts,
            "compression": self.compression, "compression_level": self.compression_level,
            "parallel_jobs": self.parallel_jobs, "enabled": self.enabled, "rpo_minutes": self.rpo_minutes,
            "verify_deep": self.verify_deep, "drill": self.drill,
            "drill_schedule": str(self.drill_schedule) if self.drill_schedule else None,
            "keep_daily": self.keep_daily, "keep_weekly": self.keep_weekly, "keep_monthly": self.keep_monthly,
            "keep_days": self.keep_days,
        }

    def save(self, *args, **kwargs):
        # The policy's own beat entry is part of the policy's change, recorded by whoever
        # changes the policy; it gets no events of its own.
        with transaction.atomic(), audit_context.quiet("django_celery_beat.periodictask"):
            super().save(*args, **kwargs)
            self.sync_periodic_task()
            self.sync_drill_task()

    def delete(self, *args, **kwargs):
        with transaction.atomic(), audit_context.quiet("django_celery_beat.periodictask"):
            tasks = [t for t in (self.periodic_task, self.drill_task) if t is not None]
            result = super().delete(*args, **kwargs)
            for task in tasks:
                task.delete()
            return result

    def effective_rpo(self) -> timedelta:
        if self.rpo_minutes:
            return timedelta(minutes=self.rpo_minutes)
        return schedule_period(self.schedule) + timedelta(hours=2)

    def sync_drill_task(self) -> None:
        """The drill's own beat entry, present only while drills are on."""
        name = f"drill-policy-{self.pk}"
        if not self.drill:
            if self.drill_task_id:
                task = self.drill_task
                self.drill_task = None
                super().save(update_fields=["drill_task"])
                task.delete()
            return
        schedule = self.drill_schedule or CrontabSchedule.objects.get_or_create(
            minute="0", hour="5", day_of_week="6", day_of_month="*", month_of_year="*")[0]
        values = {"task": "monitoring.tasks.run_drill", "crontab": schedule, "interval": None,
                  "args": json.dumps([self.pk]), "enabled": self.enabled,
                  "expire_seconds": schedule_expiry_seconds(schedule),
                  "description": f"Restore drill of {self}"}
        task, _ = PeriodicTask.objects.update_or_create(name=name, defaults=values)
        if self.drill_task_id != task.pk:
            self.drill_task = task
            super().save(update_fields=["drill_task"])

    def sync_periodic_task(self) -> None:
        """Create or update the beat entry that runs this policy."""
        values = {
            "task": "backups.tasks.run_policy",
            "crontab": self.schedule,
            "interval": None,
            "args": json.dumps([self.pk]),
            "enabled": self.enabled,
            # A message that waits longer than this is dropped instead of piling up behind a
            # stalled worker; the next slot runs normally.
            "expire_seconds": schedule_expiry_seconds(self.schedule),
            "description": f"Backup policy {self} ({self.kind})",
        }
        name = f"backup-policy-{self.pk}"
        task = self.periodic_task or PeriodicTask.objects.filter(name=name).first()
        if task is None:
            task = PeriodicTask.objects.create(name=name, **values)
        else:
            for field, value in values.items():
                setattr(task, field, value)
            task.name = name
            task.save()
        if self.periodic_task_id != task.pk:
            self.periodic_task = task
            super().save(update_fields=["periodic_task"])


def schedule_period(crontab: CrontabSchedule) -> timedelta:
    """The time between two of the crontab's slots (the next two; crontabs are mostly regular).

    celery's remaining_estimate(last) is "next slot after `last`, minus now", not minus `last`:
    both slots are found from now. Crontabs have minute granularity, so the clock's movement
    between the two calls is rounded away."""
    sched = crontab.schedule
    first = timezone.now() + sched.remaining_estimate(timezone.now())
    second = timezone.now() + sched.remaining_estimate(first + timedelta(seconds=1))
    return timedelta(minutes=round((second - first).total_seconds() / 60))


def next_slot(crontab: CrontabSchedule, after=None):
    after = after or timezone.now()
    return after + crontab.schedule.remaining_estimate(after)


def previous_slot(crontab: CrontabSchedule, at=None):
    """The newest slot of the crontab at or before ``at`` (now): the slot a beat message that
    arrives now belongs to. Celery semantics: day of month AND day of week must both match."""
    sched = crontab.schedule
    tz = crontab.timezone or timezone.get_current_timezone()
    local = (at or timezone.now()).astimezone(tz).replace(second=0, microsecond=0)
    hours, minutes = sorted(sched.hour, reverse=True), sorted(sched.minute, reverse=True)
    day = local.date()
    for _ in range(800):
        if (day.month in sched.month_of_year and day.day in sched.day_of_month
                and (day.weekday() + 1) % 7 in sched.day_of_week):
            for h in hours:
                for m in minutes:
                    slot = datetime.combine(day, time(h, m), tzinfo=tz)
                    if slot <= local:
                        return slot
        day -= timedelta(days=1)
    return None


def slot_key(policy: BackupPolicy, at=None) -> str | None:
    slot = previous_slot(policy.schedule, at)
    return f"{policy.pk}@{slot.astimezone(UTC):%Y-%m-%dT%H:%MZ}" if slot else None


def schedule_expiry_seconds(crontab: CrontabSchedule) -> int:
    """Half the crontab's period, between 30 s and 6 h."""
    period = schedule_period(crontab).total_seconds()
    return int(max(30, min(period / 2, 6 * 3600)))


class BackupRun(models.Model):
    """One execution of a backup.

    Transitions (each a method below, each audited):
        queued -> running                      claim()
        running -> waiting_for_wal             wait_for_wal()   (base backups)
        running | waiting_for_wal -> succeeded succeed()
        queued | running | waiting_for_wal -> failed   fail()
    """

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        WAITING_FOR_WAL = "waiting_for_wal", "waiting for WAL"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING, State.WAITING_FOR_WAL)

    class Trigger(models.TextChoices):
        SCHEDULED = "scheduled"
        MANUAL = "manual"

    database = models.ForeignKey(Database, on_delete=models.PROTECT, related_name="runs")
    policy = models.ForeignKey(BackupPolicy, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    kind = models.CharField(max_length=16, choices=BackupKind.choices, default=BackupKind.LOGICAL)
    trigger = models.CharField(max_length=10, choices=Trigger.choices)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                     on_delete=models.PROTECT, related_name="+")
    # Who asked, for the trail: a username, "system:beat" or "cli:<os user>".
    requested_by_label = models.CharField(max_length=150, blank=True)
    queued_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    bytes = models.BigIntegerField(default=0)
    worker = models.CharField(max_length=255, blank=True)
    error = models.TextField(blank=True)
    error_detail = models.TextField(blank=True)
    progress_done = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(default=0)
    progress_item = models.CharField(max_length=255, blank=True)
    # Touched by the worker while the run is active; a stale one means the worker is gone.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Scheduled runs: "<policy id>@<slot, UTC ISO>"; unique, so a duplicated beat message or a
    # redelivered task never makes a second run of one slot. A retry appends "+retry".
    slot_key = models.CharField(max_length=80, null=True, blank=True, unique=True)
    retry_of = models.OneToOneField("self", null=True, blank=True, on_delete=models.PROTECT, related_name="retry")
    # Set when the watchdog queued the run again because nobody had claimed it (lost message).
    requeued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-queued_at", "-id"]
        indexes = [
            # the database page: newest runs of one database
            models.Index(fields=["database", "-queued_at"], name="run_db_recent_idx"),
            # freshness: runs by state
            models.Index(fields=["state", "-finished_at"], name="run_state_idx"),
        ]

    def __str__(self):
        return f"run {self.pk} of {self.database.name} ({self.state})"

    @property
    def duration(self) -> timedelta | None:
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None

    @property
    def actor(self):
        """Who asked for the run (a user, or the component that scheduled it)."""
        return self.requested_by or self.requested_by_label or "system"

    def _requested(self) -> dict:
        actor = self.actor
        return {"requested_by": actor.get_username() if hasattr(actor, "get_username") else str(actor)}

    @classmethod
    def enqueue(cls, database: Database, *, trigger: str, policy: BackupPolicy | None = None,
                requested_by=None, actor_label: str = "", kind: str | None = None, slot_key: str | None = None,
                retry_of: BackupRun | None = None) -> BackupRun:
        """A new queued run. With a slot_key that has a run already, that run is returned and
        nothing is created (see BackupRun.slot_key)."""
        if slot_key:
            existing = cls.objects.filter(slot_key=slot_key).first()
            if existing is not None:
                return existing
        try:
            with transaction.atomic():
                run = cls.objects.create(
                    database=database, policy=policy, trigger=trigger,
                    kind=kind or (policy.kind if policy else BackupKind.LOGICAL),
                    requested_by=requested_by,
                    requested_by_label=requested_by.get_username() if requested_by else actor_label,
                    slot_key=slot_key, retry_of=retry_of,
                )
                details = {"database": database.name, "trigger": trigger, "kind": run.kind,
                           "policy": str(policy) if policy else None}
                if slot_key:
                    details["slot"] = slot_key
                if retry_of:
                    details["retry_of"] = retry_of.pk
                audit.record(run.actor, "backup.run.queued", run, details=details)
        except IntegrityError:  # the same slot, queued at the same moment by a duplicate
            existing = cls.objects.filter(slot_key=slot_key).first() if slot_key else None
            if existing is None:
                raise
            return existing
        return run

    def claim(self, worker: str) -> bool:
        """queued -> running. Returns False (and changes nothing) when another worker or a
        duplicated message got there first."""
        with transaction.atomic():
            now = timezone.now()
            n = BackupRun.objects.filter(pk=self.pk, state=self.State.QUEUED).update(
                state=self.State.RUNNING, started_at=now, worker=worker[:255])
            if n != 1:
                return False
            self.refresh_from_db()
            # The worker does the work: it is the actor from here on; who asked is in the details.
            audit.record(WORKER, "backup.run.started", self,
                         details={"database": self.database.name, "worker": worker, **self._requested()})
        return True

    def wait_for_wal(self) -> None:
        """The data is copied; the backup is usable only once its WAL is in the repository."""
        with transaction.atomic():
            run = BackupRun.objects.select_for_update().get(pk=self.pk)
            if run.state == self.State.WAITING_FOR_WAL:
                return
            if run.state != self.State.RUNNING:
                raise StateError(f"run {self.pk} is {run.state}, not running")
            self.state = self.State.WAITING_FOR_WAL
            self.progress_item = "waiting for the backup's WAL to reach the repository"
            self.save(update_fields=["state", "progress_item"])
            audit.record(WORKER, "backup.run.waiting_for_wal", self, details={"database": self.database.name})

    def succeed(self, archive: Archive) -> None:
        with transaction.atomic():
            run = BackupRun.objects.select_for_update().get(pk=self.pk)
            if run.state not in (self.State.RUNNING, self.State.WAITING_FOR_WAL):
                raise StateError(f"run {self.pk} is {run.state}, not running")
            self.state = self.State.SUCCEEDED
            self.finished_at = timezone.now()
            self.bytes = archive.bytes
            self.progress_done = self.progress_total or self.progress_done
            self.save(update_fields=["state", "finished_at", "bytes", "progress_done"])
            audit.record(WORKER, "backup.run.succeeded", self,
                         details={"database": self.database.name, "archive": archive.pk,
                                  "path": archive.path, "bytes": archive.bytes,
                                  "seconds": round(self.duration.total_seconds(), 3)})

    def fail(self, error: str, detail: str = "", actor: str = "") -> None:
        """actor: who found the failure, when not the worker running it (the portal that could
        not queue it, the watchdog that found its worker gone)."""
        with transaction.atomic():
            run = BackupRun.objects.select_for_update().get(pk=self.pk)
            if run.state not in self.ACTIVE_STATES:
                raise StateError(f"run {self.pk} is {run.state}; it cannot fail now")
            self.state = self.State.FAILED
            self.finished_at = timezone.now()
            self.error = error
            self.error_detail = detail[-8000:]
            self.save(update_fields=["state", "finished_at", "error", "error_detail"])
            audit.record(actor or WORKER, "backup.run.failed", self, outcome="failure",
                         details={"database": self.database.name, "error": error})

    def report_progress(self, done: int, total: int, item: str = "") -> None:
        """Progress is not a state change: a plain UPDATE, no audit event. While the portal's
        database restarts, a report is skipped (the next one reconnects): the job goes on."""
        try:
            BackupRun.objects.filter(pk=self.pk, state__in=self.ACTIVE_STATES).update(
                progress_done=done, progress_total=total, progress_item=item[:255])
        except (OperationalError, InterfaceError):
            connections["default"].close()


class Archive(models.Model):
    """What a successful run left in the repository: a directory with a manifest.json and the
    files it lists. The repository is the truth; this row is the catalog's copy of it."""

    class State(models.TextChoices):
        COMPLETE = "complete"
        # A base backup whose WAL (start to stop LSN) is not all in the repository yet.
        WAITING_FOR_WAL = "waiting_for_wal", "waiting for WAL"
        # A base backup whose WAL never arrived: unusable for recovery.
        INCOMPLETE = "incomplete"
        CORRUPT = "corrupt"
        # Removed from the repository by retention; the row stays for the record.
        EXPIRED = "expired"

    run = models.OneToOneField(BackupRun, null=True, blank=True, on_delete=models.PROTECT, related_name="archive")
    database = models.ForeignKey(Database, on_delete=models.PROTECT, related_name="archives")
    kind = models.CharField(max_length=16, choices=BackupKind.choices, default=BackupKind.LOGICAL)
    state = models.CharField(max_length=16, choices=State.choices, default=State.COMPLETE)
    # Directory relative to the repository root, e.g. archives/auth/20261124_020000_logical_r12
    path = models.CharField(max_length=500, unique=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    bytes = models.BigIntegerField()
    server_version = models.CharField(max_length=64, blank=True)
    compression = models.CharField(max_length=8, choices=Compression.choices)
    manifest_sha256 = models.CharField(max_length=64)
    verified_at = models.DateTimeField(null=True, blank=True)
    verify_error = models.TextField(blank=True)
    # Fingerprints of the public keys the files are encrypted to (empty: not encrypted).
    encrypted_for = models.JSONField(default=list, blank=True)
    # Nobody and nothing deletes an archive under legal hold.
    legal_hold = models.BooleanField(default=False)
    legal_hold_reason = models.TextField(blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    # Base backups: where in the WAL they start and stop (pg_lsn text, e.g. 0/2000028).
    timeline = models.PositiveIntegerField(null=True, blank=True)
    start_lsn = models.CharField(max_length=20, blank=True)
    stop_lsn = models.CharField(max_length=20, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        permissions = [("verify_archive", "Can verify an archive"),
                       ("download_archive", "Can download an archive's files (a copy of the data leaves the vault)"),
                       ("set_legal_hold", "Can place and lift a legal hold on an archive")]
        indexes = [
            # newest archive of a database (restore pickers, freshness)
            models.Index(fields=["database", "-started_at"], name="archive_db_recent_idx"),
        ]

    def __str__(self):
        return self.path

    @property
    def main_file(self) -> ArchiveFile | None:
        """The file a restore starts from: the dump, or the base backup's data tar."""
        role = ArchiveFile.Role.BASE if self.kind == BackupKind.BASE else ArchiveFile.Role.DUMP
        return self.files.filter(role=role).first()

    def record_verification(self, ok: bool, error: str, actor) -> None:
        with transaction.atomic():
            self.verified_at = timezone.now() if ok else self.verified_at
            self.verify_error = "" if ok else error
            self.state = self.State.COMPLETE if ok else self.State.CORRUPT
            self.save(update_fields=["verified_at", "verify_error", "state"])
            audit.record(actor, "archive.verified" if ok else "archive.verify_failed", self,
                         outcome="success" if ok else "failure",
                         details={"database": self.database.name, "error": error} if error else
                         {"database": self.database.name})


    def mark_wal_state(self, state: str, actor, error: str = "") -> None:
        """waiting_for_wal -> complete | incomplete (the WAL never arrived) | corrupt (deep
        verification failed)."""
        with transaction.atomic():
            current = Archive.objects.select_for_update().get(pk=self.pk)
            if current.state != self.State.WAITING_FOR_WAL:
                raise StateError(f"archive {self.pk} is {current.state}, not waiting for WAL")
            self.state = state
            self.verify_error = error
            self.save(update_fields=["state", "verify_error"])
            audit.record(actor, f"archive.wal_{'complete' if state == self.State.COMPLETE else 'missing'}", self,
                         outcome="success" if state == self.State.COMPLETE else "failure",
                         details={"database": self.database.name, "error": error} if error
                         else {"database": self.database.name})


class WalTimeline(models.Model):
    """The catalog's view of one timeline of a database's WAL area: the range of segments it
    holds and the gaps in it (a missing segment breaks every restore point after it). Rebuilt
    from the repository by backups.engine.wal.refresh_catalog()."""

    database = models.ForeignKey(Database, on_delete=models.CASCADE, related_name="wal_timelines")
    timeline = models.PositiveIntegerField()
    first_segment = models.CharField(max_length=24)
    last_segment = models.CharField(max_length=24)
    segment_count = models.PositiveIntegerField()
    # [[first missing, last missing], ...] segment names
    gaps = models.JSONField(default=list, blank=True)
    first_archived_at = models.DateTimeField(null=True, blank=True)
    last_archived_at = models.DateTimeField(null=True, blank=True)
    # From the timeline's .history file: where it branched off its parent.
    parent_timeline = models.PositiveIntegerField(null=True, blank=True)
    branch_lsn = models.CharField(max_length=20, blank=True)
    scanned_at = models.DateTimeField()

    class Meta:
        ordering = ["database", "timeline"]
        constraints = [models.UniqueConstraint(fields=["database", "timeline"], name="wal_timeline_unique")]

    def __str__(self):
        return f"{self.database.name} timeline {self.timeline}"


class ArchiveFile(models.Model):
    class Role(models.TextChoices):
        DUMP = "dump", "custom-format dump"
        PLAIN = "plain", "plain SQL"
        SCHEMA = "schema", "schema only"
        DATA = "data", "data only"
        GLOBALS = "globals", "roles and tablespaces"
        BASE = "base", "base backup (tar)"
        TABLESPACE = "tablespace", "tablespace (tar)"
        BACKUP_MANIFEST = "backup_manifest", "server's backup manifest"

    archive = models.ForeignKey(Archive, on_delete=models.CASCADE, related_name="files")
    path = models.CharField(max_length=255, help_text="Relative to the archive directory.")
    role = models.CharField(max_length=16, choices=Role.choices)
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)

    class Meta:
        ordering = ["archive", "path"]
        constraints = [models.UniqueConstraint(fields=["archive", "path"], name="archive_file_unique_path")]

    def __str__(self):
        return self.path


class ArchiveCopy(models.Model):
    """An archive's copy in a remote repository. A copy counts only once every file's sha256 has
    been checked after the upload."""

    class State(models.TextChoices):
        COPYING = "copying"
        COMPLETE = "complete"
        FAILED = "failed"
        DELETED = "deleted"

    archive = models.ForeignKey(Archive, on_delete=models.PROTECT, related_name="copies")
    remote = models.ForeignKey(RemoteRepository, on_delete=models.PROTECT, related_name="copies")
    state = models.CharField(max_length=10, choices=State.choices, default=State.COPYING)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    bytes = models.BigIntegerField(default=0)
    storage_class = models.CharField(max_length=32, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["archive", "remote"]
        constraints = [models.UniqueConstraint(fields=["archive", "remote"], name="archive_copy_unique")]

    def __str__(self):
        return f"{self.archive.path} @ {self.remote.name} ({self.state})"
