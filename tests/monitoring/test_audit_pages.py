"""The auditor's pages: who sees them, filters, keyset paging, streamed and audited exports,
reports, and a list whose cost does not grow with the trail."""

import csv
import hashlib
import io
import json
import re
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

import audit
from audit import chain
from audit.exports import COLUMNS
from audit.models import AuditEvent

pytestmark = [pytest.mark.pg, pytest.mark.django_db]
PAGES = ["/audit/", "/audit/export.csv", "/audit/export.jsonl", "/audit/report/"]


def events(n, actor="bulk", action="backup.run.queued", **kw):
    for i in range(n):
        audit.record(actor, action, ("backups.backuprun", i, f"run {i}"), **kw)


def sequences(response) -> list[int]:
    return [e.sequence for e in response.context["rows"]]


@pytest.fixture
def auditor(client, personas):
    client.force_login(personas["auditor"])
    return client


# -- who ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PAGES)
@pytest.mark.parametrize("persona", ["auditor", "superuser"])
def test_auditors_and_superusers_see_the_pages(client, personas, path, persona):
    client.force_login(personas[persona])
    response = client.get(path)
    assert response.status_code == 200
    if response.streaming:
        b"".join(response.streaming_content)


@pytest.mark.parametrize("path", PAGES)
@pytest.mark.parametrize("persona", ["operator", "approver_a", "outsider"])
def test_everyone_else_is_refused_and_the_attempt_is_recorded(client, personas, path, persona):
    client.force_login(personas[persona])
    response = client.get(path)
    assert response.status_code == 403
    event = AuditEvent.objects.get(action="audit.access.denied")
    assert event.actor_label == personas[persona].username and event.outcome == "denied"
    assert event.details == {"path": path}
    assert not AuditEvent.objects.filter(action__in=["audit.exported", "audit.log.viewed"]).exists()


def test_a_post_to_the_report_form_is_refused_to_an_operator(client, personas):
    client.force_login(personas["operator"])
    response = client.post("/audit/report/", {"start": "2026-11-01", "end": "2026-11-30", "kind": "summary",
                                              "format": "csv"})
    assert response.status_code == 403
    assert not AuditEvent.objects.filter(action="audit.report.generated").exists()


@pytest.mark.parametrize("path", PAGES)
def test_anonymous_visitors_are_sent_to_sign_in(client, path):
    response = client.get(path)
    assert response.status_code == 302 and "/login/" in response.url


def test_a_staff_member_without_the_auditor_role_is_refused(client, personas):
    """Staff status is not a role: operators are staff, and still may not read the trail here."""
    assert personas["operator"].is_staff
    client.force_login(personas["operator"])
    assert client.get("/audit/").status_code == 403


def test_exports_take_only_get(auditor):
    assert auditor.post("/audit/export.csv").status_code == 405


# -- the list -----------------------------------------------------------------------------------
def test_the_list_is_newest_first_with_the_chain_head_and_is_recorded(auditor):
    events(3)
    head = chain.head()
    response = auditor.get("/audit/")
    page = response.content.decode()
    shown = sequences(response)
    assert shown == sorted(shown, reverse=True) and shown[0] == head[0]
    assert f"#{head[0]}" in page and head[1] in page
    viewed = AuditEvent.objects.filter(action="audit.log.viewed").latest("sequence")
    assert viewed.actor_label == "audrey" and viewed.details["shown"] == len(shown)


@pytest.mark.parametrize("query,expected_actions", [
    ("actor=alice", {"backup.run.failed", "restore.request.approved"}),
    ("action=restore.request.*", {"restore.request.approved", "restore.request.rejected"}),
    ("action=backup.run.failed", {"backup.run.failed"}),
    ("outcome=failure", {"backup.run.failed"}),
    ("target_type=recovery.restorerequest&target_id=9", {"restore.request.rejected"}),
    ("actor=alice&action=restore.*", {"restore.request.approved"}),
])
def test_filters_narrow_the_list(auditor, query, expected_actions):
    audit.record("alice", "backup.run.failed", ("backups.backuprun", 1, "run 1"), outcome="failure")
    audit.record("alice", "restore.request.approved", ("recovery.restorerequest", 8, "request 8"))
    audit.record("bob", "restore.request.rejected", ("recovery.restorerequest", 9, "request 9"))
    response = auditor.get(f"/audit/?{query}")
    assert response.status_code == 200
    assert {e.action for e in response.context["rows"]} == expected_actions


def test_the_period_filter_takes_whole_days(auditor):
    events(2)
    today = AuditEvent.objects.latest("sequence").created_at.date()
    assert len(sequences(auditor.get(f"/audit/?from={today}&to={today}&actor=bulk"))) == 2
    assert sequences(auditor.get(f"/audit/?to={today - timedelta(days=1)}&actor=bulk")) == []
    assert sequences(auditor.get(f"/audit/?from={today + timedelta(days=1)}")) == []


def test_bad_filters_answer_400_with_the_reason(auditor):
    response = auditor.get("/audit/?from=soon")
    assert response.status_code == 400 and "not a date" in response.content.decode()
    response = auditor.get("/audit/?outcome=maybe")
    assert response.status_code == 400
    response = auditor.get("/audit/export.csv?action=a b")
    assert response.status_code == 400 and b"prefix ending in .*" in response.content
    assert not AuditEvent.objects.filter(action="audit.exported").exists()


def test_keyset_pagination_walks_the_whole_filter_without_offsets(auditor):
    events(120)
    events(5, actor="someone-else")
    bulk = list(AuditEvent.objects.filter(actor_label="bulk").order_by("-sequence").values_list("sequence", flat=True))

    first = auditor.get("/audit/?actor=bulk")
    assert sequences(first) == bulk[:50]
    assert first.context["newer"] is None
    older = first.context["older"]
    assert older == f"?actor=bulk&before={bulk[49]}"

    second = auditor.get(f"/audit/{older}")
    assert sequences(second) == bulk[50:100]
    third = auditor.get(f"/audit/{second.context['older']}")
    assert sequences(third) == bulk[100:]
    assert third.context["older"] is None

    back = auditor.get(f"/audit/{third.context['newer']}")
    assert sequences(back) == bulk[50:100]
    back = auditor.get(f"/audit/{back.context['newer']}")
    assert sequences(back) == bulk[:50] and back.context["newer"] is None
    assert back.context["older"] is not None
    assert 'rel="next"' in first.content.decode()


def test_with_a_period_pages_walk_database_time_and_still_cover_every_event(auditor):
    events(120)
    today = AuditEvent.objects.latest("sequence").created_at.date()
    query = f"from={today}&to={today}&actor=&action=backup.run.queued"
    expected = list(AuditEvent.objects.filter(action="backup.run.queued").order_by("-sequence")
                    .values_list("sequence", flat=True))
    seen, url = [], f"/audit/?{query}"
    while url:
        response = auditor.get(url)
        seen += sequences(response)
        url = f"/audit/{response.context['older']}" if response.context["older"] else None
    assert seen == expected
    period_only = f"/audit/?from={today}&to={today}"
    first = auditor.get(period_only)
    second = auditor.get(f"/audit/{first.context['older']}")
    back = auditor.get(f"/audit/{second.context['newer']}")
    assert sequences(back) == sequences(first)
    assert sequences(second)[0] == sequences(first)[-1] - 1


def test_paging_ignores_nonsense_cursors(auditor):
    events(3)
    assert auditor.get("/audit/?before=abc").status_code == 200
    assert auditor.get("/audit/?before=-5").status_code == 200
    assert auditor.get("/audit/?before=99999999999999999999999").status_code == 200


def test_the_list_costs_the_same_number_of_queries_whatever_the_size_of_the_trail(auditor,
                                                                                 django_assert_max_num_queries):
    events(5)
    with CaptureQueriesContext(connection) as small:
        assert auditor.get("/audit/?actor=bulk").status_code == 200
    events(300)
    with django_assert_max_num_queries(len(small.captured_queries)):
        response = auditor.get("/audit/?actor=bulk")
    assert len(response.context["rows"]) == 50
    with django_assert_max_num_queries(len(small.captured_queries) + 1):  # + the "are there newer" probe
        auditor.get(f"/audit/{response.context['older']}")
    assert not any("COUNT(" in q["sql"].upper() or "OFFSET" in q["sql"].upper() for q in small.captured_queries)


FILL = """
INSERT INTO audit_auditevent (sequence, created_at, actor_label, action, outcome, target_type, target_id,
                              target_label, user_agent, request_id, details, prev_hash, hash)
SELECT 1000 + g, now() - (50000 - g) * INTERVAL '1 minute', 'actor' || (g %% 50),
       'backup.run.' || (ARRAY['queued', 'started', 'succeeded'])[1 + g %% 3], 'success', 'backups.backuprun',
       g::text, 'run', '', '', '{}'::jsonb, 'p' || g, 'h' || g
FROM generate_series(1, %s) g
"""


def test_the_actor_filter_is_served_by_its_index():
    """With realistic statistics PostgreSQL walks audit_actor_idx backwards and stops after one
    page (the benchmark measures the same query over 1,000,000 events)."""
    from django.utils import timezone

    from audit.exports import Filters
    from monitoring.views import _Pages

    with connection.cursor() as cur:
        cur.execute(FILL, [50_000])
        cur.execute("ANALYZE audit_auditevent")
    day = timezone.now() - timedelta(days=20)
    for filters, index in ((Filters(actor="actor7"), "audit_actor_idx"),
                           (Filters(actor="actor7", outcome="success"), "audit_actor_idx"),
                           (Filters(action="backup.run.started"), "audit_action_idx"),
                           (Filters(start=day, end=day + timedelta(days=1)), "audit_time_idx")):
        pages = _Pages.of(filters)
        for page in (pages.qs.order_by(*pages.newest_first),
                     pages.beyond(30_000, older=True).order_by(*pages.newest_first),
                     pages.beyond(10_000, older=False).order_by(*pages.oldest_first)):
            plan = page[:51].explain()
            full_sorts = [ln for ln in plan.splitlines() if ln.strip().lstrip("-> ").startswith("Sort  (")]
            assert index in plan and not full_sorts, plan


# -- exports ------------------------------------------------------------------------------------
def test_csv_export_streams_the_filtered_events_and_is_audited(auditor):
    events(4)
    events(2, actor="alice", action="restore.request.approved")
    head = chain.head()
    response = auditor.get("/audit/export.csv?action=restore.request.*")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith('attachment; filename="bankvault-audit-')
    assert response["X-Audit-Chain-Head"] == f"{head[0]} {head[1]}"
    body = b"".join(response.streaming_content)
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [r["actor_label"] for r in rows] == ["alice", "alice"] and list(rows[0]) == COLUMNS

    event = AuditEvent.objects.get(action="audit.exported")
    assert event.actor_label == "audrey" and event.outcome == "success"
    assert event.details["count"] == 2 and event.details["format"] == "csv"
    assert event.details["sha256"] == hashlib.sha256(body).hexdigest()
    assert event.details["filters"]["action"] == "restore.request.*"
    assert event.details["head_sequence"] == head[0]


def test_jsonl_export_streams_one_event_per_line(auditor):
    events(3)
    response = auditor.get("/audit/export.jsonl?actor=bulk")
    body = b"".join(response.streaming_content)
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [line["actor_label"] for line in lines] == ["bulk"] * 3
    assert AuditEvent.objects.get(action="audit.exported").details["count"] == 3


def test_an_export_abandoned_midway_is_recorded_as_incomplete(auditor, monkeypatch):
    monkeypatch.setattr("audit.exports.CHUNK_ROWS", 10)
    events(50)
    response = auditor.get("/audit/export.csv")
    next(iter(response.streaming_content))
    # The client went away: the WSGI server closes the response. The end of the request must not
    # close the test's database connection (it holds the test's transaction).
    monkeypatch.setattr(type(connections["default"]), "close_if_unusable_or_obsolete", lambda self: None)
    response.close()
    event = AuditEvent.objects.get(action="audit.exported")
    assert event.outcome == "failure" and event.details["complete"] is False


# -- reports ------------------------------------------------------------------------------------
def test_the_report_form_makes_a_pdf_summary_and_records_it(auditor):
    events(2)
    today = AuditEvent.objects.latest("sequence").created_at.date()
    response = auditor.post("/audit/report/", {"start": today - timedelta(days=3), "end": today,
                                               "kind": "summary", "format": "pdf"})
    assert response.status_code == 200 and response["Content-Type"] == "application/pdf"
    assert response.content.startswith(b"%PDF")
    assert re.match(r'attachment; filename="bankvault-audit-summary-\d{8}-\d{8}\.pdf"',
                    response["Content-Disposition"])
    event = AuditEvent.objects.get(action="audit.report.generated")
    assert event.actor_label == "audrey" and event.details["report"] == "summary"
    assert event.details["sha256"] == hashlib.sha256(response.content).hexdigest()


def test_the_report_form_streams_an_event_log_csv(auditor):
    events(3)
    today = AuditEvent.objects.latest("sequence").created_at.date()
    response = auditor.post("/audit/report/", {"start": today, "end": today, "kind": "events", "format": "csv",
                                               "actor": "bulk"})
    assert response.streaming
    text = b"".join(response.streaming_content).decode()
    assert text.startswith("# bankvault audit event log") and text.rstrip().endswith("# end: 3 events")
    event = AuditEvent.objects.get(action="audit.report.generated")
    assert event.details["rows"] == 3 and event.details["filters"]["actor"] == "bulk"


def test_the_report_form_explains_what_is_wrong(auditor):
    response = auditor.post("/audit/report/", {"start": "2026-11-30", "end": "2026-11-01", "kind": "summary",
                                               "format": "pdf"})
    assert response.status_code == 400 and "ends before it starts" in response.content.decode()
    response = auditor.post("/audit/report/", {"start": "2026-11-01", "end": "2026-11-30", "kind": "summary",
                                               "format": "pdf", "actor": "anna"})
    assert response.status_code == 400 and "leave actor and action empty" in response.content.decode()
    assert not AuditEvent.objects.filter(action="audit.report.generated").exists()


# -- markup -------------------------------------------------------------------------------------
class Markup(HTMLParser):
    def __init__(self):
        super().__init__()
        self.label_for, self.controls, self.inline_script, self.styles, self.th_without_scope = set(), [], 0, 0, 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "style" in a or tag == "style":
            self.styles += 1
        if tag == "label" and a.get("for"):
            self.label_for.add(a["for"])
        if tag in ("input", "select", "textarea") and a.get("type") not in ("hidden", "submit"):
            self.controls.append(a.get("id"))
        if tag == "script":
            self._in_script = "src" not in a
        if tag == "th" and "scope" not in a:
            self.th_without_scope += 1

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_script += 1

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False


@pytest.mark.parametrize("path", ["/audit/?actor=bulk", "/audit/report/"])
def test_pages_label_every_field_and_need_no_inline_script_or_style(auditor, path):
    events(2)
    page = Markup()
    page.feed(auditor.get(path).content.decode())
    assert page.controls and all(c in page.label_for for c in page.controls), (page.controls, page.label_for)
    assert page.inline_script == 0 and page.styles == 0 and page.th_without_scope == 0
