"""Provision portal users from scripts.

    manage.py users add USERNAME --email E --role operator|approver|auditor [--role ...] --password-env VAR
    manage.py users list [--json]
    manage.py users deactivate USERNAME

The password comes from the named environment variable, never argv. Deactivating a user also
ends their sessions at once."""

import json
import os

from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.models import Group
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

import audit
from audit import context as audit_context
from recovery.rules import ROLES


class Command(BaseCommand):
    help = "Add, list and deactivate portal users and their roles."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add")
        add.add_argument("username")
        add.add_argument("--email", default="")
        add.add_argument("--role", action="append", choices=ROLES, default=[], required=True)
        add.add_argument("--password-env", metavar="VAR", required=True)
        lst = sub.add_parser("list")
        lst.add_argument("--json", action="store_true")
        de = sub.add_parser("deactivate")
        de.add_argument("username")

    def handle(self, *args, action, **o):
        # The events the user model's own changes produce carry this command's actor.
        with audit_context.bind(actor=audit.cli_actor()):
            return getattr(self, f"do_{action}")(**o)

    def do_add(self, username, email, role, password_env, **_):
        User = get_user_model()
        if password_env not in os.environ:
            raise CommandError(f"environment variable {password_env} is not set")
        password = os.environ[password_env]
        if User.objects.filter(username=username).exists():
            raise CommandError(f"user {username!r} exists already")
        # Staff: role holders use the admin too, where their groups' model permissions apply.
        user = User(username=username, email=email, is_staff=True)
        try:
            user.full_clean(exclude=["password"])
            password_validation.validate_password(password, user)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        with transaction.atomic():  # recorded as config.user.created and config.user.groups.added
            user.set_password(password)
            user.save()
            user.groups.set(Group.objects.filter(name__in=role))
        self.stdout.write(f"added {username} ({', '.join(sorted(role))})")

    def do_list(self, **o):
        rows = [{"username": u.username, "email": u.email, "active": u.is_active, "superuser": u.is_superuser,
                 "roles": sorted(g.name for g in u.groups.all()),
                 "last_login": u.last_login.isoformat() if u.last_login else None}
                for u in get_user_model().objects.prefetch_related("groups").order_by("username")]
        if o.get("json"):
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for r in rows:
            flags = ("" if r["active"] else " (deactivated)") + (" superuser" if r["superuser"] else "")
            self.stdout.write(f"{r['username']:<20} {', '.join(r['roles']) or '-':<28}{flags}")

    def do_deactivate(self, username, **_):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user {username!r}")
        with transaction.atomic(), audit_context.quiet("auth.user"):  # one event says it all
            user.is_active = False
            user.save(update_fields=["is_active"])
            ended = end_sessions(user)
            audit.record(audit.cli_actor(), "config.user.deactivated", user,
                         details={"username": username, "sessions_ended": ended})
        self.stdout.write(f"deactivated {username}; {ended} session(s) ended")


def end_sessions(user) -> int:
    ended = 0
    for session in Session.objects.filter(expire_date__gt=timezone.now()):
        if str(session.get_decoded().get("_auth_user_id")) == str(user.pk):
            session.delete()
            ended += 1
    return ended
