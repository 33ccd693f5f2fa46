"""Checks go red for real causes, and each change of state sends exactly one alert to a real
(local) webhook receiver — and one more when it recovers."""

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import time_machine
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule

from audit.models import AuditEvent
from backups.engine import runner, wal
from backups.engine.cluster import free_port
from backups.models import BackupPolicy, BackupRun
from monitoring import alerts, health
from monitoring.models import CheckState
from tests.backups.test_failures import tmpfs
from tests.recovery.test_pitr import switch_and_wait

pytestmark = [pytest.mark.pg, pytest.mark.django_db]


@pytest.fixture
def webhook(settings):
    """A real HTTP receiver on loopback; alerts are configured to post to it."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"payload": json.loads(body), "auth": self.headers.get("Authorization")})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.ALERT_WEBHOOK_URL = f"http://127.0.0.1:{server.server_port}/hook"
    settings.ALERT_WEBHOOK_TOKEN = "hook-token"
    settings.ALERT_EMAILS = []
    yield received
    server.shutdown()


def run(*checks):
    results, changes = health.run_all(list(checks))
    alerts.process(changes)
    return {(r.name, r.target): r for r in results}


def events_for(received, check, target):
    return [r["payload"]["event"] for r in received
            if r["payload"]["check"] == check and r["payload"]["target"] == target]


def test_a_stopped_cluster_alerts_once_and_once_on_recovery(webhook, target_db, target_cluster):
    assert run("connectivity")[("connectivity", target_db.name)].status == "ok"
    target_cluster.stop()
    try:
        result = run("connectivity")[("connectivity", target_db.name)]
        assert result.status == "failing" and "cannot reach the database server" in result.summary
        run("connectivity")  # still down: no second alert
    finally:
        target_cluster.start()
    assert run("connectivity")[("connectivity", target_db.name)].status == "ok"
    assert events_for(webhook, "connectivity", target_db.name) == ["failing", "recovered"]
    assert {r["auth"] for r in webhook} == {"Bearer hook-token"}
    assert AuditEvent.objects.filter(action="alert.failing", actor_label="system:monitoring").count() == 1
    assert AuditEvent.objects.filter(action="alert.recovered").count() == 1


def test_a_backup_older_than_its_rpo_alerts(webhook, target_db, repo):
    cron = CrontabSchedule.objects.create(minute="0", hour="2")
    policy = BackupPolicy.objects.create(database=target_db, schedule=cron, rpo_minutes=60)
    run_ = BackupRun.enqueue(target_db, trigger="manual", policy=policy, actor_label="test")
    runner.execute(run_.pk)
    target = str(policy)
    assert run("freshness")[("freshness", target)].status == "ok"
    with time_machine.travel(timezone.now() + timedelta(minutes=90)):
        result = run("freshness")[("freshness", target)]
        assert result.status == "failing" and "older than the RPO of 60 min" in result.summary
        run("freshness")
        again = BackupRun.enqueue(target_db, trigger="manual", policy=policy, actor_label="test")
        runner.execute(again.pk)
        assert run("freshness")[("freshness", target)].status == "ok"
    assert events_for(webhook, "freshness", target) == ["failing", "recovered"]


def test_a_new_policy_before_its_first_slot_is_pending_not_failing(target_db):
    in_an_hour = timezone.now() + timedelta(hours=1)
    cron = CrontabSchedule.objects.create(minute=str(in_an_hour.minute), hour=str(in_an_hour.hour))
    policy = BackupPolicy.objects.create(database=target_db, schedule=cron)
    assert run("freshness")[("freshness", str(policy))].status == "pending"
    assert health.overall() != "failing"


def test_a_broken_archive_command_and_a_missing_segment_alert(webhook, make_archiving_cluster, repo):
    cluster, db = make_archiving_cluster(name="walcheck")
    switch_and_wait(cluster)
    assert run("wal")[("wal", db.name)].status == "ok"

    # archive_command starts failing: pg_stat_archiver says so
    cluster.sql("ALTER SYSTEM SET archive_command = '/bin/false'")
    cluster.sql("SELECT pg_reload_conf()")
    with cluster.connect() as conn:
        conn.execute("SELECT txid_current()")
        conn.execute("SELECT pg_switch_wal()")
    from backups.engine.cluster import wait_until

    wait_until(lambda: cluster.sql("SELECT failed_count FROM pg_stat_archiver")[0][0] > 0, 30,
               what="a failed archive attempt")
    result = run("wal")[("wal", db.name)]
    assert result.status == "failing" and "archive_command is failing" in result.summary

    # fixed: the archiver catches up, and the check recovers
    cluster.sql(f"ALTER SYSTEM SET archive_command = '{wal.archive_command(db, repo)}'")
    cluster.sql("SELECT pg_reload_conf()")
    switch_and_wait(cluster)
    assert run("wal")[("wal", db.name)].status == "ok"

    # a segment disappears from the repository: a gap
    gap = switch_and_wait(cluster)
    switch_and_wait(cluster)
    [path] = list(wal.area_path(db, repo).rglob(f"{gap}-*"))
    saved = path.read_bytes()
    path.unlink()
    result = run("wal")[("wal", db.name)]
    assert result.status == "failing" and f"WAL gaps: {gap}..{gap}" in result.summary
    path.write_bytes(saved)
    assert run("wal")[("wal", db.name)].status == "ok"
    assert events_for(webhook, "wal", db.name) == ["failing", "recovered", "failing", "recovered"]


def test_a_nearly_full_repository_alerts(webhook, repo, settings):
    with tmpfs(repo.root, "4m"):
        filler = repo.root / "filler"
        filler.write_bytes(b"x" * (4 * 1024 * 1024 - 96 * 1024))  # leave < 5% free
        result = run("disk")[("disk", str(repo.root))]
        assert result.status == "failing" and "MiB free" in result.summary
        filler.unlink()
        assert run("disk")[("disk", str(repo.root))].status == "ok"
    assert events_for(webhook, "disk", str(repo.root)) == ["failing", "recovered"]


def test_a_check_that_stays_failing_is_reminded_at_most_every_repeat_interval(webhook, target_db, target_cluster,
                                                                               settings):
    settings.ALERT_REPEAT_SECONDS = 3600
    target_cluster.stop()
    try:
        run("connectivity")
        run("connectivity")
        with time_machine.travel(timezone.now() + timedelta(minutes=61)):
            run("connectivity")
            run("connectivity")
    finally:
        target_cluster.start()
    assert events_for(webhook, "connectivity", target_db.name) == ["failing", "still failing"]


def test_an_undeliverable_alert_is_recorded_as_such(target_db, target_cluster, settings):
    settings.ALERT_WEBHOOK_URL = f"http://127.0.0.1:{free_port()}/nobody-listens"
    settings.ALERT_EMAILS = []
    target_cluster.stop()
    try:
        run("connectivity")
    finally:
        target_cluster.start()
    event = AuditEvent.objects.get(action="alert.failing")
    assert event.outcome == "failure" and "webhook" in event.details["errors"][0]
    assert CheckState.objects.get(name="connectivity", target=target_db.name).last_alerted_at is not None
