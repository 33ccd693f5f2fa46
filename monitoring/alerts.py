"""Alerts on a change of state — a check going bad (ok -> warning/failing) and coming back —
not on every run; a check that stays bad is re-sent no more often than ALERT_REPEAT_SECONDS.
Channels: e-mail through Django's mail settings, and a generic JSON webhook. Every alert is
an audit event, delivered or not."""

from __future__ import annotations

import json
import logging
import urllib.request
from datetime import timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

import audit

from .models import CheckState, Status

log = logging.getLogger(__name__)
BAD = (Status.WARNING, Status.FAILING)


def process(changes: list[tuple[CheckState, str | None]]) -> list[dict]:
    """Send what the changes call for, and the reminders that are due."""
    sent = []
    changed = set()
    for state, previous in changes:
        changed.add(state.pk)
        if state.status in BAD and (previous is None or previous not in BAD or
                                    (previous == Status.WARNING and state.status == Status.FAILING)):
            sent.append(send("failing" if state.status == Status.FAILING else "warning", state))
        elif state.status == Status.OK and previous in BAD:
            sent.append(send("recovered", state))
    repeat = timedelta(seconds=settings.ALERT_REPEAT_SECONDS)
    now = timezone.now()
    for state in CheckState.objects.filter(status=Status.FAILING).exclude(pk__in=changed):
        if state.last_alerted_at is None or now - state.last_alerted_at >= repeat:
            sent.append(send("still failing", state))
    return sent


def send(kind: str, state: CheckState) -> dict:
    payload = {
        "event": kind,
        "check": state.name,
        "target": state.target,
        "status": state.status,
        "summary": state.summary,
        "since": state.since.isoformat(),
        "portal": settings.BANKVAULT_BASE_URL,
    }
    delivered, errors = [], []
    if settings.ALERT_EMAILS:
        try:
            send_mail(f"[bankvault] {kind}: {state.name} {state.target}".strip(),
                      f"{state.summary}\n\nstatus: {state.status} since {state.since:%Y-%m-%d %H:%M:%S %Z}\n"
                      f"{settings.BANKVAULT_BASE_URL}\n", settings.DEFAULT_FROM_EMAIL, settings.ALERT_EMAILS)
            delivered.append("email")
        except Exception as exc:
            errors.append(f"email: {exc}")
    if settings.ALERT_WEBHOOK_URL:
        try:
            post_json(settings.ALERT_WEBHOOK_URL, payload, settings.ALERT_WEBHOOK_TOKEN)
            delivered.append("webhook")
        except Exception as exc:
            errors.append(f"webhook: {exc}")
    state.last_alerted_at = timezone.now()
    state.save(update_fields=["last_alerted_at"])
    audit.record("system:monitoring", f"alert.{kind.replace(' ', '_')}", state,
                 outcome="failure" if errors else "success",
                 details={**payload, "delivered": delivered, "errors": errors})
    if errors:
        log.error("alert %s for %s[%s] not delivered: %s", kind, state.name, state.target, "; ".join(errors))
    return {**payload, "delivered": delivered, "errors": errors}


def post_json(url: str, payload: dict, token: str = "", timeout: float = 10) -> None:
    data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - configured URL
        if response.status >= 300:
            raise RuntimeError(f"HTTP {response.status}")
