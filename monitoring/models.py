"""What monitoring remembers: every check result (history), the current state of each check
(what alerts compare against), and restore drills with their measured RTO."""

from django.db import models
from django.utils import timezone


class Status(models.TextChoices):
    OK = "ok"
    WARNING = "warning"
    FAILING = "failing"
    PENDING = "pending"  # nothing to judge yet (a new policy whose first slot has not come)


class CheckResult(models.Model):
    """One run of one check against one target (a database, a policy, the repository...)."""

    name = models.CharField(max_length=40)
    target = models.CharField(max_length=120, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices)
    summary = models.CharField(max_length=500)
    details = models.JSONField(default=dict, blank=True)
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-checked_at", "-id"]
        indexes = [
            # health history of one check/target, newest first
            models.Index(fields=["name", "target", "-checked_at"], name="check_history_idx"),
            models.Index(fields=["-checked_at"], name="check_recent_idx"),
        ]

    def __str__(self):
        return f"{self.name}[{self.target}] {self.status}"


class CheckState(models.Model):
    """The current state of a check/target, for alerting on changes (ok -> failing and back)
    rather than on every run."""

    name = models.CharField(max_length=40)
    target = models.CharField(max_length=120, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices)
    summary = models.CharField(max_length=500)
    since = models.DateTimeField(default=timezone.now)
    checked_at = models.DateTimeField(default=timezone.now)
    last_alerted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name", "target"]
        constraints = [models.UniqueConstraint(fields=["name", "target"], name="check_state_unique")]

    def __str__(self):
        return f"{self.name}[{self.target}] {self.status} since {self.since:%Y-%m-%d %H:%M}"


class Drill(models.Model):
    """A restore drill: the newest archive (or a point in time) restored into a throwaway
    cluster, checked against its manifest, timed (the measured RTO), and removed."""

    class Kind(models.TextChoices):
        ARCHIVE = "archive", "newest archive"
        PITR = "pitr", "point in time"

    class State(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    database = models.ForeignKey("backups.Database", on_delete=models.PROTECT, related_name="drills")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    archive = models.ForeignKey("backups.Archive", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    target_time = models.DateTimeField(null=True, blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.RUNNING)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    rto_seconds = models.FloatField(null=True, blank=True)
    tables_verified = models.IntegerField(default=0)
    error = models.TextField(blank=True)
    progress_done = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(default=0)
    progress_item = models.CharField(max_length=255, blank=True)
    # Touched by the worker while the drill runs; a stale one means the worker is gone.
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [models.Index(fields=["database", "-started_at"], name="drill_db_recent_idx")]

    def report_progress(self, done: int, total: int, item: str = "") -> None:
        """A plain UPDATE while the drill runs: the dashboard polls it, nothing is audited."""
        Drill.objects.filter(pk=self.pk, state=self.State.RUNNING).update(
            progress_done=done, progress_total=total, progress_item=item[:255])

    def __str__(self):
        return f"drill {self.pk} of {self.database.name} ({self.kind}, {self.state})"
