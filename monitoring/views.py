from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import urlencode

from django import forms
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, Subquery
from django.http import HttpResponse, HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

import audit
from audit import chain
from audit.exports import CONTENT_TYPES as EXPORT_CONTENT_TYPES
from audit.exports import Export, FilterError, Filters
from audit.models import AuditEvent
from backups.models import BackupRun, Database
from recovery import rules

from .compliance import Report, pdf_max_rows


@login_required
def overview(request):
    if not rules.can_read(request.user):
        raise PermissionDenied("bankvault is for operators, approvers, auditors and administrators")
    last = BackupRun.objects.filter(database=OuterRef("pk")).order_by("-queued_at")
    databases = Database.objects.annotate(
        last_state=Subquery(last.values("state")[:1]),
        last_finished=Subquery(last.values("finished_at")[:1]),
        last_bytes=Subquery(last.values("bytes")[:1]),
    )
    runs = BackupRun.objects.select_related("database")[:20]
    return render(request, "monitoring/overview.html", {"databases": databases, "runs": runs})


# -- the audit trail, for auditors ---------------------------------------------------------------
# Auditors and superusers only. The list pages by keyset (?before=N / ?after=N, N a sequence),
# never by OFFSET and never with a COUNT(*) of the filter: over a year of events both grow with
# the trail, while a keyset page is one short walk down an index whatever its size (_Pages).
AUDIT_PAGE_SIZE = 50


def _require_auditor(request) -> None:
    user = request.user
    if rules.has_role(user, rules.AUDITOR) or user.is_superuser:
        return
    # Trying to read the trail is itself worth a line in it.
    audit.record(user, "audit.access.denied", None, outcome="denied", request=request,
                 details={"path": request.path})
    raise PermissionDenied("the audit trail is for auditors")


class AuditFilterForm(forms.Form):
    """The filters of the list, the exports and the report, as query parameters."""

    actor = forms.CharField(required=False, max_length=150, help_text="Exact: a username, cli:root, system:beat.")
    action = forms.CharField(required=False, max_length=100,
                             help_text="Exact (backup.run.failed) or a prefix (restore.request.*).")
    outcome = forms.ChoiceField(required=False, choices=[("", "any")] + AuditEvent.Outcome.choices)
    target_type = forms.CharField(required=False, max_length=100, label="Target type",
                                  help_text="e.g. backups.database")
    target_id = forms.CharField(required=False, max_length=64, label="Target id")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "from" is a Python keyword: added by name.
        self.fields["from"] = forms.CharField(required=False, label="From",
                                              help_text="First day (2026-11-01) or instant, TIME_ZONE.",
                                              widget=forms.TextInput(attrs={"placeholder": "2026-11-01"}))
        self.fields["to"] = forms.CharField(required=False, label="To",
                                            help_text="Last day, included (2026-11-30).",
                                            widget=forms.TextInput(attrs={"placeholder": "2026-11-30"}))
        self.order_fields(["from", "to", "actor", "action", "outcome", "target_type", "target_id"])
        for name, field in self.fields.items():
            if field.help_text:
                field.widget.attrs["aria-describedby"] = f"id_{name}_help"

    def clean(self):
        data = super().clean()
        try:
            data["filters"] = Filters.parse(start=data.get("from"), end=data.get("to"), actor=data.get("actor"),
                                            action=data.get("action"), outcome=data.get("outcome"),
                                            target_type=data.get("target_type"), target_id=data.get("target_id"))
        except FilterError as exc:
            raise forms.ValidationError(str(exc))
        return data

    def query(self) -> str:
        """The filters as a query string, for export links and paging."""
        return urlencode({k: v for k, v in self.data.items() if k in self.fields and v})


def _filters_or_400(request) -> tuple[AuditFilterForm, Filters | None]:
    form = AuditFilterForm(request.GET)
    return form, (form.cleaned_data["filters"] if form.is_valid() else None)


def _positive_int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() and len(value) < 19 else None


@dataclass
class _Pages:
    """The filtered events and how to walk them a page at a time, newest first.

    An equality on actor_label leaves PostgreSQL free to walk the sequence index backwards and
    drop other actors' rows as it goes: cheap while the actor is busy now, a walk over most of a
    year for one whose events are old (the planner assumes matches are spread evenly). The same
    filter written as a range keeps actor_label in the ORDER BY, an order only audit_actor_idx
    gives, so every page is one short walk down that index. An exact action gets the same
    treatment with audit_action_idx.

    A period alone has the same trap with the sequence index (a day in the middle of a million
    events cost 70-100 ms that way), so it is walked in audit_time_idx's order instead: database
    time, then sequence. That is the sequence's own order as long as the database clock never
    steps back, and an exact keyset either way (?before=N anchors on event N's time and sequence).
    """

    qs: object
    newest_first: tuple = ("-sequence",)
    oldest_first: tuple = ("sequence",)
    by_time: bool = False

    @classmethod
    def of(cls, filters: Filters) -> _Pages:
        for name, column in (("actor", "actor_label"), ("action", "action")):
            value = getattr(filters, name)
            if value and not value.endswith(".*"):
                qs = replace(filters, **{name: ""}).queryset().filter(**{f"{column}__gte": value,
                                                                           f"{column}__lte": value})
                return cls(qs, (column, "-sequence"), (f"-{column}", "sequence"))
        if filters.start or filters.end:
            return cls(filters.queryset(), ("-created_at", "-sequence"), ("created_at", "sequence"), by_time=True)
        return cls(filters.queryset())

    def beyond(self, sequence: int, *, older: bool, at=None):
        """The events after (older=True: before) event `sequence` in this walk; `at` is its
        created_at when the caller has it."""
        if self.by_time:
            if at is None:
                at = AuditEvent.objects.filter(sequence=sequence).values_list("created_at", flat=True).first()
            if at is not None:
                return self.qs.extra(where=[f"(audit_auditevent.created_at, audit_auditevent.sequence) "
                                            f"{'<' if older else '>'} (%s, %s)"], params=[at, sequence])
        return self.qs.filter(sequence__lt=sequence) if older else self.qs.filter(sequence__gt=sequence)

    def exists(self, qs, order) -> bool:
        # ordered like the page, so the probe takes the same index
        return bool(list(qs.order_by(*order).values_list("sequence", flat=True)[:1]))


@login_required
def audit_log(request):
    _require_auditor(request)
    form, filters = _filters_or_400(request)
    head = chain.head()
    rows, has_newer, has_older = [], False, False
    before, after = _positive_int(request.GET.get("before")), _positive_int(request.GET.get("after"))
    if filters is not None:
        pages = _Pages.of(filters)
        pages.qs = pages.qs.only("sequence", "created_at", "actor_label", "action", "outcome", "target_type",
                                 "target_id", "target_label", "source_ip", "details")
        if after is not None and before is None:
            # one page towards the newest, shown newest first like every page
            rows = list(pages.beyond(after, older=False).order_by(*pages.oldest_first)[:AUDIT_PAGE_SIZE + 1])
            has_newer = len(rows) > AUDIT_PAGE_SIZE
            rows = rows[:AUDIT_PAGE_SIZE][::-1]
            has_older = bool(rows) and pages.exists(pages.beyond(rows[-1].sequence, older=True,
                                                                 at=rows[-1].created_at), pages.newest_first)
        else:
            page = pages.beyond(before, older=True) if before is not None else pages.qs
            rows = list(page.order_by(*pages.newest_first)[:AUDIT_PAGE_SIZE + 1])
            has_older = len(rows) > AUDIT_PAGE_SIZE
            rows = rows[:AUDIT_PAGE_SIZE]
            has_newer = before is not None and bool(rows) and pages.exists(
                pages.beyond(rows[0].sequence, older=False, at=rows[0].created_at), pages.oldest_first)
    audit.record(request.user, "audit.log.viewed", None, request=request,
                 details={"filters": filters.as_dict() if filters else None, "before": before, "after": after,
                          "shown": len(rows)})
    query = form.query()
    context = {
        "form": form, "rows": rows, "head": head, "query": query, "page_size": AUDIT_PAGE_SIZE,
        "older": f"?{query + '&' if query else ''}before={rows[-1].sequence}" if has_older else None,
        "newer": f"?{query + '&' if query else ''}after={rows[0].sequence}" if has_newer else None,
        "newest": f"?{query}" if (before or after) else None,
        "filtered": filters is not None and any(filters.as_dict().values()),
    }
    status = 200 if filters is not None else 400
    return render(request, "monitoring/audit_log.html", context, status=status)


def _export(request, fmt: str):
    _require_auditor(request)
    form, filters = _filters_or_400(request)
    if filters is None:
        return HttpResponseBadRequest("; ".join(e for errors in form.errors.values() for e in errors),
                                      content_type="text/plain; charset=utf-8")
    exp = Export(filters, fmt)

    def stream():
        # Recorded when the stream ends, with what was actually sent (a dropped connection is
        # recorded as incomplete). The request is passed along: the audit context of the
        # middleware has been left by the time a streaming response is read.
        try:
            yield from exp
        finally:
            exp.record(request.user, request=request, output="http")

    response = StreamingHttpResponse(stream(), content_type=EXPORT_CONTENT_TYPES[fmt])
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="bankvault-audit-{stamp}.{fmt}"'
    # Known before the first byte; the file's sha256 and count are in the audit.exported event.
    response["X-Audit-Chain-Head"] = f"{exp.head[0]} {exp.head[1]}"
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def audit_export_csv(request):
    return _export(request, "csv")


@login_required
@require_GET
def audit_export_jsonl(request):
    return _export(request, "jsonl")


class ReportForm(forms.Form):
    start = forms.DateField(label="From", help_text="First day of the period.",
                            widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label="To", help_text="Last day of the period, included.",
                          widget=forms.DateInput(attrs={"type": "date"}))
    kind = forms.ChoiceField(label="Report", widget=forms.RadioSelect, initial="summary",
                             choices=[("summary", "Compliance summary of the period"),
                                      ("events", "Event log of the period")])
    format = forms.ChoiceField(widget=forms.RadioSelect, initial="pdf",
                               choices=[("pdf", "PDF, to read"), ("csv", "CSV, for a spreadsheet")])
    actor = forms.CharField(required=False, max_length=150, help_text="Event log only: one actor, exact.")
    action = forms.CharField(required=False, max_length=100,
                             help_text="Event log only: exact, or a prefix (restore.request.*).")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, field in self.fields.items():
            if field.help_text:
                field.widget.attrs["aria-describedby"] = f"id_{name}_help"

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        if data["kind"] == "summary" and (data.get("actor") or data.get("action")):
            raise forms.ValidationError("The summary covers the whole period: leave actor and action empty.")
        try:
            data["report"] = Report(data["kind"], data["format"],
                                    Filters.parse(start=data["start"], end=data["end"], actor=data.get("actor"),
                                                  action=data.get("action")))
        except FilterError as exc:
            raise forms.ValidationError(str(exc))
        return data


@login_required
def audit_report(request):
    _require_auditor(request)
    form = ReportForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        report = form.cleaned_data["report"]

        def stream():
            try:
                yield from report
            finally:
                report.record(request.user, request=request, output="http")

        if report.fmt == "pdf":
            # built whole (a bounded size), so a failure is a 500 and not half a file
            body = b"".join(stream())
            response = HttpResponse(body, content_type=report.content_type)
        else:
            response = StreamingHttpResponse(stream(), content_type=report.content_type)
        response["Content-Disposition"] = f'attachment; filename="{report.filename}"'
        response["X-Audit-Chain-Head"] = f"{report.head[0]} {report.head[1]}"
        response["Cache-Control"] = "no-store"
        return response
    return render(request, "monitoring/audit_report.html",
                  {"form": form, "head": chain.head(), "pdf_max_rows": pdf_max_rows()},
                  status=400 if request.method == "POST" else 200)
