"""Celery tasks: thin. The task re-checks the two-person rule itself (RestoreRequest.claim),
so a forged message or a race cannot run an unapproved request."""

from celery import shared_task

from .engine import runner
from .models import RestoreRequest


@shared_task(name="recovery.tasks.execute_restore")
def execute_restore(request_id: int) -> None:
    runner.execute(request_id)


@shared_task(name="recovery.tasks.expire_requests")
def expire_requests() -> int:
    """Pending requests past RESTORE_REQUEST_TTL and approved ones past
    RESTORE_EXECUTION_WINDOW become expired."""
    return sum(r.expire_if_due() for r in RestoreRequest.objects.filter(
        state__in=[RestoreRequest.State.PENDING, RestoreRequest.State.APPROVED]))
