#!/bin/sh
# The database servers' entrypoint in docker-compose-backup.yml (image target postgres-wal).
#
# Runs as root before the official image's docker-entrypoint.sh, which then drops to the postgres
# user. The WAL area is a volume (mounted at the same path in bankvault's containers); a new volume
# belongs to root, and archive_command runs as postgres, so the area is handed to postgres here, on
# every start. bankvault's containers only read it.
set -eu
if [ "$(id -u)" = 0 ] && [ -n "${BANKVAULT_WAL_AREA:-}" ]; then
    mkdir -p "$BANKVAULT_WAL_AREA"
    chown postgres:postgres "$BANKVAULT_WAL_AREA"
    chmod 0755 "$BANKVAULT_WAL_AREA"
fi
exec docker-entrypoint.sh "$@"
