"""Every page and API endpoint × every role: only the allowed combinations succeed."""

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from backups.models import BackupRun
from monitoring.models import Drill
from recovery import services
from tests.recovery.conftest import PASSWORD
from tests.recovery.test_bypass import make_archive

pytestmark = [pytest.mark.django_db]
ROLES = ["anonymous", "operator", "approver", "auditor", "superuser"]
PERSONA = {"operator": "operator", "approver": "approver_a", "auditor": "auditor", "superuser": "superuser"}
LOGIN = "login"  # a redirect to sign in (anonymous visitors)


def row(method, path, body, anonymous, operator, approver, auditor, superuser):
    return (method, path, body, dict(zip(ROLES, [anonymous, operator, approver, auditor, superuser],
                                         strict=True)))


NEW = {"kind": "archive", "archive": "{other}", "mode": "copy", "new_name": "checked_copy", "reason": "auth test"}
DECIDE = {"password": PASSWORD}
REPORT = {"start": "2026-11-01", "end": "2026-11-30", "kind": "events", "format": "csv"}

DASHBOARD = [
    row("get", "/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/accounts/login/", None, 200, 200, 200, 200, 200),
    row("get", "/restores/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/restores/new/", None, LOGIN, 200, 403, 403, 403),
    row("post", "/restores/new/", NEW, LOGIN, 302, 403, 403, 403),
    row("get", "/restores/{id}/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/restores/{id}/progress/", None, LOGIN, 200, 200, 200, 200),
    row("post", "/restores/{id}/approve/", DECIDE, LOGIN, 403, 302, 403, 403),
    row("post", "/restores/{id}/reject/", DECIDE, LOGIN, 403, 302, 403, 403),
    row("post", "/restores/{id}/cancel/", None, LOGIN, 302, 403, 403, 403),
    # the dashboard: every signed-in role reads; operators act
    row("get", "/databases/auth/", None, LOGIN, 200, 200, 200, 200),
    row("post", "/databases/auth/backup/", {"kind": "logical"}, LOGIN, 302, 403, 403, 302),
    row("get", "/runs/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/runs/{run}/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/runs/{run}/progress/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/archives/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/archives/{other}/", None, LOGIN, 200, 200, 200, 200),
    row("post", "/archives/{other}/verify/", None, LOGIN, 302, 403, 403, 302),
    # (the file is not on disk here: the operator gets a redirect with the reason)
    row("get", "/archives/{other}/files/dump.pgdump.zst", None, LOGIN, 302, 403, 403, 302),
    # retention: everyone reads the dry run; operators place and lift legal holds
    row("get", "/retention/", None, LOGIN, 200, 200, 200, 200),
    row("post", "/archives/{other}/hold/", {"reason": "case 1"}, LOGIN, 302, 403, 403, 302),
    row("post", "/archives/{other}/release/", {"reason": "case closed"}, LOGIN, 302, 403, 403, 302),
    row("get", "/drills/{drill}/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/drills/{drill}/progress/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/health/", None, LOGIN, 200, 200, 200, 200),
    # the auditor's pages
    row("get", "/audit/", None, LOGIN, 403, 403, 200, 200),
    row("get", "/audit/export.csv", None, LOGIN, 403, 403, 200, 200),
    row("get", "/audit/export.jsonl", None, LOGIN, 403, 403, 200, 200),
    row("get", "/audit/report/", None, LOGIN, 403, 403, 200, 200),
    row("post", "/audit/report/", REPORT, LOGIN, 403, 403, 200, 200),
    row("get", "/admin/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/admin/backups/database/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/admin/backups/database/add/", None, LOGIN, 200, 403, 403, 200),
    row("get", "/admin/backups/backuppolicy/add/", None, LOGIN, 200, 403, 403, 200),
    row("get", "/admin/backups/backuprun/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/admin/backups/archive/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/admin/recovery/restorerequest/", None, LOGIN, 200, 200, 200, 200),
    row("get", "/admin/audit/auditevent/", None, LOGIN, 403, 403, 200, 200),
    row("get", "/admin/auth/user/", None, LOGIN, 403, 403, 403, 200),
]
API = [
    row("get", "/api/v1/restore-requests/", None, 401, 200, 200, 200, 200),
    row("post", "/api/v1/restore-requests/", NEW, 401, 201, 403, 403, 403),
    row("get", "/api/v1/restore-requests/{id}/", None, 401, 200, 200, 200, 200),
    row("post", "/api/v1/restore-requests/{id}/approve/", DECIDE, 401, 403, 200, 403, 403),
    row("post", "/api/v1/restore-requests/{id}/reject/", DECIDE, 401, 403, 200, 403, 403),
    row("post", "/api/v1/restore-requests/{id}/cancel/", None, 401, 200, 403, 403, 403),
    row("get", "/api/v1/databases/", None, 401, 200, 200, 200, 200),
    row("get", "/api/v1/archives/", None, 401, 200, 200, 200, 200),
    row("get", "/api/v1/schema/", None, 401, 200, 200, 200, 200),
]


@pytest.fixture
def world(personas, monkeypatch):
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)
    monkeypatch.setattr("backups.services.dispatch", lambda run: None)
    req = services.file_request(personas["operator"], kind="archive", mode="copy", new_name="first",
                                archive=make_archive("account"), reason="the request under test")
    other = make_archive("auth")
    run = BackupRun.objects.create(database=other.database, trigger="manual", state="succeeded")
    drill = Drill.objects.create(database=other.database, kind="archive")
    return {"id": req.pk, "other": other.pk, "run": run.pk, "drill": drill.pk, "personas": personas}


def fill(value, world):
    if isinstance(value, dict):
        return {k: fill(v, world) for k, v in value.items()}
    return value.format(**world) if isinstance(value, str) else value


def admin_login_redirect(response):
    return response.status_code == 302 and "/login/" in response.url


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method,path,body,expected", DASHBOARD, ids=[f"{r[0]} {r[1]}" for r in DASHBOARD])
def test_dashboard_and_admin(client, world, role, method, path, body, expected):
    if role != "anonymous":
        client.force_login(world["personas"][PERSONA[role]])
    response = getattr(client, method)(fill(path, world), fill(body, world) or {})
    want = expected[role]
    if want == LOGIN:
        assert admin_login_redirect(response), (role, response.status_code)
    else:
        assert response.status_code == want, (role, response.status_code)
        if want == 302 and path != "/restores/new/":
            assert "/login/" not in response.url


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method,path,body,expected", API, ids=[f"{r[0]} {r[1]}" for r in API])
def test_api(world, role, method, path, body, expected):
    client = APIClient()
    if role != "anonymous":
        token, _ = Token.objects.get_or_create(user=world["personas"][PERSONA[role]])
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    response = getattr(client, method)(fill(path, world), fill(body, world), format="json")
    assert response.status_code == expected[role], (role, response.status_code, response.content[:300])
