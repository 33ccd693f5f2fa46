"""A policy's period (and so its default RPO and its task expiry) must not depend on the time
of day it is asked at."""

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django_celery_beat.models import CrontabSchedule

from backups.models import BackupPolicy, schedule_expiry_seconds, schedule_period

CASES = [
    (CrontabSchedule(minute="0", hour="2", timezone="UTC"), timedelta(days=1)),
    (CrontabSchedule(minute="0", hour="1", day_of_week="0", timezone="UTC"), timedelta(days=7)),
    (CrontabSchedule(minute="15", hour="*", timezone="UTC"), timedelta(hours=1)),
    (CrontabSchedule(minute="*/5", timezone="UTC"), timedelta(minutes=5)),
]


@pytest.mark.parametrize("at", ["2026-11-24 01:59:30", "2026-11-24 02:00:30", "2026-11-24 13:37:11",
                                "2026-11-28 23:59:59"])
@pytest.mark.parametrize("crontab,period", CASES)
def test_period_is_the_same_at_any_time_of_day(crontab, period, at):
    with time_machine.travel(datetime.fromisoformat(at).replace(tzinfo=UTC), tick=False):
        assert schedule_period(crontab) == period


def test_default_rpo_is_the_period_plus_two_hours_and_expiry_half_the_period():
    daily = CrontabSchedule(minute="0", hour="2", timezone="UTC")
    with time_machine.travel(datetime(2026, 11, 24, 3, 0, tzinfo=UTC), tick=False):
        assert BackupPolicy(schedule=daily).effective_rpo() == timedelta(hours=26)
        assert BackupPolicy(schedule=daily, rpo_minutes=90).effective_rpo() == timedelta(minutes=90)
        assert schedule_expiry_seconds(daily) == 6 * 3600
        assert schedule_expiry_seconds(CrontabSchedule(minute="*", timezone="UTC")) == 30
