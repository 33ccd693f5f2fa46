"""Streaming WAL archiving with a supervised pg_receivewal: a receiver stopped during writes
and started again leaves no gap, thanks to its replication slot."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backups.engine import receiver, runner, wal
from backups.engine.cluster import wait_until
from backups.models import BackupKind, BackupRun
from recovery.engine import pitr

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[2]


def start_receiver(portal_env, log: Path, name: str):
    return subprocess.Popen([sys.executable, "manage.py", "wal_receiver", "--database", name, "--interval", "0.2"],
                            cwd=ROOT, env=portal_env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115


def test_a_receiver_stopped_during_writes_resumes_without_a_gap(make_archiving_cluster, repo, portal_env, tmp_path):
    cluster, db = make_archiving_cluster(name="streamed", mode="stream")
    area = wal.area_path(db, repo)
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
    log = tmp_path / "receiver.log"
    proc = start_receiver(portal_env, log, db.name)
    try:
        wait_until(lambda: receiver.partial_segment(area), 30, what=f"pg_receivewal to stream ({log})")
        run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test", kind=BackupKind.BASE)
        runner.execute(run.pk)  # completes only once its WAL arrived through the receiver

        written = []
        stop_writing = threading.Event()

        def writer():
            with cluster.connect() as conn:
                while not stop_writing.is_set():
                    written.append(conn.execute("INSERT INTO t (v) VALUES (repeat('x', 2000)) RETURNING id")
                                   .fetchone()[0])
                    if len(written) % 150 == 0:
                        conn.execute("SELECT pg_switch_wal()")  # a few segments while we are away
                    time.sleep(0.004)

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)  # the receiver goes away mid-stream
        proc.wait(timeout=20)
        with cluster.connect() as conn:
            retained = conn.execute("SELECT active, restart_lsn IS NOT NULL FROM pg_replication_slots "
                                    "WHERE slot_name = %s", (receiver.slot_name(db),)).fetchone()
        assert retained == (False, True)  # the slot keeps the server's WAL for us
        time.sleep(1.5)
        proc = start_receiver(portal_env, log, db.name)
        time.sleep(1.0)
        stop_writing.set()
        thread.join()

        result = wal.force_switch_and_wait(db, timeout=30)
        assert result["segment"]
        states = wal.timelines(area, db.wal_segment_size)
        assert states[1].gaps == []
        assert len(states[1].names) >= 4

        rc = pitr.recover(db, None)
        try:
            with rc.cluster.connect() as conn:
                recovered = {r[0] for r in conn.execute("SELECT id FROM t")}
            assert set(written) <= recovered
        finally:
            rc.destroy()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert "wal_receiver: stopped" in log.read_text()
