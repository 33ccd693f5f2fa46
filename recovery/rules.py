"""The two-person rule: the one place that decides who may request, approve, reject, cancel
and run a restore. Every path — dashboard, admin, CLI, API and the Celery task — asks these
functions; none of them changes anything.

- RESTORE_REQUIRED_APPROVALS distinct approvals (never fewer than 1), each from an active
  member of the `approver` group who is not the requester; one person counts once.
- Any single rejection ends the request.
- An approval is bound to the request's digest; a request whose content no longer matches its
  digest cannot be approved or run.
- Superuser or staff status gives no way around any of this.
- Approving needs a fresh proof of identity (password re-entered, and OTP when required).
- A pending request expires after RESTORE_REQUEST_TTL; an approved one not started within
  RESTORE_EXECUTION_WINDOW expires too.
- Before running, the task re-checks everything under a row lock, including that the requester
  and every approver are still active and still hold their roles; any change fails closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone

OPERATOR = "operator"
APPROVER = "approver"
AUDITOR = "auditor"
ROLES = (OPERATOR, APPROVER, AUDITOR)


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str = ""
    # "role" / "self" / "auth" -> 403, "state" -> 409, "content" -> 403
    code: str = ""

    def __bool__(self) -> bool:
        return self.ok


ALLOW = Decision(True)


def deny(reason: str, code: str = "role") -> Decision:
    return Decision(False, reason, code)


def required_approvals() -> int:
    return max(1, int(getattr(settings, "RESTORE_REQUIRED_APPROVALS", 2)))


def has_role(user, role: str) -> bool:
    """Active and in the group. Deliberately blind to is_superuser and is_staff."""
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    return user.groups.filter(name=role).exists()


def can_request(user) -> Decision:
    if not has_role(user, OPERATOR):
        return deny("only active members of the operator group can request a restore")
    return ALLOW


def _expired(req, now) -> bool:
    expires = req.expires_at
    return expires is not None and now >= expires


def can_approve(user, req, *, password_ok: bool, otp_ok: bool = True, now=None) -> Decision:
    now = now or timezone.now()
    if not has_role(user, APPROVER):
        return deny("only active members of the approver group can approve (superuser or staff status "
                    "does not count)")
    if user.pk == req.requester_id:
        return deny("no one can approve their own request", "self")
    if req.state != req.State.PENDING or _expired(req, now):
        state = "expired" if _expired(req, now) else req.state
        return deny(f"the request is {state}; only pending requests can be approved", "state")
    if req.approvals.filter(user=user).exists():
        return deny("you have already decided on this request; one person counts once", "state")
    if not password_ok:
        return deny("approving needs a fresh proof of identity: enter your password", "auth")
    if not otp_ok:
        return deny("approving needs your one-time password: a valid code from your authenticator "
                    "(required for everyone with a device, and for all approvers when APPROVER_REQUIRE_OTP is on)",
                    "auth")
    if req.digest != req.compute_digest():
        return deny("the request's content no longer matches what was filed (digest mismatch)", "content")
    return ALLOW


def can_reject(user, req, *, password_ok: bool, otp_ok: bool = True, now=None) -> Decision:
    now = now or timezone.now()
    if not has_role(user, APPROVER):
        return deny("only active members of the approver group can reject")
    if user.pk == req.requester_id:
        return deny("the requester cancels their own request instead of rejecting it", "self")
    if req.state != req.State.PENDING or _expired(req, now):
        return deny(f"the request is {'expired' if _expired(req, now) else req.state}; "
                    "only pending requests can be rejected", "state")
    if req.approvals.filter(user=user).exists():
        return deny("you have already decided on this request", "state")
    if not password_ok:
        return deny("rejecting needs a fresh proof of identity: enter your password", "auth")
    if not otp_ok:
        return deny("rejecting needs your one-time password: a valid code from your authenticator", "auth")
    return ALLOW


def can_cancel(user, req) -> Decision:
    if user is None or not user.is_authenticated or not user.is_active:
        return deny("sign in to cancel")
    if user.pk != req.requester_id and not has_role(user, OPERATOR):
        return deny("only the requester or another operator can cancel a request")
    if req.state not in (req.State.PENDING, req.State.APPROVED):
        return deny(f"the request is {req.state}; only pending or approved requests can be cancelled", "state")
    return ALLOW


def counted_approvals(req) -> list:
    """Approvals that count: approve decisions on the current digest by distinct, active
    approvers other than the requester."""
    seen, counted = set(), []
    for a in req.approvals.filter(decision="approve").select_related("user"):
        if a.user_id in seen or a.user_id == req.requester_id or a.digest != req.digest:
            continue
        if not has_role(a.user, APPROVER):
            continue
        seen.add(a.user_id)
        counted.append(a)
    return counted


def is_approved(req) -> bool:
    if req.approvals.filter(decision="reject").exists():
        return False
    return len(counted_approvals(req)) >= required_approvals()


def may_execute(req, now=None) -> Decision:
    """The task's re-check, made under the request's row lock just before anything is touched."""
    now = now or timezone.now()
    if req.state != req.State.APPROVED:
        return deny(f"the request is {req.state}, not approved; nothing runs", "state")
    if _expired(req, now):
        return deny("the approved request was not started within RESTORE_EXECUTION_WINDOW", "state")
    if req.digest != req.compute_digest():
        return deny("the request's content no longer matches the approved digest", "content")
    if req.approvals.filter(decision="reject").exists():
        return deny("the request was rejected", "state")
    if not has_role(req.requester, OPERATOR):
        return deny(f"the requester {req.requester.get_username()} is no longer an active operator")
    approvals = list(req.approvals.filter(decision="approve").select_related("user"))
    for a in approvals:
        if not has_role(a.user, APPROVER):
            return deny(f"approver {a.user.get_username()} is no longer an active member of the approver group")
        if a.digest != req.digest:
            return deny(f"the approval of {a.user.get_username()} was for different content")
    if len(counted_approvals(req)) < required_approvals():
        return deny(f"{len(counted_approvals(req))} valid approvals; {required_approvals()} needed")
    return ALLOW


def can_read(user) -> bool:
    """Reading restore requests: the three roles, and superusers (who read everything in the
    admin anyway). Reading grants nothing else."""
    return bool(user and user.is_authenticated and user.is_active and
                (user.is_superuser or any(has_role(user, r) for r in ROLES)))


def can_view(user, req) -> bool:
    return can_read(user) or bool(user and user.is_authenticated and user.is_active and user.pk == req.requester_id)
