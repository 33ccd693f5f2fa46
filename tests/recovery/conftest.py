"""The personas live in tests/conftest.py; re-exported for the recovery tests' imports."""

from tests.conftest import PASSWORD, ensure_roles, make_user  # noqa: F401
