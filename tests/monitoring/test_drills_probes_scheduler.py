"""Restore drills against real archives, /healthz and /metrics, and backup_scheduler."""

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from audit.models import AuditEvent
from backups.engine import runner
from backups.models import BackupPolicy, BackupRun
from monitoring import drills, health
from monitoring.models import CheckState, Drill
from tests.conftest import archive_dir

pytestmark = [pytest.mark.django_db]


def scratch_leftovers(settings) -> list[Path]:
    """What a drill left in scratch (the host's job-slot lock files aside)."""
    root = Path(settings.BANKVAULT_SCRATCH_DIR)
    return sorted(p for p in root.iterdir() if p.name != "slots") if root.exists() else []


def postgres_processes_under(path: Path) -> int:
    n = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    n += 1
            except OSError:
                pass
    return n


@pytest.mark.pg
def test_a_drill_restores_the_newest_archive_records_its_rto_and_cleans_up(target_db, repo, settings):
    run = BackupRun.enqueue(target_db, trigger="manual", actor_label="test")
    archive = runner.execute(run.pk)
    drill = drills.run_archive_drill(target_db)
    assert drill.state == Drill.State.SUCCEEDED, drill.error
    assert drill.archive == archive and drill.rto_seconds > 0 and drill.tables_verified >= 6
    assert scratch_leftovers(settings) == []
    assert postgres_processes_under(Path(settings.BANKVAULT_SCRATCH_DIR)) == 0
    assert AuditEvent.objects.filter(action="drill.succeeded", target_id=str(drill.pk)).exists()
    assert CheckState.objects.get(name="drill-archive", target=target_db.name).status == "ok"


@pytest.mark.pg
def test_a_failed_drill_still_cleans_up_and_alerts(target_db, repo, settings):
    settings.ALERT_WEBHOOK_URL = ""
    run = BackupRun.enqueue(target_db, trigger="manual", actor_label="test")
    archive = runner.execute(run.pk)
    dump = archive_dir(archive) / archive.main_file.path
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    drill = drills.run_archive_drill(target_db)
    assert drill.state == Drill.State.FAILED and "checksum" in drill.error
    assert scratch_leftovers(settings) == []
    assert postgres_processes_under(Path(settings.BANKVAULT_SCRATCH_DIR)) == 0
    state = CheckState.objects.get(name="drill-archive", target=target_db.name)
    assert state.status == "failing" and state.last_alerted_at is not None
    assert AuditEvent.objects.filter(action="alert.failing", target_id=str(state.pk)).exists()


@pytest.mark.pg
def test_a_pitr_drill_recovers_and_cleans_up(make_archiving_cluster, repo, settings):
    from tests.recovery.test_pitr import base_backup, switch_and_wait

    cluster, db = make_archiving_cluster(name="drilled")
    base_backup(db)
    switch_and_wait(cluster)
    drill = drills.run_pitr_drill(db)
    assert drill.state == Drill.State.SUCCEEDED, drill.error
    assert drill.rto_seconds > 0 and drill.archive is not None
    assert not any(p.is_dir() and (p / "data").exists() for p in scratch_leftovers(settings))


def test_healthz_reports_only_the_overall_status(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    CheckState.objects.create(name="connectivity", target="auth", status="failing", summary="down: password=x")
    response = client.get("/healthz")
    assert response.status_code == 503 and response.json() == {"status": "failing"}
    assert b"password" not in response.content


@pytest.mark.pg
def test_metrics_in_prometheus_format_and_optional_token(client, target_db, repo, settings):
    run = BackupRun.enqueue(target_db, trigger="manual", actor_label="test")
    runner.execute(run.pk)
    CheckState.objects.create(name="disk", target="/repo", status="warning", summary="low")
    body = client.get("/metrics").content.decode()
    assert f'bankvault_last_backup_success_timestamp_seconds{{database="{target_db.name}"}}' in body
    assert f'bankvault_last_backup_size_bytes{{database="{target_db.name}"}}' in body
    assert 'bankvault_check_status{check="disk",target="/repo"} 1' in body
    assert "# TYPE bankvault_drill_rto_seconds gauge" in body
    settings.METRICS_TOKEN = "scrape-me"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").status_code == 200


def call(*args) -> str:
    out = StringIO()
    call_command("backup_scheduler", *args, stdout=out, stderr=out)
    return out.getvalue()


def test_setup_creates_the_default_schedules_once(target_db_row):
    first = call("--setup")
    assert "created  " in first
    names = set(PeriodicTask.objects.values_list("name", flat=True))
    assert {"bankvault: monthly cleanup", "bankvault: health checks", "bankvault: heartbeat"} <= names
    daily = BackupPolicy.objects.get(database=target_db_row, kind="logical")
    assert (daily.schedule.minute, daily.schedule.hour) == ("0", "2")
    weekly = BackupPolicy.objects.get(database=target_db_row, kind="base")
    assert (weekly.schedule.hour, weekly.schedule.day_of_week, weekly.verify_deep) == ("1", "0", True)
    cleanup = PeriodicTask.objects.get(name="bankvault: monthly cleanup").crontab
    assert (cleanup.minute, cleanup.hour, cleanup.day_of_month) == ("0", "3", "1")
    assert PeriodicTask.objects.get(name="bankvault: health checks").crontab.hour == "*/6"
    count = PeriodicTask.objects.count()
    second = call("--setup")
    assert "created  " not in second and PeriodicTask.objects.count() == count  # idempotent
    # and right after setup, the database whose first slot has not come is pending, not failing
    results = {(r.name, r.target): r.status for r in health.freshness()}
    assert results[("freshness", str(daily))] in ("pending", "ok")


def test_status_and_monitor(target_db_row):
    call("--setup")
    status = call("--status")
    assert "ACTIVE   bankvault: health checks" in status and "next " in status
    report = call("--monitor")
    assert report.startswith("=== Backup Status Report ===")
    assert "Recent Backups (last 7 days):" in report and "Backup Schedule:" in report


@pytest.mark.pg
def test_health_check_exit_status(target_db, repo, settings, monkeypatch):
    monkeypatch.setattr(health, "CHECKS", {"connectivity": health.connectivity, "disk": health.disk})
    assert "healthy" in call("--health-check")
    target_db.port = 1
    target_db.save()
    with pytest.raises(CommandError, match="1 check\\(s\\) failing"):
        call("--health-check")


@pytest.fixture
def target_db_row(db):
    from backups.models import Database

    return Database.objects.create(name="auth", host="127.0.0.1", port=5433, dbname="authdb", user="u",
                                   wal_mode="archive")


def test_policy_drill_flag_owns_a_beat_entry(target_db_row):
    cron = CrontabSchedule.objects.create(minute="0", hour="2")
    policy = BackupPolicy.objects.create(database=target_db_row, schedule=cron, drill=True)
    task = PeriodicTask.objects.get(name=f"drill-policy-{policy.pk}")
    assert task.task == "monitoring.tasks.run_drill" and task.crontab.day_of_week == "6"
    policy.drill = False
    policy.save()
    assert not PeriodicTask.objects.filter(name=f"drill-policy-{policy.pk}").exists()


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_a_long_drill_beats_so_the_watchdog_does_not_call_its_worker_lost(make_target_db, repo, settings):
    """With a 1 s "worker lost" limit and a 0.2 s heartbeat, a drill that takes longer than 1 s
    must survive a watchdog sweeping all the while (it used to be failed as lost: no heartbeat)."""
    import threading

    from monitoring import watchdog
    from tests.conftest import FIXTURE_SQL

    settings.BANKVAULT_HEARTBEAT_SECONDS = 0.2
    settings.BANKVAULT_WORKER_LOST_SECONDS = 1
    # Enough rows that the restore outlasts the limit several times over.
    target_db = make_target_db(sql=FIXTURE_SQL + "CREATE TABLE bulk AS SELECT g, md5(g::text) AS h, "
                                                 "repeat(md5(g::text), 4) AS pad FROM generate_series(1, 400000) g;"
                                                 "ALTER TABLE bulk ADD PRIMARY KEY (g);")
    runner.execute(BackupRun.enqueue(target_db, trigger="manual", actor_label="test").pk)
    stop, swept = threading.Event(), []

    def sweeping():
        from django.db import connection

        try:
            while not stop.wait(0.3):
                swept.append(watchdog.sweep()["lost_drills"])
        finally:
            connection.close()

    sweeper = threading.Thread(target=sweeping)
    sweeper.start()
    try:
        drill = drills.run_archive_drill(target_db)
    finally:
        stop.set()
        sweeper.join()
    assert drill.rto_seconds > settings.BANKVAULT_WORKER_LOST_SECONDS, "the drill was too quick to prove anything"
    assert drill.state == Drill.State.SUCCEEDED, drill.error
    assert len(swept) > 3 and not any(swept)
    drill.refresh_from_db()
    assert drill.state == Drill.State.SUCCEEDED and drill.heartbeat_at > drill.started_at
