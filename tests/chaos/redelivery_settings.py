"""Settings for the workers of the redelivery scenario: the portal's own, with kombu looking for
unacknowledged messages every second instead of every ~100 s (unacked_restore_interval x
unacked_restore_throttle), so that a visibility timeout of one second (CELERY_VISIBILITY_TIMEOUT=1)
shows within a test that a long task's message is handed out again while it runs."""

from bankvault.settings import *  # noqa: F403
from bankvault.settings import CELERY_BROKER_TRANSPORT_OPTIONS

CELERY_BROKER_TRANSPORT_OPTIONS = {**CELERY_BROKER_TRANSPORT_OPTIONS, "unacked_restore_interval": 1,
                                   "unacked_restore_throttle": 1}
