"""The pieces that let bankvault run unattended: one run per schedule slot, one job per database,
a limit per host, heartbeats that tell a dead worker from a slow one, hung jobs stopped, and a
watchdog that fails what was lost, queues again what was forgotten, and alerts once."""

import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import OperationalError, connection
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule

from audit.models import AuditEvent
from backups import locks
from backups.engine import pgtools
from backups.liveness import Heartbeat, db_retry, moved
from backups.models import Archive, BackupPolicy, BackupRun, Database, previous_slot, slot_key
from monitoring import watchdog
from monitoring.models import CheckState

pytestmark = [pytest.mark.django_db]


def at(text):
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def auth():
    return Database.objects.create(name="auth", host="127.0.0.1", port=1, dbname="authdb", user="u")


@pytest.fixture
def policy(auth):
    cron = CrontabSchedule.objects.create(minute="0", hour="2", timezone="UTC")
    return BackupPolicy.objects.create(database=auth, name="daily", schedule=cron)


# -- one run per slot ----------------------------------------------------------------------------
def test_previous_slot_is_the_slot_a_late_message_belongs_to():
    daily = CrontabSchedule(minute="0", hour="2", timezone="UTC")
    assert previous_slot(daily, at("2026-11-24 03:10:00")) == at("2026-11-24 02:00:00")
    assert previous_slot(daily, at("2026-11-24 02:00:59")) == at("2026-11-24 02:00:00")
    assert previous_slot(daily, at("2026-11-24 01:59:00")) == at("2026-11-23 02:00:00")
    sunday = CrontabSchedule(minute="0", hour="1", day_of_week="0", timezone="UTC")
    assert previous_slot(sunday, at("2026-11-24 12:00:00")) == at("2026-11-22 01:00:00")  # 22nd: a Sunday
    first = CrontabSchedule(minute="0", hour="3", day_of_month="1", timezone="UTC")
    assert previous_slot(first, at("2026-11-24 12:00:00")) == at("2026-11-01 03:00:00")


def test_a_duplicated_beat_message_never_makes_a_second_run(policy, monkeypatch):
    from backups import tasks

    executed = []
    monkeypatch.setattr(tasks.runner, "execute", lambda pk: executed.append(pk) or BackupRun.objects.filter(
        pk=pk).update(state="running"))
    with time_machine.travel(at("2026-11-24 02:00:03"), tick=False):
        tasks.run_policy(policy.pk)
    with time_machine.travel(at("2026-11-24 02:04:00"), tick=False):
        tasks.run_policy(policy.pk)  # the same slot, redelivered
    assert BackupRun.objects.count() == 1 and len(executed) == 1
    assert BackupRun.objects.get().slot_key == f"{policy.pk}@2026-11-24T02:00Z"
    with time_machine.travel(at("2026-11-25 02:00:01"), tick=False):
        tasks.run_policy(policy.pk)  # the next slot
    assert BackupRun.objects.count() == 2 and len(executed) == 2


@pytest.mark.django_db(transaction=True)
def test_racing_duplicates_of_one_slot_make_one_run(policy):
    key = slot_key(policy, at("2026-11-24 02:00:00"))
    runs, errors = [], []

    def enqueue():
        try:
            runs.append(BackupRun.enqueue(policy.database, trigger="scheduled", policy=policy,
                                          actor_label="system:beat", slot_key=key).pk)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=enqueue) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(runs)) == 1 and BackupRun.objects.count() == 1
    assert AuditEvent.objects.filter(action="backup.run.queued").count() == 1


# -- one job per database, a limit per host ----------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_database_is_held_by_one_job_and_released_when_its_holder_dies(auth):
    with locks.database_lock(auth, "backup run 12"):
        with pytest.raises(locks.Busy, match=r"auth is busy: backup run 12 \(since .*\) holds it"), \
                locks.database_lock(auth, "backup run 13"):
            pass
        started = time.monotonic()
        with pytest.raises(locks.Busy, match="waited 1 s"), locks.database_lock(auth, "restore request 4", wait=1):
            pass
        assert time.monotonic() - started >= 1
    with locks.database_lock(auth, "backup run 13"):
        pass
    # A worker killed mid-job: its session ends, the lock with it (no stale lock to clear).
    holder_done, release = threading.Event(), threading.Event()

    def holder():
        try:
            with locks.database_lock(auth, "backup run 14"):
                holder_done.set()
                release.wait(10)
        except Exception:  # noqa: BLE001 - its connection is killed under it
            pass

    t = threading.Thread(target=holder)
    t.start()
    holder_done.wait(5)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'bankvault: backup run 14'")
    with locks.database_lock(auth, "backup run 15", wait=5):
        pass
    release.set()
    t.join()


@pytest.mark.django_db(transaction=True)
def test_a_lock_lost_with_the_portal_databases_connection_is_taken_again(auth, settings):
    """A restart of the portal's database ends the lock's session while the job goes on: the job
    takes its lock again, so a second job still finds the database busy."""
    settings.BANKVAULT_HEARTBEAT_SECONDS = 0.2

    def holders() -> list[int]:
        with connection.cursor() as cur:
            cur.execute("SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                        "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.granted "
                        "AND a.application_name = 'bankvault: backup run 21'", [locks.LOCK_CLASS, auth.pk])
            return [row[0] for row in cur.fetchall()]

    with locks.database_lock(auth, "backup run 21"):
        [first] = holders()
        with connection.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", [first])
        deadline = time.monotonic() + 10
        while holders() in ([], [first]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(holders()) == 1 and holders() != [first], "the job did not take its lock again"
        with pytest.raises(locks.Busy, match="backup run 21"), locks.database_lock(auth, "backup run 22"):
            pass
    assert holders() == []
    with locks.database_lock(auth, "backup run 22"):
        pass


def test_jobs_per_host_are_limited(settings, tmp_path):
    settings.BANKVAULT_SCRATCH_DIR = tmp_path
    settings.BANKVAULT_HOST_JOBS = 1
    with locks.host_slot() as slot:
        assert slot == 0
        with pytest.raises(locks.Busy, match="all 1 job slots of this host are taken"), \
                locks.host_slot(wait=0.3, poll=0.1):
            pass
    with locks.host_slot(wait=0):
        pass
    settings.BANKVAULT_HOST_JOBS = 0
    with locks.host_slot() as slot, locks.host_slot() as other:
        assert slot == other == -1  # no limit


# -- heartbeats and hung jobs ----------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_silent_job_is_stopped_as_hung_and_a_moving_one_is_not(auth):
    run = BackupRun.objects.create(database=auth, trigger="manual", state="running", started_at=timezone.now())
    proc, _ = pgtools.spawn(["sleep", "30"], env={})
    with Heartbeat(BackupRun, run.pk, alive_states=BackupRun.ACTIVE_STATES, interval=0.1, hung_after=0.6) as hb:
        proc.wait(timeout=10)
    assert hb.hung and proc.returncode != 0 and "nothing moved for 0.6 seconds" in hb.reason
    run.refresh_from_db()
    assert run.heartbeat_at is not None and timezone.now() - run.heartbeat_at < timedelta(seconds=5)

    proc, _ = pgtools.spawn(["sleep", "30"], env={})
    with Heartbeat(BackupRun, run.pk, alive_states=BackupRun.ACTIVE_STATES, interval=0.1, hung_after=0.6) as hb:
        for _ in range(15):  # 1.5 s of a job that keeps moving bytes
            moved(4096)
            time.sleep(0.1)
    assert not hb.hung and proc.poll() is None
    pgtools.kill(proc)


def test_a_state_change_waits_for_the_portal_database_to_come_back(settings):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("server closed the connection unexpectedly")
        return "done"

    assert db_retry(flaky, what="test", seconds=10) == "done" and len(calls) == 3
    with pytest.raises(OperationalError):
        db_retry(lambda: (_ for _ in ()).throw(OperationalError("down")), what="test", seconds=0.2)


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_cataloging_waits_for_the_portal_database_and_never_catalogs_twice(target_db, repo, monkeypatch):
    """The portal's database restarts while a finished archive is cataloged: once before the
    rows commit, once after the commit but before its answer arrives. One archive either way."""
    from backups.engine import runner

    real, calls = runner.catalog, []

    def restarting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("terminating connection due to administrator command")
        archive = real(*args, **kwargs)
        if len(calls) == 2:
            raise OperationalError("server closed the connection unexpectedly")  # committed, answer lost
        return archive

    monkeypatch.setattr(runner, "catalog", restarting)
    run = BackupRun.enqueue(target_db, trigger="manual", actor_label="test")
    archive = runner.execute(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded" and len(calls) == 2
    assert list(Archive.objects.filter(run=run).values_list("pk", flat=True)) == [archive.pk]


# -- the watchdog --------------------------------------------------------------------------------
def test_a_run_whose_worker_died_fails_and_a_scheduled_one_is_retried_once(policy, repo, monkeypatch, settings,
                                                                            django_capture_on_commit_callbacks):
    dispatched = []
    monkeypatch.setattr("backups.services.dispatch", lambda run: dispatched.append(run.pk))
    now = timezone.now()
    old = now - timedelta(minutes=5)
    run = BackupRun.objects.create(database=policy.database, policy=policy, trigger="scheduled", state="running",
                                   worker="host-a:4242", started_at=old, heartbeat_at=old,
                                   slot_key=f"{policy.pk}@2026-11-24T02:00Z")
    manual = BackupRun.objects.create(database=policy.database, trigger="manual", state="running",
                                      started_at=old, heartbeat_at=old)
    alive = BackupRun.objects.create(database=policy.database, trigger="manual", state="running",
                                     started_at=old, heartbeat_at=now - timedelta(seconds=20))
    staging = repo.tmp / f"run-{run.pk}-x"
    staging.mkdir(parents=True)
    (staging / "dump.pgdump.zst").write_bytes(b"partial")
    with django_capture_on_commit_callbacks(execute=True):
        report = watchdog.sweep(now)
    run.refresh_from_db()
    manual.refresh_from_db()
    alive.refresh_from_db()
    assert run.state == manual.state == "failed" and alive.state == "running"
    assert run.error.startswith("worker lost: no heartbeat from host-a:4242 since")
    assert not staging.exists()
    retry = BackupRun.objects.get(retry_of=run)
    assert retry.slot_key == f"{run.slot_key}+retry" and dispatched == [retry.pk]
    assert {r["run"] for r in report["lost_runs"]} == {run.pk, manual.pk}
    failed = AuditEvent.objects.get(action="backup.run.failed", target_id=str(run.pk))
    assert failed.actor_label == "system:watchdog"

    # The retry dies too: it fails, and is not retried again.
    BackupRun.objects.filter(pk=retry.pk).update(state="running", started_at=old, heartbeat_at=old)
    with django_capture_on_commit_callbacks(execute=True):
        watchdog.sweep(now)
    assert BackupRun.objects.get(pk=retry.pk).state == "failed" and dispatched == [retry.pk]
    assert BackupRun.objects.count() == 4


def test_a_forgotten_queued_run_is_queued_again_once(auth, monkeypatch, settings, django_capture_on_commit_callbacks):
    dispatched = []
    monkeypatch.setattr("backups.services.dispatch", lambda run: dispatched.append(run.pk))
    now = timezone.now()
    lost = BackupRun.objects.create(database=auth, trigger="manual", queued_at=now - timedelta(minutes=11))
    fresh = BackupRun.objects.create(database=auth, trigger="manual", queued_at=now - timedelta(minutes=1))
    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            watchdog.sweep(now)
    assert dispatched == [lost.pk] and BackupRun.objects.get(pk=lost.pk).requeued_at is not None
    assert BackupRun.objects.get(pk=fresh.pk).requeued_at is None


def test_a_failed_run_alerts_once_and_the_next_good_one_recovers(auth, settings):
    settings.ALERT_EMAILS, settings.ALERT_WEBHOOK_URL = [], ""
    now = timezone.now()
    BackupRun.objects.create(database=auth, trigger="scheduled", state="failed", finished_at=now,
                             error="could not connect to the database server")
    for _ in range(3):
        watchdog.sweep(now)
    state = CheckState.objects.get(name="last-run", target="auth")
    assert state.status == "failing" and "could not connect" in state.summary
    assert AuditEvent.objects.filter(action="alert.failing").count() == 1
    BackupRun.objects.create(database=auth, trigger="scheduled", state="succeeded",
                             finished_at=now + timedelta(minutes=1))
    watchdog.sweep(now)
    assert CheckState.objects.get(name="last-run", target="auth").status == "ok"
    assert AuditEvent.objects.filter(action="alert.recovered").count() == 1


@pytest.mark.pg
def test_a_restore_whose_worker_died_fails_and_its_work_database_is_dropped(personas, target_db, target_cluster,
                                                                            monkeypatch):
    from recovery import services
    from recovery.models import RestoreRequest
    from tests.recovery.test_bypass import make_archive

    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)
    archive = make_archive("other")
    archive.database = target_db
    archive.save()
    req = services.file_request(personas["operator"], kind="archive", mode="copy", new_name="inspect",
                                archive=archive, reason="test")
    old = timezone.now() - timedelta(minutes=5)
    RestoreRequest.objects.filter(pk=req.pk).update(state="running", started_at=old, heartbeat_at=old,
                                                    worker="host-b:99")
    target_cluster.sql(f'CREATE DATABASE "inspect__restore_{req.pk}"')
    watchdog.sweep()
    req.refresh_from_db()
    assert req.state == "failed" and req.error.startswith("worker lost: no heartbeat from host-b:99")
    assert f"removed inspect__restore_{req.pk}" in req.error and "live database was not touched" in req.error
    with target_cluster.connect() as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
    assert f"inspect__restore_{req.pk}" not in names and target_db.dbname in names


@pytest.mark.django_db(transaction=True)
def test_a_silent_job_whose_server_is_still_working_is_not_hung(auth):
    run = BackupRun.objects.create(database=auth, trigger="manual", state="running", started_at=timezone.now())
    asked = []

    def busy():
        asked.append(1)
        return len(asked) < 4  # the server works for a while (an index build), then stops

    proc, _ = pgtools.spawn(["sleep", "30"], env={})
    with Heartbeat(BackupRun, run.pk, alive_states=BackupRun.ACTIVE_STATES, interval=0.1, hung_after=0.3,
                   busy=busy) as hb:
        proc.wait(timeout=10)
    assert hb.hung and len(asked) == 4 and proc.returncode != 0

    def broken():
        raise OSError("server unreachable")

    proc, _ = pgtools.spawn(["sleep", "30"], env={})
    with Heartbeat(BackupRun, run.pk, alive_states=BackupRun.ACTIVE_STATES, interval=0.1, hung_after=0.3,
                   busy=broken) as hb:
        proc.wait(timeout=10)
    assert hb.hung, "a probe that cannot tell must not keep a hung job alive"


@pytest.mark.django_db
def test_a_restore_counts_as_working_while_its_work_database_runs_a_statement(personas, target_db,
                                                                               target_cluster, monkeypatch):
    from recovery import services
    from recovery.engine.runner import _server_working
    from tests.recovery.test_bypass import make_archive

    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)
    archive = make_archive("other")
    archive.database = target_db
    archive.save()
    req = services.file_request(personas["operator"], kind="archive", mode="copy", new_name="inspect",
                                archive=archive, reason="test")
    work = f"inspect__restore_{req.pk}"
    target_cluster.sql(f'CREATE DATABASE "{work}"')
    try:
        assert not _server_working(req)
        sleeper = threading.Thread(target=lambda: target_cluster.sql(
            "SET application_name = 'pg_restore'; SELECT pg_sleep(3)", dbname=work))
        sleeper.start()
        time.sleep(0.8)
        assert _server_working(req)
        sleeper.join()
        assert not _server_working(req)
    finally:
        target_cluster.sql(f'DROP DATABASE IF EXISTS "{work}" WITH (FORCE)')


def test_tools_started_elsewhere_can_be_stopped_too():
    proc = pgtools.track(subprocess.Popen(["sleep", "30"]))
    assert pgtools.kill_active() >= 1
    assert proc.wait(timeout=10) != 0


# -- wired into the backup runner ------------------------------------------------------------------
@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_a_second_backup_of_a_busy_database_fails_clearly_and_starts_nothing(target_db, repo):
    from backups.engine import pgtools as tools
    from backups.engine import runner

    run = BackupRun.enqueue(target_db, trigger="manual", actor_label="test")
    with locks.database_lock(target_db, "backup run 777"), pytest.raises(tools.BackupError):
        runner.execute(run.pk)
    run.refresh_from_db()
    assert run.state == "failed" and run.error.startswith("ledger is busy: backup run 777 (since ")
    assert run.error.endswith("Nothing was started.") and not (repo.tmp.is_dir() and any(repo.tmp.iterdir()))
    assert runner.execute(BackupRun.enqueue(target_db, trigger="manual", actor_label="test").pk) is not None


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_a_backup_that_moves_nothing_is_stopped_as_hung(target_db, target_cluster, repo, settings):
    from backups.engine import pgtools as tools
    from backups.engine import runner

    settings.BANKVAULT_HEARTBEAT_SECONDS, settings.BANKVAULT_HUNG_SECONDS = 0.2, 1.5
    run = BackupRun.enqueue(target_db, trigger="manual", actor_label="test")
    with target_cluster.connect(target_db.dbname, autocommit=False) as blocker:
        blocker.execute("LOCK TABLE ledger.accounts IN ACCESS EXCLUSIVE MODE")  # pg_dump waits, silent
        started = time.monotonic()
        with pytest.raises(tools.BackupError):
            runner.execute(run.pk)
        blocker.rollback()
    run.refresh_from_db()
    assert run.state == "failed" and run.error.startswith("hung: nothing moved for 1.5 seconds")
    assert time.monotonic() - started < 30 and not any(repo.tmp.iterdir())


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_a_replace_restore_waits_for_a_running_backup_then_fails_clearly(personas, target_db, repo, settings,
                                                                         monkeypatch):
    from backups.engine import runner as backup_runner
    from recovery import services
    from recovery.engine import runner as restore_runner

    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)
    archive = backup_runner.execute(BackupRun.enqueue(target_db, trigger="manual", actor_label="test").pk)
    req = services.file_request(personas["operator"], kind="archive", mode="replace", archive=archive, reason="t")
    req.approve(personas["approver_a"], password_ok=True)
    req.approve(personas["approver_b"], password_ok=True)
    settings.BANKVAULT_RESTORE_LOCK_WAIT = 1
    with locks.database_lock(target_db, "backup run 9"), pytest.raises(locks.Busy):
        restore_runner.execute(req.pk)
    req.refresh_from_db()
    assert req.state == "failed" and req.error.startswith("ledger is busy: backup run 9 (since ")
    assert "waited 1 s. Nothing was started." in req.error
