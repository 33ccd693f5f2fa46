"""Sign-in hardening: lockout per username and address, audited sign-ins, idle and absolute
session timeouts, deactivated users, one-time passwords (sign-in, admin, approvals), the
Content-Security-Policy, and the production security settings."""

import json
import os
import re
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.test import Client
from django.utils import timezone
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from audit.models import AuditEvent
from bankvault.accounts import verify_otp
from recovery import services
from tests.conftest import PASSWORD
from tests.recovery.test_bypass import make_archive

pytestmark = [pytest.mark.django_db]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clock(time_machine):
    """Time stands still unless a test moves it (sessions, lockouts and TOTP all read it)."""
    time_machine.move_to(timezone.now(), tick=False)
    return time_machine


@pytest.fixture
def no_dispatch(monkeypatch):
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)


def sign_in(client, username, password=PASSWORD, ip="10.0.0.1", **extra):
    return client.post("/accounts/login/", {"username": username, "password": password, **extra}, REMOTE_ADDR=ip)


def signed_in(client) -> bool:
    return "_auth_user_id" in client.session


def token_for(device, offset_steps: int = 0) -> str:
    return str(totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits,
                    drift=device.drift + offset_steps)).zfill(device.digits)


def wrong_token(device) -> str:
    near = {token_for(device, k) for k in (-2, -1, 0, 1, 2)}  # what the tolerance might accept
    return next(t for t in (f"{n:06d}" for n in range(123456, 999999, 7919)) if t not in near)


def enroll(client, user, clock) -> TOTPDevice:
    """Set up an authenticator app through /accounts/otp/, as a person would."""
    client.force_login(user)
    assert "no authenticator app" in client.get("/accounts/otp/").content.decode()
    assert client.post("/accounts/otp/", {"action": "add"}).status_code == 302
    page = client.get("/accounts/otp/").content.decode()
    device = TOTPDevice.objects.get(user=user)
    assert not device.confirmed and "<svg" in page and "<path" in page
    secret = re.search(r'<code class="bv-secret">([A-Z2-7 ]+)</code>', page).group(1)
    from base64 import b32encode

    assert secret.replace(" ", "") == b32encode(device.bin_key).decode().rstrip("=")
    response = client.post("/accounts/otp/", {"action": "confirm", "token": token_for(device)})
    assert response.status_code == 302, response.content.decode()[:2000]
    device.refresh_from_db()
    assert device.confirmed
    clock.shift(timedelta(seconds=31))  # a token is good once: move to the next time step
    return device


# -- lockout ---------------------------------------------------------------------------------------


def test_ten_failures_lock_that_username_at_that_address_for_the_cool_off(client, personas, clock):
    for attempt in range(1, 10):
        assert sign_in(client, "anna", "wrong").status_code == 200, attempt
    tenth = sign_in(client, "anna", "wrong")
    assert tenth.status_code == 429 and "blocked" in tenth.content.decode()

    right = sign_in(client, "anna")  # the right password changes nothing now
    assert right.status_code == 429 and not signed_in(client)
    page = right.content.decode()
    assert "Signing in is blocked" in page and "30 minutes" in page and "anna" in page

    assert sign_in(Client(), "anna", ip="10.0.0.2").status_code == 302  # another address
    assert sign_in(Client(), "bert", ip="10.0.0.1").status_code == 302  # another username

    locked = AuditEvent.objects.filter(action="auth.login.locked").order_by("sequence")
    assert locked.exists()
    first = locked.first()
    assert first.source_ip == "10.0.0.1" and first.outcome == "denied"
    assert first.details["username"] == "anna" and first.details["failures"] == 10

    clock.shift(timedelta(minutes=29))
    assert sign_in(client, "anna").status_code == 429  # attempts while locked do not extend it...
    clock.shift(timedelta(minutes=2))
    assert sign_in(client, "anna").status_code == 302 and signed_in(client)  # ...and it ends


def test_force_login_and_api_tokens_are_never_locked_out(client, personas, clock):
    for _ in range(10):
        sign_in(Client(), "anna", "wrong", ip="127.0.0.1")
    client.force_login(personas["approver_a"])
    assert client.get("/").status_code == 200
    api = APIClient()
    token, _ = Token.objects.get_or_create(user=personas["approver_a"])
    api.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    assert api.get("/api/v1/restore-requests/").status_code == 200


# -- audit ---------------------------------------------------------------------------------------------


def test_sign_ins_and_sign_out_are_audited_with_the_source_address(client, personas):
    assert sign_in(client, "olga", "wrong", ip="192.0.2.7").status_code == 200
    assert sign_in(client, "olga", ip="192.0.2.7").status_code == 302
    assert client.post("/accounts/logout/", REMOTE_ADDR="192.0.2.7").status_code == 302
    assert not signed_in(client)

    failed = AuditEvent.objects.get(action="auth.login.failed")
    assert (failed.outcome, failed.source_ip, failed.details["username"]) == ("failure", "192.0.2.7", "olga")
    ok = AuditEvent.objects.get(action="auth.login.succeeded")
    assert (ok.outcome, ok.source_ip, ok.actor_label) == ("success", "192.0.2.7", "olga")
    out = AuditEvent.objects.get(action="auth.logout")
    assert (out.source_ip, out.actor_label) == ("192.0.2.7", "olga")


# -- sessions ----------------------------------------------------------------------------------------


def test_an_idle_session_is_signed_out_and_htmx_polling_does_not_keep_it_alive(client, personas, clock):
    req = services.file_request(personas["operator"], kind="archive", mode="copy", new_name="x",
                                archive=make_archive(), reason="idle test")
    page, progress = f"/restores/{req.pk}/", f"/restores/{req.pk}/progress/"
    poll = {"HTTP_HX_REQUEST": "true", "HTTP_HX_CURRENT_URL": f"http://testserver{page}"}
    assert sign_in(client, "anna").status_code == 302
    assert client.get(page).status_code == 200

    clock.shift(timedelta(minutes=10))
    assert client.get(progress, **poll).status_code == 200  # polled, still signed in...
    clock.shift(timedelta(minutes=6))  # ...but 16 minutes since anna did anything
    response = client.get(progress, **poll)
    # The whole page goes to the sign-in form, and back to the request page afterwards.
    assert response["HX-Redirect"] == f"/accounts/login/?next=%2Frestores%2F{req.pk}%2F"
    assert not signed_in(client)
    response = client.get(page, follow=True)
    assert response.redirect_chain[0][0] == f"/accounts/login/?next=/restores/{req.pk}/"
    assert "signed out after 15 minutes without activity" in response.content.decode()
    assert AuditEvent.objects.filter(action="auth.logout", actor_label="anna").exists()


def test_a_normal_request_keeps_the_session_alive(client, personas, clock):
    assert sign_in(client, "anna").status_code == 302
    for _ in range(4):  # 40 minutes of work, never 15 idle
        clock.shift(timedelta(minutes=10))
        assert client.get("/").status_code == 200
    clock.shift(timedelta(minutes=16))
    response = client.get("/")
    assert response.status_code == 302 and response.url == "/accounts/login/?next=/"


def test_activity_is_written_to_the_session_at_most_once_a_minute(client, personas, clock):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def session_writes():
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/").status_code == 200
        return [q for q in queries.captured_queries if q["sql"].startswith('UPDATE "django_session"')]

    assert sign_in(client, "anna").status_code == 302
    clock.shift(timedelta(seconds=59))
    assert session_writes() == []
    clock.shift(timedelta(seconds=2))
    assert len(session_writes()) == 1


def test_a_session_ends_at_its_absolute_age_however_active(client, personas, clock, settings):
    settings.SESSION_COOKIE_AGE = 3600
    assert sign_in(client, "anna").status_code == 302
    for _ in range(6):
        clock.shift(timedelta(minutes=10))
        assert client.get("/").status_code == 200
    clock.shift(timedelta(minutes=1))
    assert client.get("/").status_code == 302 and not signed_in(client)


def test_a_deactivated_users_live_session_is_refused_at_once(client, personas):
    anna = personas["approver_a"]
    client.force_login(anna)
    assert client.get("/restores/").status_code == 200
    anna.is_active = False
    anna.save()
    response = client.get("/restores/")
    assert response.status_code == 302 and response.url.startswith("/accounts/login/")


def test_session_settings(settings):
    assert settings.SESSION_IDLE_TIMEOUT == 15 * 60
    assert settings.SESSION_COOKIE_AGE == 12 * 3600
    assert settings.SESSION_EXPIRE_AT_BROWSER_CLOSE and settings.SESSION_COOKIE_HTTPONLY
    assert not settings.SECURE_SSL_REDIRECT and not settings.SESSION_COOKIE_SECURE  # `make run` is plain HTTP


# -- one-time passwords ----------------------------------------------------------------------------


def test_enrolling_an_authenticator_app_is_audited_and_verifies_the_session(client, personas, clock):
    anna = personas["approver_a"]
    client.force_login(anna)
    client.post("/accounts/otp/", {"action": "add"})
    device = TOTPDevice.objects.get(user=anna)
    refused = client.post("/accounts/otp/", {"action": "confirm", "token": wrong_token(device)})
    assert refused.status_code == 200 and "did not match" in refused.content.decode()
    device.refresh_from_db()
    assert not device.confirmed and not verify_otp(anna, token_for(device))  # unconfirmed counts for nothing
    clock.shift(timedelta(seconds=31))
    assert client.post("/accounts/otp/", {"action": "confirm", "token": token_for(device)}).status_code == 302
    device.refresh_from_db()
    assert device.confirmed
    assert client.session["otp_device_id"] == device.persistent_id
    assert AuditEvent.objects.filter(action="auth.otp.added", actor_label="anna").exists()
    assert "is <strong>set up</strong>" in client.get("/accounts/otp/").content.decode()
    # A second device cannot be added beside the first.
    assert client.post("/accounts/otp/", {"action": "add"}).status_code == 400


def test_verify_otp_accepts_a_token_once(personas, clock):
    anna = personas["approver_a"]
    device = TOTPDevice.objects.create(user=anna, name="app", confirmed=True)
    assert not verify_otp(anna, "") and not verify_otp(anna, wrong_token(device))
    clock.shift(timedelta(seconds=31))
    token = token_for(device)
    assert verify_otp(anna, token)
    assert not verify_otp(anna, token)  # replayed
    assert not verify_otp(personas["approver_b"], token_for(device))  # someone else's device


def test_sign_in_requires_the_token_once_a_device_is_set_up(client, personas, clock):
    device = enroll(client, personas["approver_a"], clock)
    client.logout()

    missing = sign_in(client, "anna")
    assert missing.status_code == 200 and not signed_in(client)
    assert "did not match" in missing.content.decode() and 'name="otp_token"' in missing.content.decode()
    clock.shift(timedelta(seconds=31))
    assert sign_in(client, "anna", otp_token=wrong_token(device)).status_code == 200 and not signed_in(client)
    assert AuditEvent.objects.filter(action="auth.login.failed", details__username="anna").count() == 2

    clock.shift(timedelta(seconds=31))
    assert sign_in(client, "anna", otp_token=token_for(device)).status_code == 302
    assert signed_in(client) and client.session["otp_device_id"] == device.persistent_id
    # Who has no device signs in with the password alone.
    assert sign_in(Client(), "bert").status_code == 302


def test_wrong_tokens_count_towards_the_lockout(client, personas, clock):
    device = TOTPDevice.objects.create(user=personas["approver_a"], name="app", confirmed=True)
    for _ in range(10):
        clock.shift(timedelta(seconds=31))  # past django-otp's own throttle
        response = sign_in(client, "anna", otp_token=wrong_token(device))
    assert response.status_code == 429
    clock.shift(timedelta(seconds=31))
    assert sign_in(client, "anna", otp_token=token_for(device)).status_code == 429


def test_the_admin_login_requires_the_token_too(client, personas, clock):
    device = enroll(client, personas["superuser"], clock)
    admin = Client()
    page = admin.get("/admin/login/?next=/admin/").content.decode()
    assert 'name="otp_token"' in page
    refused = admin.post("/admin/login/?next=/admin/", {"username": "root", "password": PASSWORD, "next": "/admin/"})
    assert refused.status_code == 200 and not signed_in(admin)
    assert admin.get("/admin/").status_code == 302
    clock.shift(timedelta(seconds=31))
    response = admin.post("/admin/login/?next=/admin/", {"username": "root", "password": PASSWORD,
                                                         "otp_token": token_for(device), "next": "/admin/"})
    assert response.status_code == 302 and response.url == "/admin/"
    assert admin.get("/admin/").status_code == 200


def test_removing_the_device_needs_the_password(client, personas, clock):
    anna = personas["approver_a"]
    enroll(client, anna, clock)
    refused = client.post("/accounts/otp/", {"action": "remove", "password": "not-it"})
    assert refused.status_code == 200 and TOTPDevice.objects.filter(user=anna).exists()
    assert client.post("/accounts/otp/", {"action": "remove", "password": PASSWORD}).status_code == 302
    assert not TOTPDevice.objects.filter(user=anna).exists()
    assert AuditEvent.objects.filter(action="auth.otp.removed", actor_label="anna").exists()


@pytest.fixture
def restore_request(personas, no_dispatch):
    return services.file_request(personas["operator"], kind="archive", mode="copy", new_name="otp_copy",
                                 archive=make_archive(), reason="otp test")


def approve(client, req, **data):
    return client.post(f"/restores/{req.pk}/approve/", {"password": PASSWORD, **data}, follow=True)


def test_with_otp_required_approving_needs_a_device_and_a_valid_token(client, personas, settings, clock,
                                                                      restore_request):
    settings.APPROVER_REQUIRE_OTP = True
    req = restore_request

    client.force_login(personas["approver_a"])  # anna has no device
    refused = approve(client, req, otp="123456")
    assert "approving needs your one-time password" in refused.content.decode()
    assert not req.approvals.exists()

    device = enroll(client, personas["approver_b"], clock)
    refused = approve(client, req, otp=wrong_token(device))
    assert "approving needs your one-time password" in refused.content.decode()
    assert not req.approvals.exists()
    assert "approving needs your one-time password" in approve(client, req).content.decode()  # none given

    clock.shift(timedelta(seconds=31))
    accepted = approve(client, req, otp=token_for(device))
    assert "Your approval is recorded." in accepted.content.decode()
    assert list(req.approvals.values_list("user__username", flat=True)) == ["bert"]
    assert AuditEvent.objects.filter(action__startswith="restore.", outcome="denied").count() >= 3


def test_with_otp_required_the_api_checks_the_token(personas, settings, clock, restore_request):
    settings.APPROVER_REQUIRE_OTP = True
    bert = personas["approver_b"]
    device = TOTPDevice.objects.create(user=bert, name="app", confirmed=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=bert).key}")
    url = f"/api/v1/restore-requests/{restore_request.pk}/approve/"
    refused = api.post(url, {"password": PASSWORD, "otp": wrong_token(device)}, format="json")
    assert refused.status_code == 403 and "one-time password" in refused.json()["error"]
    clock.shift(timedelta(seconds=31))
    assert api.post(url, {"password": PASSWORD, "otp": token_for(device)}, format="json").status_code == 200
    assert restore_request.approvals.filter(user=bert).exists()


def test_with_otp_optional_an_approver_without_a_device_needs_only_the_password(client, personas, restore_request):
    client.force_login(personas["approver_a"])
    assert "Your approval is recorded." in approve(client, restore_request).content.decode()


def test_with_otp_optional_a_wrong_token_of_a_user_with_a_device_is_refused(client, personas, clock,
                                                                            restore_request):
    device = enroll(client, personas["approver_b"], clock)
    approve(client, restore_request, otp=wrong_token(device))
    assert not restore_request.approvals.exists()


# -- Content-Security-Policy -------------------------------------------------------------------------

POLICY = {
    "default-src": "'self'", "script-src": "'self'", "style-src": "'self'", "img-src": "'self' data:",
    "frame-ancestors": "'none'", "form-action": "'self'", "base-uri": "'self'", "object-src": "'none'",
}


def policy(response) -> dict:
    header = response["Content-Security-Policy"]
    return dict(part.strip().split(" ", 1) for part in header.split(";") if part.strip())


def assert_no_inline_code(html: str):
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>\s*\S", html), "inline script"
    assert "<style" not in html and not re.search(r"\sstyle=", html), "inline style"


def test_the_csp_header_is_on_dashboard_sign_in_and_admin_pages(client, personas, clock):
    client.force_login(personas["superuser"])
    for url in ("/", "/restores/", "/admin/", "/admin/backups/database/add/"):
        response = client.get(url)
        assert response.status_code == 200 and policy(response) == POLICY, url
        assert_no_inline_code(response.content.decode())
    assert '<meta name="htmx-config" content=\'{"includeIndicatorStyles": false}\'>' in client.get("/").content.decode()
    client.post("/accounts/otp/", {"action": "add"})
    enrolment = client.get("/accounts/otp/")
    assert "<svg" in enrolment.content.decode() and policy(enrolment) == POLICY
    assert_no_inline_code(enrolment.content.decode())

    anonymous = Client()
    for url in ("/accounts/login/", "/admin/login/"):
        response = anonymous.get(url)
        assert response.status_code == 200 and policy(response) == POLICY, url
        assert_no_inline_code(response.content.decode())
    assert anonymous.get("/accounts/login/")["X-Frame-Options"] == "DENY"


# -- production settings --------------------------------------------------------------------------------


def production_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "BANKVAULT_FIELD_KEYS", "DEBUG")}
    env.update(BANKVAULT_ENV="production", SECRET_KEY=secrets.token_urlsafe(64), DEBUG="false",
               BANKVAULT_FIELD_KEYS=Fernet.generate_key().decode(), ALLOWED_HOSTS="bankvault.bank.example",
               DJANGO_SETTINGS_MODULE="bankvault.settings")
    return env


def test_check_deploy_passes_with_the_production_environment():
    out = subprocess.run([sys.executable, "manage.py", "check", "--deploy"], cwd=ROOT, env=production_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "System check identified no issues (0 silenced)." in out.stdout
    assert "WARNING" not in out.stdout + out.stderr


def test_production_cookies_and_headers():
    code = ("import django, json; django.setup(); from django.conf import settings as s; print(json.dumps({k: "
            "getattr(s, k) for k in ['SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_SSL_REDIRECT', "
            "'SECURE_HSTS_SECONDS', 'SECURE_HSTS_INCLUDE_SUBDOMAINS', 'SECURE_CONTENT_TYPE_NOSNIFF', "
            "'X_FRAME_OPTIONS', 'SECURE_REFERRER_POLICY', 'SESSION_COOKIE_HTTPONLY', 'CSRF_COOKIE_HTTPONLY', "
            "'SECURE_PROXY_SSL_HEADER', 'SECURE_REDIRECT_EXEMPT']}))")
    env = production_env() | {"SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "SESSION_COOKIE_SECURE": True, "CSRF_COOKIE_SECURE": True, "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 31536000, "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_CONTENT_TYPE_NOSNIFF": True, "X_FRAME_OPTIONS": "DENY", "SECURE_REFERRER_POLICY": "same-origin",
        "SESSION_COOKIE_HTTPONLY": True, "CSRF_COOKIE_HTTPONLY": True,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"], "SECURE_REDIRECT_EXEMPT": ["^healthz$"]}


def test_the_client_address_behind_a_trusted_proxy(rf, settings):
    from audit.context import client_ip

    request = rf.get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="203.0.113.9, 10.0.0.7")
    assert client_ip(request) == "10.0.0.5"  # no trusted proxies: the header is ignored
    settings.BANKVAULT_TRUSTED_PROXIES = ["10.0.0.0/24"]
    assert client_ip(request) == "203.0.113.9"
    spoofed = rf.get("/", REMOTE_ADDR="198.51.100.1", HTTP_X_FORWARDED_FOR="1.2.3.4")
    assert client_ip(spoofed) == "198.51.100.1"  # not from a proxy: the header is the client's lie


def test_no_emailed_password_reset(client):
    assert client.get("/accounts/password_reset/").status_code == 404
