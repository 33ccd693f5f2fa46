"""`manage.py remotes`: register, list and probe an S3 remote from the command line, against the
session's real SeaweedFS server. The secret key comes from an environment variable named on the
command line, so it is never in argv, the output or the trail."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from audit.models import AuditEvent
from backups.models import RemoteRepository
from tests.offsite.conftest import BUCKET


def run(*args) -> str:
    out = StringIO()
    call_command("remotes", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.mark.django_db
def test_add_list_and_test_a_remote_without_the_secret_in_argv_output_or_trail(seaweed, monkeypatch):
    monkeypatch.setenv("BV_TEST_S3_SECRET", seaweed.secret_key)
    out = run("add", "dr-site", "--endpoint", seaweed.endpoint, "--bucket", BUCKET, "--prefix", "cli-test/",
              "--region", "us-east-1", "--access-key-id", seaweed.access_key, "--secret-key-env", "BV_TEST_S3_SECRET")
    assert "registered" in out
    remote = RemoteRepository.objects.get(name="dr-site")
    assert remote.get_secret_key() == seaweed.secret_key
    listed = json.loads(run("list", "--json"))
    assert [r["name"] for r in listed] == ["dr-site"] and listed[0]["enabled"] is True
    probed = run("test", "dr-site")
    assert "OK" in probed
    everything = out + json.dumps(listed) + probed + json.dumps(
        list(AuditEvent.objects.values_list("action", "details")), default=str)
    assert seaweed.secret_key not in everything
    assert AuditEvent.objects.filter(action="config.remote.created", actor_label__startswith="cli:").exists()


@pytest.mark.django_db
def test_a_wrong_secret_fails_the_probe_clearly(seaweed, monkeypatch):
    monkeypatch.setenv("BV_TEST_S3_SECRET", "not-the-secret")
    run("add", "wrong", "--endpoint", seaweed.endpoint, "--bucket", BUCKET, "--region", "us-east-1",
        "--access-key-id", seaweed.access_key, "--secret-key-env", "BV_TEST_S3_SECRET")
    with pytest.raises(CommandError, match="remote wrong"):
        run("test", "wrong")


@pytest.mark.django_db
@pytest.mark.parametrize("args, error", [
    (["add", "x", "--bucket", "b", "--access-key-id", "k"], "needs its secret key"),
    (["add", "x", "--bucket", "b", "--access-key-id", "k", "--secret-key-env", "BV_UNSET_VARIABLE"], "is not set"),
    (["add", "x", "--bucket", "b", "--access-key-id", "k", "--secret-key-env", "BV_TEST_S3_SECRET",
      "--archive-after-days", "30"], "--archive-storage-class"),
    (["test", "nobody"], "no remote repository named nobody"),
])
def test_bad_input_is_refused_and_nothing_is_stored(args, error, monkeypatch):
    monkeypatch.setenv("BV_TEST_S3_SECRET", "s3cret")
    monkeypatch.delenv("BV_UNSET_VARIABLE", raising=False)
    with pytest.raises(CommandError, match=error):
        run(*args)
    assert not RemoteRepository.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="config.remote").exists()
