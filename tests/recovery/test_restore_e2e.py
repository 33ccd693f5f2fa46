"""Restores end to end against real clusters: the two-person rule, the safe swap, and that the
restored database equals the archive in everything pg_dump carries."""

import re
import subprocess

import pytest
from psycopg import sql

from backups.engine import pgbin
from backups.engine import runner as backup_runner
from backups.engine.cluster import wait_until
from backups.models import BackupRun
from recovery import services
from recovery.models import RuleViolation
from tests.conftest import FIXTURE_SQL, table_counts
from tests.recovery.conftest import make_user

pytestmark = [pytest.mark.pg, pytest.mark.slow]

ROLES_SQL = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_ro') THEN CREATE ROLE app_ro; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_rw') THEN CREATE ROLE app_rw LOGIN; END IF;
END $$;
"""


def db_level_sql(dbname: str) -> str:
    d = f'"{dbname}"'
    return f"""
ALTER TABLE ledger.accounts OWNER TO app_rw;
GRANT USAGE ON SCHEMA ledger TO app_ro;
GRANT SELECT ON ALL TABLES IN SCHEMA ledger TO app_ro;
COMMENT ON DATABASE {d} IS 'ledger of record';
ALTER DATABASE {d} SET search_path TO ledger, public;
ALTER ROLE app_ro IN DATABASE {d} SET statement_timeout = '5s';
REVOKE CONNECT ON DATABASE {d} FROM PUBLIC;
GRANT CONNECT ON DATABASE {d} TO app_ro, app_rw;
"""


def make_rich_db(make_target_db, cluster, name="account"):
    cluster.sql(ROLES_SQL)
    db = make_target_db(name=name, sql=FIXTURE_SQL)
    with cluster.connect(db.dbname) as conn:
        conn.execute(db_level_sql(db.dbname))
    return db


def backup(db):
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test")
    return backup_runner.execute(run.pk)


def fingerprint(cluster, dbname: str) -> dict:
    """Everything pg_dump can carry, in a comparable form."""
    dump = subprocess.run([pgbin.for_server().tool("pg_dump"), "--schema-only", "-h", str(cluster.socket_dir),
                           "-p", str(cluster.port), "-U", "postgres", dbname], capture_output=True, text=True,
                          check=True).stdout
    schema = "\n".join(ln for ln in dump.splitlines() if not ln.startswith(("--", "\\restrict", "\\unrestrict")))
    with cluster.connect(dbname) as conn:
        data = {}
        for schema_name, table in table_counts(cluster, dbname):
            q = sql.SQL("SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {}.{} t")
            data[f"{schema_name}.{table}"] = conn.execute(
                q.format(sql.Identifier(schema_name), sql.Identifier(table))).fetchone()[0]
        sequences = conn.execute("SELECT schemaname, sequencename, last_value FROM pg_sequences ORDER BY 1, 2")\
            .fetchall()
        blobs = conn.execute("SELECT md5(lo_get(oid)), pg_get_userbyid(lomowner) FROM pg_largeobject_metadata "
                             "ORDER BY 1").fetchall()
    with cluster.connect("postgres") as conn:
        comment, acl, owner = conn.execute(
            "SELECT shobj_description(oid, 'pg_database'), datacl::text[], pg_get_userbyid(datdba) "
            "FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        settings = sorted(conn.execute(
            "SELECT coalesce(r.rolname, '*'), s.setconfig FROM pg_db_role_setting s "
            "JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole "
            "WHERE d.datname = %s", (dbname,)).fetchall())
    return {"schema": schema, "data": data, "sequences": sequences, "blobs": blobs, "comment": comment,
            "acl": sorted(acl or []), "owner": owner, "settings": settings}


def allow_connections(cluster, dbname):
    cluster.sql(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')


def wait_done(req, timeout=120):
    def done():
        req.refresh_from_db()
        return req.state in ("succeeded", "failed")

    wait_until(done, timeout, interval=0.2, what=f"restore request {req.pk}")
    return req


@pytest.mark.django_db(transaction=True)
def test_replace_restore_needs_two_other_people_and_equals_the_archive(
        celery_worker_thread, personas, make_target_db, repo, target_cluster):
    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    before = fingerprint(target_cluster, db.dbname)
    # Live changes after the backup: what the restore must undo, and the pre-restore copy keep.
    with target_cluster.connect(db.dbname) as conn:
        conn.execute("INSERT INTO ledger.accounts (iban, balance) VALUES ('CHANGED', 1)")
        conn.execute("DROP TABLE public.cache")
        conn.execute("SELECT setval('ledger.accounts_id_seq', 9999)")
        conn.execute(f"COMMENT ON DATABASE \"{db.dbname}\" IS 'changed'")
    changed = fingerprint(target_cluster, db.dbname)
    assert changed != before

    dual = make_user("dora", "operator", "approver")  # holds both roles; the rules still hold
    req = services.file_request(dual, kind="archive", mode="replace", archive=archive, database=db,
                                reason="a migration damaged the accounts table", change_ticket="CHG-1042")
    assert req.state == "pending" and len(req.digest) == 64

    with pytest.raises(RuleViolation, match="no one can approve their own request"):
        req.approve(dual, password_ok=True)
    req.approve(personas["approver_a"], password_ok=True)
    req.refresh_from_db()
    assert req.state == "pending"  # one approver is not enough
    assert fingerprint(target_cluster, db.dbname) == changed

    req.approve(personas["approver_b"], password_ok=True)
    wait_done(req)
    assert req.state == "succeeded", req.error
    item = req.result["items"][0]
    assert item["pre_restore"] == f"{db.dbname}__pre_restore_{req.pk}"
    assert item["tables_verified"] == len(before["data"])

    assert fingerprint(target_cluster, db.dbname) == before
    allow_connections(target_cluster, item["pre_restore"])
    pre = fingerprint(target_cluster, item["pre_restore"])
    assert pre["data"] == changed["data"] and pre["sequences"] == changed["sequences"]

    from audit.models import AuditEvent

    actions = list(AuditEvent.objects.filter(target_type="recovery.restorerequest", target_id=str(req.pk))
                   .order_by("id").values_list("action", "actor_label", "outcome"))
    assert actions == [
        ("restore.request.created", "dora", "success"),
        ("restore.approval.denied", "dora", "denied"),
        ("restore.request.approved_by", "anna", "success"),
        ("restore.request.approved_by", "bert", "success"),
        ("restore.request.approved", "bert", "success"),
        ("restore.request.started", "system:worker", "success"),
        ("restore.request.succeeded", "system:worker", "success"),
    ]


@pytest.mark.django_db(transaction=True)
def test_copy_to_a_restore_test_server_creates_the_missing_roles(personas, make_target_db, repo, target_cluster,
                                                                  target_password):
    """The archive needs app_ro and app_rw, which the restore-test server lacks: the restore
    creates them from the archive's roles (without passwords) — never a half-restored copy."""
    from backups.engine.cluster import LocalCluster
    from backups.models import Database
    from recovery.engine import runner

    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    test_host = LocalCluster.create(tcp_auth="scram-sha-256", throwaway=True)
    test_host.start()
    try:
        with test_host.connect() as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(target_password)))
        server = Database(name="restore-test", host="127.0.0.1", port=test_host.port, dbname="postgres",
                          user="postgres")
        server.set_password(target_password)
        server.save()
        req = services.file_request(personas["operator"], kind="archive", mode="copy", archive=archive,
                                    new_name="account_check", target_server=server, reason="quarterly restore test")
        req.approve(personas["approver_a"], password_ok=True)
        with pytest.MonkeyPatch.context() as mp:  # run in this process instead of a worker
            mp.setattr("recovery.models._dispatch", lambda pk: None)
            req.approve(personas["approver_b"], password_ok=True)
        runner.execute(req.pk)
        req.refresh_from_db()
        assert req.state == "succeeded", req.error
        assert sorted(req.result["items"][0]["roles_created"]) == ["app_ro", "app_rw"]
        copy = fingerprint(test_host, "account_check")
        source = fingerprint(target_cluster, db.dbname)
        assert copy["data"] == source["data"] and copy["owner"] == source["owner"]
        assert re.sub(r"\s+", " ", copy["schema"]) == re.sub(r"\s+", " ", source["schema"])
        assert copy["comment"] == "ledger of record"
        with test_host.connect() as conn:
            assert conn.execute("SELECT rolcanlogin, rolpassword IS NULL FROM pg_authid WHERE rolname = 'app_rw'")\
                .fetchone() == (True, True)
        # the source was not touched
        assert fingerprint(target_cluster, db.dbname) == source
    finally:
        test_host.destroy()
