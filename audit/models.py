from django.conf import settings
from django.db import models


class AppendOnly(Exception):
    pass


class AuditEvent(models.Model):
    """One thing that happened: who (actor), did what (action), to what (target), from where,
    and how it ended (outcome).

    Events form a hash chain: ``hash`` = sha256 over ``prev_hash`` and the canonical form of the
    event as stored (audit.chain), ``sequence`` is gapless, and ``prev_hash`` is unique, so the
    chain cannot fork. The table rejects UPDATE, DELETE and TRUNCATE at the database level
    (migration 0002); rows keep labels of actor and target so they outlive both.
    """

    class Outcome(models.TextChoices):
        SUCCESS = "success"
        FAILURE = "failure"
        DENIED = "denied"

    sequence = models.BigIntegerField(unique=True)
    # The database's clock at insert (clock_timestamp()), at the precision it stores.
    created_at = models.DateTimeField()
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                              related_name="+", db_constraint=True)
    # Username at the time, or the system component ("system:beat", "cli:root").
    actor_label = models.CharField(max_length=150)
    action = models.CharField(max_length=100)
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    target_type = models.CharField(max_length=100, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_label = models.CharField(max_length=255, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=255, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    details = models.JSONField(default=dict, blank=True)
    prev_hash = models.CharField(max_length=64, unique=True)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["-sequence"]
        indexes = [
            # the audit log filtered to one actor, newest first
            models.Index(fields=["actor_label", "-sequence"], name="audit_actor_idx"),
            # filtered to an action (auth.login.failed, restore.request.*), newest first
            models.Index(fields=["action", "-sequence"], name="audit_action_idx"),
            # what happened to this database / run / request
            models.Index(fields=["target_type", "target_id", "-sequence"], name="audit_target_idx"),
            # reports by period
            models.Index(fields=["created_at"], name="audit_time_idx"),
        ]

    def __str__(self):
        return f"#{self.sequence} {self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action} {self.outcome}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise AppendOnly("audit events are append-only")
        raise AppendOnly("audit events are written by audit.record() only (it links them into the chain)")

    def delete(self, *args, **kwargs):
        raise AppendOnly("audit events are append-only")
