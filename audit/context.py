"""Who is acting, from where, for the events written while handling one request, command or
task — so that every audit.record() call carries the source IP, user agent and request id
without each call site passing them along."""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from dataclasses import dataclass, field

_current: contextvars.ContextVar[Context | None] = contextvars.ContextVar("audit_context", default=None)


@dataclass
class Context:
    actor: object = None            # a user or a label ("system:beat", "cli:root")
    source_ip: str | None = None
    user_agent: str = ""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    quiet: set[str] = field(default_factory=set)  # model labels whose signal-driven events are muted


def cli_actor() -> str:
    """The actor label for a management command run without a portal user."""
    import getpass

    try:
        who = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        who = "unknown"
    return f"cli:{who}"


def current() -> Context | None:
    return _current.get()


@contextlib.contextmanager
def bind(**values):
    """Everything recorded inside the block inherits these values."""
    parent = _current.get()
    ctx = Context(**{**(parent.__dict__ if parent else {}), **values})
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


@contextlib.contextmanager
def quiet(*model_labels: str):
    """Mute the automatic events of these models: used when a change is already recorded as
    part of a larger one (a policy saving its own beat entry)."""
    ctx = _current.get() or Context()
    token = _current.set(Context(**{**ctx.__dict__, "quiet": ctx.quiet | set(model_labels)}))
    try:
        yield
    finally:
        _current.reset(token)


def client_ip(request) -> str | None:
    """The client's address. Behind TLS proxies (BANKVAULT_TRUSTED_PROXIES, addresses or networks)
    it is the right-most X-Forwarded-For entry that is not one of them; a header from anyone else
    is ignored, since clients can write whatever they like into it."""
    import ipaddress

    from django.conf import settings

    remote = request.META.get("REMOTE_ADDR") or None
    trusted = [ipaddress.ip_network(p, strict=False) for p in getattr(settings, "BANKVAULT_TRUSTED_PROXIES", [])]

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in trusted)

    if not remote or not trusted or not is_trusted(remote):
        return remote
    hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return remote
    return remote
