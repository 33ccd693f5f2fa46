"""The audit trail is a linear, append-only hash chain, and tampering with it is detected."""

import threading
from io import StringIO

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection

import audit
from audit import chain, checkpoints
from audit.models import AppendOnly, AuditEvent

pytestmark = [pytest.mark.pg]


def some_events(n=5):
    for i in range(n):
        audit.record("test", f"test.event.{i}", ("thing", i, f"thing {i}"), details={"i": i, "nested": {"a": [1, 2]}})


def superuser_sql(statement, params=None):
    """As a database superuser would, with the audit triggers disabled around it."""
    with connection.cursor() as cur:
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")  # Django's deferred FK checks block ALTER TABLE
        cur.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER USER")
        try:
            cur.execute(statement, params)
        finally:
            cur.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER USER")


def verify_output():
    out, err = StringIO(), StringIO()
    try:
        call_command("audit", "verify", stdout=out, stderr=err)
        return True, out.getvalue() + err.getvalue()
    except CommandError as exc:
        return False, out.getvalue() + err.getvalue() + str(exc)


@pytest.mark.django_db
def test_events_chain_with_gapless_sequences_and_database_time():
    some_events(3)
    events = list(AuditEvent.objects.order_by("sequence"))
    assert [e.sequence for e in events] == [1, 2, 3]
    assert events[0].prev_hash == chain.GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    assert chain.verify() == (3, [])
    assert events[0].created_at.microsecond or events[1].created_at.microsecond  # db precision kept


@pytest.mark.django_db(transaction=True)
def test_update_delete_and_truncate_are_refused_by_the_database():
    """Even for the table's owner: the triggers refuse every change."""
    some_events(2)
    dsn = connection.get_connection_params()
    with psycopg.connect(host=dsn["host"], port=dsn["port"], dbname=dsn["dbname"], user=dsn["user"],
                         autocommit=True) as owner:
        for statement in ("UPDATE audit_auditevent SET action = 'x'", "DELETE FROM audit_auditevent",
                          "TRUNCATE audit_auditevent CASCADE"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                owner.execute(statement)
    assert AuditEvent.objects.count() == 2


@pytest.mark.django_db
def test_the_model_refuses_to_change_or_delete_an_event():
    some_events(1)
    event = AuditEvent.objects.get()
    event.action = "rewritten"
    with pytest.raises(AppendOnly):
        event.save()
    with pytest.raises(AppendOnly):
        event.delete()
    with pytest.raises(AppendOnly):
        AuditEvent(sequence=99, created_at=event.created_at, actor_label="x", action="forged", outcome="success",
                   prev_hash="f" * 64, hash="e" * 64).save()
    with pytest.raises(AppendOnly):
        AuditEvent(sequence=99, created_at=event.created_at, actor_label="x", action="forged", outcome="success",
                   prev_hash="f" * 64, hash="e" * 64).save(force_insert=True)


@pytest.mark.django_db(transaction=True)
def test_an_application_role_with_insert_and_select_only_cannot_change_events():
    """The README's least-privilege role for the application: INSERT and SELECT on the trail."""
    some_events(2)
    dsn = connection.get_connection_params()
    with connection.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS bankvault_app_test")
        cur.execute("CREATE ROLE bankvault_app_test LOGIN PASSWORD 'app-test-pw'")
        cur.execute("GRANT INSERT, SELECT ON audit_auditevent TO bankvault_app_test")
        cur.execute("GRANT USAGE ON SEQUENCE audit_auditevent_id_seq TO bankvault_app_test")
    try:
        with psycopg.connect(host=dsn["host"], port=dsn["port"], dbname=dsn["dbname"], user="bankvault_app_test",
                             password="app-test-pw", autocommit=True) as app:
            assert app.execute("SELECT count(*) FROM audit_auditevent").fetchone()[0] == 2
            for statement in ("UPDATE audit_auditevent SET action = 'x'", "DELETE FROM audit_auditevent",
                              "TRUNCATE audit_auditevent"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    app.execute(statement)
    finally:
        with connection.cursor() as cur:
            cur.execute("REVOKE ALL ON audit_auditevent FROM bankvault_app_test")
            cur.execute("REVOKE ALL ON SEQUENCE audit_auditevent_id_seq FROM bankvault_app_test")
            cur.execute("DROP ROLE bankvault_app_test")


@pytest.mark.django_db
def test_a_row_altered_with_triggers_disabled_is_named_by_audit_verify():
    some_events(5)
    ok, _ = verify_output()
    assert ok
    victim = AuditEvent.objects.get(sequence=3)
    superuser_sql("UPDATE audit_auditevent SET details = '{\"i\": 999}' WHERE id = %s", [victim.id])
    ok, out = verify_output()
    assert not ok
    assert f"event #3 (id {victim.id}): its content was altered" in out
    # the record of the failed verification is itself in the trail
    assert AuditEvent.objects.filter(action="audit.chain.verified", outcome="failure").exists()


@pytest.mark.django_db
def test_a_deleted_event_is_a_gap(settings, tmp_path):
    some_events(5)
    superuser_sql("DELETE FROM audit_auditevent WHERE sequence = 2")
    count, breaks = chain.verify()
    assert "event #2: missing" in str(breaks[0])


@pytest.mark.django_db
def test_a_consistent_rewrite_of_the_whole_table_is_caught_by_the_checkpoints(settings, tmp_path):
    settings.AUDIT_CHECKPOINT_FILE = str(tmp_path / "checkpoints.jsonl")
    some_events(4)
    checkpoints.write()
    some_events(2)
    # A careful attacker rewrites event 2 and recomputes every hash after it: the chain is
    # consistent again...
    superuser_sql("UPDATE audit_auditevent SET details = '{\"i\": \"rewritten\"}' WHERE sequence = 2")
    rows = list(AuditEvent.objects.order_by("sequence").values("id", "prev_hash", "hash", *chain.FIELDS))
    prev = chain.GENESIS
    for row in rows:
        new = chain.link(prev, row)
        superuser_sql("UPDATE audit_auditevent SET prev_hash = %s, hash = %s WHERE id = %s",
                      ["x" * 63 + str(row["sequence"] % 10), "y" * 63 + str(row["sequence"] % 10), row["id"]])
        row["new"], row["prev"] = new, prev
        prev = new
    for row in rows:
        superuser_sql("UPDATE audit_auditevent SET prev_hash = %s, hash = %s WHERE id = %s",
                      [row["prev"], row["new"], row["id"]])
    assert chain.verify()[1] == []  # ...so the chain alone cannot tell
    count, breaks = chain.verify(checkpoints.read())
    assert breaks and "contradicts the checkpoint" in str(breaks[0]) and "the trail was rewritten" in str(breaks[0])


@pytest.mark.django_db
def test_removing_the_newest_events_is_caught_by_the_checkpoints(settings, tmp_path):
    settings.AUDIT_CHECKPOINT_FILE = str(tmp_path / "checkpoints.jsonl")
    some_events(6)
    checkpoints.write()
    superuser_sql("DELETE FROM audit_auditevent WHERE sequence > 3")
    count, breaks = chain.verify(checkpoints.read())
    assert any("no longer in the trail" in str(b) for b in breaks)


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_writers_make_one_linear_chain():
    barrier = threading.Barrier(20)
    errors = []

    def writer(n):
        try:
            barrier.wait()
            for i in range(25):
                audit.record(f"writer-{n}", "test.concurrent", ("writer", n, str(i)), details={"i": i})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    sequences = list(AuditEvent.objects.order_by("sequence").values_list("sequence", flat=True))
    assert sequences == list(range(1, 501))
    assert chain.verify() == (500, [])


@pytest.mark.django_db(transaction=True)
def test_an_event_of_its_own_and_one_inside_a_transaction_chain_alike_and_roll_back_cleanly(monkeypatch):
    """record() outside any transaction pipelines its own BEGIN ... COMMIT; inside one it joins
    the caller's. Both write the same chain, and a failure in either leaves nothing behind and
    the connection usable."""
    from django.db import transaction

    audit.record("test", "test.alone", ("thing", 1, "one"), details={"when": "alone"})
    with transaction.atomic():
        audit.record("test", "test.inside", ("thing", 2, "two"))
    with pytest.raises(RuntimeError), transaction.atomic():
        audit.record("test", "test.rolled.back", ("thing", 3, "three"))
        raise RuntimeError("the caller's change failed")
    real_link = chain.link
    monkeypatch.setattr(chain, "link", lambda *a: (_ for _ in ()).throw(RuntimeError("hash failed")))
    with pytest.raises(RuntimeError, match="hash failed"):
        audit.record("test", "test.broken.alone", ("thing", 4, "four"))
    with pytest.raises(RuntimeError, match="hash failed"), transaction.atomic():
        audit.record("test", "test.broken.inside", ("thing", 5, "five"))
    monkeypatch.setattr(chain, "link", real_link)
    # A duplicate hash (as a bypassed lock would make) is refused by the database: rolled back too.
    with connection.cursor() as cur:
        cur.execute("SELECT hash FROM audit_auditevent ORDER BY sequence DESC LIMIT 1")
        head_hash = cur.fetchone()[0]
    monkeypatch.setattr(chain, "link", lambda *a: head_hash)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the IntegrityError of the unique hash
        audit.record("test", "test.fork", ("thing", 6, "six"))
    monkeypatch.setattr(chain, "link", real_link)
    audit.record("test", "test.after", ("thing", 7, "seven"))
    with connection.cursor() as cur:
        cur.execute("SELECT 1")  # the connection is usable and not inside a failed transaction
    actions = list(AuditEvent.objects.order_by("sequence").values_list("action", flat=True))
    assert actions == ["test.alone", "test.inside", "test.after"]
    assert chain.verify() == (3, [])


@pytest.mark.django_db
def test_secrets_in_details_are_masked():
    audit.record("test", "test.secret", None, details={"password": "hunter2", "api_token": "t0k",
                                                       "nested": {"secret_key": "s"}, "user": "olga"})
    details = AuditEvent.objects.get(action="test.secret").details
    assert details == {"password": "********", "api_token": "********", "nested": {"secret_key": "********"},
                       "user": "olga"}

