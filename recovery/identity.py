"""Fresh proof of identity for deciding on a restore: one-time passwords (django-otp TOTP).
Used by the approval paths (dashboard and API) and by the sign-in forms in bankvault/accounts.py."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django_otp import devices_for_user, user_has_device


def _clean_token(token) -> str:
    return "".join(str(token or "").split())  # authenticator apps show "123 456"


def verified_device(user, token):
    """The confirmed device of ``user`` that accepts ``token``, or None. A token is accepted
    once (django-otp remembers the last time step) and failures throttle the device."""
    token = _clean_token(token)
    if not token or user is None or not user.is_authenticated:
        return None
    with transaction.atomic():
        for device in devices_for_user(user, confirmed=True, for_verify=True):
            if device.verify_token(token):  # checks the throttle first
                return device
    return None


def verify_otp(user, token) -> bool:
    """True only for a valid token of one of the user's confirmed devices."""
    return verified_device(user, token) is not None


def otp_ok(user, token, *, required: bool | None = None) -> bool:
    """The one-time-password answer for approving or rejecting a restore request: who has a
    device must give a valid token; who has none passes unless OTP is ``required``
    (default: the APPROVER_REQUIRE_OTP setting)."""
    if user_has_device(user, confirmed=True):
        return verify_otp(user, token)
    if required is None:
        required = settings.APPROVER_REQUIRE_OTP
    return not required
