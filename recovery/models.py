"""Restore requests and their approvals.

A request is immutable once created: what the approvers approve is a sha256 digest of its exact
content, and the task refuses to run if that digest no longer matches. Whether a request may be
approved or run is decided by recovery.rules alone; the transition methods here ask it and
record every step in the audit trail.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import InterfaceError, OperationalError, connections, models, transaction
from django.db.models import Q
from django.utils import timezone

import audit
from backups.models import Archive, Database

new_name_validator = RegexValidator(
    r"^[a-z_][a-z0-9_]{0,62}$", "Use lowercase letters, digits and '_', starting with a letter or '_' (max 63).")


class StateError(Exception):
    """A transition from a state that does not allow it (HTTP 409)."""


class RuleViolation(Exception):
    """The two-person rule (recovery.rules) says no (HTTP 403). ``code`` is the rule's code:
    "role", "self", "auth" (no fresh proof of identity), "content"."""

    def __init__(self, reason: str, code: str = "role"):
        super().__init__(reason)
        self.code = code


class RestoreRequest(models.Model):
    """A request to restore, which runs only after enough approvals.

    Transitions (methods below; each audited, each under a row lock):
        pending -> approved      approve() by the last required approver
        pending -> rejected      reject() by any approver
        pending -> cancelled     cancel() by the requester
        pending | approved -> expired    expire_if_due() (TTL / execution window)
        approved -> running      claim() by the task, after rules.may_execute()
        running -> succeeded | failed    succeed() / fail()
        approved -> failed       fail() when the task's re-check refuses
    """

    class Kind(models.TextChoices):
        ARCHIVE = "archive", "one database from one archive"
        SYSTEM = "system", "every database from the archive set nearest a time"
        PITR = "pitr", "point in time"
        TABLES = "tables", "selected tables into a new schema"
        ROLLBACK = "rollback", "roll back a replace restore"

    class Mode(models.TextChoices):
        REPLACE = "replace", "replace the live database"
        COPY = "copy", "restore as a copy (live database untouched)"

    class State(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        REJECTED = "rejected"
        CANCELLED = "cancelled"
        EXPIRED = "expired"

    OPEN_STATES = (State.PENDING, State.APPROVED, State.RUNNING)

    kind = models.CharField(max_length=10, choices=Kind.choices)
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.COPY)
    requester = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    reason = models.TextField()
    change_ticket = models.CharField(max_length=64, blank=True)
    # What to restore. `system` and `pitr` without a database mean every registered database.
    database = models.ForeignKey(Database, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    archive = models.ForeignKey(Archive, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    target_time = models.DateTimeField(null=True, blank=True)
    new_name = models.CharField(max_length=63, blank=True, validators=[new_name_validator],
                                help_text="copy: the new database's name; tables: the new schema's name")
    target_server = models.ForeignKey(Database, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                      help_text="copy: a registered restore-test server instead of the source's")
    tables = models.JSONField(default=list, blank=True, help_text='["schema.table", "schema"]')
    rollback_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    # The resolved plan, fixed at creation: [{"database": id, "name": ..., "archive": id, "sha256": ...}, ...]
    # (a `system` request names the exact archive of every database here, so the digest binds them).
    items = models.JSONField(default=list)
    digest = models.CharField(max_length=64)

    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    created_at = models.DateTimeField(default=timezone.now)
    decided_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)
    progress_done = models.IntegerField(default=0)
    progress_total = models.IntegerField(default=0)
    progress_item = models.CharField(max_length=255, blank=True)
    # Touched by the worker while the request runs; a stale one means the worker is gone.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Set when the watchdog handed an approved request to the queue again (its message was lost).
    requeued_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [
            ("request_restore", "Can request a restore"),
            ("approve_restore", "Can approve or reject a restore request"),
        ]
        indexes = [models.Index(fields=["state", "-created_at"], name="restore_state_idx")]
        constraints = [
            # One live restore per database: no second request while one is pending, approved or running.
            models.UniqueConstraint(fields=["database"], condition=Q(state__in=["pending", "approved", "running"]),
                                    name="one_open_restore_per_database",
                                    violation_error_message="This database already has an open restore request "
                                    "(pending, approved or running): cancel it or wait until it ends."),
            models.CheckConstraint(condition=~Q(mode="copy") | ~Q(new_name="") | Q(kind="tables"),
                                   name="copy_needs_new_name", violation_error_message="A copy needs a new name."),
        ]

    def __str__(self):
        what = self.database.name if self.database_id else "all databases"
        return f"restore request {self.pk} ({self.kind}, {self.mode}, {what})"

    # -- content and its digest -----------------------------------------------------------------
    def content(self) -> dict:
        """Everything an approver approves. Any change to it changes the digest."""
        return {
            "kind": self.kind, "mode": self.mode,
            "database": self.database.name if self.database_id else None,
            "archive": self.archive_id,
            "items": list(self.items or []),
            "target_time": self.target_time.isoformat() if self.target_time else None,
            "new_name": self.new_name,
            "target_server": self.target_server.name if self.target_server_id else None,
            "tables": list(self.tables or []),
            "rollback_of": self.rollback_of_id,
            "requester": self.requester_id,
        }

    def compute_digest(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def save(self, *args, **kwargs):
        if self.pk is not None and not kwargs.get("update_fields"):
            raise StateError("a restore request is immutable once created: cancel it and file a new one")
        if not self.digest:
            self.digest = self.compute_digest()
        super().save(*args, **kwargs)

    @property
    def required_approvals(self) -> int:
        from . import rules

        return rules.required_approvals()

    @property
    def expires_at(self):
        if self.state == self.State.PENDING:
            return self.created_at + timedelta(seconds=settings.RESTORE_REQUEST_TTL)
        if self.state == self.State.APPROVED and self.decided_at:
            return self.decided_at + timedelta(seconds=settings.RESTORE_EXECUTION_WINDOW)
        return None

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None

    def url(self) -> str:
        return f"{settings.BANKVAULT_BASE_URL.rstrip('/')}/restores/{self.pk}/"

    # -- transitions ------------------------------------------------------------------------------
    @classmethod
    def create(cls, requester, *, request=None, via: str = "web", **fields) -> RestoreRequest:
        from . import rules

        decision = rules.can_request(requester)
        if not decision:
            audit.record(requester, "restore.request.denied", None, outcome="denied",
                         details={"reason": decision.reason, "via": via}, request=request)
            raise RuleViolation(decision.reason)
        with transaction.atomic():
            obj = cls(requester=requester, **fields)
            obj.full_clean(exclude=["digest"])
            obj.save()
            audit.record(requester, "restore.request.created", obj, request=request,
                         details={"via": via, "digest": obj.digest, **obj.content()})
        return obj

    def _locked(self) -> RestoreRequest:
        return RestoreRequest.objects.select_for_update().get(pk=self.pk)

    def _set(self, locked: RestoreRequest, **values) -> None:
        for k, v in values.items():
            setattr(locked, k, v)
            setattr(self, k, v)
        locked.save(update_fields=list(values))

    def _refuse(self, user, action: str, decision, request=None, **details):
        """Record a refusal (after the transaction that found it, so the record stays) and raise."""
        audit.record(user, action, self, outcome="denied", request=request,
                     details={"reason": decision.reason, "code": decision.code, **details})
        if decision.code == "state":
            raise StateError(decision.reason)
        raise RuleViolation(decision.reason, decision.code)

    def approve(self, user, *, password_ok: bool, otp_ok: bool = True, request=None, comment: str = "") -> Approval:
        """Record an approval; the last one needed moves the request to `approved` and hands it
        to a worker once the transaction commits."""
        from . import rules

        with transaction.atomic():
            locked = self._locked()
            locked.expire_if_due(locked=True)
            decision = rules.can_approve(user, locked, password_ok=password_ok, otp_ok=otp_ok)
            if decision:
                approval = Approval.objects.create(
                    request=locked, user=user, decision=Approval.Decision.APPROVE, digest=locked.digest,
                    comment=comment, source_ip=request.META.get("REMOTE_ADDR") if request else None)
                audit.record(user, "restore.request.approved_by", locked, request=request,
                             details={"digest": locked.digest, "required": rules.required_approvals(),
                                      "approvals": len(rules.counted_approvals(locked))})
                if rules.is_approved(locked):
                    self._set(locked, state=self.State.APPROVED, decided_at=timezone.now())
                    audit.record(user, "restore.request.approved", locked, request=request,
                                 details={"approvers": sorted(a.user.get_username()
                                                              for a in rules.counted_approvals(locked))})
                    pk = locked.pk
                    transaction.on_commit(lambda: _dispatch(pk))
                return approval
        self.refresh_from_db(fields=["state"])
        self._refuse(user, "restore.approval.denied", decision, request)

    def reject(self, user, *, password_ok: bool, otp_ok: bool = True, request=None, comment: str = "") -> Approval:
        from . import rules

        with transaction.atomic():
            locked = self._locked()
            locked.expire_if_due(locked=True)
            decision = rules.can_reject(user, locked, password_ok=password_ok, otp_ok=otp_ok)
            if decision:
                approval = Approval.objects.create(
                    request=locked, user=user, decision=Approval.Decision.REJECT, digest=locked.digest,
                    comment=comment, source_ip=request.META.get("REMOTE_ADDR") if request else None)
                self._set(locked, state=self.State.REJECTED, decided_at=timezone.now())
                audit.record(user, "restore.request.rejected", locked, request=request,
                             details={"comment": comment})
                return approval
        self.refresh_from_db(fields=["state"])
        self._refuse(user, "restore.rejection.denied", decision, request)

    def cancel(self, user, *, request=None) -> None:
        from . import rules

        with transaction.atomic():
            locked = self._locked()
            decision = rules.can_cancel(user, locked)
            if decision:
                self._set(locked, state=self.State.CANCELLED, finished_at=timezone.now())
                audit.record(user, "restore.request.cancelled", locked, request=request)
                return
        self._refuse(user, "restore.cancel.denied", decision, request)

    def expire_if_due(self, *, locked: bool = False, now=None) -> bool:
        """pending past RESTORE_REQUEST_TTL, or approved and not started within
        RESTORE_EXECUTION_WINDOW -> expired."""
        now = now or timezone.now()
        expires = self.expires_at
        if expires is None or now < expires:
            return False
        with transaction.atomic():
            row = self if locked else self._locked()
            if row.state not in (self.State.PENDING, self.State.APPROVED) or now < row.expires_at:
                return False
            previous = row.state
            row.state = self.State.EXPIRED
            row.finished_at = now
            row.save(update_fields=["state", "finished_at"])
            self.state, self.finished_at = row.state, row.finished_at
            audit.record("system:expiry", "restore.request.expired", row, details={"was": previous})
        return True

    def claim(self, worker: str) -> None:
        """approved -> running, after the rules' re-check under the row lock. A refusal of an
        approved request fails it closed (committed before the refusal is raised)."""
        from . import rules

        with transaction.atomic():
            locked = self._locked()
            locked.expire_if_due(locked=True)
            decision = rules.may_execute(locked)
            if decision:
                self._set(locked, state=self.State.RUNNING, started_at=timezone.now(), worker=worker[:255])
                audit.record("system:worker", "restore.request.started", locked, details={"worker": worker})
                return
            if locked.state == self.State.APPROVED:
                self._set(locked, state=self.State.FAILED, finished_at=timezone.now(),
                          error=f"refused before starting: {decision.reason}")
                audit.record("system:worker", "restore.request.refused", locked, outcome="denied",
                             details={"reason": decision.reason})
            else:
                audit.record("system:worker", "restore.execution.refused", locked, outcome="denied",
                             details={"reason": decision.reason, "state": locked.state})
        raise RuleViolation(decision.reason, decision.code)

    def succeed(self, result: dict) -> None:
        with transaction.atomic():
            locked = self._locked()
            if locked.state != self.State.RUNNING:
                raise StateError(f"request {self.pk} is {locked.state}, not running")
            self._set(locked, state=self.State.SUCCEEDED, finished_at=timezone.now(), result=result,
                      progress_done=max(locked.progress_total, locked.progress_done))
            audit.record("system:worker", "restore.request.succeeded", locked,
                         details={**result, "seconds": round(self.duration.total_seconds(), 3)})

    def fail(self, error: str, result: dict | None = None, actor: str = "system:worker") -> None:
        with transaction.atomic():
            locked = self._locked()
            if locked.state not in (self.State.RUNNING, self.State.APPROVED):
                raise StateError(f"request {self.pk} is {locked.state}; it cannot fail now")
            self._set(locked, state=self.State.FAILED, finished_at=timezone.now(), error=error,
                      result=result or {})
            audit.record(actor, "restore.request.failed", locked, outcome="failure",
                         details={"error": error, **(result or {})})

    def report_progress(self, done: int, total: int, item: str = "") -> None:
        """Best effort: while the portal's database restarts, a report is skipped, not the restore."""
        try:
            RestoreRequest.objects.filter(pk=self.pk, state=self.State.RUNNING).update(
                progress_done=done, progress_total=total, progress_item=item[:255])
        except (OperationalError, InterfaceError):
            connections["default"].close()


def _dispatch(pk: int) -> None:
    from .tasks import execute_restore

    try:
        execute_restore.apply_async((pk,), retry=True, retry_policy={"max_retries": 2, "interval_start": 0.5})
    except Exception as exc:  # broker down: stays approved; an operator can re-dispatch within the window
        import logging

        logging.getLogger(__name__).error("could not queue restore request %s: %s", pk, exc)


class Approval(models.Model):
    """One approver's decision on one request, bound to the digest they saw."""

    class Decision(models.TextChoices):
        APPROVE = "approve"
        REJECT = "reject"

    request = models.ForeignKey(RestoreRequest, on_delete=models.PROTECT, related_name="approvals")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    decision = models.CharField(max_length=8, choices=Decision.choices)
    digest = models.CharField(max_length=64)
    comment = models.TextField(blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            # One person's decision counts once, whatever races.
            models.UniqueConstraint(fields=["request", "user"], name="one_decision_per_approver"),
        ]

    def __str__(self):
        return f"{self.user} {self.decision}s request {self.request_id}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise StateError("approvals are never changed")
        super().save(*args, **kwargs)
