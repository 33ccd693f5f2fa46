import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankvault.settings")

# The queues, one per kind of work, so that a long base backup never delays a health check or
# a restore (routing: CELERY_TASK_ROUTES in settings). "celery" is Celery's default queue, for
# anything not routed. A worker that should do everything listens to ALL_QUEUES.
QUEUES = ("backups", "wal", "restores", "checks", "celery")
ALL_QUEUES = ",".join(QUEUES)

app = Celery("bankvault")
# Every Celery setting lives in Django's settings with a CELERY_ prefix.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
