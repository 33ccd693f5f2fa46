"""Starts the services the suite needs before Django reads its settings.

Loaded with `-p tests.plugin` (pytest.ini). pytest-django reads DATABASE_URL when it
configures Django, which is too early for a fixture, so the portal's own PostgreSQL cluster
and a Redis server are started in pytest_load_initial_conftests. Both are private to this
test session (free loopback ports, temp dirs) and stopped at the end, so the suite neither
depends on nor disturbs services already running on the machine.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_started: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    from backups.engine.cluster import LocalCluster
    from bankvault.devservices import RedisServer

    scratch = Path(tempfile.mkdtemp(prefix="bv-tests-"))
    _started["scratch"] = scratch
    os.environ["BANKVAULT_ENV"] = "test"
    os.environ["BANKVAULT_VAR_DIR"] = str(scratch / "var")
    (scratch / "var" / "static").mkdir(parents=True)  # STATIC_ROOT; whitenoise warns if absent
    os.environ["BANKVAULT_REPOSITORY"] = str(scratch / "repository")
    os.environ["STATICFILES_STORAGE"] = "django.contrib.staticfiles.storage.StaticFilesStorage"
    os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-" + "x" * 40)

    portal = LocalCluster.create(throwaway=True, settings={"max_connections": 200})
    portal.start()
    _started["portal"] = portal
    os.environ["DATABASE_URL"] = portal.url("bankvault")
    os.environ["CONN_MAX_AGE"] = "0"

    redis = RedisServer.start(directory=scratch / "redis")
    _started["redis"] = redis
    os.environ["CELERY_BROKER_URL"] = redis.url


def pytest_unconfigure(config):
    redis = _started.pop("redis", None)
    if redis:
        redis.stop()
    portal = _started.pop("portal", None)
    if portal:
        portal.destroy()
    scratch = _started.pop("scratch", None)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


def services() -> dict:
    """The session's services, for fixtures that need them (e.g. to restart Redis)."""
    return _started
