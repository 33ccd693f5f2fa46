#!/bin/sh
# The database servers' entrypoint in docker-compose-backup.yml (image target postgres-wal).
#
# Runs as root before the official image's docker-entrypoint.sh, which then drops to the postgres
# user. The WAL area (BANKVAULT_WAL_AREA) is a volume, mounted at the same path in bankvault's
# containers: archive_command writes it as postgres, bankvault (BANKVAULT_APP_UID, default 10001)
# reads and expires it. prepare-wal-area.sh sets that up, on every start.
set -eu
if [ "$(id -u)" = 0 ] && [ -n "${BANKVAULT_WAL_AREA:-}" ]; then
    /usr/local/bin/bankvault-prepare-wal-area.sh "$BANKVAULT_WAL_AREA" "${BANKVAULT_APP_UID:-10001}" postgres
fi
exec docker-entrypoint.sh "$@"
