"""The HTTP API (/api/v1/): filing, approving, rejecting and cancelling restore requests under the
two-person rule, what each role can read, and that errors come back as JSON a person can act on."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from audit.models import AuditEvent
from backups.models import Archive, ArchiveFile, Database
from recovery import services
from recovery.models import RestoreRequest
from tests.recovery.conftest import PASSWORD, make_user

pytestmark = pytest.mark.django_db

API = "/api/v1"
DB_PASSWORD = "api-test-db-password-7c1e"
RESTORE_PASSWORD = "api-test-restore-password-9d2f"


def client_for(user=None, **extra) -> APIClient:
    client = APIClient(**extra)
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


@pytest.fixture
def api(personas):
    """api("approver_a") -> an APIClient holding that persona's token."""
    return lambda name, **extra: client_for(personas[name], **extra)


def make_archive(db: Database, *, days_ago: int = 1, kind: str = "logical") -> Archive:
    started = timezone.now() - timedelta(days=days_ago)
    archive = Archive.objects.create(
        database=db, kind=kind, state="complete", path=f"archives/{db.name}/{started:%Y%m%d_%H%M%S}_{kind}",
        started_at=started, finished_at=started + timedelta(minutes=1), bytes=4096, compression="zstd",
        manifest_sha256="a" * 64)
    ArchiveFile.objects.create(archive=archive, path="dump.pgc.zst", role="dump", bytes=4000, sha256="b" * 64)
    return archive


@pytest.fixture
def ledger(db) -> Database:
    database = Database(name="ledger", host="10.0.0.5", port=5432, dbname="ledger_prod", user="backup",
                        restore_user="restorer")
    database.set_password(DB_PASSWORD)
    database.set_restore_password(RESTORE_PASSWORD)
    database.save()
    return database


@pytest.fixture
def archive(ledger) -> Archive:
    return make_archive(ledger)


@pytest.fixture
def pending(personas, archive) -> RestoreRequest:
    return services.file_request(personas["operator"], kind="archive", mode="copy", new_name="ledger_copy",
                                 archive=archive, reason="check yesterday's balances")


@pytest.fixture
def dispatched(monkeypatch):
    """Approved requests are handed to a worker on commit; here that is only noted."""
    calls = []
    monkeypatch.setattr("recovery.models._dispatch", calls.append)
    return calls


def approve(client, req, password=PASSWORD, **body):
    return client.post(f"{API}/restore-requests/{req.pk}/approve/", {"password": password, **body}, format="json")


# -- filing -------------------------------------------------------------------------------------------
def test_operator_files_a_request_and_gets_it_back_pending_with_its_digest(api, archive):
    resp = api("operator").post(f"{API}/restore-requests/", {
        "database": "ledger", "kind": "archive", "archive": archive.pk, "mode": "copy",
        "new_name": "ledger_copy", "reason": "check yesterday's balances", "change_ticket": "CHG-7"}, format="json")
    assert resp.status_code == 201, resp.content
    body = resp.json()
    req = RestoreRequest.objects.get(pk=body["id"])
    assert resp["Location"] == f"{API}/restore-requests/{req.pk}/"
    assert body["state"] == "pending" and body["digest"] == req.digest and len(body["digest"]) == 64
    assert body["database"] == "ledger" and body["archive"] == archive.pk and body["requester"] == "olga"
    assert body["required_approvals"] == 2 and body["approvals"] == []
    assert body["items"][0]["sha256"] == "b" * 64
    assert body["url"].endswith(f"/restores/{req.pk}/")
    assert body["progress"] == {"done": 0, "total": 0, "item": ""}
    assert AuditEvent.objects.filter(action="restore.request.created", target_id=str(req.pk),
                                     details__via="api").exists()


def test_target_time_accepts_the_old_tools_stamp(api, archive):
    resp = api("operator").post(f"{API}/restore-requests/", {
        "kind": "system", "target_time": "20241205_020000", "mode": "replace", "reason": "quarterly drill"},
        format="json")
    assert resp.status_code == 201, resp.content
    assert resp.json()["target_time"].startswith("2024-12-05T02:00:00")
    assert resp.json()["items"][0]["archive"] == archive.pk


@pytest.mark.parametrize("persona, status", [("approver_a", 403), ("auditor", 403), ("outsider", 403),
                                             ("superuser", 403), (None, 401)])
def test_only_operators_can_file(personas, archive, persona, status):
    client = client_for(personas[persona] if persona else None)
    resp = client.post(f"{API}/restore-requests/", {"kind": "archive", "archive": archive.pk, "mode": "copy",
                                                    "new_name": "x", "reason": "r"}, format="json")
    assert resp.status_code == status
    assert resp.json()["error"]
    assert not RestoreRequest.objects.exists()
    if persona:
        assert AuditEvent.objects.filter(action="restore.request.denied", actor=personas[persona],
                                         details__via="api").exists()


def test_anonymous_is_told_how_to_authenticate(db):
    resp = client_for().get(f"{API}/restore-requests/")
    assert resp.status_code == 401
    assert "Authorization: Token" in resp.json()["error"]
    assert resp["WWW-Authenticate"] == "Token"


def test_non_operator_gets_403_even_for_bad_input(api):
    resp = api("approver_a").post(f"{API}/restore-requests/", {"database": "nope"}, format="json")
    assert resp.status_code == 403


@pytest.mark.parametrize("body, field, message", [
    ({"kind": "archive", "mode": "copy", "new_name": "c"}, "reason", "Say why"),
    ({"kind": "archive", "mode": "copy", "reason": "r"}, "new_name", "A copy needs a new name"),
    ({"kind": "bogus", "reason": "r", "new_name": "c"}, "kind", "Unknown kind 'bogus'"),
    ({"kind": "archive", "mode": "sideways", "reason": "r", "new_name": "c"}, "mode", "Unknown mode"),
    ({"kind": "pitr", "database": "ledger", "target_time": "2999-01-01T00:00:00Z", "reason": "r", "new_name": "c"},
     "target_time", "in the future"),
    ({"kind": "pitr", "database": "ledger", "target_time": "yesterday-ish", "reason": "r", "new_name": "c"},
     "target_time", "is not a time"),
    ({"kind": "archive", "database": "nosuch", "reason": "r", "new_name": "c"}, "database",
     "no registered database named 'nosuch'"),
    ({"kind": "archive", "archive": 999999, "reason": "r", "new_name": "c"}, "archive", "no archive with id 999999"),
    ({"kind": "tables", "database": "ledger", "tables": "ledger.accounts", "reason": "r"}, "tables",
     "Expected a list"),
    ({"kind": "archive", "new_name": "Bad Name!", "reason": "r"}, "new_name", "lowercase"),
])
def test_bad_input_is_a_400_naming_the_field(api, archive, body, field, message):
    body = {"archive": archive.pk, **body} if body["kind"] == "archive" and "archive" not in body else body
    resp = api("operator").post(f"{API}/restore-requests/", body, format="json")
    assert resp.status_code == 400, resp.content
    data = resp.json()
    assert message in " ".join(data["fields"][field])
    assert message in data["error"]
    assert not RestoreRequest.objects.exists()


def test_archive_of_another_database_is_refused(api, archive):
    make_archive(Database.objects.create(name="auth", host="h", dbname="auth", user="u"))
    resp = api("operator").post(f"{API}/restore-requests/", {
        "kind": "archive", "database": "auth", "archive": archive.pk, "mode": "copy", "new_name": "c",
        "reason": "r"}, format="json")
    assert resp.status_code == 400
    assert "belongs to ledger, not auth" in resp.json()["fields"]["archive"][0]


def test_a_second_open_request_for_the_same_database_is_refused(api, pending, archive):
    resp = api("operator_b").post(f"{API}/restore-requests/", {
        "kind": "archive", "archive": archive.pk, "mode": "copy", "new_name": "c2", "reason": "r"}, format="json")
    assert resp.status_code == 400
    assert "already has an open restore request" in resp.json()["fields"]["non_field_errors"][0]


# -- approving ----------------------------------------------------------------------------------------
def test_requester_cannot_approve_own_request(archive, personas):
    dual = make_user("dora", "operator", "approver")  # holds both roles; the rule still holds
    req = services.file_request(dual, kind="archive", mode="copy", new_name="c", archive=archive, reason="r")
    resp = approve(client_for(dual), req)
    assert resp.status_code == 403
    assert "no one can approve their own request" in resp.json()["error"]
    assert not req.approvals.exists()


@pytest.mark.parametrize("password", [None, "", "wrong-password"])
def test_approval_needs_the_approvers_own_password(api, pending, password):
    client = api("approver_a")
    body = {} if password is None else {"password": password}
    resp = client.post(f"{API}/restore-requests/{pending.pk}/approve/", body, format="json")
    assert resp.status_code == 403
    assert "enter your password" in resp.json()["error"]
    assert not pending.approvals.exists()
    assert AuditEvent.objects.filter(action="restore.approval.denied", target_id=str(pending.pk),
                                     outcome="denied").exists()


def test_someone_elses_password_does_not_count(api, pending):
    assert approve(api("approver_a"), pending, password="not-annas").status_code == 403


@pytest.mark.parametrize("persona", ["auditor", "operator_b"])
def test_people_who_can_read_but_are_not_approvers_get_403(api, pending, persona):
    resp = approve(api(persona), pending)
    assert resp.status_code == 403
    assert "approver group" in resp.json()["error"]


def test_superuser_outside_the_approver_group_cannot_approve(api, pending):
    resp = approve(api("superuser"), pending)
    assert resp.status_code == 403
    assert "superuser or staff status does not count" in resp.json()["error"]
    assert not pending.approvals.exists()
    assert AuditEvent.objects.filter(action="restore.approval.denied", actor__username="root").exists()


def test_otp_required_but_not_yet_verifiable_refuses(api, pending, settings):
    settings.APPROVER_REQUIRE_OTP = True
    resp = approve(api("approver_a"), pending, otp="123456")
    assert resp.status_code == 403
    assert "one-time password" in resp.json()["error"]


def test_two_distinct_approvers_approve_and_the_restore_is_dispatched_once(
        api, pending, dispatched, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        first = approve(api("approver_a"), pending, comment="balances look wrong")
    assert first.status_code == 200
    assert first.json()["state"] == "pending"
    assert [a["user"] for a in first.json()["approvals"]] == ["anna"]
    assert dispatched == []

    with django_capture_on_commit_callbacks(execute=True):
        again = approve(api("approver_a"), pending)
    assert again.status_code == 409
    assert "one person counts once" in again.json()["error"]

    with django_capture_on_commit_callbacks(execute=True):
        second = approve(api("approver_b"), pending)
    assert second.status_code == 200, second.content
    body = second.json()
    assert body["state"] == "approved" and body["decided_at"] and body["expires_at"]
    assert [(a["user"], a["decision"], a["digest"]) for a in body["approvals"]] == [
        ("anna", "approve", pending.digest), ("bert", "approve", pending.digest)]
    assert dispatched == [pending.pk]

    with django_capture_on_commit_callbacks(execute=True):
        late = approve(api("approver_c"), pending)
    assert late.status_code == 409
    assert "approved" in late.json()["error"]
    assert dispatched == [pending.pk]


def test_approval_is_audited_with_source_ip_and_user_agent(api, pending):
    client = api("approver_a", REMOTE_ADDR="10.20.30.40", HTTP_USER_AGENT="bankvault-cli/1")
    assert approve(client, pending).status_code == 200
    event = AuditEvent.objects.get(action="restore.request.approved_by", target_id=str(pending.pk))
    assert event.actor.username == "anna"
    assert event.source_ip == "10.20.30.40" and event.user_agent == "bankvault-cli/1"
    assert pending.approvals.get().source_ip == "10.20.30.40"


def test_only_auditors_see_where_approvers_approved_from(api, pending):
    approve(api("approver_a", REMOTE_ADDR="10.20.30.40"), pending)
    seen_by_auditor = api("auditor").get(f"{API}/restore-requests/{pending.pk}/").json()["approvals"][0]
    seen_by_operator = api("operator").get(f"{API}/restore-requests/{pending.pk}/").json()["approvals"][0]
    assert seen_by_auditor["source_ip"] == "10.20.30.40"
    assert "source_ip" not in seen_by_operator


def test_unknown_request_is_404(api, db):
    resp = api("approver_a").post(f"{API}/restore-requests/999999/approve/", {"password": PASSWORD}, format="json")
    assert resp.status_code == 404
    assert "no restore request 999999" in resp.json()["error"]


# -- rejecting and cancelling -------------------------------------------------------------------------
def test_one_rejection_ends_the_request(api, pending):
    resp = api("approver_a").post(f"{API}/restore-requests/{pending.pk}/reject/",
                                  {"password": PASSWORD, "comment": "wrong archive"}, format="json")
    assert resp.status_code == 200
    assert resp.json()["state"] == "rejected"
    assert resp.json()["approvals"][0]["decision"] == "reject"
    later = approve(api("approver_b"), pending)
    assert later.status_code == 409
    assert "rejected" in later.json()["error"]


def test_rejecting_needs_the_password_too(api, pending):
    resp = api("approver_a").post(f"{API}/restore-requests/{pending.pk}/reject/", {}, format="json")
    assert resp.status_code == 403
    pending.refresh_from_db()
    assert pending.state == "pending"


def test_requester_can_cancel(api, pending):
    resp = api("operator").post(f"{API}/restore-requests/{pending.pk}/cancel/")
    assert resp.status_code == 200
    assert resp.json()["state"] == "cancelled" and resp.json()["finished_at"]
    assert AuditEvent.objects.filter(action="restore.request.cancelled", target_id=str(pending.pk)).exists()
    assert api("operator").post(f"{API}/restore-requests/{pending.pk}/cancel/").status_code == 409


def test_approver_cannot_cancel(api, pending):
    resp = api("approver_a").post(f"{API}/restore-requests/{pending.pk}/cancel/")
    assert resp.status_code == 403
    pending.refresh_from_db()
    assert pending.state == "pending"


def test_wrong_method_is_a_json_405(api, pending):
    resp = api("approver_a").get(f"{API}/restore-requests/{pending.pk}/approve/")
    assert resp.status_code == 405
    assert "not allowed" in resp.json()["error"]


def test_mistyped_paths_answer_json(api, db):
    resp = api("auditor").get(f"{API}/restore-request/")
    assert resp.status_code == 404
    assert "schema" in resp.json()["error"]


# -- reading ------------------------------------------------------------------------------------------
def test_auditor_reads_requests_databases_and_archives(api, pending, archive):
    client = api("auditor")
    listing = client.get(f"{API}/restore-requests/").json()
    assert listing["count"] == 1 and listing["results"][0]["id"] == pending.pk
    assert client.get(f"{API}/restore-requests/?state=approved").json()["count"] == 0
    assert client.get(f"{API}/restore-requests/?state=nonsense").status_code == 400
    assert client.get(f"{API}/restore-requests/{pending.pk}/").json()["reason"] == "check yesterday's balances"
    dbs = client.get(f"{API}/databases/").json()
    assert dbs["count"] == 1
    assert dbs["results"] == [{"name": "ledger", "host": "10.0.0.5", "port": 5432, "dbname": "ledger_prod",
                               "user": "backup", "sslmode": "prefer", "wal_mode": "none", "has_password": True}]
    archives = client.get(f"{API}/archives/?database=ledger").json()
    assert archives["count"] == 1
    assert archives["results"][0]["files"] == [
        {"path": "dump.pgc.zst", "role": "dump", "bytes": 4000, "sha256": "b" * 64}]
    assert archives["results"][0]["database"] == "ledger"


def test_unknown_database_in_the_archive_filter_is_404(api, db):
    resp = api("operator").get(f"{API}/archives/?database=nosuch")
    assert resp.status_code == 404
    assert "nosuch" in resp.json()["error"]


@pytest.mark.parametrize("path", ["/restore-requests/", "/databases/", "/archives/"])
def test_outsider_reads_nothing(api, pending, path):
    resp = api("outsider").get(API + path)
    assert resp.status_code == 403
    assert resp.json()["error"]


def test_outsider_cannot_see_a_single_request(api, pending):
    assert api("outsider").get(f"{API}/restore-requests/{pending.pk}/").status_code == 404


def test_superuser_reads_everything_but_files_nothing(api, pending):
    client = api("superuser")
    for path in ("/databases/", "/archives/", "/restore-requests/", f"/restore-requests/{pending.pk}/"):
        assert client.get(API + path).status_code == 200, path
    assert client.post(f"{API}/restore-requests/", {"kind": "system"}, format="json").status_code == 403


def test_database_listing_never_carries_a_password_or_its_ciphertext(api, ledger):
    raw = api("operator").get(f"{API}/databases/").content
    for secret in (DB_PASSWORD, RESTORE_PASSWORD, ledger.password_encrypted, ledger.restore_password_encrypted):
        assert secret and secret.encode() not in raw
    assert b"password_encrypted" not in raw and b"restorer" not in raw


def test_schema_is_an_openapi_document_for_signed_in_users(api, db):
    resp = api("auditor").get(f"{API}/schema/?format=json")
    assert resp.status_code == 200
    schema = resp.json()
    assert schema["openapi"].startswith("3.")
    assert "/api/v1/restore-requests/" in schema["paths"]
    assert "/api/v1/restore-requests/{id}/approve/" in schema["paths"]
    assert client_for().get(f"{API}/schema/").status_code == 401


# -- a real archive -----------------------------------------------------------------------------------
@pytest.mark.pg
def test_a_real_backup_is_listed_and_can_be_requested(api, make_target_db, repo):
    from backups.engine import runner
    from backups.models import BackupRun

    db = make_target_db(name="account", sql="CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    archive = runner.execute(BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test").pk)
    listed = api("approver_a").get(f"{API}/archives/?database=account").json()["results"]
    assert [a["id"] for a in listed] == [archive.pk]
    dump = next(f for f in listed[0]["files"] if f["role"] == "dump")
    assert dump["sha256"] == archive.main_file.sha256
    resp = api("operator").post(f"{API}/restore-requests/", {
        "kind": "archive", "database": "account", "archive": archive.pk, "mode": "copy",
        "new_name": "account_check", "reason": "verify the nightly dump"}, format="json")
    assert resp.status_code == 201, resp.content
    assert resp.json()["items"][0]["sha256"] == dump["sha256"]


def test_password_guesses_on_approve_are_throttled(api, pending, settings):
    from django.core.cache import cache

    cache.clear()
    statuses = [api("approver_a").post(f"{API}/restore-requests/{pending.pk}/approve/", {"password": "guess"},
                                       format="json").status_code for _ in range(12)]
    assert statuses[:10] == [403] * 10 and statuses[10:] == [429, 429]
    cache.clear()
