"""The HTTP API under /api/v1/: restore requests under the two-person rule, and the catalog of
databases and archives, for scripts and other systems (token per user, or the session).

Nothing here decides who may do what. Filing goes through recovery.services, every transition
through a RestoreRequest method, and both ask recovery.rules, which the model methods also use
to audit refusals. This module turns HTTP into those calls and their errors into JSON:
``{"error": "...", "fields": {...}}`` with 400 (bad input), 401, 403 (RuleViolation),
404 (unknown or invisible), 409 (StateError: wrong state).
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, ObjectDoesNotExist
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from django.http import Http404
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.decorators import api_view, permission_classes, throttle_classes
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import UserRateThrottle
from rest_framework.views import exception_handler as drf_exception_handler

import audit
from backups.models import Archive, ArchiveFile, Database

from . import rules, services
from .engine.pitr import PitrError
from .models import Approval, RestoreRequest, RuleViolation, StateError

log = logging.getLogger(__name__)

class DecisionThrottle(UserRateThrottle):
    """Approve/reject check a password; bound the guesses per user (API_DECISION_RATE)."""

    scope = "decisions"


LIST_LIMIT = 200  # newest first; ?limit= asks for fewer or more (up to LIST_LIMIT_MAX)
LIST_LIMIT_MAX = 1000


# -- output -------------------------------------------------------------------------------------------
class DatabaseSerializer(serializers.ModelSerializer):
    # An allow-list: a field added to Database later stays private until someone names it here.
    has_password = serializers.BooleanField(read_only=True)

    class Meta:
        model = Database
        fields = ["name", "host", "port", "dbname", "user", "sslmode", "wal_mode", "has_password"]


class ArchiveFileSerializer(serializers.ModelSerializer):
    class Meta:
        model = ArchiveFile
        fields = ["path", "role", "bytes", "sha256"]


class ArchiveSerializer(serializers.ModelSerializer):
    database = serializers.SlugRelatedField(slug_field="name", read_only=True)
    files = ArchiveFileSerializer(many=True, read_only=True)

    class Meta:
        model = Archive
        fields = ["id", "database", "kind", "state", "started_at", "finished_at", "bytes", "path", "compression",
                  "verified_at", "verify_error", "timeline", "start_lsn", "stop_lsn", "files"]


class ApprovalSerializer(serializers.ModelSerializer):
    user = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Approval
        fields = ["user", "decision", "comment", "created_at", "digest", "source_ip"]

    def to_representation(self, instance):
        data = super().to_representation(instance)
        # Where colleagues were when they approved is for the auditors (who see it in the trail
        # anyway), not for everyone who can read the request.
        if not self.context.get("show_source_ip"):
            data.pop("source_ip")
        return data


class ProgressSerializer(serializers.Serializer):
    done = serializers.IntegerField(source="progress_done")
    total = serializers.IntegerField(source="progress_total")
    item = serializers.CharField(source="progress_item")


class RestoreRequestSerializer(serializers.ModelSerializer):
    database = serializers.SlugRelatedField(slug_field="name", read_only=True)
    target_server = serializers.SlugRelatedField(slug_field="name", read_only=True)
    requester = serializers.SlugRelatedField(slug_field="username", read_only=True)
    tables = serializers.ListField(child=serializers.CharField(), read_only=True)
    required_approvals = serializers.IntegerField(read_only=True)
    approvals = ApprovalSerializer(many=True, read_only=True)
    expires_at = serializers.DateTimeField(read_only=True, allow_null=True)
    progress = ProgressSerializer(source="*", read_only=True)
    url = serializers.URLField(read_only=True, help_text="The request's page on the dashboard.")

    class Meta:
        model = RestoreRequest
        fields = ["id", "kind", "mode", "state", "database", "archive", "target_server", "rollback_of", "items",
                  "target_time", "new_name", "tables", "reason", "change_ticket", "requester", "digest",
                  "required_approvals", "approvals", "created_at", "decided_at", "started_at", "finished_at",
                  "expires_at", "progress", "error", "result", "url"]
        read_only_fields = fields


# -- input --------------------------------------------------------------------------------------------
class FileRequestSerializer(serializers.Serializer):
    """Shapes only; what the values mean is checked by recovery.services.file_request."""

    kind = serializers.CharField(help_text="archive | system | pitr | tables | rollback")
    database = serializers.CharField(required=False, allow_null=True, allow_blank=True,
                                     help_text="The registered database's name (not its dbname).")
    archive = serializers.IntegerField(required=False, allow_null=True, help_text="Archive id.")
    target_time = serializers.CharField(
        required=False, allow_null=True, allow_blank=True,
        help_text="ISO 8601 ('2026-11-20T14:30:00+01:00'), the old tool's stamp '20241205_020000', or 'latest'.")
    mode = serializers.CharField(required=False, default=RestoreRequest.Mode.COPY, help_text="replace | copy")
    new_name = serializers.CharField(required=False, allow_blank=True, default="")
    tables = serializers.ListField(child=serializers.CharField(), required=False, default=list)
    target_server = serializers.CharField(required=False, allow_null=True, allow_blank=True,
                                          help_text="copy: a registered database's name whose server receives it.")
    rollback_of = serializers.IntegerField(required=False, allow_null=True, help_text="Restore request id.")
    reason = serializers.CharField(required=False, allow_blank=True, default="")
    change_ticket = serializers.CharField(required=False, allow_blank=True, default="")


class DecisionSerializer(serializers.Serializer):
    password = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False, write_only=True,
                                     help_text="Your own password, re-entered: approving needs fresh proof.")
    otp = serializers.CharField(required=False, allow_blank=True, write_only=True)
    comment = serializers.CharField(required=False, allow_blank=True, default="")


def _listing(name: str, item: type[serializers.Serializer]):
    """Lists come as {count, results}: room for paging later without breaking clients."""
    return inline_serializer(name, {"count": serializers.IntegerField(), "results": item(many=True)})


# -- helpers ------------------------------------------------------------------------------------------
def _limit(request) -> int:
    raw = request.query_params.get("limit", str(LIST_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= LIST_LIMIT_MAX:
        raise exceptions.ValidationError({"limit": [f"Give a whole number from 1 to {LIST_LIMIT_MAX}."]})
    return int(raw)


def _requests():
    return (RestoreRequest.objects.select_related("database", "target_server", "requester")
            .prefetch_related("approvals__user"))


def _get_request_for_user(request, pk) -> RestoreRequest:
    """The request, if it exists and this user may see it; 404 either way otherwise, so ids
    tell an outsider nothing."""
    req = _requests().filter(pk=pk).first()
    if req is None or not rules.can_view(request.user, req):
        raise exceptions.NotFound(f"There is no restore request {pk}, or you may not see it.")
    return req


def _request_json(request, req_or_list, many=False):
    context = {"show_source_ip": rules.has_role(request.user, rules.AUDITOR)}
    return RestoreRequestSerializer(req_or_list, many=many, context=context).data


def _otp_ok(user, otp: str) -> bool:
    # Who has a confirmed device must give a valid token; without one, only APPROVER_REQUIRE_OTP refuses.
    from .identity import otp_ok

    return otp_ok(user, otp, required=settings.APPROVER_REQUIRE_OTP)


def _decide(request, pk, method: str):
    req = _get_request_for_user(request, pk)
    body = DecisionSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    password = body.validated_data.get("password", "")
    # A missing or wrong password still goes to the model method: the rules refuse it there and
    # the refusal lands in the audit trail.
    password_ok = bool(password) and request.user.check_password(password)
    getattr(req, method)(request.user, password_ok=password_ok,
                         otp_ok=_otp_ok(request.user, body.validated_data.get("otp", "")),
                         request=request._request, comment=body.validated_data["comment"])
    return Response(_request_json(request, _get_request_for_user(request, pk)))


def _file_request(request):
    decision = rules.can_request(request.user)
    if not decision:
        # Refuse before reading the body, so that a non-operator learns nothing about names or
        # archives from validation messages. The same event RestoreRequest.create writes.
        audit.record(request.user, "restore.request.denied", None, outcome="denied",
                     details={"reason": decision.reason, "via": "api"}, request=request._request)
        raise RuleViolation(decision.reason)
    body = FileRequestSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    data = body.validated_data
    errors: dict[str, list[str]] = {}

    def ref(field, queryset, key, what):
        value = data.get(field)
        if value in (None, ""):
            return None
        found = queryset.filter(**{key: value}).first()
        if found is None:
            errors[field] = [f"There is no {what} {value!r}."]
        return found

    database = ref("database", Database.objects, "name", "registered database named")
    target_server = ref("target_server", Database.objects, "name", "registered database named")
    archive = ref("archive", Archive.objects.select_related("database"), "pk", "archive with id")
    rollback_of = ref("rollback_of", RestoreRequest.objects, "pk", "restore request with id")
    target_time = None
    if data.get("target_time"):
        try:
            target_time = services.parse_stamp(data["target_time"])
        except PitrError as exc:
            errors["target_time"] = [str(exc)]
    if errors:
        raise DjangoValidationError(errors)
    req = services.file_request(
        request.user, kind=data["kind"], reason=data["reason"], mode=data["mode"], database=database,
        archive=archive, target_time=target_time, new_name=data["new_name"], target_server=target_server,
        tables=data["tables"], rollback_of=rollback_of, change_ticket=data["change_ticket"],
        latest=str(data.get("target_time") or "").strip().lower() == "latest", via="api", request=request._request)
    location = reverse("api:restore-request", args=[req.pk])
    return Response(_request_json(request, _get_request_for_user(request, req.pk)), status=201,
                    headers={"Location": location})


# -- views --------------------------------------------------------------------------------------------
@extend_schema(methods=["GET"], operation_id="restore_requests_list",
               responses=_listing("RestoreRequestList", RestoreRequestSerializer),
               parameters=[OpenApiParameter("state", str), OpenApiParameter("limit", int)],
               description="Restore requests, newest first, as {count, results}. "
                           "Operators, approvers, auditors and superusers.")
@extend_schema(methods=["POST"], request=FileRequestSerializer, responses={201: RestoreRequestSerializer},
               description="File a restore request (operators). It runs after the required approvals.")
@api_view(["GET", "POST"])
def restore_requests(request):
    if request.method == "POST":
        return _file_request(request)
    if not rules.can_read(request.user):
        raise exceptions.PermissionDenied("Only operators, approvers and auditors can read restore requests.")
    qs = _requests()
    if state := request.query_params.get("state"):
        if state not in RestoreRequest.State.values:
            raise exceptions.ValidationError({"state": [f"Use one of {', '.join(RestoreRequest.State.values)}."]})
        qs = qs.filter(state=state)
    limit = _limit(request)
    return Response({"count": qs.count(), "results": _request_json(request, qs[:limit], many=True)})


@extend_schema(responses=RestoreRequestSerializer)
@api_view(["GET"])
def restore_request_detail(request, pk):
    return Response(_request_json(request, _get_request_for_user(request, pk)))


@extend_schema(request=DecisionSerializer, responses=RestoreRequestSerializer,
               description="Approve (approvers other than the requester; password required).")
@api_view(["POST"])
@throttle_classes([DecisionThrottle])
def approve(request, pk):
    return _decide(request, pk, "approve")


@extend_schema(request=DecisionSerializer, responses=RestoreRequestSerializer,
               description="Reject: any one rejection ends the request (password required).")
@api_view(["POST"])
@throttle_classes([DecisionThrottle])
def reject(request, pk):
    return _decide(request, pk, "reject")


@extend_schema(request=None, responses=RestoreRequestSerializer,
               description="Cancel a pending or approved request (the requester or another operator).")
@api_view(["POST"])
def cancel(request, pk):
    req = _get_request_for_user(request, pk)
    req.cancel(request.user, request=request._request)
    return Response(_request_json(request, _get_request_for_user(request, pk)))


@extend_schema(operation_id="databases_list", responses=_listing("DatabaseList", DatabaseSerializer))
@api_view(["GET"])
def databases(request):
    if not rules.can_read(request.user):
        raise exceptions.PermissionDenied("Only operators, approvers and auditors can list databases.")
    qs = Database.objects.order_by("name")
    return Response({"count": qs.count(), "results": DatabaseSerializer(qs, many=True).data})


@extend_schema(operation_id="archives_list", responses=_listing("ArchiveList", ArchiveSerializer),
               parameters=[OpenApiParameter("database", str, description="A registered database's name."),
                           OpenApiParameter("limit", int)])
@api_view(["GET"])
def archives(request):
    if not rules.can_read(request.user):
        raise exceptions.PermissionDenied("Only operators, approvers and auditors can list archives.")
    qs = Archive.objects.select_related("database").prefetch_related("files").order_by("-started_at", "-id")
    if name := request.query_params.get("database"):
        db = Database.objects.filter(name=name).first()
        if db is None:
            raise exceptions.NotFound(f"There is no registered database named {name!r}; "
                                      "GET /api/v1/databases/ lists them.")
        qs = qs.filter(database=db)
    limit = _limit(request)
    return Response({"count": qs.count(), "results": ArchiveSerializer(qs[:limit], many=True).data})


@extend_schema(exclude=True)
@api_view(["GET", "POST", "PUT", "PATCH", "DELETE"])
@permission_classes([AllowAny])
def not_found(request, rest=""):
    # Keeps /api/v1/ answering JSON for mistyped paths (Django's own 404 page is HTML).
    raise exceptions.NotFound(f"No API endpoint at {request.path}. Paths end with '/'; "
                              "GET /api/v1/schema/ describes them all.")


# -- errors -------------------------------------------------------------------------------------------
def _messages(msgs) -> list[str]:
    if isinstance(msgs, dict):  # a list field's errors by position: {0: ["Not a valid string."]}
        return [f"item {i}: {m}" for i, sub in msgs.items() for m in _messages(sub)]
    if isinstance(msgs, (list, tuple)):
        return [m for sub in msgs for m in _messages(sub)]
    return [str(msgs)]


def _field_errors(detail) -> dict[str, list[str]]:
    return {("non_field_errors" if field == NON_FIELD_ERRORS else field): _messages(msgs)
            for field, msgs in detail.items()}


def _invalid(fields: dict[str, list[str]]) -> Response:
    summary = "; ".join(m if f == "non_field_errors" else f"{f}: {m}" for f, msgs in fields.items() for m in msgs)
    return Response({"error": f"Invalid input. {summary}", "fields": fields}, status=400)


def exception_handler(exc, context):
    """REST_FRAMEWORK["EXCEPTION_HANDLER"]: every error as {"error": "...", ...}.

    Unlike DRF's default this never marks the transaction for rollback: refusals are audited by
    the model methods, and those records must stay even under ATOMIC_REQUESTS."""
    if isinstance(exc, RuleViolation):
        return Response({"error": str(exc)}, status=403)
    if isinstance(exc, StateError):
        return Response({"error": str(exc)}, status=409)
    if isinstance(exc, DjangoValidationError):
        if hasattr(exc, "error_dict"):
            return _invalid(_field_errors(exc.message_dict))
        return _invalid({"non_field_errors": exc.messages})
    if isinstance(exc, ObjectDoesNotExist):
        exc = Http404(str(exc))
    if isinstance(exc, IntegrityError):
        # Two changes raced past validation (e.g. two open restores of one database); the
        # database constraint stopped the second.
        log.warning("API request conflicted with a concurrent change: %s", exc)
        return Response({"error": "This conflicts with a change made at the same time (for example another "
                                  "open restore request for the same database). Reload and try again."}, status=409)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a bug: Django's 500 handling logs it
    data = response.data
    if isinstance(exc, exceptions.ValidationError):
        fields = _field_errors(data) if isinstance(data, dict) else {"non_field_errors": _messages(data)}
        response.data = _invalid(fields).data
    elif isinstance(exc, exceptions.NotAuthenticated):
        response.data = {"error": f"{data['detail']} Send the header 'Authorization: Token <your token>' "
                                  "(an administrator creates it with manage.py drf_create_token USERNAME)."}
    else:
        response.data = {"error": str(data.get("detail", data)) if isinstance(data, dict) else str(data)}
    return response
