"""The dashboard's restore pages: filing, deciding with a fresh password, cancelling, progress."""

import pytest

from recovery.models import RestoreRequest
from tests.recovery.conftest import PASSWORD
from tests.recovery.test_bypass import make_archive

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def no_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: calls.append(pk))
    return calls


def login(client, user):
    client.force_login(user)
    return client


def file_via_form(client, archive, **extra):
    data = {"kind": "archive", "archive": archive.pk, "mode": "copy", "new_name": "account_copy",
            "reason": "check last night's archive", "change_ticket": "CHG-9"}
    data.update(extra)
    return client.post("/restores/new/", data)


def test_an_operator_files_a_request_from_the_form(client, personas, no_dispatch):
    archive = make_archive()
    login(client, personas["operator"])
    assert client.get("/restores/new/").status_code == 200
    response = file_via_form(client, archive)
    req = RestoreRequest.objects.get()
    assert response.status_code == 302 and response.url == f"/restores/{req.pk}/"
    page = client.get(response.url).content.decode()
    assert req.digest in page and "Approvals (0 of 2)" in page and "Cancel this request" in page
    assert "Your decision" not in page  # the requester cannot decide


def test_the_form_shows_errors_and_files_nothing(client, personas):
    login(client, personas["operator"])
    archive = make_archive()
    response = file_via_form(client, archive, reason="")
    assert response.status_code == 200 and "This field is required." in response.content.decode()
    response = file_via_form(client, archive, new_name="")
    assert response.status_code == 200 and "A copy needs a new name." in response.content.decode()
    response = file_via_form(client, make_archive("other"), target_time="next tuesday")
    assert "is not a time" in response.content.decode()
    assert not RestoreRequest.objects.exists()


def test_only_operators_may_file(client, personas):
    for who in ("approver_a", "auditor", "superuser", "outsider"):
        login(client, personas[who])
        assert client.get("/restores/new/").status_code == 403, who
        assert file_via_form(client, make_archive(f"db{who}")).status_code == 403, who
    assert not RestoreRequest.objects.exists()


def test_approvers_decide_with_their_password(client, personas, no_dispatch, django_capture_on_commit_callbacks):
    login(client, personas["operator"])
    file_via_form(client, make_archive())
    req = RestoreRequest.objects.get()

    login(client, personas["approver_a"])
    page = client.get(f"/restores/{req.pk}/").content.decode()
    assert "Your decision" in page and 'name="password"' in page
    wrong = client.post(f"/restores/{req.pk}/approve/", {"password": "not-it"}, follow=True)
    assert "fresh proof of identity" in wrong.content.decode()
    assert not req.approvals.exists()
    assert client.post(f"/restores/{req.pk}/approve/", {"password": PASSWORD}).status_code == 302
    twice = client.post(f"/restores/{req.pk}/approve/", {"password": PASSWORD}, follow=True)
    assert "already decided" in twice.content.decode()

    login(client, personas["approver_b"])
    with django_capture_on_commit_callbacks(execute=True):  # the hand-over to a worker happens on commit
        client.post(f"/restores/{req.pk}/approve/", {"password": PASSWORD, "comment": "checked the ticket"})
    req.refresh_from_db()
    assert req.state == "approved" and no_dispatch == [req.pk]
    fragment = client.get(f"/restores/{req.pk}/progress/").content.decode()
    assert 'data-state="approved"' in fragment and "hx-get" in fragment


def test_a_rejection_ends_it_and_outsiders_cannot_decide(client, personas, no_dispatch):
    login(client, personas["operator"])
    file_via_form(client, make_archive())
    req = RestoreRequest.objects.get()
    login(client, personas["superuser"])
    assert client.post(f"/restores/{req.pk}/approve/", {"password": PASSWORD}).status_code == 403
    login(client, personas["approver_a"])
    client.post(f"/restores/{req.pk}/reject/", {"password": PASSWORD, "comment": "wrong archive"})
    req.refresh_from_db()
    assert req.state == "rejected"
    ended = client.get(f"/restores/{req.pk}/progress/").content.decode()
    assert "hx-get" not in ended  # polling stops


def test_cancel_by_the_requester(client, personas, no_dispatch):
    login(client, personas["operator"])
    file_via_form(client, make_archive())
    req = RestoreRequest.objects.get()
    login(client, personas["approver_a"])
    assert client.post(f"/restores/{req.pk}/cancel/").status_code == 403
    login(client, personas["operator"])
    client.post(f"/restores/{req.pk}/cancel/")
    req.refresh_from_db()
    assert req.state == "cancelled"


def test_wrong_methods_and_unknown_requests(client, personas):
    login(client, personas["approver_a"])
    assert client.get("/restores/999/").status_code == 404
    login(client, personas["operator"])
    file_via_form(client, make_archive())
    req = RestoreRequest.objects.get()
    assert client.get(f"/restores/{req.pk}/approve/").status_code == 405
    assert client.get(f"/restores/{req.pk}/cancel/").status_code == 405
    login(client, personas["outsider"])
    assert client.get(f"/restores/{req.pk}/").status_code == 403
    assert client.get("/restores/").status_code == 403
