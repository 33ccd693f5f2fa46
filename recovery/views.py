"""Dashboard pages for restore requests. Every decision is the model's, which asks
recovery.rules; these views only collect input and show outcomes."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from . import rules, services
from .forms import DecisionForm, RestoreRequestForm
from .models import RestoreRequest, RuleViolation, StateError


def _get_request_for_user(request, pk) -> RestoreRequest:
    """Lookup and visibility together: 404 for what the user may not see."""
    req = get_object_or_404(RestoreRequest.objects.select_related(
        "requester", "database", "archive", "target_server"), pk=pk)
    if not rules.can_view(request.user, req):
        raise PermissionDenied("you may not see restore requests")
    req.expire_if_due()
    return req


@login_required
def request_list(request):
    if not rules.can_read(request.user):
        raise PermissionDenied("restore requests are for operators, approvers and auditors")
    reqs = RestoreRequest.objects.select_related("requester", "database")[:200]
    return render(request, "recovery/list.html", {"requests": reqs,
                                                  "can_request": rules.can_request(request.user).ok})


@login_required
def request_new(request):
    decision = rules.can_request(request.user)
    if not decision:
        raise PermissionDenied(decision.reason)
    form = RestoreRequestForm(request.POST or None, initial=request.GET or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            req = services.file_request(
                request.user, kind=data["kind"], mode=data["mode"], reason=data["reason"],
                database=data["database"], archive=data["archive"], target_time=data["target_time"],
                new_name=data["new_name"].strip(), target_server=data["target_server"],
                tables=data["tables"].splitlines(), change_ticket=data["change_ticket"],
                latest=form.data.get("target_time", "").strip().lower() == "latest", via="web", request=request)
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                form.add_error(field if field in form.fields else None, errors)
        except RuleViolation as exc:
            raise PermissionDenied(str(exc)) from None
        else:
            messages.success(request, f"Restore request {req.pk} filed; it needs {req.required_approvals} approvals.")
            return redirect("recovery:detail", pk=req.pk)
    return render(request, "recovery/new.html", {"form": form})


@login_required
def request_detail(request, pk):
    req = _get_request_for_user(request, pk)
    user = request.user
    context = {
        "req": req,
        "approvals": req.approvals.select_related("user"),
        "counted": len(rules.counted_approvals(req)),
        "content": req.content(),
        "may_decide": req.state == req.State.PENDING and rules.has_role(user, rules.APPROVER)
        and user.pk != req.requester_id and not req.approvals.filter(user=user).exists(),
        "may_cancel": rules.can_cancel(user, req).ok,
        "form": DecisionForm(),
    }
    return render(request, "recovery/detail.html", context)


@login_required
def request_progress(request, pk):
    """The live part of the request page, polled by htmx while something happens."""
    req = _get_request_for_user(request, pk)
    return render(request, "recovery/_progress.html", {"req": req})


def _decide(request, pk, method: str):
    req = _get_request_for_user(request, pk)
    form = DecisionForm(request.POST)
    if not form.is_valid():
        return HttpResponseBadRequest("password missing")
    password_ok = request.user.check_password(form.cleaned_data["password"])
    try:
        getattr(req, method)(request.user, password_ok=password_ok, otp_ok=_otp_ok(request, form),
                             request=request, comment=form.cleaned_data["comment"])
    except RuleViolation as exc:
        if exc.code != "auth":
            raise PermissionDenied(str(exc)) from None
        messages.error(request, f"Not recorded: {exc}")  # a mistyped password: try again
    except StateError as exc:
        messages.error(request, f"Not recorded: {exc}")
    else:
        messages.success(request, "Your approval is recorded." if method == "approve" else "The request is rejected.")
    return redirect("recovery:detail", pk=pk)


def _otp_ok(request, form) -> bool:
    # Who has a confirmed device must give a valid token; without one, only APPROVER_REQUIRE_OTP refuses.
    from django.conf import settings

    from .identity import otp_ok

    return otp_ok(request.user, form.cleaned_data.get("otp", ""), required=settings.APPROVER_REQUIRE_OTP)


@login_required
@require_POST
def request_approve(request, pk):
    return _decide(request, pk, "approve")


@login_required
@require_POST
def request_reject(request, pk):
    return _decide(request, pk, "reject")


@login_required
@require_POST
def request_cancel(request, pk):
    req = _get_request_for_user(request, pk)
    try:
        req.cancel(request.user, request=request)
    except RuleViolation as exc:
        raise PermissionDenied(str(exc)) from None
    except StateError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Restore request {req.pk} is cancelled.")
    return redirect("recovery:detail", pk=pk)
