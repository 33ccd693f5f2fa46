"""Inspect, verify, hold and expire archives.

    manage.py archives list [--database NAME] [--json]
    manage.py archives verify ARCHIVE_ID
    manage.py archives hold ARCHIVE_ID --reason "..."      legal hold: nothing deletes it
    manage.py archives release ARCHIVE_ID --reason "..."   lift the legal hold
    manage.py archives cleanup --dry-run [--database NAME] [--json]   what retention would delete, and why
    manage.py archives cleanup [--database NAME]           apply retention now (as the monthly task does)
    manage.py archives copy ARCHIVE_ID --to REMOTE [--again]   copy off-site now, verified after upload
    manage.py archives copies [--archive ID] [--json]      off-site copies and their state

Commands run with the rights of whoever can run them on the portal host (operators); the
trail names them cli:<OS user>."""

import json

from django.core.management.base import BaseCommand, CommandError
from django.template.defaultfilters import filesizeformat

import audit
from backups import retention
from backups.engine import runner
from backups.models import Archive, Database


class Command(BaseCommand):
    help = "List and verify archives in the repository."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        lst = sub.add_parser("list")
        lst.add_argument("--database", metavar="NAME")
        lst.add_argument("--json", action="store_true")
        ver = sub.add_parser("verify")
        ver.add_argument("archive_id", type=int)
        for name in ("hold", "release"):
            hold = sub.add_parser(name)
            hold.add_argument("archive_id", type=int)
            hold.add_argument("--reason", required=True, help="the case or instruction (recorded in the trail)")
        clean = sub.add_parser("cleanup")
        clean.add_argument("--dry-run", action="store_true", help="show what would be deleted and why; change nothing")
        clean.add_argument("--database", metavar="NAME", action="append", help="only this database (repeatable)")
        clean.add_argument("--json", action="store_true")
        cp = sub.add_parser("copy", help="copy an archive to a remote repository now and verify it there")
        cp.add_argument("archive_id", type=int)
        cp.add_argument("--to", metavar="REMOTE", action="append", required=True, help="remote name (repeatable)")
        cp.add_argument("--again", action="store_true", help="copy and verify again even if a complete copy exists")
        cps = sub.add_parser("copies", help="list off-site copies")
        cps.add_argument("--archive", metavar="ID", type=int)
        cps.add_argument("--json", action="store_true")

    def handle(self, *args, action, **opts):
        return getattr(self, f"do_{action}")(**opts)

    def do_list(self, database=None, json=False, **_):
        qs = Archive.objects.select_related("database")
        if database:
            qs = qs.filter(database__name=database)
        rows = [{
            "id": a.pk, "database": a.database.name, "kind": a.kind, "state": a.state,
            "started_at": a.started_at.isoformat(), "finished_at": a.finished_at.isoformat(),
            "bytes": a.bytes, "path": a.path, "compression": a.compression,
            "verified_at": a.verified_at.isoformat() if a.verified_at else None,
            "legal_hold": a.legal_hold,
        } for a in qs]
        if json:
            self.stdout.write(_dumps(rows))
            return
        if not rows:
            self.stdout.write("no archives")
        for r in rows:
            self.stdout.write(f"{r['id']:>6}  {r['database']:<12} {r['kind']:<8} {r['state']:<9} "
                              f"{r['started_at'][:19]}  {filesizeformat(r['bytes']):>10}  {r['path']}"
                              f"{'  [legal hold]' if r['legal_hold'] else ''}")

    def do_verify(self, archive_id, **_):
        archive = Archive.objects.filter(pk=archive_id).first()
        if archive is None:
            raise CommandError(f"no archive with id {archive_id}")
        ok, error = runner.verify(archive, audit.cli_actor())
        if not ok:
            raise CommandError(f"archive {archive_id} FAILED verification: {error}")
        self.stdout.write(f"archive {archive_id} ({archive.path}): OK, {archive.files.count()} files verified")

    def do_hold(self, archive_id, reason, **_):
        self._hold(archive_id, reason, True)

    def do_release(self, archive_id, reason, **_):
        self._hold(archive_id, reason, False)

    def _hold(self, archive_id, reason, hold):
        try:
            archive = (retention.place_hold if hold else retention.lift_hold)(archive_id, audit.cli_actor(), reason)
        except retention.RetentionError as exc:
            raise CommandError(str(exc)) from None
        if hold:
            self.stdout.write(f"archive {archive.pk} ({archive.path}) is under legal hold: {archive.legal_hold_reason}")
        else:
            self.stdout.write(f"archive {archive.pk} ({archive.path}): legal hold lifted")

    def do_cleanup(self, dry_run=False, database=None, json=False, **_):
        dbs = Database.objects.order_by("name")
        if database:
            unknown = sorted(set(database) - set(dbs.filter(name__in=database).values_list("name", flat=True)))
            if unknown:
                raise CommandError(f"no database named {', '.join(unknown)}")
            dbs = dbs.filter(name__in=database)
        if not dry_run:
            try:
                summary = retention.cleanup(audit.cli_actor(), databases=list(dbs))
            except retention.RetentionError as exc:
                raise CommandError(str(exc)) from None
            if json:
                self.stdout.write(_dumps(summary))
                return
            for name, entry in summary.items():
                self.stdout.write(f"{name}: {entry['archives_expired']} archive(s) expired "
                                  f"({filesizeformat(entry['bytes'])}), {entry['wal_files']} WAL file(s) removed "
                                  f"({filesizeformat(entry['wal_bytes'])})"
                                  + (f"; FAILED: {entry['error']}" if "error" in entry else ""))
            if any("error" in e for e in summary.values()):
                raise CommandError("retention failed for some databases (see above)")
            return
        plans = [retention.plan_database(db) for db in dbs]
        if json:
            self.stdout.write(_dumps([_plan_json(p) for p in plans]))
            return
        for p in plans:
            self.stdout.write(f"{p.database.name}:")
            for k in p.kinds:
                rules = "; ".join(f"{r.name}: {r.describe()}" for r in k.rules) or "no enabled policy"
                self.stdout.write(f"  {k.kind} archives ({rules}): {len(k.delete)} to delete, {len(k.kept)} kept")
                for d in k.delete:
                    self.stdout.write(f"    delete {d.item.pk:>6}  {d.item.started_at:%Y-%m-%d %H:%M}  "
                                      f"{d.item.path}  -- {'; '.join(d.reasons)}")
            if p.wal.files:
                for r in p.wal.ranges:
                    self.stdout.write(f"  WAL: delete timeline {r['timeline']} {r['first']}..{r['last']} "
                                      f"({r['segments']} segments)")
            for note in p.wal.notes:
                self.stdout.write(f"  WAL: {note}")
        self.stdout.write("dry run: nothing was changed")

    def do_copy(self, archive_id, to, again=False, **_):
        from backups import offsite
        from backups.models import RemoteRepository

        archive = Archive.objects.select_related("database").filter(pk=archive_id).first()
        if archive is None:
            raise CommandError(f"no archive with id {archive_id}")
        remotes = {r.name: r for r in RemoteRepository.objects.filter(name__in=to)}
        unknown = sorted(set(to) - set(remotes))
        if unknown:
            raise CommandError(f"no remote repository named {', '.join(unknown)} (manage.py remotes list)")
        failed = []
        for name in to:
            try:
                copy = offsite.copy_archive(archive, remotes[name], audit.cli_actor(), force=again)
            except offsite.OffsiteError as exc:
                failed.append(name)
                self.stderr.write(f"archive {archive_id} -> {name}: FAILED: {exc.message}")
                continue
            if copy is None:
                self.stdout.write(f"archive {archive_id} -> {name}: already copied and verified (--again to redo)")
            else:
                seconds = (copy.finished_at - copy.started_at).total_seconds()
                self.stdout.write(f"archive {archive_id} -> {name}: copied and verified, "
                                  f"{filesizeformat(copy.bytes)} in {seconds:.1f} s")
        if failed:
            raise CommandError(f"the copy to {', '.join(failed)} failed (see above)")

    def do_copies(self, archive=None, json=False, **_):
        from backups import offsite
        from backups.models import ArchiveCopy

        qs = ArchiveCopy.objects.select_related("archive", "remote").order_by("archive_id", "remote__name")
        if archive is not None:
            qs = qs.filter(archive_id=archive)
        rows = offsite.copies_summary(qs)
        if json:
            self.stdout.write(_dumps(rows))
            return
        if not rows:
            self.stdout.write("no off-site copies")
        for r in rows:
            verified = (r["verified_at"] or "never")[:19]
            self.stdout.write(f"{r['archive']:>6}  {r['remote']:<14} {r['state']:<9} verified {verified:<19}  "
                              f"{filesizeformat(r['bytes']):>10}  {r['path']}"
                              + (f"  -- {r['error']}" if r["error"] else ""))


def _plan_json(p) -> dict:
    def row(d):
        return {"id": d.item.pk, "kind": d.item.kind, "state": d.item.state, "path": d.item.path,
                "started_at": d.item.started_at.isoformat(), "bytes": d.item.bytes, "reasons": d.reasons}

    return {"database": p.database.name, "delete": [row(d) for d in p.delete], "keep": [row(d) for d in p.kept],
            "wal": {"files": len(p.wal.files), "segments": p.wal.segments, "bytes": p.wal.bytes,
                    "ranges": p.wal.ranges, "notes": p.wal.notes}}


def _dumps(value) -> str:
    return json.dumps(value, indent=2)
