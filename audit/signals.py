"""Events nobody calls audit.record() for explicitly: sign-in, sign-out and failed sign-ins,
and changes to configuration models that are not ours to edit (users, groups, celery-beat
schedules), with field-level before/after. Our own models (Database, BackupPolicy, runs,
requests) record their events explicitly where they change."""

from __future__ import annotations

from axes.signals import user_locked_out
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save
from django.dispatch import receiver

from . import context
from .recorder import diff, record

# model -> (action prefix, fields that matter; bookkeeping fields are left out)
TRACKED = {}


def _snapshot(instance, fields) -> dict:
    snap = {}
    for f in fields:
        value = getattr(instance, f, None)
        if f == "password":
            value = "********" if value else ""
        elif hasattr(value, "pk") or value is not None and not isinstance(value, (str, int, float, bool, list, dict)):
            value = str(value)
        snap[f] = value
    return snap


def track(model, prefix: str, fields: list[str]):
    TRACKED[model] = (prefix, fields)
    label = model._meta.label_lower

    def before(sender, instance, update_fields=None, **kw):
        if update_fields and not set(update_fields) & set(fields):
            instance._audit_before = None  # a bookkeeping save (last_login, last_run_at)
            return
        old = sender.objects.filter(pk=instance.pk).first() if instance.pk else None
        instance._audit_before = _snapshot(old, fields) if old else {}

    def after(sender, instance, created, **kw):
        before_snap = getattr(instance, "_audit_before", None)
        ctx = context.current()
        if before_snap is None or (ctx and label in ctx.quiet):
            return
        changes = diff(None if created else before_snap, _snapshot(instance, fields))
        if changes:
            record(None, f"config.{prefix}.{'created' if created else 'changed'}", instance,
                   details={"changes": changes})

    def gone(sender, instance, **kw):
        ctx = context.current()
        if ctx and label in ctx.quiet:
            return
        record(None, f"config.{prefix}.deleted", (label, instance.pk, str(instance)),
               details={"changes": diff(_snapshot(instance, fields), None)})

    pre_save.connect(before, sender=model, weak=False, dispatch_uid=f"audit-pre-{label}")
    post_save.connect(after, sender=model, weak=False, dispatch_uid=f"audit-post-{label}")
    post_delete.connect(gone, sender=model, weak=False, dispatch_uid=f"audit-del-{label}")


def _password_changed(sender, instance, **kw):
    old = sender.objects.filter(pk=instance.pk).values_list("password", flat=True).first() if instance.pk else None
    instance._audit_password_changed = old is not None and old != instance.password


def connect():
    User = get_user_model()
    track(User, "user", ["username", "email", "first_name", "last_name", "is_active", "is_staff",
                         "is_superuser"])
    track(Group, "group", ["name"])
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    track(PeriodicTask, "schedule", ["name", "task", "enabled", "crontab", "interval", "args", "kwargs",
                                     "queue", "expire_seconds", "one_off", "start_time", "description"])
    track(CrontabSchedule, "crontab", ["minute", "hour", "day_of_week", "day_of_month", "month_of_year",
                                       "timezone"])
    track(IntervalSchedule, "interval", ["every", "period"])

    pre_save.connect(_password_changed, sender=User, weak=False, dispatch_uid="audit-password-pre")

    def password_after(sender, instance, created, **kw):
        if not created and getattr(instance, "_audit_password_changed", False):
            record(None, "config.user.password_changed", instance)

    post_save.connect(password_after, sender=User, weak=False, dispatch_uid="audit-password-post")


@receiver(m2m_changed, dispatch_uid="audit-m2m")
def _memberships(sender, instance, action, model, pk_set, **kw):
    User = get_user_model()
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    if sender is User.groups.through:
        what = "user.groups"
    elif sender is User.user_permissions.through:
        what = "user.permissions"
    elif sender is Group.permissions.through:
        what = "group.permissions"
    else:
        return
    names = sorted(str(o) for o in model.objects.filter(pk__in=pk_set or [])) if pk_set else []
    verb = {"post_add": "added", "post_remove": "removed", "post_clear": "cleared"}[action]
    record(None, f"config.{what}.{verb}", instance, details={"items": names})


@receiver(user_logged_in, dispatch_uid="audit-login")
def _logged_in(sender, request, user, **kw):
    record(user, "auth.login.succeeded", user, request=request)


@receiver(user_login_failed, dispatch_uid="audit-login-failed")
def _login_failed(sender, credentials, request=None, **kw):
    username = (credentials or {}).get("username", "")
    record(f"anonymous:{username}"[:150], "auth.login.failed", ("auth.user", "", username), outcome="failure",
           details={"username": username}, request=request)


@receiver(user_locked_out, dispatch_uid="audit-login-locked")
def _locked_out(sender, request, username, ip_address, **kw):
    # django-axes: sent when a username+address reaches the failure limit, and again for each
    # attempt refused while it stays locked (then "failures" is None).
    record(f"anonymous:{username}"[:150], "auth.login.locked", ("auth.user", "", username or ""), outcome="denied",
           details={"username": username, "failures": getattr(request, "axes_failures_since_start", None)},
           request=request)


@receiver(user_logged_out, dispatch_uid="audit-logout")
def _logged_out(sender, request, user, **kw):
    if user is not None:
        record(user, "auth.logout", user, request=request)
