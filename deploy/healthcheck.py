"""Is the web process serving? For the container HEALTHCHECK (compose) and the readiness probe (k8s).

    python deploy/healthcheck.py            exit 0 when /healthz answers, 1 when it does not

/healthz answers 200 ("ok", "warning", "pending") or 503 ("failing": a backup is stale, a WAL check
failed, ...). Both mean the process serves and reads its database, so both pass here: a failing
*backup* must raise an alert (bankvault's own), not restart the web server or take it out of the
load balancer just when operators need the dashboard. No answer, a timeout or any other status
fails.

Django refuses a Host header not in ALLOWED_HOSTS, so the request names the first allowed host
(BANKVAULT_HEALTHCHECK_HOST overrides it). Standard library only; no Django start-up.
"""

import os
import sys
import urllib.error
import urllib.request

SERVING = (200, 503)


def main() -> int:
    url = os.environ.get("BANKVAULT_HEALTHCHECK_URL", "http://127.0.0.1:8000/healthz")
    hosts = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "localhost").split(",") if h.strip()]
    host = os.environ.get("BANKVAULT_HEALTHCHECK_HOST") or next(
        (h.lstrip(".") for h in hosts if h != "*"), "localhost")
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=float(os.environ.get("BANKVAULT_HEALTHCHECK_TIMEOUT", "5"))) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status not in SERVING:
        print(f"healthcheck: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
