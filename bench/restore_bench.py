"""Restore speed: bankvault's restore engine and its request path against raw pg_restore -j2
of the same pgbench database, in one run, with a breakdown of where bankvault's time goes.

    .venv/bin/python bench/restore_bench.py [--scale 20] [--repeat 3] [--explore] [--strict]

Everything it needs it starts itself (a source cluster, the portal's catalog cluster, a
temporary repository and scratch directory) and removes at the end. See bench/README.md for
how to read the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # as a script, sys.path[0] is bench/, not the project root

# The data, the portal and the tool helpers are the backup benchmark's, so the benchmarks agree.
from backup_bench import (  # noqa: E402
    DBNAME,
    MB,
    core_contention,
    describe_contention,
    load_pgbench,
    paired,
    sh,
    start_portal,
    tool_version,
)

from backups.engine.cluster import LocalCluster  # noqa: E402  (needs the path above)

RAW_DB = "bench_raw"  # the fresh, empty database the raw variants restore into
ENGINE_ID0 = 900_000  # request ids for (c): far from the RestoreRequest pks that (d) gets
VARIANTS = {
    "a": "raw pg_restore -j2, pg_dump -Fc (gzip) file",
    "b": "raw pg_restore -j2, pg_dump -Fc -Z0 file",
    "c": "bankvault engine: restore_database+finish",
    "d": "bankvault request: runner.execute",
}
# --explore: what the engine's own pg_restore step costs, and what an alternative would.
EXPLORE = {
    "x1": "raw pg_restore -j2, bankvault's dump (piped)",
    "x2": "zstd -dc archive | pg_restore (1 job)",
    "x3": "raw pg_restore -j1, pg_dump -Fc -Z0 file",
    "x4": "bankvault engine with jobs=2 (scratch copy)",
}
LABELS = {**VARIANTS, **EXPLORE}
# Phases of one engine restore, in the order they happen (see Phases.breakdown).
PHASES = {
    "connect": "connect, read the server version",
    "verify": "verify sha256 of every archive file",
    "decompress": "decompress the dump to scratch",
    "toc": "pg_restore --list (TOC of the dump)",
    "preflight": "preflight (roles via pg_restore -L, ext., space)",
    "properties_sql": "database properties (pg_restore -L -f -)",
    "createdb": "CREATE DATABASE <work name>",
    "pg_restore": "pg_restore --exit-on-error (c, d: streamed, 1 job)",
    "counts": "exact row counts of every table",
    "props_cleanup": "carry properties, remove scratch",
    "swap": "swap (finish)",
    "outside": "outside the engine (request bookkeeping)",
}


class Phases:
    """Times the restore engine's steps by wrapping its functions in their module (they are
    looked up there at call time), so the engine runs unchanged and unedited."""

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []
        self._undo: list[tuple[object, str, object]] = []

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((name, t0, time.perf_counter()))
        return timed

    def wrap(self, module, attr: str, name: str) -> None:
        fn = getattr(module, attr)
        self._undo.append((module, attr, fn))
        setattr(module, attr, self._timed(name, fn))

    def install(self) -> None:
        from recovery.engine import restore

        for attr in ("restore_database", "finish", "prepare", "verify_files", "preflight", "database_properties",
                     "run_pg_restore", "verify_counts", "swap"):
            self.wrap(restore, attr, attr)
        # prepare()'s table of contents and the -L scripts both go through _pg_restore_output:
        # time it and tell the TOC listing apart from the scripts.
        inner = restore._pg_restore_output

        def output(work, args):
            return self._timed("toc" if "--list" in args else "toc_sql", inner)(work, args)

        self._undo.append((restore, "_pg_restore_output", inner))
        restore._pg_restore_output = output

    def uninstall(self) -> None:
        for module, attr, fn in reversed(self._undo):
            setattr(module, attr, fn)
        self._undo.clear()

    def breakdown(self, total: float) -> dict[str, float]:
        """Seconds per PHASES key for the run just timed (total = its wall time)."""
        ev, spent = {}, {}
        for name, t0, t1 in self.events:
            ev.setdefault(name, (t0, t1))  # boundaries: the first call (one restore calls each once)
            spent[name] = spent.get(name, 0.0) + t1 - t0  # x4's prepare may list the TOC more than once

        def d(name):
            return spent.get(name, 0.0)

        out = {
            "connect": ev["prepare"][0] - ev["restore_database"][0],
            "verify": d("verify_files"),
            # The checksums and the TOC run side by side in prepare(); what is left of it is the
            # scratch copy (jobs > 1), 0 when streamed (the default).
            "decompress": max(0.0, d("prepare") - max(d("verify_files"), d("toc"))),
            "toc": d("toc"),
            "preflight": d("preflight"),
            "properties_sql": d("database_properties"),
            "createdb": ev["run_pg_restore"][0] - ev["database_properties"][1],
            "pg_restore": d("run_pg_restore"),
            "counts": d("verify_counts"),
            "props_cleanup": ev["restore_database"][1] - ev["verify_counts"][1],
            "swap": d("finish"),
        }
        out["outside"] = total - d("restore_database") - d("finish")
        return {k: round(v, 4) for k, v in out.items()}


class Bench:
    def __init__(self, scratch: Path, source: LocalCluster, inst):
        self.scratch = scratch
        self.source = source
        self.inst = inst
        self.pg_restore = inst.tool("pg_restore")
        # The raw tools reach the server the way the engine does: TCP to 127.0.0.1.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env.update(PGHOST="127.0.0.1", PGPORT=str(source.port), PGUSER="postgres",
                        PGDATABASE=DBNAME, LC_MESSAGES="C")
        self.dumps = scratch / "dumps"
        self.phases = Phases()
        self.db = self.archive = self.source_obj = self.users = None  # set in main()
        self.next_id = ENGINE_ID0

    # -- around every timed run (not timed) ------------------------------------------------------
    def settle(self) -> None:
        """Start every timed run from the same state: the previous restore's WAL checkpointed
        and its dirty pages written back, so neither lands on the next run's clock."""
        self.source.sql("CHECKPOINT")
        os.sync()

    def fresh_raw_db(self) -> None:
        self.source.sql(f"DROP DATABASE IF EXISTS {RAW_DB} WITH (FORCE)")
        self.source.sql(f"CREATE DATABASE {RAW_DB} TEMPLATE template0")

    def accounts(self, dbname: str) -> int:
        return self.source.sql("SELECT count(*) FROM pgbench_accounts", dbname)[0][0]

    # Each variant returns (wall seconds, the database it restored, extra figures for the JSON).
    def _raw(self, dump: Path, jobs: int):
        self.fresh_raw_db()
        self.settle()
        t0 = time.perf_counter()
        sh([self.pg_restore, f"--jobs={jobs}", "-d", RAW_DB, str(dump)], self.env)
        return time.perf_counter() - t0, RAW_DB, {}

    def a_raw_gzip(self):
        return self._raw(self.dumps / "raw_gzip.dump", 2)

    def b_raw_z0(self):
        return self._raw(self.dumps / "raw_z0.dump", 2)

    def c_engine(self, jobs: int | None = None):
        from django.conf import settings

        jobs = settings.BANKVAULT_RESTORE_JOBS if jobs is None else jobs  # the engine's default
        from recovery.engine import restore

        self.next_id += 1
        self.settle()
        self.phases.events.clear()
        t0 = time.perf_counter()
        prepared = restore.restore_database(self.db, self.source_obj, live_name=DBNAME, final_name=DBNAME,
                                            replace=True, request_id=self.next_id, jobs=jobs)
        restore.finish(prepared)
        seconds = time.perf_counter() - t0
        return seconds, DBNAME, {"pre_restore": prepared.pre_name, "phases": self.phases.breakdown(seconds),
                                 "tables_verified": prepared.result["tables_verified"]}

    def d_request(self):
        from recovery import services
        from recovery.engine import runner

        # Filing and approving are the web requests' part; a worker's restore is execute().
        req = services.file_request(self.users["operator"], kind="archive", mode="replace", archive=self.archive,
                                    reason="bench")
        req.approve(self.users["approver_a"], password_ok=True)
        req.approve(self.users["approver_b"], password_ok=True)
        self.settle()
        self.phases.events.clear()
        t0 = time.perf_counter()
        result = runner.execute(req.pk)
        seconds = time.perf_counter() - t0
        if result is None:
            req.refresh_from_db()
            raise SystemExit(f"restore request {req.pk} did not run: {req.state} {req.error}")
        item = result["items"][0]
        return seconds, DBNAME, {"request": req.pk, "pre_restore": item["pre_restore"],
                                 "phases": self.phases.breakdown(seconds)}

    def x1_raw_piped_dump(self):
        return self._raw(self.dumps / "bankvault.pgdump", 2)

    def x2_stream(self):
        """No scratch file and decompression overlapped with the restore; a pipe allows one job."""
        self.fresh_raw_db()
        self.settle()
        entry = self.source_obj.file("dump")
        t0 = time.perf_counter()
        zstd = subprocess.Popen(["zstd", "-dcq", str(self.source_obj.directory / entry["path"])],
                                stdout=subprocess.PIPE)
        load = subprocess.Popen([self.pg_restore, "--exit-on-error", "-d", RAW_DB], stdin=zstd.stdout,
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        zstd.stdout.close()  # only pg_restore holds the read end now
        err = load.communicate()[1]
        rc_zstd = zstd.wait()
        seconds = time.perf_counter() - t0
        if load.returncode or rc_zstd:
            raise SystemExit(f"zstd | pg_restore failed: zstd exit {rc_zstd}, pg_restore exit {load.returncode}: "
                             f"{err.decode(errors='replace').strip()[-1000:]}")
        return seconds, RAW_DB, {}

    def x3_raw_z0_one_job(self):
        return self._raw(self.dumps / "raw_z0.dump", 1)

    def x4_engine_two_jobs(self):
        """(c) with BANKVAULT_RESTORE_JOBS=2: the dump is decompressed to scratch first, and
        pg_restore -j2 steps through it block by block (a piped dump has no data offsets)."""
        return self.c_engine(jobs=2)

    def cleanup(self, key: str, extra: dict) -> None:
        if key in ("c", "d", "x4"):  # the previous live database, kept for rollback; not needed here
            self.source.sql(f'DROP DATABASE IF EXISTS "{extra["pre_restore"]}" WITH (FORCE)')
        else:
            self.source.sql(f"DROP DATABASE IF EXISTS {RAW_DB} WITH (FORCE)")


def make_dumps(bench: Bench, explore: bool) -> dict:
    """The raw variants' inputs, written with -f as people do (pg_dump then records where each
    table's data starts); for --explore also bankvault's own dump, decompressed."""
    bench.dumps.mkdir()
    pg_dump = bench.inst.tool("pg_dump")
    sh([pg_dump, "-Fc", "-f", str(bench.dumps / "raw_gzip.dump")], bench.env)
    sh([pg_dump, "-Fc", "-Z0", "-f", str(bench.dumps / "raw_z0.dump")], bench.env)
    if explore:
        entry = bench.source_obj.file("dump")
        sh(["zstd", "-dqf", str(bench.source_obj.directory / entry["path"]), "-o",
            str(bench.dumps / "bankvault.pgdump")], bench.env)
    return {p.name: p.stat().st_size for p in sorted(bench.dumps.iterdir())}


def make_users() -> dict:
    """An operator and two approvers (the groups come from recovery's data migration)."""
    from django.contrib.auth.models import Group, User

    users = {}
    for key, name, group in (("operator", "olga", "operator"), ("approver_a", "anna", "approver"),
                             ("approver_b", "bert", "approver")):
        user = User.objects.create_user(name, email=f"{name}@bank.example")  # no usable password: not needed
        user.groups.add(Group.objects.get(name=group))
        users[key] = user
    return users


def summarize(samples: dict) -> dict:
    rows = {}
    for key, runs in samples.items():
        secs = [r["seconds"] for r in runs]
        rows[key] = {"label": LABELS[key], "median_s": statistics.median(secs), "min_s": min(secs),
                     "max_s": max(secs), "runs": runs}
    a, b = rows["a"], rows["b"]
    for row in rows.values():
        row["time_vs_a"] = row["median_s"] / a["median_s"]
        row["time_vs_b"] = row["median_s"] / b["median_s"]
    for key in ("c", "d", "x4"):
        if key not in rows:
            continue
        per_run = [r["extra"]["phases"] for r in rows[key]["runs"]]
        rows[key]["phases_median_s"] = {p: statistics.median(run[p] for run in per_run) for p in PHASES}
    return rows


def print_table(rows: dict) -> None:
    head = ["variant", "median s", "min-max s", "time/a", "time/b"]
    body = [[f"{k}  {r['label']}", f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}",
             f"{r['time_vs_a']:.2f}x", f"{r['time_vs_b']:.2f}x"] for k, r in rows.items()]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    for line in [head, *body]:
        print("  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]))


def note(text: str) -> None:
    """A remark under a table, wrapped."""
    print(textwrap.fill(text, width=110, initial_indent="  ", subsequent_indent="      "))


def print_phases(rows: dict) -> None:
    c = rows["c"]["phases_median_s"]
    total_c = rows["c"]["median_s"]
    cols = [k for k in ("d", "x4") if k in rows]
    print(f"\nwhere bankvault's time goes (median of {len(rows['c']['runs'])} runs per phase; "
          "the medians need not add up exactly)")
    head = ["phase", "c s", "c %", *(f"{k} s" for k in cols)]
    body = [[PHASES[p], f"{c[p]:.2f}", f"{100 * c[p] / total_c:.0f}%",
             *(f"{rows[k]['phases_median_s'][p]:.2f}" for k in cols)] for p in PHASES]
    body.append(["total (median wall time)", f"{total_c:.2f}", "100%", *(f"{rows[k]['median_s']:.2f}" for k in cols)])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    for line in [head, *body]:
        print("  " + "  ".join([line[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(line[1:], widths[1:])]))
    besides = total_c - c["pg_restore"]
    note(f"c: pg_restore itself {c['pg_restore']:.2f} s = {c['pg_restore'] / rows['a']['median_s']:.2f}x raw (a), "
         f"{c['pg_restore'] / rows['b']['median_s']:.2f}x raw (b); everything else {besides:.2f} s "
         f"= {besides / rows['a']['median_s']:.2f}x (a)")
    if "x1" in rows:
        note(f"x1: raw pg_restore -j2 on bankvault's decompressed dump took {rows['x1']['median_s']:.2f} s, "
             f"{rows['x1']['median_s'] / rows['b']['median_s']:.2f}x the same data's -Z0 dump written with -f (b): "
             "written to a pipe, the dump has no data offsets, so each worker seeks block by block "
             "(one block per row) to the table it needs")
    if "x3" in rows:
        note(f"x3: raw pg_restore -j1 from the -Z0 file took {rows['x3']['median_s']:.2f} s = "
             f"{rows['x3']['time_vs_b']:.2f}x -j2 (b): pgbench has one big table, so a second job has little to do")
    if "x4" in rows:
        x4 = rows["x4"]
        note(f"x4: the engine with BANKVAULT_RESTORE_JOBS=2 (the dump decompressed to scratch, then pg_restore -j2): "
             f"{x4['median_s']:.2f} s = {x4['time_vs_a']:.2f}x (a), against {rows['c']['median_s']:.2f} s streamed "
             "into one job (c)")


def check_targets(rows: dict, checks: dict) -> list[dict]:
    """The time target is judged on the paired ratio (backup_bench.paired: the median over
    rounds of c / a in the same round); the ratio of the medians is printed beside it."""
    a, c = rows["a"], rows["c"]
    ca = paired(rows, "c", "a")
    targets = [
        ("bankvault engine (c) <= 1.15 x raw pg_restore -j2 (a)", ca <= 1.15,
         f"paired {ca:.2f}x (ratio of medians {c['time_vs_a']:.2f}x: {c['median_s']:.2f} s vs {a['median_s']:.2f} s)"),
        ("every restored database holds every account", checks["accounts_ok"],
         f"{checks['restores']} restores, pgbench_accounts {checks['accounts_seen']} "
         f"(want {checks['accounts_want']:,})"),
    ]
    out = [{"target": name, "passed": bool(ok), "measured": got} for name, ok, got in targets]
    # For information, not a target: the raw side that also reads an uncompressed dump.
    out.append({"target": "for information: bankvault engine (c) vs raw -Z0 (b)", "passed": None,
                "measured": f"paired {paired(rows, 'c', 'b'):.2f}x (ratio of medians {c['time_vs_b']:.2f}x)"})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="pgbench scale (20 = 2M accounts, ~300 MB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant; medians are reported")
    parser.add_argument("--explore", action="store_true",
                        help="also time x1-x4: raw pg_restore of bankvault's own dump, a streamed "
                             "zstd | pg_restore, raw -j1, and the engine with jobs=2 (about twice the run time)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args()
    if args.scale < 1 or args.repeat < 1:
        parser.error("--scale and --repeat must be at least 1")

    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bv-restore-bench-"))
    os.environ["BANKVAULT_SCRATCH_DIR"] = str(scratch / "restore-scratch")
    clusters: list[LocalCluster] = []
    bench = None
    saved_dispatch = None
    try:
        # The catalog's data is worth nothing after the run: fsync off.
        clusters.append(LocalCluster.create(throwaway=True))
        start_portal(clusters[0], scratch)
        # fsync on (throwaway=False): the restores write like they would on a real server.
        source = LocalCluster.create()
        clusters.append(source)
        source.start()

        from django.conf import settings

        import recovery.models
        from backups.engine import pgbin
        from backups.engine import runner as backup_runner
        from backups.models import BackupRun, Database
        from recovery.engine import restore

        # Approving hands the request to Celery on commit; here the benchmark runs it itself.
        saved_dispatch = recovery.models._dispatch
        recovery.models._dispatch = lambda pk: None

        inst = pgbin.for_server()
        bench = Bench(scratch, source, inst)
        print(f"loading pgbench scale {args.scale} with random filler ...", flush=True)
        t0 = time.perf_counter()
        load_pgbench(source, bench, inst.tool("pgbench"), args.scale)
        (db_bytes, pg_version), = source.sql(
            "SELECT pg_database_size(%s), current_setting('server_version')", params=(DBNAME,))
        db = Database(name="bench", host="127.0.0.1", port=source.port, dbname=DBNAME, user="postgres")
        db.set_password("trust-auth-ignores-it")  # the source trusts TCP clients on loopback
        db.save()
        bench.db = db
        archive = backup_runner.execute(
            BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="bench").pk)
        bench.archive = archive
        bench.source_obj = restore.Source.open(Path(settings.BANKVAULT_REPOSITORY) / archive.path,
                                               f"archive {archive.pk}")
        dump_entry = bench.source_obj.file("dump")
        sizes = make_dumps(bench, args.explore)
        bench.users = make_users()
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)

        want = 100_000 * args.scale
        if bench.accounts(DBNAME) != want:
            raise SystemExit(f"the source holds {bench.accounts(DBNAME)} accounts, not {want}")
        load_before = "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + \
            " before the first timed run (other work on the machine shows up directly)"
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor() or "?")
        header = {
            "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "scale": args.scale,
            "repeat": args.repeat, "explore": args.explore, "loadavg_before": os.getloadavg(),
            "db_size_bytes": db_bytes, "postgresql": pg_version,
            "pg_restore": tool_version([bench.pg_restore, "--version"]), "zstd": tool_version(["zstd", "-V"]),
            "archive_bytes": archive.bytes, "archive_dump_bytes": dump_entry["bytes"],
            "archive_dump_uncompressed_bytes": dump_entry.get("uncompressed_bytes"),
            "raw_dump_bytes": sizes, "restore_jobs": __import__("django.conf").conf.settings.BANKVAULT_RESTORE_JOBS,
            "contention_before": core_contention(),
        }
        uncompressed = dump_entry.get("uncompressed_bytes") or sizes["raw_z0.dump"]
        gz_mb, z0_mb = sizes["raw_gzip.dump"] / MB, sizes["raw_z0.dump"] / MB
        order = ",".join(VARIANTS) + (",x1,x2,x3,x4" if args.explore else "")
        print(f"""
bankvault restore benchmark
  machine     {header['cores']} cores ({cpu}), Linux {header['kernel']}
  machine load {load_before}
  cores now   {describe_contention(header['contention_before'])}
  target      PostgreSQL {pg_version}, fsync on, data checksums;
              pg_restore {header['pg_restore']}; zstd {header['zstd']}
  data        pgbench scale {args.scale}, {want:,} accounts with random filler; database {db_bytes / MB:.0f} MB
  inputs      (a) pg_dump -Fc -f, gzip: {gz_mb:.0f} MB; (b) pg_dump -Fc -Z0 -f: {z0_mb:.0f} MB;
              (c, d) bankvault archive: {archive.bytes / MB:.0f} MB, its dump {uncompressed / MB:.0f} MB uncompressed
              ({uncompressed / dump_entry['bytes']:.2f}x with zstd), written by pg_dump to a pipe
  runs        {args.repeat} per variant, interleaved {order},a,...; median wall time; MB = 10^6 bytes;
              CHECKPOINT and sync before every timed run
  note        raw (a, b): only pg_restore -j2 into an empty database made beforehand (not timed), no
              checks. bankvault (c): sha256 of every archive file, pg_restore --list and two -L scripts
              for pre-flight and the database's properties (each reading the streamed dump), CREATE
              DATABASE, the zstd stream into one pg_restore --exit-on-error, exact row counts of every
              table against the manifest, owner/settings/grants, and the swap (live -> pre-restore,
              new -> live, one transaction). (d) is (c) plus the request's claim with the two-person
              re-check, progress updates, catalog rows and audit events (filing and approving not timed).
""", flush=True)

        variants = {"a": bench.a_raw_gzip, "b": bench.b_raw_z0, "c": bench.c_engine, "d": bench.d_request}
        if args.explore:
            variants.update({"x1": bench.x1_raw_piped_dump, "x2": bench.x2_stream, "x3": bench.x3_raw_z0_one_job,
                             "x4": bench.x4_engine_two_jobs})
        samples: dict[str, list] = {k: [] for k in variants}
        checks = {"restores": 0, "accounts_want": want, "accounts_seen": set()}
        bench.phases.install()
        for rep in range(1, args.repeat + 1):
            for key, fn in variants.items():  # round-robin spreads machine noise over all variants
                seconds, restored, extra = fn()
                n = bench.accounts(restored)  # the cross-check, not timed
                checks["restores"] += 1
                checks["accounts_seen"].add(n)
                samples[key].append({"seconds": round(seconds, 4), "accounts": n, "extra": extra})
                print(f"  run {rep}/{args.repeat}  {key:<2} {LABELS[key]:<46} {seconds:6.2f} s  "
                      f"{n:,} accounts{'' if n == want else '  WRONG'}", flush=True)
                bench.cleanup(key, extra)
        bench.phases.uninstall()
        checks["accounts_ok"] = checks["accounts_seen"] == {want}
        checks["accounts_seen"] = ", ".join(f"{n:,}" for n in sorted(checks["accounts_seen"]))

        rows = summarize(samples)
        print()
        print_table(rows)
        print_phases(rows)
        targets = check_targets(rows, checks)
        print("\ntargets")
        for t in targets:
            mark = {True: "PASS", False: "FAIL", None: "info"}[t["passed"]]
            print(f"  {mark}  {t['target']:<55} {t['measured']}")

        header["contention_after"] = core_contention()
        print(f"  cores after {describe_contention(header['contention_after'])}")
        total = time.perf_counter() - started
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        path = results / f"restore_bench-{stamp}.json"
        path.write_text(json.dumps({
            "timestamp": stamp, "header": header, "phases": PHASES, "variants": rows, "checks": checks,
            "targets": targets, "total_seconds": round(total, 1), "loadavg_after": os.getloadavg()},
            indent=2, default=str) + "\n")
        print(f"\nresults: {path.relative_to(ROOT)}  (whole run {total:.0f} s; load average now "
              f"{os.getloadavg()[0]:.2f})")
        return 1 if args.strict and not all(t["passed"] for t in targets if t["passed"] is not None) else 0
    finally:
        if bench is not None:
            bench.phases.uninstall()
        if saved_dispatch is not None:
            import recovery.models

            recovery.models._dispatch = saved_dispatch
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()  # before the portal cluster goes away under them
        for cluster in reversed(clusters):
            cluster.destroy()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
