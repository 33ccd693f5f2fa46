"""Sign-in and sessions: the OTP-aware sign-in form (the portal's and the admin's), the lockout
page, TOTP enrolment at /accounts/otp/, one-time-password checks for approvals, and the
middleware that signs idle sessions out.

Lockout counting is django-axes' (settings: AXES_*); its audit event is recorded in
audit/signals.py with the other sign-in events.
"""

from __future__ import annotations

import time
from base64 import b32encode
from urllib.parse import urlencode, urlsplit

import qrcode
import qrcode.image.svg
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import SESSION_KEY, logout
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.contrib.auth.views import LoginView
from django.db import transaction
from django.dispatch import receiver
from django.http import HttpResponseBadRequest
from django.shortcuts import redirect, render, resolve_url
from django.utils.safestring import mark_safe
from django_htmx.http import HttpResponseClientRedirect
from django_otp import login as otp_login
from django_otp import user_has_device
from django_otp.plugins.otp_totp.models import TOTPDevice

import audit

# Session keys of the idle and absolute timeout (epoch seconds).
SIGNED_IN_AT = "bv_signed_in_at"
LAST_ACTIVITY = "bv_last_activity"

# One-time passwords are checked by recovery.identity (approvals need them too, and apps do not
# import from this wiring package).
from recovery.identity import _clean_token, otp_ok, verified_device, verify_otp  # noqa: E402,F401

# -- sign-in -------------------------------------------------------------------------------------------

SIGN_IN_FAILED = ("Your username, password or one-time password did not match. Please try again. "
                  "Too many failed attempts block signing in from this address for a while.")


def _otp_token_field():
    return forms.CharField(
        required=False, max_length=16, label="One-time password",
        help_text="From your authenticator app, if you have set one up.",
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}))


class OTPSignInMixin:
    """Username and password, then, for users with a confirmed device, a valid token. One message
    for every failure, so the form never tells a guesser that the password alone was right."""

    def clean(self):
        cleaned = super().clean()  # authenticate(): axes refuses locked-out clients here
        user = self.get_user()
        if user is not None and user_has_device(user, confirmed=True):
            device = verified_device(user, cleaned.get("otp_token"))
            if device is None:
                self.user_cache = None
                # Counts towards the lockout and lands in the audit trail like a wrong password.
                user_login_failed.send(sender=__name__, credentials={"username": cleaned.get("username")},
                                       request=self.request)
                raise self.get_invalid_login_error()
            user.otp_device = device  # django_otp.login() marks the session verified on login
        return cleaned


class SignInForm(OTPSignInMixin, AuthenticationForm):
    error_messages = {**AuthenticationForm.error_messages, "invalid_login": SIGN_IN_FAILED}
    otp_token = _otp_token_field()


class AdminSignInForm(OTPSignInMixin, AdminAuthenticationForm):
    """The admin's login: the same checks, plus the admin's own staff check."""

    error_messages = {**AdminAuthenticationForm.error_messages,
                      "invalid_login": "Please enter the correct username, password and, if you have set one up, "
                                       "one-time password of a staff account."}
    otp_token = _otp_token_field()


login_view = LoginView.as_view(authentication_form=SignInForm, template_name="registration/login.html")


@receiver(user_logged_in, dispatch_uid="bankvault-session-stamps")
def _stamp_sign_in(sender, request, user, **kw):
    # A re-sign-in in the same session starts a new idle and absolute period.
    session = getattr(request, "session", None)
    if session is not None:
        now = int(time.time())
        session[SIGNED_IN_AT] = session[LAST_ACTIVITY] = now


def lockout_response(request, original_response=None, credentials=None):
    """The page for a locked-out username+address (axes calls this; AXES_LOCKOUT_CALLABLE)."""
    from axes.helpers import get_client_username, get_cool_off

    cool_off = get_cool_off(request)
    context = {
        "username": get_client_username(request, credentials) or "",
        "failure_limit": settings.AXES_FAILURE_LIMIT,
        "minutes": round(cool_off.total_seconds() / 60) if cool_off else None,
    }
    return render(request, "registration/locked_out.html", context, status=429)


# -- TOTP enrolment: /accounts/otp/ -----------------------------------------------------------------


class TokenForm(forms.Form):
    token = forms.CharField(max_length=16, label="Code from the app",
                            widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}))


class PasswordForm(forms.Form):
    password = forms.CharField(label="Your password", strip=False,
                               widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}))


def _qr_svg(data: str) -> str:
    # A path-only SVG: no Pillow, no inline style, so it passes style-src 'self'.
    image = qrcode.make(data, image_factory=qrcode.image.svg.SvgPathImage, box_size=10, border=4)
    return image.to_string(encoding="unicode")


def _secret_text(device: TOTPDevice) -> str:
    secret = b32encode(device.bin_key).decode().rstrip("=")
    return " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))


@login_required
def otp_devices(request):
    """Add (then confirm), or remove, the user's authenticator app. One device per person."""
    user = request.user
    confirmed = TOTPDevice.objects.devices_for_user(user, confirmed=True).first()
    pending = None if confirmed else TOTPDevice.objects.devices_for_user(user, confirmed=False).last()
    token_form, password_form = TokenForm(), PasswordForm()

    if request.method == "POST":
        action = request.POST.get("action")
        if action == "add" and confirmed is None:
            # A half-finished enrolment is replaced, never accumulated.
            TOTPDevice.objects.devices_for_user(user, confirmed=False).delete()
            TOTPDevice.objects.create(user=user, name="authenticator app", confirmed=False)
            return redirect("otp")
        elif action == "confirm" and pending is not None:
            token_form = TokenForm(request.POST)
            if token_form.is_valid():
                device = _confirm(request, pending, token_form.cleaned_data["token"])
                if device is not None:
                    otp_login(request, device)  # the code just proved it: this session is verified
                    messages.success(request, "Your authenticator app is set up. Signing in now asks for its code.")
                    return redirect("otp")
                token_form.add_error("token", "That code did not match. Check the phone's clock and try the next one.")
        elif action == "remove" and confirmed is not None:
            password_form = PasswordForm(request.POST)
            if password_form.is_valid():
                if user.check_password(password_form.cleaned_data["password"]):
                    with transaction.atomic():
                        TOTPDevice.objects.devices_for_user(user, confirmed=None).delete()
                        audit.record(user, "auth.otp.removed", user, details={"device": confirmed.name},
                                     request=request)
                    messages.success(request, "Your authenticator app is removed.")
                    return redirect("otp")
                password_form.add_error("password", "That is not your password.")
        else:
            return HttpResponseBadRequest("Nothing to do: reload the page.")

    context = {"confirmed": confirmed, "pending": pending, "token_form": token_form,
               "password_form": password_form, "require_otp": settings.APPROVER_REQUIRE_OTP}
    if pending is not None:
        context["qr_svg"] = mark_safe(_qr_svg(pending.config_url))  # markup generated by qrcode
        context["secret"] = _secret_text(pending)
    return render(request, "accounts/otp.html", context)


def _confirm(request, pending: TOTPDevice, token: str) -> TOTPDevice | None:
    with transaction.atomic():
        device = TOTPDevice.objects.select_for_update().filter(pk=pending.pk, confirmed=False).first()
        if device is None or not device.verify_token(_clean_token(token)):
            return None
        device.confirmed = True
        device.save(update_fields=["confirmed"])
        audit.record(request.user, "auth.otp.added", request.user, details={"device": device.name}, request=request)
    return device


# -- idle and absolute session timeout -------------------------------------------------------------


def is_user_activity(request) -> bool:
    """htmx polls (GETs sent by htmx) keep a page fresh, not a person present."""
    return not (request.headers.get("HX-Request") == "true" and request.method in ("GET", "HEAD"))


# Activity is written to the session at most this often (seconds): not a session write per
# request. The recorded time may lag by as much, so an idle session can end up to this much
# early, never late.
ACTIVITY_GRANULARITY = 60


class SessionTimeoutMiddleware:
    """Signs out a session idle for SESSION_IDLE_TIMEOUT seconds, or older than
    SESSION_COOKIE_AGE since sign-in (Django alone would extend that age with every save).
    Timestamps live in the session; only sessions of signed-in users are touched, so token
    API calls never create one."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        session = request.session
        if SESSION_KEY in session:
            now = int(time.time())
            idle = getattr(settings, "SESSION_IDLE_TIMEOUT", 0)
            last, start = session.get(LAST_ACTIVITY), session.get(SIGNED_IN_AT)
            note = None
            if idle and last is not None and now - last > idle:
                note = f"You were signed out after {_duration(idle)} without activity."
            elif start is not None and now - start > settings.SESSION_COOKIE_AGE:
                note = f"Your session ended {_duration(settings.SESSION_COOKIE_AGE)} after signing in."
            if note:
                logout(request)  # audited as auth.logout
                messages.info(request, note + " Please sign in again.")

        response = self.get_response(request)

        session = request.session
        if SESSION_KEY in session:
            now = int(time.time())
            if SIGNED_IN_AT not in session:  # signed in before this middleware, or force_login
                session[SIGNED_IN_AT] = session[LAST_ACTIVITY] = now
            elif is_user_activity(request) and now - session.get(LAST_ACTIVITY, 0) >= ACTIVITY_GRANULARITY:
                session[LAST_ACTIVITY] = now
        return _htmx_sign_in_redirect(request, response)


def _htmx_sign_in_redirect(request, response):
    # A poll that meets "sign in first" must move the whole page to the sign-in form (and back
    # to that page afterwards), not swap the form into a progress fragment.
    if request.headers.get("HX-Request") != "true" or response.status_code != 302:
        return response
    login_path = resolve_url(settings.LOGIN_URL)
    if urlsplit(response.get("Location", "")).path != login_path:
        return response
    current = urlsplit(request.headers.get("HX-Current-URL", ""))
    back = current.path + (f"?{current.query}" if current.query else "") if current.path else "/"
    return HttpResponseClientRedirect(f"{login_path}?{urlencode({'next': back})}")


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return f"{hours} hour{'s' if hours != 1 else ''}"
    if seconds % 60 == 0:
        minutes = seconds // 60
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds} seconds"
