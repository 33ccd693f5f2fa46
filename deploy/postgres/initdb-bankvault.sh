#!/bin/sh
# Runs once, when the official postgres image initialises an empty data directory
# (/docker-entrypoint-initdb.d), as the postgres user against the temporary server.
#
# The least-privilege role bankvault backs up as (README, "Production setup"; the same statements,
# checked against a real server by tests/test_deploy_files.py): pg_dump reads everything, also
# tables with row-level security (BYPASSRLS; else pg_dump refuses them), pg_basebackup and
# pg_receivewal replicate, settings and the archiver's status are readable, and `databases check
# --wal` may force a WAL switch. Its password comes from BANKVAULT_BACKUP_PASSWORD; without one, no
# role is created.
set -eu
if [ -n "${BANKVAULT_BACKUP_PASSWORD:-}" ]; then
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -v pw="$BANKVAULT_BACKUP_PASSWORD" -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE bankvault_backup LOGIN REPLICATION BYPASSRLS PASSWORD :'pw';
GRANT pg_read_all_data, pg_monitor TO bankvault_backup;
GRANT CONNECT ON DATABASE :"db" TO bankvault_backup;
-- function privileges are per database: repeat in every database bankvault checks
GRANT EXECUTE ON FUNCTION pg_switch_wal() TO bankvault_backup;
SQL
    # Replication connections (pg_basebackup) are not covered by the image's "host all all all" line.
    echo "host replication bankvault_backup all scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi
