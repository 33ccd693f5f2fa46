"""Schedules for real: celery-beat with the DatabaseScheduler sends the policy's task at its
crontab minute, a real worker process runs it against a real cluster through real Redis; and a
worker with concurrency 2 backs up two databases at the same time."""

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule

from backups import services
from backups.engine.cluster import wait_until
from backups.models import Archive, BackupPolicy, BackupRun

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Enough rows that one backup takes a noticeable moment, so overlap is visible.
BIGGER_SQL = ("CREATE TABLE filler (id int, v text);"
              "INSERT INTO filler SELECT g, md5(g::text) FROM generate_series(1, 300000) g;")


def test_beat_fires_a_crontab_and_a_worker_runs_it(make_target_db, repo, celery_procs):
    db = make_target_db(name="auth")
    # The next minute that is at least 5 s away, so beat is surely up before it comes.
    fire = (timezone.now() + timedelta(seconds=65)).replace(second=0, microsecond=0)
    cron = CrontabSchedule.objects.create(minute=str(fire.minute), hour=str(fire.hour), timezone="UTC")
    policy = BackupPolicy.objects.create(database=db, name="every-day-at-this-minute", schedule=cron)

    celery_procs("worker", "--pool", "solo", "--loglevel", "INFO", "--without-heartbeat",
                 "--without-mingle", "--without-gossip", name="worker")
    celery_procs("beat", "--loglevel", "INFO", "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
                 "--schedule", str(celery_procs.logs / "beat-schedule"), name="beat")

    deadline = (fire - timezone.now()).total_seconds() + 60
    run = wait_until(lambda: BackupRun.objects.filter(policy=policy, state__in=["succeeded", "failed"]).first(),
                     deadline, interval=0.5, what="the scheduled run (see beat.log/worker.log)")
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    assert run.trigger == BackupRun.Trigger.SCHEDULED
    assert run.requested_by_label == "system:beat"
    assert run.queued_at >= fire - timedelta(seconds=1)
    assert Archive.objects.filter(run=run).exists()
    time.sleep(2)
    assert BackupRun.objects.filter(policy=policy).count() == 1  # fired once, not per beat tick


def test_two_databases_back_up_in_parallel_on_a_worker_with_concurrency_2(make_target_db, repo, celery_procs):
    a = make_target_db(name="auth", sql=BIGGER_SQL)
    b = make_target_db(name="account", sql=BIGGER_SQL)
    celery_procs("worker", "--pool", "prefork", "--concurrency", "2", "--loglevel", "INFO",
                 "--without-mingle", "--without-gossip", name="worker")
    # Both messages are sent together once the worker is up.
    wait_until(lambda: b"ready" in (celery_procs.logs / "worker.log").read_bytes(), 60, what="worker ready")
    runs = [services.start_backup(a, actor_label="test"), services.start_backup(b, actor_label="test")]

    def ended():
        return all(r.state in ("succeeded", "failed") for r in BackupRun.objects.filter(pk__in=[x.pk for x in runs]))

    wait_until(ended, 120, interval=0.2, what="both runs")
    first, second = BackupRun.objects.filter(pk__in=[r.pk for r in runs]).order_by("started_at")
    assert first.state == second.state == BackupRun.State.SUCCEEDED, (first.error, second.error)
    assert first.worker != second.worker  # two worker processes
    assert second.started_at < first.finished_at, "the second backup waited for the first"
