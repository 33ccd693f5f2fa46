"""The Django admin: configuration with audited changes, write-only passwords, permission-
guarded actions, and read-only engine rows."""

import pytest
from django.contrib.auth.models import Permission, User
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from audit.models import AuditEvent
from backups.models import Archive, BackupPolicy, BackupRun, Database
from tests.backups.test_failures import wait_for_end

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def staff_without_backup_right(client):
    user = User.objects.create_user("viewer", password="pw-viewer-123456", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_database", "view_backuprun"]))
    client.force_login(user)
    return client


def add_database(admin_client, **overrides):
    data = {"name": "auth", "host": "127.0.0.1", "port": "5433", "dbname": "authdb", "user": "backup",
            "password": "Initial-Pw-42", "sslmode": "prefer", "default_compression": "zstd", "wal_mode": "none"}
    data.update(overrides)
    return admin_client.post("/admin/backups/database/add/", data)


def test_admin_lists_registered_databases(admin_client):
    Database.objects.create(name="auth", host="h", dbname="authdb", user="u")
    Database.objects.create(name="account", host="h", dbname="accountdb", user="u")
    page = admin_client.get("/admin/backups/database/").content.decode()
    assert "auth" in page and "account" in page and "never" in page


def test_adding_a_database_stores_the_password_encrypted_and_never_shows_it(admin_client):
    response = add_database(admin_client)
    assert response.status_code == 302, response.content.decode()[:2000]
    db = Database.objects.get(name="auth")
    assert db.get_password() == "Initial-Pw-42"
    assert "Initial-Pw-42" not in db.password_encrypted
    page = admin_client.get(f"/admin/backups/database/{db.pk}/change/").content.decode()
    assert "Initial-Pw-42" not in page and db.password_encrypted not in page
    event = AuditEvent.objects.get(action="config.database.created")
    assert event.actor_label == "admin" and event.details["changes"]["password"] == [None, "********"]


def test_changing_a_database_without_a_password_keeps_the_old_one_and_audits_the_diff(admin_client):
    add_database(admin_client)
    db = Database.objects.get(name="auth")
    data = {"name": "auth", "host": "db.internal", "port": "5433", "dbname": "authdb", "user": "backup",
            "password": "", "sslmode": "verify-full", "default_compression": "zstd", "wal_mode": "none",
            "wal_timelines-TOTAL_FORMS": "0", "wal_timelines-INITIAL_FORMS": "0"}  # the read-only inline
    assert admin_client.post(f"/admin/backups/database/{db.pk}/change/", data).status_code == 302
    db.refresh_from_db()
    assert db.get_password() == "Initial-Pw-42" and db.host == "db.internal"
    changes = AuditEvent.objects.get(action="config.database.changed").details["changes"]
    assert changes == {"host": ["127.0.0.1", "db.internal"], "sslmode": ["prefer", "verify-full"]}


def test_invalid_form_values_are_refused(admin_client):
    response = add_database(admin_client, port="70000", name="Not Valid")
    assert response.status_code == 200
    assert not Database.objects.exists()
    body = response.content.decode()
    assert "Ensure this value is less than or equal to 65535" in body
    assert "lowercase letters" in body


def test_policy_owns_its_beat_entry(admin_client):
    db = Database.objects.create(name="auth", host="h", dbname="d", user="u")
    cron = CrontabSchedule.objects.create(minute="0", hour="2")
    response = admin_client.post("/admin/backups/backuppolicy/add/", {
        "database": db.pk, "name": "daily", "kind": "logical", "schedule": cron.pk, "compression": "zstd",
        "parallel_jobs": "2", "enabled": "on", "plain_sql": "on", "keep_daily": "7", "keep_weekly": "4",
        "keep_monthly": "12"})
    assert response.status_code == 302, response.content.decode()[:3000]
    policy = BackupPolicy.objects.get()
    task = PeriodicTask.objects.get(pk=policy.periodic_task_id)
    assert task.task == "backups.tasks.run_policy" and task.args == f"[{policy.pk}]"
    assert task.crontab == cron and task.enabled
    assert 30 <= task.expire_seconds <= 6 * 3600
    assert AuditEvent.objects.filter(action="config.policy.created").exists()

    policy.enabled = False
    policy.save()
    task.refresh_from_db()
    assert not task.enabled

    admin_client.post(f"/admin/backups/backuppolicy/{policy.pk}/delete/", {"post": "yes"})
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()
    assert AuditEvent.objects.filter(action="config.policy.deleted").exists()


@pytest.mark.pg
def test_back_up_now_action_runs_a_real_backup(celery_worker_thread, admin_client, target_db, repo):
    response = admin_client.post("/admin/backups/database/", {
        "action": "back_up_now", "_selected_action": [target_db.pk]}, follow=True)
    assert "Backup of" in response.content.decode()
    run = wait_for_end(BackupRun.objects.get(database=target_db))
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    assert run.requested_by.username == "admin" and run.trigger == "manual"
    assert Archive.objects.filter(run=run).exists()


def test_back_up_now_needs_the_run_backup_permission(staff_without_backup_right):
    db = Database.objects.create(name="auth", host="h", dbname="d", user="u")
    page = staff_without_backup_right.get("/admin/backups/database/").content.decode()
    assert "back_up_now" not in page
    response = staff_without_backup_right.post("/admin/backups/database/", {
        "action": "back_up_now", "_selected_action": [db.pk]})
    assert not BackupRun.objects.exists()
    assert response.status_code in (200, 302, 403)


def test_runs_and_archives_are_read_only_in_the_admin(admin_client):
    db = Database.objects.create(name="auth", host="h", dbname="d", user="u")
    run = BackupRun.enqueue(db, trigger="manual", actor_label="test")
    assert admin_client.get("/admin/backups/backuprun/add/").status_code == 403
    response = admin_client.post(f"/admin/backups/backuprun/{run.pk}/change/", {"state": "succeeded"})
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.state == BackupRun.State.QUEUED
    assert admin_client.post(f"/admin/backups/backuprun/{run.pk}/delete/", {"post": "yes"}).status_code == 403
    assert admin_client.get("/admin/backups/archive/add/").status_code == 403
    assert admin_client.get("/admin/audit/auditevent/add/").status_code == 403


def test_anonymous_users_are_sent_to_sign_in(client):
    assert client.get("/").status_code == 302
    assert client.get("/").url.startswith("/accounts/login/")
    assert client.get("/admin/backups/database/").status_code == 302
