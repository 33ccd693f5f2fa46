"""Encryption at rest for the target databases' passwords.

Fernet (AES-128-CBC + HMAC-SHA256) with keys from BANKVAULT_FIELD_KEYS; the first key
encrypts and every key decrypts, so keys can be rotated (`manage.py databases rekey`).
Without configured keys a key is derived from SECRET_KEY, which suits a local checkout only.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


class SecretUnreadable(Exception):
    """The stored secret cannot be decrypted with any configured key."""


def _keys() -> list[bytes]:
    keys = [k.strip().encode() for k in settings.BANKVAULT_FIELD_KEYS if k.strip()]
    if not keys:
        digest = hashlib.sha256(b"bankvault-field-key:" + settings.SECRET_KEY.encode()).digest()
        keys = [base64.urlsafe_b64encode(digest)]
    return keys


def _fernet() -> MultiFernet:
    return MultiFernet([Fernet(k) for k in _keys()])


def encrypt(plaintext: str) -> str:
    if not plaintext:
        return ""
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    if not token:
        return ""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "the stored password cannot be decrypted with the configured BANKVAULT_FIELD_KEYS "
            "(was the key changed?); set the password again"
        ) from None


def rotate(token: str) -> str:
    """Re-encrypt with the current first key."""
    return _fernet().rotate(token.encode()).decode() if token else ""
