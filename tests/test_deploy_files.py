"""The deployment files (Dockerfile, docker-compose-backup.yml, k8s/, deploy/) and the README's
production sections. No Docker engine or Kubernetes cluster runs here, so the files are parsed and
everything they name is checked against the code: services, volumes, ports, environment variables,
commands. Two promises are run for real: the least-privilege backup role (README, "Production
setup") against a PostgreSQL 15 server through bankvault's engine, and the WAL area's ACL with a
real archive_command and bankvault's uid."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose-backup.yml").read_text())
K8S = {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((ROOT / "k8s").glob("*.yaml"))}
K8S_OBJECTS = [d for name, docs in K8S.items() if name != "kustomization.yaml" for d in docs]
APP_UID = 10001
WAL_ROOT = "/var/lib/bankvault/repository/wal"

# Services whose containers run the app image (everything else is a database server or Redis).
APP_SERVICES = {"migrate", "web", "worker", "worker-restores", "beat", "wal-receiver"}
DB_SERVICES = {"postgres-auth": ("5433", "auth"), "postgres-account": ("5434", "account")}
SECTIONS = ["Production setup", "Deployment files", "Upgrades", "Disaster recovery runbook"]


# -- what the code reads ----------------------------------------------------------------------------
def settings_variables() -> set[str]:
    """Every environment variable bankvault/settings.py reads (NAME_FILE for secrets too)."""
    text = (ROOT / "bankvault" / "settings.py").read_text()
    names = set(re.findall(r'env\.\w+\(\s*"([A-Z][A-Z0-9_]+)"', text))
    names |= set(re.findall(r'os\.environ\.get\(\s*"([A-Z][A-Z0-9_]+)"', text))
    secrets = set(re.findall(r'\bsecret\(\s*"([A-Z][A-Z0-9_]+)"', text))
    assert {"SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL"} <= names | secrets  # the parse itself works
    return names | secrets | {f"{s}_FILE" for s in secrets}


def process_variables() -> set[str]:
    """Variables read outside settings by the processes the files start."""
    found = set()
    for path in ("gunicorn.conf.py", "deploy/healthcheck.py"):
        found |= set(re.findall(r'environ\.get\(\s*"([A-Z][A-Z0-9_]+)"', (ROOT / path).read_text()))
    return found


def script_variables() -> set[str]:
    """Variables the database servers' scripts read, plus the official postgres image's."""
    found = {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_INITDB_ARGS"}
    for path in (ROOT / "deploy" / "postgres").glob("*.sh"):
        found |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", path.read_text()))
    return found


def env_example_variables() -> set[str]:
    return set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))


KNOWN = None


def known_app_variables() -> set[str]:
    global KNOWN
    if KNOWN is None:
        KNOWN = settings_variables() | process_variables() | {"DJANGO_SETTINGS_MODULE"}
    return KNOWN


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert m, f"README has no section '## {title}'"
    return m.group(1)


def table_first_column(text: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", text, re.M)


# -- README -----------------------------------------------------------------------------------------
def test_readme_has_the_production_sections_before_tests_and_benchmarks():
    headings = re.findall(r"^## (.+)$", README, re.M)
    for title in SECTIONS:
        assert title in headings, title
        assert headings.index(title) < headings.index("Tests and benchmarks"), title
    dr = section("Disaster recovery runbook")
    steps = ["migrate", "repository rescan", "databases set-password", "recover"]
    positions = [dr.index(s) for s in steps]
    assert positions == sorted(positions), "the runbook's steps are out of order"
    assert "no Docker engine" in section("Deployment files").replace("No Docker engine", "no Docker engine")
    assert "sslmode=verify-full" in section("Production setup") or "verify-full" in section("Production setup")


def test_every_variable_the_readme_names_is_one_bankvault_knows():
    # Variables have an underscore; SQL words in backticks (`BYPASSRLS`, `CONNECT`) do not.
    named = set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)(?:=[^`]*)?`", section("Production setup")))
    assert {"SECRET_KEY", "BANKVAULT_FIELD_KEYS", "DATABASE_URL"} <= named
    assert named - known_app_variables() == set()


def test_every_variable_settings_reads_is_documented_in_env_example():
    missing = settings_variables() - env_example_variables() - {f"{n}_FILE" for n in settings_variables()}
    assert missing == set(), f"not in .env.example: {sorted(missing)}"


# -- docker-compose-backup.yml --------------------------------------------------------------------------
def test_compose_has_every_service_the_readme_promises():
    promised = set(table_first_column(section("Deployment files")))
    assert {"postgres-auth", "postgres-account", "portal-db", "redis", "web", "worker", "beat"} <= promised
    services = set(COMPOSE["services"])
    assert promised <= services, promised - services
    assert services == promised | {"migrate"} or services - promised <= {"migrate"}


def test_compose_has_every_volume_the_readme_promises_and_mounts_it():
    text = section("Deployment files")
    volumes_line = text[text.index("Volumes:"):text.index("The database servers")]
    promised = set(re.findall(r"`([a-z_]+)`", volumes_line))
    assert {"auth_wal_archive", "account_wal_archive", "backups", "portal_data"} <= promised
    assert promised <= set(COMPOSE["volumes"])
    mounted = {v.split(":")[0] for s in COMPOSE["services"].values() for v in s.get("volumes", [])}
    assert set(COMPOSE["volumes"]) <= mounted, "a declared volume no service mounts"


@pytest.mark.parametrize("name", sorted(DB_SERVICES))
def test_database_servers_archive_wal_to_their_volume_with_a_health_check(name):
    port, short = DB_SERVICES[name]
    svc = COMPOSE["services"][name]
    assert svc["ports"] == [f"127.0.0.1:{port}:5432"]
    assert svc["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    command = " ".join(svc["command"])
    area = f"{WAL_ROOT}/{short}"
    assert "archive_mode=on" in command and "wal_level=replica" in command
    assert f"bankvault-walpush push --area {area} %p %f" in command
    assert f"{short}_wal_archive:{area}" in svc["volumes"]
    assert svc["environment"]["BANKVAULT_WAL_AREA"] == area
    assert int(svc["environment"]["BANKVAULT_APP_UID"]) == APP_UID
    # bankvault's workers see the same area at the same path
    for worker in ("worker", "worker-restores"):
        assert f"{short}_wal_archive:{area}" in COMPOSE["services"][worker]["volumes"]
    assert svc["build"]["target"] == "postgres-wal"


def test_compose_portal_db_redis_and_web_are_healthy_and_published_where_promised():
    services = COMPOSE["services"]
    for name in ("portal-db", "redis", "web"):
        assert "healthcheck" in services[name], name
    assert "ports" not in services["portal-db"]
    assert services["web"]["ports"] == ["127.0.0.1:8000:8000"]
    assert services["web"]["healthcheck"]["test"] == ["CMD", "python", "deploy/healthcheck.py"]
    for name in APP_SERVICES - {"migrate"}:
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name


def test_compose_workers_cover_every_queue_and_one_beat_exists():
    from bankvault.celery import QUEUES

    queues = []
    for name in ("worker", "worker-restores"):
        cmd = COMPOSE["services"][name]["command"]
        assert cmd[:4] == ["celery", "-A", "bankvault", "worker"]
        queues += cmd[cmd.index("-Q") + 1].split(",")
    assert sorted(queues) == sorted(QUEUES)  # each queue served, none twice
    beats = [n for n, s in COMPOSE["services"].items() if "beat" in s.get("command", [])]
    assert beats == ["beat"]
    assert "django_celery_beat.schedulers:DatabaseScheduler" in COMPOSE["services"]["beat"]["command"]


def test_compose_app_services_use_one_image_and_set_only_variables_bankvault_knows():
    services = COMPOSE["services"]
    assert {services[n]["image"] for n in APP_SERVICES} == {"bankvault:latest"}
    assert {services[n]["build"]["target"] for n in APP_SERVICES} == {"app"}
    for name in APP_SERVICES:
        unknown = set(services[name]["environment"]) - known_app_variables()
        assert unknown == set(), f"{name} sets variables bankvault does not read: {sorted(unknown)}"
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    for name in DB_SERVICES:
        assert set(services[name]["environment"]) - script_variables() == set(), name


# -- commands named anywhere exist ---------------------------------------------------------------------
def all_commands() -> list[list[str]]:
    commands = [s["command"] for s in COMPOSE["services"].values() if isinstance(s.get("command"), list)]
    commands += [s["healthcheck"]["test"][1:] for s in COMPOSE["services"].values() if "healthcheck" in s]
    for obj in K8S_OBJECTS:
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            commands.append(c["command"])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    commands.append(c[probe]["exec"]["command"])
    return [shlex.split(c[2]) if c[:2] == ["sh", "-c"] else c for c in commands]


def check_command(argv: list[str]) -> None:
    from django.core.management import get_commands

    if argv[:2] == ["python", "manage.py"]:
        assert argv[2] in get_commands(), f"no manage.py command {argv[2]!r}"
    elif argv[:2] == ["python", "deploy/healthcheck.py"]:
        assert (ROOT / argv[1]).is_file()
    elif argv[0] == "celery":
        module = argv[argv.index("-A") + 1]
        app = __import__(f"{module}.celery", fromlist=["app"]).app
        assert app.main == module
        assert argv[3] in ("worker", "beat", "inspect"), argv
    elif argv[0] == "gunicorn":
        module, attr = argv[1].split(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))
        assert (ROOT / argv[argv.index("--config") + 1]).is_file()
    elif argv[0] in ("postgres", "redis-server", "pg_isready", "redis-cli", "mkdir", "gpg"):
        pass  # the database and Redis images' own programs, gpg in the app image (Dockerfile)
    else:
        raise AssertionError(f"unknown command {argv}")


def test_every_command_in_compose_and_k8s_exists():
    commands = all_commands()
    assert len(commands) > 15
    for argv in commands:
        check_command(argv)
    # sh -c chains in k8s: every part
    for argv in commands:
        if "&&" in argv:
            for part in " ".join(argv).split("&&"):
                check_command(shlex.split(part))


@pytest.mark.parametrize("argv", [["python", "manage.py", "no_such_command"], ["celery", "-A", "nosuchapp", "worker"],
                                  ["gunicorn", "bankvault.wsgi:application", "--config", "missing.conf.py"]])
def test_the_command_check_rejects_what_does_not_exist(argv):
    with pytest.raises((AssertionError, ImportError)):
        check_command(argv)


def test_the_readme_commands_name_existing_manage_py_subcommands():
    from django.core.management import get_commands

    text = "".join(section(t) for t in SECTIONS)
    named = set(re.findall(r"manage\.py ([a-z_]+)", text))
    assert {"migrate", "databases", "repository", "recover", "backup_scheduler", "createsuperuser"} <= named
    assert named - set(get_commands()) == set()
    assert "repository rescan" in text and "databases set-password" in text
    for sub in ("rescan", "check"):
        assert f'add_parser("{sub}"' in (ROOT / "backups/management/commands/repository.py").read_text()
    assert 'add_parser("set-password"' in (ROOT / "backups/management/commands/databases.py").read_text()


# -- Dockerfile ---------------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, list[str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"FROM \S+ AS (\S+)", line)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current and line and not line.startswith("#"):
            stages[current].append(line)
    return stages


def test_dockerfile_app_stage_runs_as_a_non_root_user_with_pg15_tools():
    stages = dockerfile_stages()
    assert list(stages) == ["postgres-wal", "app"]  # app last: the default target
    app = stages["app"]
    users = [line.split()[1] for line in app if line.startswith("USER ")]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0") and int(uid) == APP_UID
    assert any(f"--uid {APP_UID}" in line for line in app)
    assert 'ARG PG_MAJORS="15"' in app
    run = " ".join(app)
    assert "postgresql-client-$major postgresql-$major" in run and "gnupg" in run and "zstd" in run
    # pgbin looks in /usr/lib/postgresql/<major>/bin, where Debian's packages install
    from backups.engine import pgbin

    assert str(pgbin.DEBIAN_ROOT) == "/usr/lib/postgresql"
    cmd = json.loads([line for line in app if line.startswith("CMD ")][-1][4:])
    assert cmd == COMPOSE["services"]["web"]["command"]
    env = " ".join(line[4:] for line in app if line.startswith("ENV "))
    names = set(re.findall(r"([A-Z][A-Z0-9_]+)=", env))
    assert names - known_app_variables() - {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"} == set()


def test_every_file_the_dockerfile_copies_exists_and_is_not_ignored():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    copies = []
    for lines in dockerfile_stages().values():
        for line in lines:
            if line.startswith("COPY "):
                parts = [p for p in line.split()[1:] if not p.startswith("--")]
                copies += parts[:-1]
    assert "backups/walpush.py" in copies and "deploy/postgres/prepare-wal-area.sh" in copies
    for src in copies:
        assert (ROOT / src).exists(), src
        assert not any(src == i or src.startswith(i + "/") for i in ignored), f"{src} is in .dockerignore"
    for script in (ROOT / "deploy" / "postgres").glob("*.sh"):
        assert f"deploy/postgres/{script.name}" in copies, script.name
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0, script.name


# -- k8s ----------------------------------------------------------------------------------------------
def k8s(kind: str, name: str) -> dict:
    found = [o for o in K8S_OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def deployments() -> list[dict]:
    return [o for o in K8S_OBJECTS if o["kind"] == "Deployment"]


def test_kustomization_lists_every_manifest():
    resources = K8S["kustomization.yaml"][0]["resources"]
    assert sorted(resources) == sorted(n for n in K8S if n != "kustomization.yaml")


def test_k8s_has_web_workers_beat_service_configmap_secret_and_a_shared_repository():
    for name in ("bankvault-web", "bankvault-worker-backups", "bankvault-worker-restores", "bankvault-beat"):
        k8s("Deployment", name)
    k8s("ConfigMap", "bankvault-config")
    k8s("Secret", "bankvault-secrets")
    k8s("Secret", "bankvault-gpg")
    pvc = k8s("PersistentVolumeClaim", "bankvault-repository")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    service = k8s("Service", "bankvault-web")
    web = k8s("Deployment", "bankvault-web")
    assert service["spec"]["selector"] == web["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert web["spec"]["template"]["spec"]["containers"][0]["ports"] == [{"name": "http", "containerPort": 8000}]
    promised = set(re.findall(r"`(bankvault-[a-z-]+)`", section("Deployment files")))
    names = {o["metadata"]["name"] for o in K8S_OBJECTS}
    assert promised and promised <= names, promised - names


@pytest.mark.parametrize("name", ["bankvault-beat", "bankvault-wal-receiver"])
def test_singletons_run_exactly_one_replica_and_are_recreated(name):
    d = k8s("Deployment", name)
    assert d["spec"]["replicas"] == 1
    assert d["spec"]["strategy"] == {"type": "Recreate"}


def test_k8s_workers_cover_every_queue_with_a_liveness_probe():
    from bankvault.celery import QUEUES

    queues = []
    for name in ("bankvault-worker-backups", "bankvault-worker-restores"):
        c = k8s("Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        queues += c["command"][c["command"].index("-Q") + 1].split(",")
        assert "inspect ping" in " ".join(c["livenessProbe"]["exec"]["command"])
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/var/lib/bankvault/repository", "/var/tmp/bankvault-scratch"} <= mounts
    assert sorted(queues) == sorted(QUEUES)
    web = k8s("Deployment", "bankvault-web")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert web[probe]["exec"]["command"] == ["python", "deploy/healthcheck.py"]


def test_every_k8s_pod_runs_non_root_read_only_with_resources():
    pods = [o["spec"]["template"]["spec"] for o in K8S_OBJECTS if o["kind"] in ("Deployment", "Job")]
    assert len(pods) == 6
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == APP_UID
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert c["image"] == "bankvault"


def test_k8s_sets_only_variables_bankvault_knows_and_secrets_are_not_in_the_configmap():
    known = known_app_variables()
    config = k8s("ConfigMap", "bankvault-config")["data"]
    assert set(config) - known == set()
    for secret_name in ("SECRET_KEY", "BANKVAULT_FIELD_KEYS", "DATABASE_URL", "BANKVAULT_GPG_PASSPHRASE"):
        assert secret_name not in config
    secrets = {o["metadata"]["name"]: o["stringData"] for o in K8S_OBJECTS if o["kind"] == "Secret"}
    for obj in K8S_OBJECTS:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                assert e["name"] in known, e["name"]
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]
                if e["name"].endswith("_FILE"):  # the file is in a mounted Secret
                    directory, key = e["value"].rsplit("/", 1)
                    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == directory)
                    assert key in secrets[volumes[mount["name"]]["secret"]["secretName"]], e["value"]


# -- the backup role, for real ---------------------------------------------------------------------------
def readme_role_sql() -> str:
    text = section("Production setup")
    m = re.search(r"```sql\n(.*?)```", text, re.S)
    assert m and "CREATE ROLE bankvault_backup" in m.group(1)
    return m.group(1)


ROLE_FIXTURE = """
CREATE SCHEMA ledger;
REVOKE ALL ON SCHEMA ledger FROM PUBLIC;
CREATE TABLE ledger.accounts (id bigserial PRIMARY KEY, iban text NOT NULL);
INSERT INTO ledger.accounts (iban) SELECT 'DE' || g FROM generate_series(1, 500) g;
CREATE TABLE ledger.tenants (id int, tenant text);
INSERT INTO ledger.tenants VALUES (1, 'a'), (2, 'b'), (3, 'c');
ALTER TABLE ledger.tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON ledger.tenants USING (tenant = current_user);
"""


@pytest.mark.pg
@pytest.mark.slow
@pytest.mark.django_db
def test_the_readme_backup_role_can_run_every_backup_and_no_more(make_archiving_cluster, repo):
    from psycopg import sql

    from backups.engine import runner, wal
    from backups.models import BackupKind, BackupRun
    from tests.conftest import archive_dir

    cluster, db = make_archiving_cluster("account")
    cluster.sql('CREATE DATABASE accountdb')
    cluster.sql("REVOKE CONNECT ON DATABASE accountdb FROM PUBLIC")
    with cluster.connect("accountdb") as conn:
        conn.execute(ROLE_FIXTURE)
        password = "role-" + os.urandom(8).hex()
        conn.execute(readme_role_sql().replace("'change-me'", sql.Literal(password).as_string(conn)))
    db.dbname, db.user = "accountdb", "bankvault_backup"
    db.set_password(password)
    db.save()

    def backup(kind=None):
        run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test", kind=kind)
        archive = runner.execute(run.pk)
        run.refresh_from_db()
        return run, archive

    run, archive = backup()
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    manifest = json.loads((archive_dir(archive) / "manifest.json").read_text())
    rows = {(t["schema"], t["name"]): t["rows"] for t in manifest["tables"]}
    assert rows == {("ledger", "accounts"): 500, ("ledger", "tenants"): 3}  # RLS did not hide rows

    assert wal.force_switch_and_wait(db, timeout=30)  # databases check --wal

    run, archive = backup(BackupKind.BASE)
    assert run.state == BackupRun.State.SUCCEEDED, run.error

    # Each grant is needed: without BYPASSRLS the logical backup fails, and says why.
    cluster.sql("ALTER ROLE bankvault_backup NOBYPASSRLS")
    from backups.engine.pgtools import ToolFailed

    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test")
    with pytest.raises(ToolFailed):
        runner.execute(run.pk)  # records the failure on the run, then re-raises for Celery
    run.refresh_from_db()
    assert run.state == BackupRun.State.FAILED
    assert "row-level security" in run.error
    # And the role can read, never write.
    with pytest.raises(Exception, match="permission denied"):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=cluster.port, dbname="accountdb", user="bankvault_backup",
                             password=password) as conn:
            conn.execute("DELETE FROM ledger.accounts")


# -- the WAL area of the compose database servers, for real ------------------------------------------------
@pytest.mark.pg
def test_prepare_wal_area_lets_bankvaults_uid_read_and_expire_what_the_server_archives(tmp_path):
    import tempfile

    # `make test` runs as root (as CI does) and `make setup` installs acl: neither is optional here.
    assert os.geteuid() == 0, "chown to postgres and acting as uid 10001 need root"
    assert shutil.which("setfacl"), "setfacl missing: make setup installs the acl package"

    from backups.engine.cluster import LocalCluster

    base = Path(tempfile.mkdtemp(prefix="bv-walacl-"))
    try:
        base.chmod(0o755)
        area = base / "repository" / "wal" / "auth"
        script = base / "repository" / "bin" / "bankvault-walpush"
        script.parent.mkdir(parents=True)
        shutil.copy(ROOT / "backups" / "walpush.py", script)
        script.chmod(0o755)
        (base / "repository").chmod(0o755)
        (base / "repository" / "wal").mkdir()
        (base / "repository" / "wal").chmod(0o755)
        subprocess.run(["sh", str(ROOT / "deploy/postgres/prepare-wal-area.sh"), str(area), str(APP_UID), "postgres"],
                       check=True)
        command = f"/usr/bin/python3 -S {script} push --area {area} %p %f"
        cluster = LocalCluster.create(throwaway=True, settings={"archive_mode": "on", "archive_command": command})
        try:
            cluster.start()
            cluster.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS n")
            cluster.sql("SELECT pg_switch_wal()")
            segments = []
            for _ in range(100):
                segments = [p for p in area.rglob("0000*") if p.is_file()]
                if segments:
                    break
                subprocess.run(["sleep", "0.1"])
            assert segments, "no WAL archived"
        finally:
            cluster.destroy()
        # the push script may have swapped a plain segment for its .zst meanwhile: look again
        seg = next(p for p in area.rglob("0000*") if p.is_file())
        # the server's file (umask 0077: no "other" bits); bankvault gets in through the ACL alone
        assert seg.stat().st_uid != APP_UID and seg.stat().st_mode & 0o007 == 0
        as_app = ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups"]
        read = subprocess.run([*as_app, "head", "-c", "4", str(seg)], capture_output=True)
        assert read.returncode == 0 and len(read.stdout) == 4, read.stderr
        write = subprocess.run([*as_app, "sh", "-c", f"echo x >> {seg}"], capture_output=True)
        assert write.returncode != 0  # read-only for bankvault: only the server writes segments
        assert subprocess.run([*as_app, "rm", str(seg)]).returncode == 0  # retention may expire it
        other = subprocess.run(["setpriv", "--reuid=10002", "--regid=10002", "--clear-groups", "ls", str(area)],
                               capture_output=True)
        assert other.returncode != 0  # nobody else gets in
    finally:
        shutil.rmtree(base, ignore_errors=True)
