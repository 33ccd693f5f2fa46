"""Shared fixtures: a real target cluster for the session, a fresh database per test, a
private repository per test, Celery workers, and helpers to compare databases."""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path

import pytest

from backups.engine.cluster import LocalCluster

# The chaos suite (tests/chaos, `make chaos`) kills workers and restarts services for half an
# hour: never part of `make test`.
collect_ignore = [] if os.environ.get("BANKVAULT_CHAOS") == "1" else ["chaos"]

# A schema with the things that trip up backup tools: quoted and mixed-case names, several
# schemas, a partitioned table, an unlogged table, sequences, a materialized view, a large
# object, comments, and a table with no rows.
FIXTURE_SQL = """
CREATE SCHEMA ledger;
CREATE TABLE ledger.accounts (id bigserial PRIMARY KEY, iban text UNIQUE NOT NULL, balance numeric(18,2) NOT NULL);
CREATE TABLE ledger."Entries" (id bigserial PRIMARY KEY, account_id bigint REFERENCES ledger.accounts(id),
    amount numeric(18,2), memo text, booked_at timestamptz DEFAULT now());
CREATE TABLE public.events (id bigint, at date NOT NULL, payload jsonb) PARTITION BY RANGE (at);
CREATE TABLE public.events_2026 PARTITION OF public.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE public.events_2027 PARTITION OF public.events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
CREATE UNLOGGED TABLE public.cache (k text PRIMARY KEY, v text);
CREATE TABLE public.empty_table (id int);
CREATE TABLE public.documents (id serial PRIMARY KEY, blob oid);
INSERT INTO ledger.accounts (iban, balance) SELECT 'DE' || lpad(g::text, 20, '0'), g * 1.5 FROM generate_series(1, 300) g;
INSERT INTO ledger."Entries" (account_id, amount, memo)
    SELECT 1 + g % 300, g % 977 - 400, E'memo with\\nnewline, tab\\t and ''quote'' ' || g FROM generate_series(1, 5000) g;
INSERT INTO public.events SELECT g, DATE '2026-01-01' + (g % 700), jsonb_build_object('n', g) FROM generate_series(1, 2000) g;
INSERT INTO public.cache SELECT 'k' || g, repeat('v', 10) FROM generate_series(1, 50) g;
INSERT INTO public.documents (blob) VALUES (lo_from_bytea(0, 'large object content'::bytea));
CREATE MATERIALIZED VIEW ledger.totals AS SELECT count(*) AS n, sum(balance) AS total FROM ledger.accounts;
COMMENT ON TABLE ledger.accounts IS 'accounts of the fixture';
SELECT setval('ledger.accounts_id_seq', 5000);
"""

FIXTURE_COUNTS = {
    ("ledger", "accounts"): 300,
    ("ledger", "Entries"): 5000,
    ("public", "events_2026"): None,  # split by date; the sum is 2000
    ("public", "events_2027"): None,
    ("public", "cache"): 50,
    ("public", "empty_table"): 0,
    ("public", "documents"): 1,
}


@pytest.fixture(scope="session")
def target_password() -> str:
    # Distinctive, so a test can grep logs, argv and pages for it.
    return "S3cr3t-" + secrets.token_hex(12)


@pytest.fixture(scope="session")
def target_cluster(target_password):
    """A real PostgreSQL cluster standing in for a production server: TCP clients must prove a
    password (scram-sha-256)."""
    cluster = LocalCluster.create(tcp_auth="scram-sha-256", throwaway=True)
    cluster.start()
    from psycopg import sql

    with cluster.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(target_password)))
    yield cluster
    cluster.destroy()


@pytest.fixture
def make_target_db(target_cluster, target_password, django_db_blocker):
    """Factory: a fresh database on the target cluster, filled with ``sql``, registered as a
    Database row named ``name``. Dropped at the end of the test."""
    created = []

    def make(name: str = "ledger", sql: str = FIXTURE_SQL, register: bool = True):
        from backups.models import Database

        dbname = f"t_{name}_{uuid.uuid4().hex[:8]}"
        target_cluster.sql(f'CREATE DATABASE "{dbname}"')
        created.append(dbname)
        if sql:
            with target_cluster.connect(dbname) as conn:
                conn.execute(sql)
        if not register:
            return dbname
        with django_db_blocker.unblock():
            db = Database(name=name, host="127.0.0.1", port=target_cluster.port, dbname=dbname, user="postgres")
            db.set_password(target_password)
            db.save()
        return db

    yield make
    for dbname in created:
        try:
            target_cluster.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", params=(dbname,))
            target_cluster.sql(f'DROP DATABASE IF EXISTS "{dbname}"')
        except Exception:
            pass


@pytest.fixture
def target_db(make_target_db, db):
    return make_target_db()


@pytest.fixture
def repo(settings):
    """A private repository for the test, in a directory the `postgres` OS user can traverse
    (pytest's tmp_path is not), because archive_command runs as that user."""
    import shutil
    import tempfile

    from backups.engine.repository import LocalRepository

    base = Path(tempfile.mkdtemp(prefix="bv-repo-"))
    base.chmod(0o755)
    root = base / "repository"
    settings.BANKVAULT_REPOSITORY = root
    settings.BANKVAULT_SCRATCH_DIR = base / "scratch"
    yield LocalRepository(root)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_archiving_cluster(repo, target_password, django_db_blocker):
    """Factory: a real cluster whose archive_command is bankvault's push script into the test
    repository, registered as a Database with WAL mode 'archive'. Commit timestamps are tracked
    so tests can tell exactly which transactions a recovery must contain."""
    from psycopg import sql

    from backups.engine import wal
    from backups.engine.cluster import free_port
    from backups.models import Database

    clusters = []

    def make(name: str = "pitr", mode: str = "archive", settings: dict | None = None):
        port = free_port()
        with django_db_blocker.unblock():
            db = Database(name=name, host="127.0.0.1", port=port, dbname="postgres", user="postgres",
                          wal_mode=mode)
            db.set_password(target_password)
            db.save()
        wal.install_push_script(repo)
        wal.prepare_area(db, repo=repo)
        conf = {"track_commit_timestamp": "on", "full_page_writes": "on", "max_wal_size": "256MB"}
        if mode == "archive":
            conf.update({"archive_mode": "on", "archive_command": wal.archive_command(db, repo)})
        conf.update(settings or {})
        cluster = LocalCluster.create(port=port, tcp_auth="scram-sha-256", throwaway=True, settings=conf)
        clusters.append(cluster)
        cluster.start()
        with cluster.connect() as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(target_password)))
        return cluster, db

    yield make
    for cluster in clusters:
        cluster.destroy()


def table_counts(cluster: LocalCluster, dbname: str) -> dict[tuple[str, str], int]:
    """Exact row count of every ordinary table in a database."""
    from psycopg import sql

    counts = {}
    with cluster.connect(dbname) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2").fetchall()
        for schema, name in tables:
            q = sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
            counts[(schema, name)] = conn.execute(q).fetchone()[0]
    return counts


def manual_backup(db, policy=None, kind=None):
    """A manual run executed in-process as a worker would: (the run, refreshed; its archive, or
    None when the run failed)."""
    from backups.engine import runner
    from backups.models import BackupRun

    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test", policy=policy, kind=kind)
    try:
        archive = runner.execute(run.pk)
    except Exception:
        archive = None
    run.refresh_from_db()
    return run, archive


def archive_dir(archive) -> Path:
    from django.conf import settings

    return Path(settings.BANKVAULT_REPOSITORY) / archive.path


@pytest.fixture
def celery_worker_thread(transactional_db):
    """A real Celery worker consuming from the session's real Redis, in a thread of this
    process (solo pool). Tests using it must use the transactional_db fixture, since the
    worker's database connection cannot see uncommitted test data."""
    from celery.contrib.testing.worker import start_worker
    from celery.signals import task_postrun
    from django.db import connections

    from bankvault.celery import QUEUES, app

    def close(**kw):  # in the worker's thread: its connection must not outlive the test database
        connections.close_all()

    task_postrun.connect(close, weak=False)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                          shutdown_timeout=30, queues=list(QUEUES)) as worker:
            yield worker
    finally:
        task_postrun.disconnect(close)


@pytest.fixture
def portal_env(settings) -> dict:
    """Environment for a subprocess (manage.py, celery worker/beat) that must use this test's
    portal database and repository. Data must be committed (transactional tests) to be seen."""
    import os

    from django.db import connection

    from tests.plugin import services

    env = dict(os.environ)
    env["DATABASE_URL"] = services()["portal"].url(connection.settings_dict["NAME"])
    env["BANKVAULT_REPOSITORY"] = str(settings.BANKVAULT_REPOSITORY)
    return env


@pytest.fixture
def celery_procs(portal_env, tmp_path):
    """Start real `celery worker` / `celery beat` processes; stopped at the end of the test."""
    import signal
    import subprocess
    import sys

    started = []

    from bankvault.celery import ALL_QUEUES

    def start(*args, name: str):
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        if args and args[0] == "worker" and "-Q" not in args:
            args = (*args, "-Q", ALL_QUEUES)  # like make run's workers together: every queue
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bankvault", *args],
                                env=portal_env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        started.append((proc, log))
        return proc

    start.logs = tmp_path
    yield start
    for proc, log in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                import os

                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


# -- named personas (STYLE 17) -------------------------------------------------------------------
PASSWORD = "correct-horse-battery-staple"


def make_user(username: str, *roles: str, **extra):
    """As `manage.py users add` makes them: role holders are staff (the admin then enforces
    their model permissions)."""
    from django.contrib.auth.models import Group, User

    extra.setdefault("is_staff", bool(roles))
    user = User.objects.create_user(username, email=f"{username}@bank.example", password=PASSWORD, **extra)
    for role in roles:
        user.groups.add(Group.objects.get(name=role))
    return user


def ensure_roles():
    """Transactional tests flush every table, data migrations' rows included: put the roles back."""
    import importlib

    from django.contrib.auth.models import Group, Permission

    importlib.import_module("recovery.migrations.0002_roles").assign(Group, Permission)


@pytest.fixture
def personas(db):
    ensure_roles()
    return {
        "operator": make_user("olga", "operator"),
        "operator_b": make_user("oskar", "operator"),
        "approver_a": make_user("anna", "approver"),
        "approver_b": make_user("bert", "approver"),
        "approver_c": make_user("carl", "approver"),
        "auditor": make_user("audrey", "auditor"),
        "outsider": make_user("otto"),
        "superuser": make_user("root", is_superuser=True, is_staff=True),
    }


@pytest.fixture
def slow_link():
    from tests.netutil import SlowLink

    links = []

    def make(target_port: int, rate: int, both_ways: bool = False) -> SlowLink:
        links.append(SlowLink(target_port, rate, both_ways))
        return links[-1]

    yield make
    for link in links:
        link.close()
