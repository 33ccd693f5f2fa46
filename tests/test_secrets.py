"""The target database's password appears in no argv, no child environment, no log line,
no page, no audit event, no manifest and no run error — on success and on failure."""

import json
import logging
import subprocess
from pathlib import Path

import pytest

from audit.models import AuditEvent
from backups.engine import pgtools
from backups.models import BackupRun
from tests.backups.test_failures import start, wait_for_end

pytestmark = [pytest.mark.pg]


@pytest.fixture
def spawned(monkeypatch):
    """Every process the engine starts, with its argv and environment (a spy: the real
    process still runs)."""
    seen = []
    real = subprocess.Popen

    class Spy(real):
        def __init__(self, args, *a, **kw):
            passfile = (kw.get("env") or {}).get("PGPASSFILE")
            seen.append({"argv": list(args), "env": dict(kw.get("env") or {}), "passfile": passfile})
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(pgtools.subprocess, "Popen", Spy)
    return seen


def test_password_never_leaks(celery_worker_thread, make_target_db, repo, target_password, spawned,
                              caplog, admin_client):
    caplog.set_level(logging.DEBUG)
    good = make_target_db(name="good")
    bad = make_target_db(name="bad")
    bad.set_password("Wr0ng-" + target_password[::-1])
    bad.save()
    wrong = bad.get_password()

    ok_run = wait_for_end(start(good))
    bad_run = wait_for_end(start(bad))
    assert ok_run.state == BackupRun.State.SUCCEEDED, ok_run.error
    assert bad_run.state == BackupRun.State.FAILED

    secrets = [target_password, wrong]
    # argv and environment of every tool
    assert spawned, "the engine started no tool?"
    for proc in spawned:
        blob = json.dumps(proc["argv"]) + json.dumps(proc["env"])
        for s in secrets:
            assert s not in blob, proc["argv"]
        assert "PGPASSWORD" not in proc["env"]
        if proc["passfile"]:
            assert not Path(proc["passfile"]).exists(), "passfile left behind"
    # logs
    for s in secrets:
        assert s not in caplog.text
    # audit trail
    trail = json.dumps(list(AuditEvent.objects.values()), default=str)
    for s in secrets:
        assert s not in trail
    # run errors and the manifest
    for run in (ok_run, bad_run):
        for s in secrets:
            assert s not in run.error + run.error_detail
    manifest = (repo.root / ok_run.archive.path / "manifest.json").read_text()
    for s in secrets:
        assert s not in manifest
    # pages: overview, admin lists and the database's change form
    for url in ["/", "/admin/backups/database/", f"/admin/backups/database/{good.pk}/change/",
                f"/admin/backups/database/{bad.pk}/change/", "/admin/backups/backuprun/",
                f"/admin/backups/backuprun/{bad_run.pk}/change/", "/admin/audit/auditevent/",
                f"/admin/backups/archive/{ok_run.archive.pk}/change/"]:
        page = admin_client.get(url)
        assert page.status_code == 200, url
        for s in secrets:
            assert s not in page.content.decode(), url
    # stored encrypted, not in clear
    raw = good.password_encrypted
    assert raw and target_password not in raw
