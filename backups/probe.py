"""`databases check`: can we reach a database, and what is it?"""

from django.template.defaultfilters import filesizeformat

from .models import Database


def probe(db: Database) -> dict:
    """Connect with the stored credentials; raises a BackupError subclass on failure."""
    with db.conninfo().connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int, "
                    "pg_database_size(current_database()), pg_is_in_recovery()")
        version, num, size, in_recovery = cur.fetchone()
        # What this very connection negotiated: the server's own view of it.
        cur.execute("SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        ssl, tls_version, cipher = cur.fetchone() or (False, None, None)
    return {"server_version": version, "server_version_num": num, "size_bytes": size,
            "size_pretty": filesizeformat(size), "in_recovery": in_recovery,
            "tls": {"in_use": bool(ssl), "version": tls_version, "cipher": cipher, "sslmode": db.sslmode}}


def describe_tls(tls: dict) -> str:
    """One line for an operator: is the connection encrypted, and what was verified."""
    if not tls["in_use"]:
        return (f"tls: off (sslmode {tls['sslmode']}): the password and the data cross the network in clear; "
                "see the README's production setup (sslmode verify-full)")
    verified = {"verify-full": "the server's certificate was verified against the CA bundle and names this host",
                "verify-ca": "the server's certificate was verified against the CA bundle (its host name was not)"}
    return (f"tls: {tls['version']} ({tls['cipher']}), sslmode {tls['sslmode']}: "
            + verified.get(tls["sslmode"], "encrypted, but the server's certificate was not verified"))
