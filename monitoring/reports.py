"""Rendering of compliance reports (monitoring.compliance) as CSV and PDF.

CSV reports are for people with a spreadsheet: they open with comment lines starting with "#"
(title, period, filters, generation time and the chain head) and end with a "# end" line that
gives the row count, so a truncated download shows. Cells that a spreadsheet would run as a
formula (starting with = + - @ or a tab/CR) get a leading apostrophe: an attempted user name
is attacker-controlled text. For the exact stored values use the export (audit.exports).

PDFs are for reading: a title page (period, generation time, chain head), tables with their
header row repeated, "page X of Y" on every page. An event log PDF stops after a bounded number
of rows and says how many it shows of how many.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from html import escape
from pathlib import Path

from django.db import transaction
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas
from reportlab.platypus import LongTable, PageBreak, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from audit.exports import Filters

from .compliance import as_utc, period_label

EVENT_COLUMNS = ["sequence", "time (UTC)", "actor", "action", "outcome", "target type", "target id", "target",
                 "source IP", "request id", "details"]
CSV_CHUNK_ROWS = 2000
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# -- CSV -----------------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False)
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


class _Lines:
    """csv.writer into a reusable buffer."""

    def __init__(self):
        self.buf = io.StringIO()
        self.writer = csv.writer(self.buf, lineterminator="\n")

    def row(self, values):
        self.writer.writerow([_cell(v) for v in values])

    def comment(self, text: str):
        self.buf.write(f"# {text}\n")

    def take(self) -> str:
        out = self.buf.getvalue()
        self.buf.seek(0)
        self.buf.truncate()
        return out


def _head_line(head) -> str:
    seq, digest = (head["sequence"], head["hash"]) if isinstance(head, dict) else head
    return f"chain head at generation: #{seq} sha256 {digest}"


def events_csv(filters: Filters, head: tuple[int, str], now: datetime, info: dict) -> Iterator[bytes]:
    """The event log, oldest first, streamed from a server-side cursor."""
    out = _Lines()
    out.comment("bankvault audit event log")
    out.comment(f"period: {period_label(filters.start, filters.end)}")
    out.comment(f"filters: {filters.describe()}")
    out.comment(f"generated: {as_utc(now)}")
    out.comment(_head_line(head) + " (rows are the matching events up to it)")
    out.row(EVENT_COLUMNS)
    yield out.take().encode()
    rows = (filters.queryset().filter(sequence__lte=head[0]).order_by("sequence")
            .values_list("sequence", "created_at", "actor_label", "action", "outcome", "target_type", "target_id",
                         "target_label", "source_ip", "request_id", "details"))
    n = pending = 0
    with transaction.atomic():  # a plain (not WITH HOLD) server-side cursor: rows flow as they are read
        for row in rows.iterator(chunk_size=CSV_CHUNK_ROWS):
            out.row(row)
            n += 1
            pending += 1
            if pending >= CSV_CHUNK_ROWS:
                info["rows"] = n
                yield out.take().encode()
                pending = 0
    info["rows"] = n
    out.comment(f"end: {n} events")
    yield out.take().encode()


def _retention(r: dict) -> str:
    oldest = as_utc(r["oldest_event"]) if r["oldest_event"] else "none"
    return f"at least {r['days']} days (AUDIT_RETENTION_DAYS), nothing deletes events; oldest event {oldest}"


def summary_csv(data: dict) -> Iterator[str]:
    """The period summary: one table per section, each under a "# section" line."""
    out = _Lines()
    out.comment("bankvault compliance summary")
    out.comment(f"period: {period_label(data['start'], data['end'])}; measured until {as_utc(data['measured_until'])}")
    out.comment(f"generated: {as_utc(data['generated_at'])}")
    out.comment(_head_line(data["chain_head"]))
    chain = data["chain"]
    out.comment(f"chain verification: {'OK' if chain['ok'] else 'BROKEN'} ({chain['events']} events, "
                f"{chain['checkpoints']} checkpoints)" + (f"; first break: {chain['first_break']}"
                                                         if not chain["ok"] else ""))
    out.comment(f"audit retention: {_retention(data['retention'])}")
    yield out.take()

    out.comment("section: backups per database")
    out.row(["database", "expected slots", "scheduled runs", "scheduled succeeded", "scheduled failed",
             "manual runs", "manual succeeded", "good backups", "last good backup", "longest gap (h)",
             "gap from", "gap to", "RPO objective (h)", "objective from", "objective met"])
    for b in data["backups"]:
        out.row([b["database"], b["expected_slots"], b["scheduled"], b["scheduled_succeeded"], b["scheduled_failed"],
                 b["manual"], b["manual_succeeded"], b["good_backups"], b["last_good"], b["longest_gap_hours"],
                 b["longest_gap_from"], b["longest_gap_to"], b["rpo_objective_hours"], b["rpo_objective_source"],
                 "yes" if b["rpo_met"] else "NO"])
    yield out.take()

    out.comment("section: WAL archive (as of the last scan of the repository)")
    out.row(["database", "timeline", "first segment", "last segment", "segments", "gaps", "gap ranges", "scanned"])
    for w in data["wal"]:
        out.row([w["database"], w["timeline"], w["first_segment"], w["last_segment"], w["segments"],
                 len(w["gaps"]), " ".join(f"{a}..{b}" for a, b in w["gaps"]), w["scanned_at"]])
    yield out.take()

    out.comment(f"section: restore drills: {data['drills']['count']}")
    out.comment(data["drills"]["note"])
    out.row(["drill", "database", "kind", "archive", "started", "duration (s)", "result", "tables verified", "error"])
    for d in data["drills"]["items"]:
        out.row([d["id"], d["database"], d["kind"], d["archive"], d["started_at"], d["rto_seconds"], d["state"],
                 d["tables_verified"], d["error"]])
    yield out.take()

    out.comment(f"section: restores run in the period: {len(data['restores'])}")
    out.row(["request", "kind", "mode", "database", "state", "requested by", "approvers", "change ticket",
             "started", "finished", "duration (s)", "reason"])
    for r in data["restores"]:
        out.row([r["id"], r["kind"], r["mode"], r["database"], r["state"], r["requester"], " ".join(r["approvers"]),
                 r["change_ticket"], r["started_at"], r["finished_at"], r["duration_seconds"], r["reason"]])
    yield out.take()

    fs = data["failed_signins"]
    out.comment(f"section: failed sign-ins: {fs['total']}; lockouts: {fs['lockouts']}")
    out.row(["username", "failed sign-ins"])
    for f in fs["per_username"]:
        out.row([f["username"], f["count"]])
    yield out.take()

    cc = data["config_changes"]
    out.comment(f"section: configuration changes: {cc['total']}"
                + (f" (the first {cc['listed']} listed)" if cc["listed"] < cc["total"] else ""))
    out.row(["sequence", "time (UTC)", "actor", "action", "target", "fields changed"])
    for c in cc["items"]:
        out.row([c["sequence"], c["created_at"], c["actor"], c["action"], c["target"], " ".join(c["fields"])])
    yield out.take()

    out.comment("section: chain verification")
    out.row(["result", "events checked", "checkpoints", "first break"])
    out.row(["OK" if chain["ok"] else "BROKEN", chain["events"], chain["checkpoints"], chain["first_break"]])
    for b in chain["breaks"][1:]:
        out.row(["", "", "", b])
    out.comment("end")
    yield out.take()


# -- PDF -----------------------------------------------------------------------------------------
_FONTS: dict[str, str] = {}


def _fonts() -> dict[str, str]:
    """DejaVu when the machine has it (every script a user name may be written in), else the PDF
    base fonts (Latin-1 only)."""
    if not _FONTS:
        base = Path("/usr/share/fonts/truetype/dejavu")
        try:
            pdfmetrics.registerFont(TTFont("BV", str(base / "DejaVuSans.ttf")))
            pdfmetrics.registerFont(TTFont("BV-Bold", str(base / "DejaVuSans-Bold.ttf")))
            pdfmetrics.registerFont(TTFont("BV-Mono", str(base / "DejaVuSansMono.ttf")))
            _FONTS.update(body="BV", bold="BV-Bold", mono="BV-Mono")
        except Exception:
            _FONTS.update(body="Helvetica", bold="Helvetica-Bold", mono="Courier")
    return _FONTS


def _styles() -> dict[str, ParagraphStyle]:
    f = _fonts()
    base = getSampleStyleSheet()
    return {
        "title": ParagraphStyle("bv-title", parent=base["Title"], fontName=f["bold"], fontSize=22, leading=28),
        "h2": ParagraphStyle("bv-h2", parent=base["Heading2"], fontName=f["bold"], fontSize=13, leading=17,
                             spaceBefore=10, spaceAfter=4),
        "body": ParagraphStyle("bv-body", parent=base["BodyText"], fontName=f["body"], fontSize=9, leading=12),
        "big": ParagraphStyle("bv-big", parent=base["BodyText"], fontName=f["body"], fontSize=11, leading=15),
        "cell": ParagraphStyle("bv-cell", parent=base["BodyText"], fontName=f["body"], fontSize=7.5, leading=9.5),
        "mono": ParagraphStyle("bv-mono", parent=base["BodyText"], fontName=f["mono"], fontSize=9, leading=12),
        "head": ParagraphStyle("bv-head", parent=base["BodyText"], fontName=f["bold"], fontSize=7.5, leading=9.5,
                               textColor=colors.white),
    }


def _p(text, style) -> Paragraph:
    # Paragraph parses markup: everything from the trail is escaped.
    return Paragraph(escape("" if text is None else str(text)), style)


def _numbered_canvas(footer: str):
    class NumberedCanvas(canvas.Canvas):
        """Holds every page until the end, so each can say "page X of Y"."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._pages = []

        def showPage(self):
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self):
            total = len(self._pages)
            for state in self._pages:
                self.__dict__.update(state)
                width, _ = self._pagesize
                self.setFont(_fonts()["body"], 8)
                self.setFillColor(colors.HexColor("#57606a"))
                self.drawString(15 * mm, 9 * mm, footer)
                self.drawRightString(width - 15 * mm, 9 * mm, f"page {self._pageNumber} of {total}")
                super().showPage()
            super().save()

    return NumberedCanvas


TABLE_STYLE = TableStyle([
    ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#0a3069")),
    ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.HexColor("#d0d7de")),
    ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.HexColor("#f6f8fa")]),
    ("LEFTPADDING", (0, 0), (-1, -1), 3),
    ("RIGHTPADDING", (0, 0), (-1, -1), 3),
])


def _table(header: list[str], rows: list[list], widths: list[float], st: dict, empty: str = "none"):
    data = [[_p(h, st["head"]) for h in header]]
    # every time column's header says UTC; the cells leave it out so they fit on one line
    data += [[_p(v if not isinstance(v, datetime) else as_utc(v)[:-4], st["cell"]) for v in row] for row in rows]
    if not rows:
        data.append([_p(empty, st["cell"])] + [""] * (len(header) - 1))
    cls = LongTable if len(rows) > 200 else Table
    t = cls(data, colWidths=widths, repeatRows=1, hAlign="LEFT")
    t.setStyle(TABLE_STYLE)
    return t


def _title_page(title: str, facts: list[tuple[str, str]], st: dict, head: dict) -> list:
    flow = [Spacer(1, 30 * mm), _p("bankvault", st["big"]), _p(title, st["title"]), Spacer(1, 8 * mm)]
    rows = [[_p(k, st["big"]), _p(v, st["big"])] for k, v in facts]
    t = Table(rows, colWidths=[55 * mm, 190 * mm])
    t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("BOTTOMPADDING", (0, 0), (-1, -1), 6)]))
    flow += [t, Spacer(1, 6 * mm), _p("Chain head at generation", st["h2"]),
             _p(f"sequence #{head['sequence']}", st["mono"]), _p(f"sha256 {head['hash']}", st["mono"]),
             Spacer(1, 4 * mm),
             _p("The chain head is the hash of the newest audit event when this report was made. "
                "Compare it with the checkpoints written outside the portal's database "
                "(manage.py audit verify) to show that the trail behind this report was not rewritten.",
                st["body"]),
             PageBreak()]
    return flow


def _build(flow: list, title: str, period: str) -> bytes:
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=landscape(A4), leftMargin=15 * mm, rightMargin=15 * mm,
                            topMargin=15 * mm, bottomMargin=16 * mm, title=f"bankvault {title}",
                            author="bankvault", subject=period)
    doc.build(flow, canvasmaker=_numbered_canvas(f"bankvault · {title} · {period}"))
    return buf.getvalue()


def events_pdf(filters: Filters, head: tuple[int, str], now: datetime, info: dict, *, limit: int) -> bytes:
    """The event log as a PDF, oldest first, at most `limit` rows (with a note when there are more)."""
    st = _styles()
    qs = filters.queryset().filter(sequence__lte=head[0]).order_by("sequence")
    total = qs.count()
    rows = list(qs.values_list("sequence", "created_at", "actor_label", "action", "outcome", "target_type",
                               "target_id", "target_label", "source_ip", "details")[:limit])
    info.update(rows=len(rows), total=total, truncated=total > len(rows))
    period = period_label(filters.start, filters.end)
    headd = {"sequence": head[0], "hash": head[1]}
    facts = [("Period", period), ("Filters", filters.describe()), ("Generated", as_utc(now)),
             ("Events", f"{total:,} matching" + (f"; this PDF shows the first {len(rows):,} of {total:,} — "
                                                 "use the CSV export for all" if total > len(rows) else ""))]
    flow = _title_page("Audit event log", facts, st, headd)
    if total > len(rows):
        flow.append(_p(f"{len(rows):,} of {total:,} events; use the CSV export for all.", st["big"]))
        flow.append(Spacer(1, 3 * mm))
    body = []
    for seq, at, actor, action, outcome, ttype, tid, tlabel, ip, details in rows:
        target = " ".join(x for x in (ttype, tid) if x) + (f" — {tlabel}" if tlabel else "")
        text = json.dumps(details, sort_keys=True, ensure_ascii=False) if details else ""
        body.append([seq, at, actor, action, outcome, target, ip or "", text[:300] + ("…" if len(text) > 300 else "")])
    widths = [mm * w for w in (14, 31, 30, 44, 17, 48, 22, 61)]
    # Tables of a few hundred rows each: reportlab splits one long table across pages in
    # quadratic time.
    for i in range(0, max(len(body), 1), 400):
        flow.append(_table(["#", "time (UTC)", "actor", "action", "outcome", "target", "source IP", "details"],
                           body[i:i + 400], widths, st, empty="No events match."))
    if total > len(rows):
        flow.append(Spacer(1, 3 * mm))
        flow.append(_p(f"End of the first {len(rows):,} of {total:,} events; use the CSV export for all.",
                       st["big"]))
    return _build(flow, "audit event log", period)


def summary_pdf(data: dict) -> bytes:
    st = _styles()
    period = period_label(data["start"], data["end"])
    chain = data["chain"]
    verdict = (f"OK: {chain['events']:,} events verify against {chain['checkpoints']} checkpoint(s)" if chain["ok"]
               else f"BROKEN: {chain['first_break']}")
    facts = [("Period", period), ("Measured until", as_utc(data["measured_until"])),
             ("Generated", as_utc(data["generated_at"])), ("Chain verification", verdict),
             ("Default RPO objective", f"{data['default_rpo_hours']:g} h (BANKVAULT_DEFAULT_RPO_HOURS), used for "
                                       "a database without an enabled policy"),
             ("Audit retention", _retention(data["retention"]))]
    flow = _title_page("Compliance summary", facts, st, data["chain_head"])

    flow.append(_p("Backups per database", st["h2"]))
    flow.append(_p("Expected slots come from each enabled policy's schedule. A good backup is a run that succeeded "
                   "and whose archive has not been found corrupt or incomplete since; the longest gap is measured "
                   "between good backups, from the start of the period and to its end (or now).", st["body"]))
    rows = [[b["database"], "; ".join(f"{p['name']} ({p['schedule']})" + ("" if p["enabled"] else " disabled")
                                      for p in b["policies"]) or "none",
             b["expected_slots"], b["scheduled"], b["scheduled_succeeded"], b["scheduled_failed"],
             f"{b['manual_succeeded']}/{b['manual']}", b["good_backups"], f"{b['longest_gap_hours']:g}",
             f"{as_utc(b['longest_gap_from'])[:-4]} – {as_utc(b['longest_gap_to'])[:-4]}",
             f"{b['rpo_objective_hours']:g} ({b['rpo_objective_source'].split(' (')[0]})",
             "yes" if b["rpo_met"] else "NO"]
            for b in data["backups"]]
    flow.append(_table(["database", "policies", "expected", "sched. runs", "succeeded", "failed",
                        "manual ok/all", "good", "longest gap (h)", "gap (UTC)", "RPO objective (h)", "met"],
                       rows, [mm * w for w in (24, 42, 17, 17, 18, 13, 17, 12, 18, 48, 29, 10)], st,
                       empty="No databases registered."))

    flow.append(_p("WAL archive", st["h2"]))
    flow.append(_p("As of the last scan of the repository: a gap breaks every point-in-time recovery after it.",
                   st["body"]))
    flow.append(_table(["database", "timeline", "segments", "first", "last", "gaps", "scanned (UTC)"],
                       [[w["database"], w["timeline"], w["segments"], w["first_segment"], w["last_segment"],
                         ", ".join(f"{a}..{b}" for a, b in w["gaps"]) or "none", w["scanned_at"]]
                        for w in data["wal"]],
                       [mm * w for w in (24, 16, 18, 46, 46, 87, 30)], st, empty="No WAL archived."))

    flow.append(_p(f"Restore drills: {data['drills']['count']}", st["h2"]))
    flow.append(_p(data["drills"]["note"], st["body"]))
    flow.append(_table(["drill", "database", "kind", "archive", "started (UTC)", "RTO", "result"],
                       [[d["id"], d["database"], d["kind"], d["archive"], d["started_at"],
                         "" if d["rto_seconds"] is None else f"{d['rto_seconds']:.1f} s",
                         d["state"] if not d["error"] else f"{d['state']}: {d['error'][:80]}"]
                        for d in data["drills"]["items"]],
                       [mm * w for w in (16, 24, 18, 70, 36, 20, 83)], st, empty="No drills in the period."))

    flow.append(_p(f"Restores run in the period: {len(data['restores'])}", st["h2"]))
    flow.append(_table(["request", "kind / mode", "database", "state", "requested by", "approvers", "ticket",
                        "started (UTC)", "duration"],
                       [[r["id"], f"{r['kind']} / {r['mode']}", r["database"], r["state"], r["requester"],
                         ", ".join(r["approvers"]) or "none", r["change_ticket"], r["started_at"],
                         "" if r["duration_seconds"] is None else f"{r['duration_seconds']:g} s"]
                        for r in data["restores"]],
                       [mm * w for w in (16, 34, 30, 20, 26, 40, 24, 34, 22)], st, empty="No restores ran."))

    fs = data["failed_signins"]
    flow.append(_p(f"Failed sign-ins: {fs['total']}", st["h2"]))
    flow.append(_p(f"Sign-ins refused by the lockout: {fs['lockouts']}.", st["body"]))
    flow.append(_table(["username tried", "failed sign-ins"],
                       [[f["username"], f["count"]] for f in fs["per_username"]], [mm * 80, mm * 30], st))

    cc = data["config_changes"]
    more = f" (the first {cc['listed']} listed)" if cc["listed"] < cc["total"] else ""
    flow.append(_p(f"Configuration changes: {cc['total']}{more}", st["h2"]))
    flow.append(_table(["#", "time (UTC)", "actor", "action", "target", "fields changed"],
                       [[c["sequence"], c["created_at"], c["actor"], c["action"], c["target"], ", ".join(c["fields"])]
                        for c in cc["items"]],
                       [mm * w for w in (16, 32, 30, 50, 60, 79)], st))

    flow.append(_p("Chain verification", st["h2"]))
    flow.append(_p(verdict, st["big"]))
    for b in chain["breaks"][1:]:
        flow.append(_p(b, st["body"]))
    return _build(flow, "compliance summary", period)
