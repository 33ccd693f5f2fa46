"""The other kinds of restore request, each end to end against real clusters: the whole system
at one time, a point in time, selected tables into a new schema, and rolling back."""

import time

import pytest
from django.utils import timezone

from recovery import services
from recovery.engine import runner
from tests.recovery.test_pitr import base_backup, commit_times, switch_and_wait
from tests.recovery.test_restore_e2e import allow_connections, backup, fingerprint, make_rich_db

pytestmark = [pytest.mark.pg, pytest.mark.slow]


@pytest.fixture
def run_approved(personas, monkeypatch):
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)

    def go(**fields):
        req = services.file_request(personas["operator"], reason="kind test", **fields)
        req.approve(personas["approver_a"], password_ok=True)
        req.approve(personas["approver_b"], password_ok=True)
        runner.execute(req.pk)
        req.refresh_from_db()
        assert req.state == "succeeded", req.error
        return req

    return go


@pytest.mark.django_db
def test_system_restore_brings_every_database_back_to_the_archive_set(run_approved, make_target_db, repo,
                                                                      target_cluster):
    auth = make_rich_db(make_target_db, target_cluster, name="auth")
    account = make_rich_db(make_target_db, target_cluster, name="account")
    backup(auth)
    backup(account)
    stamp = timezone.now()
    want = {d.dbname: fingerprint(target_cluster, d.dbname) for d in (auth, account)}
    for d in (auth, account):
        with target_cluster.connect(d.dbname) as conn:
            conn.execute("DELETE FROM ledger.\"Entries\"")
    req = run_approved(kind="system", mode="replace", target_time=stamp)
    assert {i["name"] for i in req.items} == {"auth", "account"}
    for d in (auth, account):
        assert fingerprint(target_cluster, d.dbname) == want[d.dbname]
    assert len(req.result["items"]) == 2


@pytest.mark.django_db
def test_rollback_puts_the_pre_restore_database_back(run_approved, make_target_db, repo, target_cluster):
    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    with target_cluster.connect(db.dbname) as conn:
        conn.execute("INSERT INTO ledger.accounts (iban, balance) VALUES ('KEEP-ME', 7)")
    after_change = fingerprint(target_cluster, db.dbname)
    restored = run_approved(kind="archive", mode="replace", archive=archive)
    assert fingerprint(target_cluster, db.dbname) != after_change

    rollback = run_approved(kind="rollback", rollback_of=restored)
    allow = fingerprint(target_cluster, db.dbname)
    assert allow["data"] == after_change["data"]
    kept = rollback.result["items"][0]["kept_as"]
    allow_connections(target_cluster, kept)
    assert fingerprint(target_cluster, kept)["data"] != after_change["data"]


@pytest.mark.django_db
def test_tables_from_an_archive_land_in_a_new_schema_beside_the_live_data(run_approved, make_target_db, repo,
                                                                           target_cluster):
    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    with target_cluster.connect(db.dbname) as conn:
        conn.execute('DROP TABLE ledger."Entries"')  # the mistake to repair
        conn.execute("UPDATE ledger.accounts SET balance = 0")
        live_accounts = conn.execute("SELECT md5(string_agg(a::text, ',' ORDER BY id)) FROM ledger.accounts a")\
            .fetchone()
    req = run_approved(kind="tables", database=db, archive=archive, tables=["ledger.Entries"],
                       new_name="restored_20261120")
    assert req.mode == "copy"
    with target_cluster.connect(db.dbname) as conn:
        assert conn.execute('SELECT count(*) FROM restored_20261120."Entries"').fetchone()[0] == 5000
        assert conn.execute("SELECT md5(string_agg(a::text, ',' ORDER BY id)) FROM ledger.accounts a")\
            .fetchone() == live_accounts  # the rest of the live data untouched
        assert conn.execute("SELECT to_regclass('ledger.\"Entries\"')").fetchone()[0] is None
    assert req.result["items"][0]["tables"] == ["ledger.Entries"]


@pytest.mark.django_db
def test_point_in_time_replace_and_tables_from_a_point_in_time(run_approved, make_archiving_cluster, repo):
    cluster, db = make_archiving_cluster(name="ledger")
    cluster.sql("CREATE DATABASE appdb")
    db.dbname = "appdb"
    db.save()
    with cluster.connect("appdb") as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, label text)")
    base_backup(db)
    with cluster.connect("appdb") as conn:
        for i in range(30):
            conn.execute("INSERT INTO t (label) VALUES (%s)", (f"r{i}",))
            time.sleep(0.002)
    switch_and_wait(cluster)
    commits = commit_times(_AppDb(cluster))
    order = sorted(commits, key=commits.get)
    target = commits[order[14]] + (commits[order[15]] - commits[order[14]]) / 2
    with cluster.connect("appdb") as conn:
        conn.execute("DELETE FROM t WHERE id > 5")  # the damage, after the target
    switch_and_wait(cluster)

    tables = run_approved(kind="tables", database=db, target_time=target, tables=["public.t"], new_name="before")
    with cluster.connect("appdb") as conn:
        assert conn.execute("SELECT count(*) FROM before.t").fetchone()[0] == 15
        assert conn.execute("SELECT count(*) FROM public.t").fetchone()[0] == 5
    assert tables.result["items"][0]["schema"] == "before"

    run_approved(kind="pitr", mode="replace", database=db, target_time=target)
    with cluster.connect("appdb") as conn:
        assert sorted(r[0] for r in conn.execute("SELECT id FROM t")) == sorted(order[:15])


class _AppDb:
    """commit_times() of the appdb database of a cluster."""

    def __init__(self, cluster):
        self.cluster = cluster

    def connect(self, *_):
        return self.cluster.connect("appdb")


@pytest.mark.django_db
def test_parallel_jobs_restore_from_a_decompressed_copy(run_approved, make_target_db, repo, target_cluster,
                                                       settings):
    settings.BANKVAULT_RESTORE_JOBS = 2
    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    req = run_approved(kind="archive", mode="copy", new_name="parallel_copy", archive=archive)
    assert fingerprint(target_cluster, "parallel_copy")["data"] == fingerprint(target_cluster, db.dbname)["data"]
    assert req.result["items"][0]["tables_verified"] > 0
    checks = {c["check"] for c in req.result["items"][0]["preflight"]}
    assert "local scratch space" in checks  # only the decompressing path needs scratch space
