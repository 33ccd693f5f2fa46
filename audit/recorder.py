"""audit.record(): the one way to write the trail."""

from __future__ import annotations

import re

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import models

from . import chain, context

# Keys whose values never enter the trail, at any depth of `details`.
SECRET_KEY_RE = re.compile(r"pass|secret|token|otp|key|credential", re.I)
MASK = "********"


def _mask(value):
    # Keep the shape (a [before, after] pair stays a pair) and emptiness, hide the content.
    if isinstance(value, (list, tuple)):
        return [_mask(v) for v in value]
    return MASK if value not in (None, "", False) else value


def scrub(value):
    if isinstance(value, dict):
        return {k: (_mask(v) if SECRET_KEY_RE.search(str(k)) else scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


cli_actor = context.cli_actor


def record(actor, action: str, target=None, outcome: str = "success", details: dict | None = None,
           *, request=None):
    """Write one audit event at the head of the chain.

    actor: a user, or a string naming a system component ("system:worker", "cli:root"); None
        takes the actor of the current audit context.
    target: a model instance, or a (type, id, label) tuple, or None.
    request: the HTTP request, if any; otherwise source IP, user agent and request id come from
        the current audit context (set by AuditContextMiddleware for web requests).
    """
    ctx = context.current()
    if actor is None and ctx is not None:
        actor = ctx.actor
    user = actor if isinstance(actor, AbstractBaseUser) else None
    actor_label = user.get_username() if user is not None else str(actor or "system")
    target_type = target_id = target_label = ""
    if isinstance(target, models.Model):
        target_type = target._meta.label_lower
        target_id = str(target.pk)
        target_label = str(target)[:255]
    elif isinstance(target, tuple):
        target_type, target_id, target_label = (str(x) for x in target)
    if request is not None:
        ip, agent = context.client_ip(request), request.META.get("HTTP_USER_AGENT", "")
        request_id = getattr(request, "audit_request_id", "") or (ctx.request_id if ctx else "")
    elif ctx is not None:
        ip, agent, request_id = ctx.source_ip, ctx.user_agent, ctx.request_id
    else:
        ip, agent, request_id = None, "", ""
    return chain.append(
        actor_id=user.pk if user is not None else None,
        actor_label=actor_label[:150],
        action=action,
        outcome=outcome,
        target_type=target_type[:100],
        target_id=target_id[:64],
        target_label=target_label[:255],
        source_ip=ip,
        user_agent=(agent or "")[:255],
        request_id=(request_id or "")[:64],
        details=scrub(details or {}),
    )


def diff(before: dict | None, after: dict | None) -> dict:
    """Field-level changes {field: [old, new]} between two audit_fields() snapshots."""
    before, after = before or {}, after or {}
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}
