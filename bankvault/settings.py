"""bankvault settings: one module, driven by environment variables (see .env.example).

Every variable has a default that suits a local checkout (`make run`); production sets them
explicitly. A secret may also come from a file named by NAME_FILE (Docker/Kubernetes secrets).
A malformed value stops start-up with a message naming the variable.
"""

import os
import secrets
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("BANKVAULT_VAR_DIR", BASE_DIR / "var"))

env = environ.Env()
# A local .env (never committed) is read if present; real environment variables win.
if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)


def secret(name: str, default: str | None = None) -> str | None:
    """NAME, or the content of the file named by NAME_FILE."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path} cannot be read: {exc}") from exc
    return os.environ.get(name, default)


def _local_secret_key() -> str:
    """A per-checkout key kept in var/ so `make run` works with no SECRET_KEY set and
    sessions survive a restart. Production must set SECRET_KEY (checked below)."""
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


DEBUG = env.bool("DEBUG", default=False)
BANKVAULT_ENV = env.str("BANKVAULT_ENV", default="local")  # local | test | production
SECRET_KEY = secret("SECRET_KEY") or ""
if not SECRET_KEY:
    if BANKVAULT_ENV == "production":
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) must be set in production")
    SECRET_KEY = _local_secret_key()

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
# Reverse proxies (addresses or networks) whose X-Forwarded-For names the real client: the audit
# trail and the sign-in lockout then see the client, not the proxy.
BANKVAULT_TRUSTED_PROXIES = env.list("BANKVAULT_TRUSTED_PROXIES", default=[])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "django_htmx",
    "axes",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "csp",
    "audit",
    "backups",
    "recovery",
    "monitoring",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Before whitenoise, so that static files carry the policy too.
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "audit.middleware.AuditContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # After messages: an idle sign-out leaves a note for the sign-in page.
    "bankvault.accounts.SessionTimeoutMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as axes asks: it turns a lockout flagged during sign-in into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "bankvault.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "bankvault.wsgi.application"

# The portal's own catalog. Not one of the databases it backs up.
DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/bankvault"),
}
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=60))
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

if BANKVAULT_ENV == "test":
    # Fast hashing for the many users the tests create; never outside tests.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# -- sign-in and sessions (bankvault/accounts.py; README "Sign-in and sessions") -------------------
AUTHENTICATION_BACKENDS = [
    # First: refuses every sign-in of a locked-out username+address before a password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Lockout: per username AND source address together, so a guesser elsewhere cannot lock a
# colleague out, and one address cannot try one username more than AXES_FAILURE_LIMIT times.
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=10)
AXES_COOLOFF_TIME = timedelta(seconds=env.int("AXES_COOLOFF_SECONDS", default=30 * 60))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
# Attempts made while locked out do not restart the cool-off: the page's "30 minutes" holds.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "bankvault.accounts.lockout_response"
# The address the audit trail records, so a lockout and its audit events name the same client.
AXES_CLIENT_IP_CALLABLE = "audit.context.client_ip"
# The audit trail (hash-chained) is the record of sign-ins; axes keeps only its counters.
AXES_DISABLE_ACCESS_LOG = True
AXES_SENSITIVE_PARAMETERS = ["username", "ip_address", "otp_token"]
AXES_VERBOSE = False  # no start-up banner in every manage.py command's output

# A session with no user activity for this many seconds is signed out (0 = never). htmx polls
# do not count as activity.
SESSION_IDLE_TIMEOUT = env.int("SESSION_IDLE_TIMEOUT", default=15 * 60)
# Absolute: a session ends this many seconds after sign-in, active or not.
SESSION_COOKIE_AGE = env.int("SESSION_COOKIE_AGE", default=12 * 3600)
SESSION_EXPIRE_AT_BROWSER_CLOSE = env.bool("SESSION_EXPIRE_AT_BROWSER_CLOSE", default=True)
SESSION_COOKIE_HTTPONLY = True
# No script reads the CSRF cookie: forms carry the token.
CSRF_COOKIE_HTTPONLY = True

# One-time passwords (TOTP, django-otp): optional for everyone, required of approvers when
# APPROVER_REQUIRE_OTP is on. The issuer is the name authenticator apps show.
OTP_TOTP_ISSUER = env.str("OTP_TOTP_ISSUER", default="bankvault")

# -- HTTP security headers ---------------------------------------------------------------------
# No inline scripts or styles anywhere (htmx's own indicator style is off: base.html).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
        "base-uri": ["'self'"],
        "object-src": ["'none'"],
    },
}
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Behind a TLS-terminating proxy: the header it sets and the value meaning https, e.g.
# "HTTP_X_FORWARDED_PROTO,https". Only if the proxy always sets (overwrites) that header.
SECURE_PROXY_SSL_HEADER = tuple(env.list("SECURE_PROXY_SSL_HEADER", default=[])) or None
if SECURE_PROXY_SSL_HEADER is not None and len(SECURE_PROXY_SSL_HEADER) != 2:
    raise ImproperlyConfigured("SECURE_PROXY_SSL_HEADER must be HEADER,VALUE, e.g. HTTP_X_FORWARDED_PROTO,https")
if BANKVAULT_ENV == "production":
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    # Container and load-balancer probes speak plain HTTP to the pod; a redirect would pass them
    # without checking anything. /healthz carries no secrets (monitoring/probes.py).
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    # "preload" only consents to preloading; nothing is preloaded unless the registrable
    # domain is submitted to the browsers' list (hstspreload.org).
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)

STATIC_URL = "/static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(VAR_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": env.str(
            "STATICFILES_STORAGE", default="whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# -- HTTP API (/api/v1/) ---------------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token per user (manage.py drf_create_token USERNAME); the session too, for the dashboard's
    # own calls — with CSRF enforced, as DRF does for session-authenticated unsafe requests.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "recovery.api.exception_handler",
    # Approving or rejecting checks a password: bound the guesses per user.
    "DEFAULT_THROTTLE_RATES": {"decisions": env.str("API_DECISION_RATE", default="10/min")},
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "bankvault API",
    "DESCRIPTION": "Restore requests under the two-person rule; databases and archives.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
}

# -- Celery ------------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Outcomes live on the domain rows (BackupRun, RestoreRequest); no result backend needed.
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
# One queue per kind of work (bankvault/celery.py QUEUES). Exact names first, then patterns.
CELERY_TASK_ROUTES = {
    "backups.tasks.check_wal_archiving": {"queue": "wal"},
    "recovery.tasks.execute_restore": {"queue": "restores"},
    "monitoring.tasks.run_drill": {"queue": "backups"},  # a drill must not hold up a real restore
    "backups.tasks.*": {"queue": "backups"},
    "monitoring.tasks.*": {"queue": "checks"},
    "recovery.tasks.*": {"queue": "checks"},
    "audit.tasks.*": {"queue": "checks"},
}
# Crash safety: a task's message is acknowledged only when the task has ended, and handed back
# to the queue when the worker process running it dies. Every task is idempotent (a run or a
# request is claimed under a row lock), so a redelivered message is a no-op.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# Redis hands an unacknowledged message to another worker after this many seconds; longer than
# most backups, but a redelivery is harmless anyway.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=2 * 3600)}
# Reconnect to the broker forever (a Redis restart must not need a person), and retry
# publishing for about a minute (a restart while beat sends a slot).
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_TASK_PUBLISH_RETRY = True
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 12, "interval_start": 0.5, "interval_step": 1,
                                    "interval_max": 10}
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False

# -- bankvault -----------------------------------------------------------------------------
BANKVAULT_REPOSITORY = Path(env.str("BANKVAULT_REPOSITORY", default=str(VAR_DIR / "repository")))
# Directory holding pg_dump & co.; empty = pick the newest installed major >= the server's.
BANKVAULT_PG_BINDIR = env.str("BANKVAULT_PG_BINDIR", default="")
# Keys that encrypt target-database passwords at rest (Fernet, urlsafe base64, 32 bytes).
# Several, comma-separated: the first encrypts, all decrypt (rotation). Empty = derived from
# SECRET_KEY, which is fine locally but ties the stored passwords to that key.
BANKVAULT_FIELD_KEYS = [k for k in (secret("BANKVAULT_FIELD_KEYS") or "").split(",") if k.strip()]
if BANKVAULT_ENV == "production" and not BANKVAULT_FIELD_KEYS:
    raise ImproperlyConfigured("BANKVAULT_FIELD_KEYS must be set in production")
# Upper bound for one pg tool invocation (seconds); a hung pg_dump is killed after this.
BANKVAULT_TOOL_TIMEOUT = env.int("BANKVAULT_TOOL_TIMEOUT", default=6 * 3600)
# The CA bundle that verifies the target servers' TLS certificates (databases registered with
# sslmode verify-ca or verify-full), for psycopg and every pg tool alike; empty: libpq's default,
# ~/.postgresql/root.crt of the user bankvault runs as.
BANKVAULT_SSLROOTCERT = env.str("BANKVAULT_SSLROOTCERT", default="")
BANKVAULT_CONNECT_TIMEOUT = env.int("BANKVAULT_CONNECT_TIMEOUT", default=10)
# How long a backup waits for a table lock (e.g. behind a migration) before it fails.
BANKVAULT_LOCK_WAIT_TIMEOUT = env.int("BANKVAULT_LOCK_WAIT_TIMEOUT", default=600)
# Worker threads for compression (zstd) per backup.
BANKVAULT_COMPRESS_THREADS = env.int("BANKVAULT_COMPRESS_THREADS", default=2)
# pg_basebackup's --compress; server-side zstd spares the network and this host.
BANKVAULT_BASEBACKUP_COMPRESS = env.str("BANKVAULT_BASEBACKUP_COMPRESS", default="server-zstd:level=3,workers=2")
# How long a finished base backup waits for its WAL (start..stop LSN) to reach the repository.
BANKVAULT_WAL_WAIT_TIMEOUT = env.int("BANKVAULT_WAL_WAIT_TIMEOUT", default=300)
# The Python that the database server's OS user runs the WAL push/fetch script with.
BANKVAULT_WAL_PYTHON = env.str("BANKVAULT_WAL_PYTHON", default="/usr/bin/python3")
# Where point-in-time recovery and drills create their clusters; must be traversable by the
# server's OS user (postgres), so not under /root.
BANKVAULT_SCRATCH_DIR = Path(env.str("BANKVAULT_SCRATCH_DIR", default="/var/tmp/bankvault-scratch"))
# Upper bound for one point-in-time recovery (unpack + replay), seconds.
BANKVAULT_PITR_TIMEOUT = env.int("BANKVAULT_PITR_TIMEOUT", default=3600)
# OS user that runs scratch clusters when the portal runs as root.
BANKVAULT_PG_OS_USER = env.str("BANKVAULT_PG_OS_USER", default="postgres")
BANKVAULT_BASE_URL = env.str("BANKVAULT_BASE_URL", default="http://127.0.0.1:8000")
# GnuPG (archive and WAL encryption). The workers' keyring holds the private key that restores,
# drills and the decrypt canary use; its passphrase comes from the environment (or a file) and
# reaches gpg only through a pipe, never argv. The database holds public keys only.
BANKVAULT_GPG_BINARY = env.str("BANKVAULT_GPG_BINARY", default="gpg")
BANKVAULT_GPG_HOME = Path(env.str("BANKVAULT_GPG_HOME", default=str(VAR_DIR / "gnupg")))
BANKVAULT_GPG_PASSPHRASE = secret("BANKVAULT_GPG_PASSPHRASE") or ""
# A recipient key of an enabled policy that expires within this many days is a health warning.
BANKVAULT_KEY_EXPIRY_WARNING_DAYS = env.int("BANKVAULT_KEY_EXPIRY_WARNING_DAYS", default=30)
# Retention: every archive is kept at least this many days, whatever a policy's GFS counts say
# (a policy's keep_days overrides it for its archives).
RETENTION_DAYS = env.int("RETENTION_DAYS", default=30)
# Off-site copies (S3-compatible): the part size of multipart uploads in MiB (raised for a file that
# would need more than 9,000 parts) and the parts uploaded at once per file; an upload holds about
# 2 x concurrency parts in memory.
BANKVAULT_OFFSITE_PART_MB = env.int("BANKVAULT_OFFSITE_PART_MB", default=8)
BANKVAULT_OFFSITE_CONCURRENCY = env.int("BANKVAULT_OFFSITE_CONCURRENCY", default=4)

# -- running unattended: heartbeats, watchdog, limits ------------------------------------------------
# A running backup, restore or drill touches its row this often (seconds) ...
BANKVAULT_HEARTBEAT_SECONDS = env.int("BANKVAULT_HEARTBEAT_SECONDS", default=15)
# ... and is declared lost (worker killed, host gone) when it has not for this long.
BANKVAULT_WORKER_LOST_SECONDS = env.int("BANKVAULT_WORKER_LOST_SECONDS", default=120)
# A run that is alive but moves no bytes for this long is hung: stopped, failed, alerted.
BANKVAULT_HUNG_SECONDS = env.int("BANKVAULT_HUNG_SECONDS", default=600)
# A queued run nobody has claimed for this long had its message lost (a broker without
# persistence restarted): it is queued again, once.
BANKVAULT_REQUEUE_SECONDS = env.int("BANKVAULT_REQUEUE_SECONDS", default=600)
# How long a restore waits for a running backup of its database before failing.
BANKVAULT_RESTORE_LOCK_WAIT = env.int("BANKVAULT_RESTORE_LOCK_WAIT", default=900)
# Heavy jobs (backups, restores, drills) running at once on one host, across all its workers.
BANKVAULT_HOST_JOBS = env.int("BANKVAULT_HOST_JOBS", default=4)
# How long state changes wait for the portal's own database to come back (a restart).
BANKVAULT_DB_RETRY_SECONDS = env.int("BANKVAULT_DB_RETRY_SECONDS", default=120)

# -- monitoring and alerts ----------------------------------------------------------------------------
# Alerts go by e-mail (Django's EMAIL_* settings) and/or as JSON to a webhook; a check that stays
# bad is reminded no more often than ALERT_REPEAT_SECONDS.
ALERT_EMAILS = env.list("ALERT_EMAILS", default=[])
ALERT_WEBHOOK_URL = env.str("ALERT_WEBHOOK_URL", default="")
ALERT_WEBHOOK_TOKEN = secret("ALERT_WEBHOOK_TOKEN") or ""
ALERT_REPEAT_SECONDS = env.int("ALERT_REPEAT_SECONDS", default=6 * 3600)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="bankvault@localhost")
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
# /metrics answers without authentication unless a token is set (then: Authorization: Bearer <token>).
METRICS_TOKEN = secret("METRICS_TOKEN") or ""
MONITORING_CONNECT_TIMEOUT = env.int("MONITORING_CONNECT_TIMEOUT", default=5)
MONITORING_WORKER_PING_TIMEOUT = env.float("MONITORING_WORKER_PING_TIMEOUT", default=2.0)
MONITORING_BEAT_STALE_SECONDS = env.int("MONITORING_BEAT_STALE_SECONDS", default=300)
MONITORING_DISK_WARNING_PCT = env.float("MONITORING_DISK_WARNING_PCT", default=15.0)
MONITORING_DISK_FAILING_PCT = env.float("MONITORING_DISK_FAILING_PCT", default=5.0)

# -- audit and compliance --------------------------------------------------------------------------
# Events are kept at least this many days. Nothing in bankvault deletes audit events at all (the
# table's triggers refuse it); the number is what reports promise and what an archiving job
# outside bankvault must honour.
AUDIT_RETENTION_DAYS = env.int("AUDIT_RETENTION_DAYS", default=400)
# The RPO a compliance summary holds a database without any enabled policy to (hours).
BANKVAULT_DEFAULT_RPO_HOURS = env.float("BANKVAULT_DEFAULT_RPO_HOURS", default=26)
# A PDF event log is for reading: beyond this many rows it says so and points to the CSV export.
BANKVAULT_REPORT_PDF_MAX_ROWS = env.int("BANKVAULT_REPORT_PDF_MAX_ROWS", default=2000)

# -- restores: the two-person rule ------------------------------------------------------------------
# Distinct approvals a restore needs, each from an approver who is not the requester (min 1).
RESTORE_REQUIRED_APPROVALS = max(1, env.int("RESTORE_REQUIRED_APPROVALS", default=2))
# A pending request expires after this many seconds; an approved one not started within the window too.
RESTORE_REQUEST_TTL = env.int("RESTORE_REQUEST_TTL", default=24 * 3600)
RESTORE_EXECUTION_WINDOW = env.int("RESTORE_EXECUTION_WINDOW", default=4 * 3600)
# Parallel jobs for pg_restore in restores. 1 streams the dump straight into pg_restore (no scratch
# copy); more decompresses it to BANKVAULT_SCRATCH_DIR first — worth it only for many large tables,
# since streamed dumps carry no data offsets and each job must scan for its tables.
BANKVAULT_RESTORE_JOBS = env.int("BANKVAULT_RESTORE_JOBS", default=1)
# Approvers must confirm with a one-time password (TOTP) as well as their password.
APPROVER_REQUIRE_OTP = env.bool("APPROVER_REQUIRE_OTP", default=False)

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
