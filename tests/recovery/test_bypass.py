"""Attempts to get around the two-person rule. Each must fail to restore anything."""

import threading
from datetime import timedelta

import pytest
import time_machine
from django.contrib.auth.models import Group
from django.db import connection
from django.test import Client

from audit.models import AuditEvent
from backups.models import Archive, ArchiveFile, Database
from recovery import rules, services
from recovery.engine import runner
from recovery.models import RestoreRequest, RuleViolation, StateError
from tests.recovery.conftest import PASSWORD


@pytest.fixture
def dispatched(monkeypatch):
    """Dispatch to a worker is recorded instead of sent; tests run the task themselves."""
    calls = []
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: calls.append(pk))
    return calls


def make_archive(name="account") -> Archive:
    from django.utils import timezone

    db = Database.objects.create(name=name, host="127.0.0.1", port=1, dbname=name, user="u")
    now = timezone.now()
    archive = Archive.objects.create(database=db, kind="logical", path=f"archives/{name}/x_{db.pk}",
                                     started_at=now, finished_at=now, bytes=10, compression="zstd",
                                     manifest_sha256="0" * 64)
    ArchiveFile.objects.create(archive=archive, path="dump.pgdump.zst", role="dump", bytes=10, sha256="a" * 64)
    return archive


@pytest.fixture
def pending(personas):
    archive = make_archive()
    return services.file_request(personas["operator"], kind="archive", mode="replace", archive=archive,
                                 reason="test")


def refused_nothing_ran(req):
    req.refresh_from_db()
    assert req.state in ("pending", "rejected", "expired", "failed", "cancelled")
    assert req.started_at is None


@pytest.mark.django_db
def test_self_approval_is_refused_even_for_someone_in_both_groups(personas, dispatched):
    personas["operator"].groups.add(Group.objects.get(name="approver"))
    req = services.file_request(personas["operator"], kind="archive", mode="copy", new_name="x",
                                archive=make_archive(), reason="test")
    with pytest.raises(RuleViolation, match="own request"):
        req.approve(personas["operator"], password_ok=True)
    refused_nothing_ran(req)
    assert AuditEvent.objects.filter(action="restore.approval.denied", outcome="denied").exists()


@pytest.mark.django_db
def test_the_same_approver_twice_counts_once(pending, personas, dispatched):
    pending.approve(personas["approver_a"], password_ok=True)
    with pytest.raises(StateError, match="already decided"):
        pending.approve(personas["approver_a"], password_ok=True)
    assert len(rules.counted_approvals(pending)) == 1
    refused_nothing_ran(pending)
    assert dispatched == []


@pytest.mark.django_db
def test_approvers_outside_the_group_superusers_included_are_refused(pending, personas, dispatched):
    for who in ("superuser", "auditor", "operator_b", "outsider"):
        with pytest.raises(RuleViolation, match="approver group"):
            pending.approve(personas[who], password_ok=True)
    refused_nothing_ran(pending)


@pytest.mark.django_db
def test_approval_without_password_reentry_is_refused(pending, personas, dispatched):
    with pytest.raises(RuleViolation, match="fresh proof of identity") as exc:
        pending.approve(personas["approver_a"], password_ok=False)
    assert exc.value.code == "auth"
    assert not pending.approvals.exists()


@pytest.mark.django_db
def test_approval_after_expiry_is_refused(pending, personas, dispatched, settings):
    expired = pending.created_at + timedelta(seconds=settings.RESTORE_REQUEST_TTL + 1)
    with time_machine.travel(expired), pytest.raises(StateError, match="expired"):
        pending.approve(personas["approver_a"], password_ok=True)
    pending.refresh_from_db()
    assert pending.state == "expired"
    assert AuditEvent.objects.filter(action="restore.request.expired").exists()


@pytest.mark.django_db
def test_an_approved_request_not_started_within_the_window_expires(pending, personas, dispatched, settings):
    pending.approve(personas["approver_a"], password_ok=True)
    pending.approve(personas["approver_b"], password_ok=True)
    pending.refresh_from_db()
    assert pending.state == "approved"
    with time_machine.travel(pending.decided_at + timedelta(seconds=settings.RESTORE_EXECUTION_WINDOW + 1)):
        from recovery.tasks import expire_requests

        assert expire_requests() == 1
        assert runner.execute(pending.pk) is None
    refused_nothing_ran(pending)


@pytest.mark.django_db
def test_a_forged_task_message_on_a_pending_request_runs_nothing(pending, personas):
    from recovery.tasks import execute_restore

    execute_restore(pending.pk)  # what a worker would do with a forged execute_restore.delay(id)
    refused_nothing_ran(pending)
    assert pending.state == "pending"
    assert AuditEvent.objects.filter(action="restore.execution.refused", target_id=str(pending.pk)).exists()


@pytest.mark.django_db
def test_the_task_fails_closed_when_an_approver_lost_the_role(pending, personas, dispatched):
    pending.approve(personas["approver_a"], password_ok=True)
    pending.approve(personas["approver_b"], password_ok=True)
    personas["approver_b"].groups.clear()
    assert runner.execute(pending.pk) is None
    pending.refresh_from_db()
    assert pending.state == "failed" and "bert is no longer an active member of the approver group" in pending.error


@pytest.mark.django_db
def test_the_task_fails_closed_when_the_requester_was_deactivated(pending, personas, dispatched):
    pending.approve(personas["approver_a"], password_ok=True)
    pending.approve(personas["approver_b"], password_ok=True)
    personas["operator"].is_active = False
    personas["operator"].save()
    assert runner.execute(pending.pk) is None
    pending.refresh_from_db()
    assert pending.state == "failed" and "requester olga is no longer an active operator" in pending.error


@pytest.mark.django_db
def test_content_changed_behind_the_approvers_backs_is_refused(pending, personas, dispatched):
    pending.approve(personas["approver_a"], password_ok=True)
    other = make_archive("other")
    RestoreRequest.objects.filter(pk=pending.pk).update(archive=other)  # a direct database edit
    pending.refresh_from_db()
    with pytest.raises(RuleViolation, match="digest mismatch"):
        pending.approve(personas["approver_b"], password_ok=True)
    refused_nothing_ran(pending)


@pytest.mark.django_db
def test_a_request_cannot_be_edited_after_filing(pending):
    pending.reason = "something else"
    with pytest.raises(StateError, match="immutable"):
        pending.save()


@pytest.mark.django_db
def test_editing_state_via_the_admin_is_impossible(pending, personas, client):
    client.force_login(personas["superuser"])
    url = f"/admin/recovery/restorerequest/{pending.pk}/change/"
    page = client.get(url)
    assert page.status_code == 200 and 'name="state"' not in page.content.decode()
    assert client.post(url, {"state": "approved"}).status_code == 403
    changelist = client.post("/admin/recovery/restorerequest/", {"action": "delete_selected",
                                                                 "_selected_action": [pending.pk]})
    assert changelist.status_code in (200, 302)
    assert client.get("/admin/recovery/restorerequest/add/").status_code == 403
    refused_nothing_ran(pending)
    assert RestoreRequest.objects.filter(pk=pending.pk).exists()


@pytest.mark.django_db
def test_a_post_without_csrf_token_is_refused(pending, personas):
    client = Client(enforce_csrf_checks=True)
    client.force_login(personas["approver_a"])
    response = client.post(f"/restores/{pending.pk}/approve/", {"password": PASSWORD})
    assert response.status_code == 403
    assert not pending.approvals.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_approvals_start_exactly_one_execution(personas, monkeypatch):
    from tests.recovery.conftest import ensure_roles

    ensure_roles()
    calls = []
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: calls.append(pk))
    req = services.file_request(personas["operator"], kind="archive", mode="copy", new_name="x",
                                archive=make_archive(), reason="race")
    barrier = threading.Barrier(3)
    outcomes = []

    def approve(who):
        try:
            barrier.wait()
            req_copy = RestoreRequest.objects.get(pk=req.pk)
            req_copy.approve(personas[who], password_ok=True)
            outcomes.append("ok")
        except (StateError, RuleViolation) as exc:
            outcomes.append(type(exc).__name__)
        finally:
            connection.close()

    threads = [threading.Thread(target=approve, args=(w,)) for w in ("approver_a", "approver_b", "approver_c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    req.refresh_from_db()
    assert req.state == "approved"
    assert sorted(outcomes) == ["StateError", "ok", "ok"]  # the third came after it was approved
    assert calls == [req.pk]  # dispatched exactly once
    # and two deliveries of the task message claim it once
    claims = []
    for _ in range(2):
        try:
            RestoreRequest.objects.get(pk=req.pk).claim("w")
            claims.append("claimed")
        except (RuleViolation, StateError):
            claims.append("refused")
    assert claims == ["claimed", "refused"]
