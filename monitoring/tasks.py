"""Celery tasks of monitoring: thin wrappers around health, alerts and drills."""

from celery import shared_task

from . import alerts, drills, health


@shared_task(name="monitoring.tasks.run_health_checks")
def run_health_checks(only: list[str] | None = None) -> dict:
    results, changes = health.run_all(only)
    sent = alerts.process(changes)
    return {"results": len(results), "changes": len(changes), "alerts": len(sent)}


@shared_task(name="monitoring.tasks.heartbeat")
def heartbeat() -> None:
    """celery-beat sends this every minute; a worker running it proves both are alive."""
    health.beat_heartbeat()


@shared_task(name="monitoring.tasks.run_drill")
def run_drill(policy_id: int) -> list[int]:
    return [d.pk for d in drills.run_for_policy(policy_id)]


@shared_task(name="monitoring.tasks.watchdog")
def watchdog() -> dict:
    """Every 30 s: fail jobs whose worker is gone, queue again what was lost, alert on failed runs."""
    from . import watchdog as dog

    report = dog.sweep()
    return {k: len(v) if isinstance(v, list) else v for k, v in report.items()}


@shared_task(name="monitoring.tasks.decrypt_canary")
def decrypt_canary() -> dict:
    """Weekly: the workers can still decrypt each database's newest encrypted archive."""
    results = drills.decrypt_canary()
    return {"results": len(results), "failing": sum(1 for r in results if r.status == "failing")}
