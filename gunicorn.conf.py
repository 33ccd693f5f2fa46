"""gunicorn's settings for bankvault, read from the working directory by every way the web
process starts (make run, the container image, compose).

Threads rather than only processes: archive downloads, audit exports (a year of events takes
tens of seconds) and htmx progress polls are long or frequent but mostly wait on I/O, and a
sync worker would be killed by its timeout in the middle of a download. The timeout is a
heartbeat of the worker process, not a request limit, with threads."""

import os

worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
accesslog = "-"
# Request lines beyond this are refused (no portal URL comes close).
limit_request_line = 8190
