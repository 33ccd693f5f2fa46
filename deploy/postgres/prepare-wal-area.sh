#!/bin/sh
# Hands a WAL area to the database server and opens it to bankvault's user. Run as root, on every
# start, by entrypoint.sh (the area is a volume; a new one belongs to root).
#
#   prepare-wal-area.sh AREA [APP_UID] [SERVER_USER]     APP_UID default 10001 (the image's bankvault)
#
# PostgreSQL runs archive_command with umask 0077, so the push script's segments and the
# subdirectories it makes would be 0600/0700: unreadable for bankvault's containers, which run as
# another user and must read (catalog, verification, restores) and delete (retention) WAL. A
# default ACL decides the permissions of new entries regardless of the umask: the server's user and
# APP_UID get rwx on directories and (capped by the script's 0644) read on segments; nobody else.
set -eu
area=$1
app_uid=${2:-10001}
server_user=${3:-postgres}
mkdir -p "$area"
chown "$server_user:$server_user" "$area"
chmod 0750 "$area"
# Existing entries too (a volume from before this script, or one restored from elsewhere).
find "$area" -type d -exec setfacl -m \
    "u:$server_user:rwx,u:$app_uid:rwx,d:u::rwx,d:u:$server_user:rwx,d:u:$app_uid:rwx,d:g::r-x,d:m::rwx,d:o::---" {} +
find "$area" -type f -exec setfacl -m "u:$app_uid:r--" {} +
