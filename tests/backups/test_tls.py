"""TLS to the target databases, against a real cluster with ssl = on that accepts TCP clients
only over TLS (hostssl): sslmode verify-full with the CA bundle from BANKVAULT_SSLROOTCERT
backs up, and every way the verification can fail stops the backup at its first connection
with a message that says which."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from psycopg import sql

from backups.engine.cluster import LocalCluster, chown_tree
from backups.models import Archive, BackupRun, Database
from tests.conftest import archive_dir, manual_backup

PASSWORD = "Tls-Target-" + "5b1e"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", "-days", "2", cwd=directory)


@pytest.fixture(scope="module")
def tls_cluster():
    """A cluster whose certificate, signed by the test CA `ca`, names only IP 127.0.0.1; a second
    CA `other` signed nothing here."""
    certs = Path(tempfile.mkdtemp(prefix="bv-tls-"))
    _ca(certs, "ca")
    _ca(certs, "other")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=certs)
    (certs / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=certs)
    cluster = LocalCluster.create(tcp_auth="scram-sha-256", throwaway=True)
    for name in ("server.crt", "server.key"):
        shutil.copy(certs / name, cluster.base / name)
        (cluster.base / name).chmod(0o600)
    chown_tree(cluster.base, cluster.os_user)
    cluster.write_conf({"ssl": "on", "ssl_cert_file": str(cluster.base / "server.crt"),
                        "ssl_key_file": str(cluster.base / "server.key")})
    # TCP only over TLS: a connection that got through was encrypted.
    cluster._write_owned(cluster.datadir / "pg_hba.conf",
                         "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
    cluster.start()
    with cluster.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(PASSWORD)))
    cluster.sql("CREATE DATABASE tlsdb")
    with cluster.connect("tlsdb") as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text); "
                     "INSERT INTO accounts SELECT g, 'owner ' || g FROM generate_series(1, 500) g")
    yield cluster, certs
    cluster.destroy()
    shutil.rmtree(certs, ignore_errors=True)


def _register(name: str, host: str, port: int, dbname: str, password: str = PASSWORD) -> Database:
    db = Database(name=name, host=host, port=port, dbname=dbname, user="postgres", sslmode="verify-full")
    db.set_password(password)
    db.save()
    return db


@pytest.mark.pg
@pytest.mark.django_db
def test_verify_full_backs_up_over_tls_with_the_ca_bundle_from_the_settings(tls_cluster, settings, repo):
    cluster, certs = tls_cluster
    settings.BANKVAULT_SSLROOTCERT = str(certs / "ca.crt")
    run, archive = manual_backup(_register("tls", "127.0.0.1", cluster.port, "tlsdb"))
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    manifest = (archive_dir(archive) / "manifest.json").read_text()
    assert '"sslmode": "verify-full"' in manifest and '"rows": 500' in manifest


@pytest.mark.pg
@pytest.mark.django_db
@pytest.mark.parametrize("case", ["other CA", "no bundle", "another host", "no TLS"])
def test_each_failed_tls_verification_stops_the_backup_at_its_first_connection_and_says_which(
        case, tls_cluster, target_cluster, target_password, settings, repo):
    cluster, certs = tls_cluster
    settings.BANKVAULT_SSLROOTCERT = str(certs / ("other.crt" if case == "other CA" else "ca.crt"))
    host, port, dbname, password = "127.0.0.1", cluster.port, "tlsdb", PASSWORD
    if case == "no bundle":
        settings.BANKVAULT_SSLROOTCERT = str(certs / "nowhere.crt")
    elif case == "another host":
        host = "localhost"  # resolves to this server, but the certificate names only 127.0.0.1
    elif case == "no TLS":
        port, dbname, password = target_cluster.port, "postgres", target_password
    run, archive = manual_backup(_register("tls", host, port, dbname, password))
    assert run.state == BackupRun.State.FAILED and archive is None
    expected = {"other CA": "is not signed by a CA in the CA bundle", "no bundle": "is missing; nothing was read",
                "another host": "names another host", "no TLS": "does not offer TLS"}[case]
    assert expected in run.error and f"{host}:{port}" in run.error, run.error
    assert PASSWORD not in run.error and target_password not in run.error
    assert not Archive.objects.exists()


@pytest.mark.pg
@pytest.mark.django_db
def test_databases_check_says_what_tls_the_connection_got(tls_cluster, target_cluster, target_password, settings):
    cluster, certs = tls_cluster
    settings.BANKVAULT_SSLROOTCERT = str(certs / "ca.crt")
    _register("tls", "127.0.0.1", cluster.port, "tlsdb")
    plain = Database(name="plain", host="127.0.0.1", port=target_cluster.port, dbname="postgres", user="postgres",
                     sslmode="prefer")
    plain.set_password(target_password)
    plain.save()

    def check(name: str) -> str:
        out = StringIO()
        call_command("databases", "check", name, stdout=out)
        return out.getvalue()

    encrypted = check("tls")
    assert "tls: TLSv1." in encrypted and "sslmode verify-full" in encrypted and "names this host" in encrypted
    clear = check("plain")
    assert "tls: off (sslmode prefer)" in clear and "in clear" in clear


@pytest.mark.pg
@pytest.mark.django_db
def test_the_admins_check_connection_shows_the_tls_and_audits_it(tls_cluster, settings, admin_client):
    from audit.models import AuditEvent

    cluster, certs = tls_cluster
    settings.BANKVAULT_SSLROOTCERT = str(certs / "ca.crt")
    db = _register("tls", "127.0.0.1", cluster.port, "tlsdb")
    page = admin_client.post("/admin/backups/database/", {
        "action": "check_connection", "_selected_action": [db.pk]}, follow=True).content.decode()
    assert "tls: TLSv1." in page and "names this host" in page
    event = AuditEvent.objects.get(action="database.checked", outcome="success")
    assert event.details["tls"]["in_use"] is True and event.details["tls"]["sslmode"] == "verify-full"
    assert PASSWORD not in str(event.details)
