"""The audit trail from the command line.

    manage.py audit verify            recompute the chain, compare with the checkpoints
    manage.py audit checkpoint        write the chain head where the database cannot rewrite it
    manage.py audit export --from 2026-11-01 --to 2026-11-30 [filters] --format csv|jsonl --output FILE
                                      the matching events, and FILE.manifest.json beside them
                                      (--output -: the file to stdout, the manifest to stderr)
    manage.py audit report --from 2026-11-01 --to 2026-11-30 [--summary] [filters] --format csv|pdf
                          [--output FILE]
                                      the event log, or the period's compliance summary (stdout by
                                      default; a PDF only when stdout is not a terminal)

Dates are whole days in TIME_ZONE, the --to day included; a date and time is exact, and as --to
it is excluded. Filters: --actor NAME, --action X (exact, or a prefix: restore.request.*),
--outcome success|failure|denied, --target-type T, --target-id ID.
"""

import json
import sys

from django.core.management.base import BaseCommand, CommandError

import audit
from audit import chain, checkpoints
from audit.exports import Export, FilterError, Filters, export_to_file


class Command(BaseCommand):
    help = "Verify, checkpoint, export and report the audit trail."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        v = sub.add_parser("verify", help="recompute the hash chain and check it against the checkpoints")
        v.add_argument("--json", action="store_true")
        sub.add_parser("checkpoint", help="append the chain head to the checkpoint file")
        e = sub.add_parser("export", help="the matching events as CSV or JSONL, with a manifest")
        _filter_arguments(e, required_period=False)
        e.add_argument("--format", choices=["csv", "jsonl"], default="csv")
        e.add_argument("--output", required=True, help="a file (FILE.manifest.json is written beside it), or - "
                                                       "for stdout (the manifest then goes to stderr)")
        r = sub.add_parser("report", help="the event log, or the compliance summary, as CSV or PDF")
        _filter_arguments(r, required_period=True)
        r.add_argument("--summary", action="store_true", help="the period's compliance summary instead of the "
                                                              "event log")
        r.add_argument("--format", choices=["csv", "pdf"], default="csv")
        r.add_argument("--output", default="-", help="a file, or - for stdout (default)")

    def handle(self, *args, action, **o):
        return getattr(self, f"do_{action}")(**o)

    def do_verify(self, json=False, **_):
        stored = checkpoints.read()
        count, breaks = chain.verify(stored)
        sequence, head = chain.head()
        result = {"events": count, "head_sequence": sequence, "head_hash": head, "checkpoints": len(stored),
                  "breaks": [str(b) for b in breaks]}
        audit.record(audit.cli_actor(), "audit.chain.verified", None, outcome="failure" if breaks else "success",
                     details=result)
        if json:
            self.stdout.write(_dumps(result))
        else:
            self.stdout.write(f"{count} events, head #{sequence} {head}, {len(stored)} checkpoint(s) checked")
        if breaks:
            for b in breaks:
                self.stderr.write(f"BROKEN: {b}")
            raise CommandError(f"the audit trail does not verify: first broken link at {breaks[0]}")
        if not json:
            self.stdout.write("the chain verifies")

    def do_checkpoint(self, **_):
        entry = checkpoints.write()
        audit.record(audit.cli_actor(), "audit.checkpoint.written", None, details=entry)
        self.stdout.write(f"checkpoint #{entry['sequence']} {entry['hash']} -> {entry['location']}")

    def do_export(self, format, output, **o):
        filters = _filters(o)
        if output != "-":
            try:
                manifest = export_to_file(filters, format, output, audit.cli_actor())
            except OSError as exc:
                raise CommandError(f"cannot write {output}: {exc.strerror or exc}")
            self.stderr.write(f"{manifest['count']} events (#{manifest['first_sequence']}..#{manifest['last_sequence']}"
                              f") -> {output}, sha256 {manifest['sha256']}; manifest {output}.manifest.json")
            return
        exp = Export(filters, format)
        sink = _binary_stdout(self.stdout)
        try:
            for chunk in exp:
                sink.write(chunk)
            sink.flush()
        finally:
            exp.record(audit.cli_actor(), output="-")
        self.stderr.write(_dumps(exp.manifest(output="-")))

    def do_report(self, summary, format, output, **o):
        from monitoring.compliance import Report

        try:
            report = Report("summary" if summary else "events", format, _filters(o))
        except FilterError as exc:
            raise CommandError(str(exc))
        if output == "-":
            if format == "pdf" and self.stdout.isatty():
                raise CommandError("a PDF is binary: give --output FILE, or redirect stdout to a file")
            sink, close = _binary_stdout(self.stdout), None
            if format == "pdf" and isinstance(sink, _TextSink):
                raise CommandError("a PDF is binary: give --output FILE")
        else:
            try:
                sink = close = open(output, "wb")  # noqa: SIM115 - closed below
            except OSError as exc:
                raise CommandError(f"cannot write {output}: {exc.strerror or exc}")
        try:
            for chunk in report:
                sink.write(chunk)
            sink.flush()
        finally:
            if close:
                close.close()
            report.record(audit.cli_actor(), output=output)
        if output != "-":
            extra = (f", {report.info['rows']} of {report.info['total']} events" if "total" in report.info
                     else f", {report.info['rows']} events" if "rows" in report.info else "")
            self.stderr.write(f"{report.kind} report -> {output} ({report.bytes} bytes{extra}), sha256 {report.sha256}")


def _filter_arguments(parser, *, required_period: bool):
    parser.add_argument("--from", dest="start", required=required_period, metavar="DATE",
                        help="first day (2026-11-01) or instant (2026-11-01T08:00) of the period")
    parser.add_argument("--to", dest="end", required=required_period, metavar="DATE",
                        help="last day, included (2026-11-30), or an instant, excluded")
    parser.add_argument("--actor", default="", help="actor label, exact (a username, cli:root, system:beat)")
    # dest: "action" is the subcommand's own
    parser.add_argument("--action", dest="action_filter", default="", metavar="ACTION",
                        help="exact (backup.run.failed) or a prefix (restore.request.*)")
    parser.add_argument("--outcome", default="", choices=["", "success", "failure", "denied"])
    parser.add_argument("--target-type", default="", help="e.g. backups.database")
    parser.add_argument("--target-id", default="")


def _filters(o: dict) -> Filters:
    try:
        return Filters.parse(start=o.get("start"), end=o.get("end"), actor=o.get("actor"),
                             action=o.get("action_filter"), outcome=o.get("outcome"), target_type=o.get("target_type"),
                             target_id=o.get("target_id"))
    except FilterError as exc:
        raise CommandError(str(exc))


class _TextSink:
    """For a stdout without a byte buffer (call_command with a StringIO)."""

    def __init__(self, out):
        self.out = out

    def write(self, data: bytes):
        self.out.write(data.decode())

    def flush(self):
        pass


def _binary_stdout(stdout):
    raw = getattr(stdout, "_out", stdout)
    if raw is sys.stdout:
        raw.flush()
    buffer = getattr(raw, "buffer", None)
    return buffer if buffer is not None else _TextSink(raw)


def _dumps(value) -> str:
    return json.dumps(value, indent=2)
