# syntax=docker/dockerfile:1
# bankvault's images, from one file (BuildKit):
#
#   app           the default (last) stage: web, worker and beat run this one image with different
#                 commands; PostgreSQL client AND server tools (restore drills and point-in-time
#                 recovery start scratch clusters), gnupg, zstd; runs as the non-root user bankvault
#   postgres-wal  the database servers of docker-compose-backup.yml: the official postgres image plus
#                 python3 and bankvault's WAL push script, for archive_command
#
#   docker build -t bankvault .
#   docker build --target postgres-wal -t bankvault-postgres:15 .
#
# pg_dump must be at least as new as the server it dumps: PG_MAJORS lists the majors installed side
# by side (bankvault picks the newest installed major >= each server's). Debian bookworm carries 15;
# for 16 or 17 build with --build-arg PGDG=1 --build-arg PG_MAJORS="15 16 17" (adds apt.postgresql.org).

ARG PG_SERVER_MAJOR=15

# -- the compose file's database servers ---------------------------------------------------------------
FROM postgres:${PG_SERVER_MAJOR}-bookworm AS postgres-wal
# archive_command runs the push script with the system's python3 (standard library only) and zstd;
# acl: the WAL area's default ACL lets bankvault's user read and expire what the server writes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 zstd acl \
 && rm -rf /var/lib/apt/lists/*
# Where `manage.py databases archive-command NAME` says the script is: <repository>/bin/. Only the
# script and the server's own WAL area (a volume) of the repository are in this container.
COPY --chmod=0755 backups/walpush.py /var/lib/bankvault/repository/bin/bankvault-walpush
COPY --chmod=0755 deploy/postgres/entrypoint.sh /usr/local/bin/bankvault-entrypoint.sh
COPY --chmod=0755 deploy/postgres/prepare-wal-area.sh /usr/local/bin/bankvault-prepare-wal-area.sh
COPY --chmod=0755 deploy/postgres/initdb-bankvault.sh /docker-entrypoint-initdb.d/50-bankvault.sh
ENTRYPOINT ["bankvault-entrypoint.sh"]
CMD ["postgres"]

# -- web, worker, beat ------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS app

ARG PG_MAJORS="15"
ARG PGDG=0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    BANKVAULT_ENV=production BANKVAULT_REPOSITORY=/var/lib/bankvault/repository \
    BANKVAULT_SCRATCH_DIR=/var/tmp/bankvault-scratch BANKVAULT_GPG_HOME=/var/lib/bankvault/gnupg \
    STATIC_ROOT=/app/staticfiles

# The server packages bring initdb/pg_ctl/postgres for drills and PITR; no cluster is created.
# /usr/bin/python3: what archive/restore commands name (BANKVAULT_WAL_PYTHON); here it is the image's.
RUN set -eux; \
    mkdir -p /etc/postgresql-common/createcluster.d; \
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/bankvault.conf; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates gnupg zstd postgresql-common; \
    if [ "$PGDG" = 1 ]; then /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y; fi; \
    pkgs=""; for major in $PG_MAJORS; do pkgs="$pkgs postgresql-client-$major postgresql-$major"; done; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    [ -e /usr/bin/python3 ] || ln -s /usr/local/bin/python3 /usr/bin/python3; \
    groupadd --system --gid 10001 bankvault; \
    useradd --system --uid 10001 --gid bankvault --home-dir /app --no-create-home bankvault

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
# collectstatic needs settings but no secrets and no database (throwaway values, this step only).
RUN SECRET_KEY=build-only BANKVAULT_FIELD_KEYS=YnVpbGQtb25seS1rZXktMDAwMDAwMDAwMDAwMDAwMDA= \
    python manage.py collectstatic --noinput \
 && mkdir -p /var/lib/bankvault/repository/wal /var/tmp/bankvault-scratch /var/lib/bankvault/gnupg \
 && chown bankvault:bankvault /var/lib/bankvault/repository /var/lib/bankvault/repository/wal \
        /var/tmp/bankvault-scratch /var/lib/bankvault/gnupg \
 && chmod 0700 /var/lib/bankvault/gnupg

USER 10001:10001
EXPOSE 8000
# The web server; compose and k8s give the worker and beat their own commands.
CMD ["gunicorn", "bankvault.wsgi:application", "--bind", "0.0.0.0:8000", "--config", "gunicorn.conf.py"]
