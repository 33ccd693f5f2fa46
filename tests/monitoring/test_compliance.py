"""The period compliance summary and the reports built on it: exact numbers from scripted
history, and PDFs a person can read."""

import csv
import hashlib
import io
import shutil
import subprocess
from datetime import datetime, time, timedelta
from io import StringIO
from pathlib import Path

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule

import audit
from audit import chain
from audit.exports import Filters
from audit.models import AuditEvent
from backups.models import Archive, BackupPolicy, BackupRun, Database, WalTimeline
from monitoring import compliance
from monitoring.compliance import Report, crontab_slots
from monitoring.models import Drill
from recovery import services
from recovery.models import RestoreRequest
from tests.audit.test_chain import superuser_sql
from tests.recovery.test_bypass import make_archive

pytestmark = [pytest.mark.pg, pytest.mark.django_db]
UTC = timezone.get_fixed_timezone(0)


@pytest.fixture
def period():
    """30 whole days around today (the audit trail's clock is the database's, which is now)."""
    start = datetime.combine(timezone.now().date() - timedelta(days=15), time.min, tzinfo=UTC)
    return start, start + timedelta(days=30)


def at(start, day, hours=0, minutes=0):
    return start + timedelta(days=day, hours=hours, minutes=minutes)


def run(db, policy, start, day, state, trigger="scheduled", hours=2, minutes=0):
    queued = at(start, day, hours, minutes)
    return BackupRun.objects.create(database=db, policy=policy, trigger=trigger, state=state, queued_at=queued,
                                    started_at=queued + timedelta(minutes=1),
                                    finished_at=queued + timedelta(minutes=10))


@pytest.fixture
def history(period, personas, monkeypatch):
    """auth: a daily 02:00 policy, 30 scheduled runs (3 failed, one whose archive was later found
    corrupt), a manual run, a run before the period; account: registered, never backed up;
    a WAL timeline with a gap; one restore with two approvals; failed sign-ins; config changes."""
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)
    start, end = period
    auth = Database.objects.create(name="auth", host="127.0.0.1", port=1, dbname="auth", user="u")
    Database.objects.create(name="account", host="127.0.0.1", port=1, dbname="account", user="u")
    daily = CrontabSchedule.objects.create(minute="0", hour="2", day_of_week="*", day_of_month="*",
                                           month_of_year="*")
    policy = BackupPolicy.objects.create(database=auth, name="daily", schedule=daily)
    run(auth, policy, start, -1, "succeeded")  # before the period: not counted
    for day in range(30):
        r = run(auth, policy, start, day, "failed" if day in (10, 11, 12) else "succeeded")
        if day == 20:
            Archive.objects.create(run=r, database=auth, state=Archive.State.CORRUPT, path=f"archives/auth/{day}",
                                   started_at=r.started_at, finished_at=r.finished_at, bytes=1, compression="zstd",
                                   manifest_sha256="0" * 64)
    run(auth, None, start, 11, "succeeded", trigger="manual", hours=12, minutes=20)
    WalTimeline.objects.create(database=auth, timeline=1, first_segment="000000010000000000000001",
                               last_segment="00000001000000000000000A", segment_count=8,
                               gaps=[["000000010000000000000004", "000000010000000000000005"]],
                               scanned_at=at(start, 29))

    req = services.file_request(personas["operator"], kind="archive", mode="copy", new_name="ledger_check",
                                archive=make_archive("ledger"), reason="quarterly check", change_ticket="CHG-7")
    req.approve(personas["approver_a"], password_ok=True)
    req.approve(personas["approver_b"], password_ok=True)
    req.claim("worker-1")
    req.succeed({"database": "ledger_check"})
    RestoreRequest.objects.filter(pk=req.pk).update(started_at=at(start, 5, 10),
                                                    finished_at=at(start, 5, 10, 12) + timedelta(seconds=34))

    for username in ("olga", "olga", "ghost", "olga"):  # as audit.signals records a failed sign-in
        audit.record(f"anonymous:{username}", "auth.login.failed", ("auth.user", "", username), outcome="failure",
                     details={"username": username})
    baseline = AuditEvent.objects.filter(action__startswith="config.").count()
    personas["outsider"].is_active = False
    personas["outsider"].save()
    audit.record("cli:root", "config.database.changed", auth, details={"changes": {"host": ["a", "b"],
                                                                                   "port": [1, 2]}})
    return {"start": start, "end": end, "request": req, "config_baseline": baseline}


def test_crontab_slots_count_the_times_beat_fires():
    start = datetime(2026, 11, 1, tzinfo=UTC)
    daily = CrontabSchedule(minute="0", hour="2")
    assert crontab_slots(daily, start, start + timedelta(days=30)) == 30
    assert crontab_slots(daily, start + timedelta(hours=3), start + timedelta(days=1, hours=2)) == 0
    assert crontab_slots(CrontabSchedule(minute="0,30", hour="*"), start, start + timedelta(days=1)) == 48
    # 2026-11-01 is a Sunday: Mon-Fri in the first two weeks
    assert crontab_slots(CrontabSchedule(minute="0", hour="1", day_of_week="1-5"), start,
                         start + timedelta(days=14)) == 10


def test_summary_counts_backups_and_measures_the_longest_gap(history):
    start, end = history["start"], history["end"]
    data = compliance.summary(start, end, now=end)
    auth, account = {b["database"]: b for b in data["backups"]}["auth"], data["backups"][0]
    assert account["database"] == "account"
    assert (auth["expected_slots"], auth["scheduled"], auth["scheduled_succeeded"], auth["scheduled_failed"]) == \
        (30, 30, 27, 3)
    assert (auth["manual"], auth["manual_succeeded"]) == (1, 1)
    # 26 scheduled (the corrupt archive's run does not count) + 1 manual
    assert auth["good_backups"] == 27
    # longest: from day 9 02:10 to the manual run at day 11 12:30
    assert auth["longest_gap_from"] == at(start, 9, 2, 10)
    assert auth["longest_gap_to"] == at(start, 11, 12, 30)
    assert auth["longest_gap_hours"] == 58.33
    # the daily policy's RPO: its period (24 h) plus two hours, as the freshness check holds it
    assert (auth["rpo_objective_hours"], auth["rpo_objective_source"], auth["rpo_met"]) == (26, "policy daily", False)
    assert auth["last_good"] == at(start, 29, 2, 10)
    # never backed up: the whole period is one gap
    assert (account["expected_slots"], account["good_backups"], account["longest_gap_hours"]) == (0, 0, 720)
    assert account["rpo_met"] is False and account["rpo_objective_source"].startswith("default")


def test_gaps_count_from_the_period_start_and_to_its_end(history):
    start = history["start"]
    # a window of days 14..16 18:00: good backups on days 14, 15 and 16 at 02:10
    data = compliance.summary(at(start, 14), at(start, 16, 18), now=history["end"])
    auth = data["backups"][1]
    assert auth["good_backups"] == 3
    assert auth["longest_gap_hours"] == 24
    data = compliance.summary(at(start, 14, 1), at(start, 14, 3), now=history["end"])
    assert data["backups"][1]["longest_gap_hours"] == 1.17  # 01:00 to 02:10, then 02:10 to 03:00
    # a period that has not ended is measured up to now, not to its end
    data = compliance.summary(at(start, 29), at(start, 40), now=at(start, 29, 6))
    assert data["measured_until"] == at(start, 29, 6)
    assert data["backups"][1]["expected_slots"] == 1 and data["backups"][1]["longest_gap_hours"] == 3.83


def test_objective_is_the_policys_rpo_else_the_setting(history, settings):
    settings.BANKVAULT_DEFAULT_RPO_HOURS = 1000
    BackupPolicy.objects.filter(name="daily").update(rpo_minutes=60 * 60)
    account, auth = compliance.summary(history["start"], history["end"], now=history["end"])["backups"][:2]
    assert (auth["rpo_objective_hours"], auth["rpo_objective_source"], auth["rpo_met"]) == (60, "policy daily", True)
    assert (account["rpo_objective_hours"], account["rpo_met"]) == (1000, True)  # no policy: the portal default
    BackupPolicy.objects.filter(name="daily").update(rpo_minutes=48 * 60)
    auth = compliance.summary(history["start"], history["end"], now=history["end"])["backups"][1]
    assert (auth["rpo_objective_hours"], auth["rpo_met"]) == (48, False)
    BackupPolicy.objects.filter(name="daily").update(enabled=False)  # a disabled policy holds nobody to anything
    auth = compliance.summary(history["start"], history["end"], now=history["end"])["backups"][1]
    assert auth["rpo_objective_hours"] == 1000


def test_summary_lists_wal_gaps_restores_sign_ins_and_config_changes(history, personas):
    data = compliance.summary(history["start"], history["end"], now=history["end"])
    assert data["wal"] == [{"database": "auth", "timeline": 1, "first_segment": "000000010000000000000001",
                            "last_segment": "00000001000000000000000A", "segments": 8,
                            "gaps": [["000000010000000000000004", "000000010000000000000005"]],
                            "scanned_at": at(history["start"], 29)}]
    assert data["drills"]["count"] == 0 and data["drills"]["items"] == []
    auth = Database.objects.get(name="auth")
    Drill.objects.create(database=auth, kind="archive", state="succeeded", rto_seconds=42.5, tables_verified=7,
                         started_at=at(history["start"], 20, 4))
    Drill.objects.create(database=auth, kind="pitr", state="failed", error="WAL segment missing",
                         started_at=at(history["start"], 27, 4))
    Drill.objects.create(database=auth, kind="archive", state="succeeded", rto_seconds=1.0,
                         started_at=at(history["start"], -3))  # before the period
    drills = compliance.summary(history["start"], history["end"], now=history["end"])["drills"]
    assert (drills["count"], drills["failed"], drills["longest_rto_seconds"]) == (2, 1, 42.5)
    assert data["retention"] == {"days": 400, "oldest_event": AuditEvent.objects.order_by("sequence")[0].created_at}
    assert [(d["kind"], d["state"], d["rto_seconds"]) for d in drills["items"]] == [
        ("archive", "succeeded", 42.5), ("pitr", "failed", None)]
    [restore] = data["restores"]
    assert restore["id"] == history["request"].pk
    assert (restore["state"], restore["requester"], restore["approvers"]) == ("succeeded", "olga", ["anna", "bert"])
    assert restore["duration_seconds"] == 754.0 and restore["change_ticket"] == "CHG-7"
    assert data["failed_signins"] == {"total": 4, "per_username": [{"username": "olga", "count": 3},
                                                                   {"username": "ghost", "count": 1}],
                                      "lockouts": 0}
    cc = data["config_changes"]
    assert cc["total"] == history["config_baseline"] + 2 == cc["listed"]
    assert [(c["actor"], c["action"], c["target"], c["fields"]) for c in cc["items"][-2:]] == [
        ("system", "config.user.changed", "otto", ["is_active"]),
        ("cli:root", "config.database.changed", "auth", ["host", "port"])]
    assert data["chain"]["ok"] is True and data["chain"]["first_break"] is None
    assert data["chain"]["events"] == AuditEvent.objects.count()
    assert data["chain_head"]["sequence"] == AuditEvent.objects.count()


def test_events_outside_the_period_are_not_counted(history):
    start = history["start"]
    data = compliance.summary(start - timedelta(days=60), start - timedelta(days=30), now=history["end"])
    assert data["failed_signins"]["total"] == 0 and data["config_changes"]["total"] == 0
    assert data["restores"] == []


def test_a_broken_chain_is_reported_with_its_first_break(history):
    victim = AuditEvent.objects.filter(action="auth.login.failed").order_by("sequence").first()
    superuser_sql("UPDATE audit_auditevent SET actor_label = 'someone else' WHERE sequence = %s", [victim.sequence])
    data = compliance.summary(history["start"], history["end"], now=history["end"])
    assert data["chain"]["ok"] is False
    assert data["chain"]["first_break"].startswith(f"event #{victim.sequence}")
    text = b"".join(Report("summary", "csv", Filters(start=history["start"], end=history["end"]))).decode()
    assert "chain verification: BROKEN" in text and f"event #{victim.sequence}" in text


# -- rendering ----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _poppler(request):
    if "pdf" in request.node.name and not shutil.which("pdftoppm"):
        pytest.fail("pdftoppm/pdftotext are missing: apt-get install poppler-utils (the Makefile's DEB_PACKAGES)")


def pdf_page_text(path: Path, page: int = 1) -> str:
    return subprocess.run(["pdftotext", "-f", str(page), "-l", str(page), "-layout", str(path), "-"],
                          capture_output=True, text=True, check=True).stdout


def pdf_pages(path: Path) -> int:
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True).stdout
    return int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))


def ink_fraction(path: Path, page: int = 1) -> float:
    """Share of non-white pixels of a page, from a greyscale PGM (pdftoppm -gray): no imaging
    library needed."""
    out = path.with_suffix("")
    subprocess.run(["pdftoppm", "-f", str(page), "-l", str(page), "-r", "40", "-gray", "-singlefile", str(path),
                    str(out)], check=True)
    data = out.with_suffix(".pgm").read_bytes()
    fields, pos = [], 0
    while len(fields) < 4:  # P5 width height maxval, separated by whitespace
        while data[pos:pos + 1].isspace():
            pos += 1
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    width, height = int(fields[1]), int(fields[2])
    pixels = data[pos + 1:pos + 1 + width * height]
    assert fields[0] == b"P5" and len(pixels) == width * height
    return sum(1 for p in pixels if p < 200) / len(pixels)


def test_summary_pdf_has_a_readable_title_page_and_numbered_pages(history, tmp_path):
    report = Report("summary", "pdf", Filters.parse(start=f"{history['start']:%Y-%m-%d}",
                                                    end=f"{history['end'] - timedelta(days=1):%Y-%m-%d}"))
    path = tmp_path / "summary.pdf"
    path.write_bytes(b"".join(report))
    assert path.read_bytes().startswith(b"%PDF")
    assert 0.005 < ink_fraction(path) < 0.5  # text on a white page: neither blank nor a black box

    title = pdf_page_text(path)
    label = f"{history['start']:%Y-%m-%d} to {history['end'] - timedelta(days=1):%Y-%m-%d}"
    assert label in title
    assert f"sequence #{report.head[0]}" in title and report.head[1] in title
    assert "Chain verification" in title and "OK" in title
    pages = pdf_pages(path)
    assert pages >= 2 and f"page 1 of {pages}" in title
    body = " ".join(pdf_page_text(path, p) for p in range(2, pages + 1))
    for text in ("Backups per database", "auth", "58.33", "Restore drills: 0", "Restores run in the period: 1",
                 "anna, bert", "754 s", "Failed sign-ins: 4", "ghost", "000000010000000000000004",
                 f"page {pages} of {pages}"):
        assert text in body, text


def test_event_log_pdf_is_capped_and_says_so(history, tmp_path, settings):
    settings.BANKVAULT_REPORT_PDF_MAX_ROWS = 5
    report = Report("events", "pdf", Filters(start=history["start"], end=history["end"]))
    path = tmp_path / "events.pdf"
    path.write_bytes(b"".join(report))
    total = AuditEvent.objects.count()
    assert report.info == {"rows": 5, "total": total, "truncated": True}
    assert f"sequence #{report.head[0]}" in pdf_page_text(path)
    assert f"5 of {total} events; use the CSV export for all" in pdf_page_text(path, 2)
    assert ink_fraction(path, 2) > 0.005


def test_event_log_csv_streams_every_row_with_the_head_and_neutralises_formulas(history):
    audit.record("anonymous:x", "auth.login.failed", ("auth.user", "", "=HYPERLINK(\"http://evil\")"),
                 outcome="failure")
    report = Report("events", "csv", Filters.parse(action="auth.login.*"))
    text = b"".join(report).decode()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments[0] == "# bankvault audit event log"
    assert f"# chain head at generation: #{report.head[0]} sha256 {report.head[1]}" in comments[4]
    assert comments[-1] == "# end: 5 events"
    rows = list(csv.DictReader(io.StringIO("\n".join(line for line in text.splitlines()
                                                     if not line.startswith("#")))))
    assert len(rows) == 5 and {r["action"] for r in rows} == {"auth.login.failed"}
    assert rows[-1]["target"] == "'=HYPERLINK(\"http://evil\")"
    assert report.sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_manage_py_audit_report_writes_a_pdf_and_records_it(history, tmp_path):
    path = tmp_path / "november.pdf"
    frm, to = f"{history['start']:%Y-%m-%d}", f"{history['end'] - timedelta(days=1):%Y-%m-%d}"
    err = StringIO()
    call_command("audit", "report", "--from", frm, "--to", to, "--summary", "--format", "pdf",
                 "--output", str(path), stderr=err)
    assert path.read_bytes().startswith(b"%PDF")
    event = AuditEvent.objects.filter(action="audit.report.generated").latest("sequence")
    assert event.actor_label.startswith("cli:") and event.outcome == "success"
    assert event.details["report"] == "summary" and event.details["format"] == "pdf"
    assert event.details["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert event.details["head_sequence"] == event.sequence - 1
    assert event.details["chain_ok"] is True
    assert str(path) in err.getvalue()


def test_manage_py_audit_report_csv_goes_to_stdout(history):
    out = StringIO()
    frm, to = f"{history['start']:%Y-%m-%d}", f"{history['end'] - timedelta(days=1):%Y-%m-%d}"
    call_command("audit", "report", "--from", frm, "--to", to, "--actor", "cli:root", stdout=out)
    lines = out.getvalue().splitlines()
    head = chain.head()
    assert lines[0] == "# bankvault audit event log"
    assert any(line.startswith(f"# chain head at generation: #{head[0] - 1} ") for line in lines)
    assert lines[-1] == "# end: 1 events" and "config.database.changed" in lines[-2]

    out = StringIO()
    with time_machine.travel(history["end"] + timedelta(hours=1), tick=False):  # the period is over
        call_command("audit", "report", "--from", frm, "--to", to, "--summary", stdout=out)
    assert "# section: backups per database" in out.getvalue()
    assert "\nauth,30,30,27,3,1,1,27," in out.getvalue()


class Terminal(StringIO):
    def isatty(self):
        return True


def test_manage_py_audit_report_refuses_bad_input(history):
    with pytest.raises(CommandError, match="binary"):
        call_command("audit", "report", "--from", "2026-11-01", "--to", "2026-11-30", "--format", "pdf",
                     stdout=Terminal())
    with pytest.raises(CommandError, match="event log only"):
        call_command("audit", "report", "--from", "2026-11-01", "--to", "2026-11-30", "--summary",
                     "--actor", "anna")
    with pytest.raises(CommandError, match="ends before it starts"):
        call_command("audit", "report", "--from", "2026-11-30", "--to", "2026-11-01")
    with pytest.raises(CommandError):
        call_command("audit", "report", "--to", "2026-11-30")  # a period is required
    assert not AuditEvent.objects.filter(action="audit.report.generated").exists()
