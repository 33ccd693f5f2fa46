"""`databases check`: can we reach a database, and what is it?"""

from django.template.defaultfilters import filesizeformat

from .models import Database


def probe(db: Database) -> dict:
    """Connect with the stored credentials; raises a BackupError subclass on failure."""
    with db.conninfo().connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int, "
                    "pg_database_size(current_database()), pg_is_in_recovery()")
        version, num, size, in_recovery = cur.fetchone()
    return {"server_version": version, "server_version_num": num, "size_bytes": size,
            "size_pretty": filesizeformat(size), "in_recovery": in_recovery}
