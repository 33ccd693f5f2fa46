"""Backup speed and size: bankvault's engine against raw pg_dump pipelines and the old
"four dumps + tar.gz" shell scripts, on one pgbench database, in one run.

    .venv/bin/python bench/backup_bench.py [--scale 20] [--repeat 3] [--strict]

Everything it needs it starts itself (a source cluster, the portal's catalog cluster, a
temporary repository) and removes at the end. See bench/README.md for how to read the output.
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
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # as a script, sys.path[0] is bench/, not the project root

from backups.engine.cluster import LocalCluster  # noqa: E402  (needs the path above)

DBNAME = "bench"
MB = 1_000_000
VARIANTS = {
    "a": "raw pg_dump -Fc (gzip)",
    "b": "raw pg_dump -Fc -Z0 | zstd -T2 -3",
    "c": "bankvault engine, zstd",
    "d": "bankvault engine, gzip",
    "e": "old scripts: 4 dumps + tar.gz",
}


def sh(argv: list[str], env: dict) -> None:
    """Run a tool; on failure stop the benchmark with the tool's own words."""
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"{Path(argv[0]).name} failed (exit {proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace').strip()[-1000:]}")


class Bench:
    def __init__(self, scratch: Path, source: LocalCluster, pg_dump: str):
        self.scratch = scratch
        self.out = scratch / "out"
        self.pg_dump = pg_dump
        # The raw tools reach the source the way the engine does: TCP to 127.0.0.1.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env.update(PGHOST="127.0.0.1", PGPORT=str(source.port), PGUSER="postgres",
                        PGDATABASE=DBNAME, LC_MESSAGES="C")
        self.db = None  # the registered backups.models.Database, set in main()

    def fresh_out(self) -> Path:
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        return self.out

    # Each variant returns (wall seconds, bytes of its output, extra figures for the JSON).
    def a_raw_gzip(self):
        path = self.out / "a.pgdump"
        t0 = time.perf_counter()
        sh([self.pg_dump, "-Fc", "-f", str(path)], self.env)
        return time.perf_counter() - t0, path.stat().st_size, {}

    def b_raw_zstd(self):
        path = self.out / "b.pgdump.zst"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            dump = subprocess.Popen([self.pg_dump, "-Fc", "-Z0"], env=self.env, stdout=subprocess.PIPE)
            zstd = subprocess.Popen(["zstd", "-T2", "-3", "-q", "-c"], stdin=dump.stdout, stdout=f)
            # Only zstd holds the read end now, so pg_dump gets SIGPIPE if zstd dies.
            dump.stdout.close()
            rc_zstd, rc_dump = zstd.wait(), dump.wait()
        seconds = time.perf_counter() - t0
        if rc_dump or rc_zstd:
            raise SystemExit(f"pipeline failed: pg_dump exit {rc_dump}, zstd exit {rc_zstd}")
        return seconds, path.stat().st_size, {}

    def _bankvault(self, algo: str):
        from backups.engine import runner
        from backups.models import BackupRun

        self.db.default_compression = algo
        self.db.save(update_fields=["default_compression"])
        run = BackupRun.enqueue(self.db, trigger=BackupRun.Trigger.MANUAL, actor_label="bench")
        # Queueing is the web request's part; a worker's backup is execute(), claim to catalog.
        t0 = time.perf_counter()
        archive = runner.execute(run.pk)
        seconds = time.perf_counter() - t0
        return seconds, archive.bytes, {"dump_bytes": archive.main_file.bytes}

    def c_bankvault_zstd(self):
        return self._bankvault("zstd")

    def d_bankvault_gzip(self):
        return self._bankvault("gzip")

    def e_old_scripts(self):
        parts = self.out / "parts"
        parts.mkdir()
        t_start = time.perf_counter()
        steps = {"x.backup": ["--format=custom", "--compress=9"], "x.sql": ["--format=plain"],
                 "schema.sql": ["--schema-only"], "data.sql": ["--data-only"]}
        seconds = {}
        for name, args in steps.items():  # one after another, as the scripts did
            t0 = time.perf_counter()
            sh([self.pg_dump, *args, "-f", str(parts / name)], self.env)
            seconds[name] = round(time.perf_counter() - t0, 3)
        tarball = self.out / "backup.tar.gz"
        t0 = time.perf_counter()
        sh(["tar", "-czf", str(tarball), "-C", str(parts), *steps], self.env)
        seconds["tar -czf"] = round(time.perf_counter() - t0, 3)
        return time.perf_counter() - t_start, tarball.stat().st_size, {"step_seconds": seconds}


def start_portal(portal: LocalCluster, scratch: Path) -> None:
    """The portal's own catalog database, and Django set up against it."""
    portal.start()
    portal.sql("CREATE DATABASE bankvault")
    os.environ.update({
        "DATABASE_URL": portal.url("bankvault"),
        "BANKVAULT_REPOSITORY": str(scratch / "repository"),
        "BANKVAULT_ENV": "test",
        "BANKVAULT_VAR_DIR": str(scratch / "var"),
        "SECRET_KEY": "bench-only-secret-key-" + "x" * 40,
        "DJANGO_SETTINGS_MODULE": "bankvault.settings",
    })
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # the engine logs every tool it runs at INFO
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def load_pgbench(source: LocalCluster, bench: Bench, pgbench: str, scale: int) -> None:
    """pgbench's schema with its rows inserted by us: pgbench's own filler is blanks, which
    compress 50x+ and would make every size in the table meaningless."""
    source.sql(f"CREATE DATABASE {DBNAME}")
    sh([pgbench, "-i", "-I", "dt", "-s", str(scale)], bench.env)
    source.sql("INSERT INTO pgbench_branches (bid, bbalance) SELECT g, 0 FROM generate_series(1, %s) g",
               DBNAME, (scale,))
    source.sql("INSERT INTO pgbench_tellers (tid, bid, tbalance) "
               "SELECT g, (g - 1) / 10 + 1, 0 FROM generate_series(1, %s) g", DBNAME, (10 * scale,))
    # 40 random hex characters in the char(84) filler: ~3.5x with zstd, like real rows.
    source.sql("INSERT INTO pgbench_accounts (aid, bid, abalance, filler) "
               "SELECT g, (g - 1) / 100000 + 1, 0, "
               "substr(md5(random()::text) || md5(random()::text), 1, 40) "
               "FROM generate_series(1, %s) g", DBNAME, (100_000 * scale,))
    sh([pgbench, "-i", "-I", "pv", "-s", str(scale)], bench.env)
    # Write the load out now, so no checkpoint lands in the middle of a timed run.
    source.sql("CHECKPOINT")


def measure_ratio(bench: Bench) -> tuple[int, int]:
    """Uncompressed custom-format dump size and its zstd -3 size. Doubles as the warm-up that
    puts the whole database in the page cache before the first timed run."""
    out = bench.fresh_out()
    sh([bench.pg_dump, "-Fc", "-Z0", "--no-sync", "-f", str(out / "raw.pgdump")], bench.env)
    sh(["zstd", "-T2", "-3", "-q", str(out / "raw.pgdump"), "-o", str(out / "raw.zst")], bench.env)
    sizes = (out / "raw.pgdump").stat().st_size, (out / "raw.zst").stat().st_size
    shutil.rmtree(out)
    return sizes


def tool_version(argv: list[str]) -> str:
    """The first version-looking word of a tool's --version, e.g. "15.20" or "v1.5.4"."""
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    return next((w.strip(",") for w in out.split() if w.lstrip("v")[:1].isdigit()), "?")


def summarize(samples: dict) -> dict:
    rows = {}
    for key, runs in samples.items():
        secs = [r["seconds"] for r in runs]
        rows[key] = {"label": VARIANTS[key], "median_s": statistics.median(secs), "min_s": min(secs),
                     "max_s": max(secs), "size_bytes": int(statistics.median(r["bytes"] for r in runs)),
                     "runs": runs}
    a, b = rows["a"], rows["b"]
    for row in rows.values():
        row["time_vs_b"] = row["median_s"] / b["median_s"]
        row["time_vs_a"] = row["median_s"] / a["median_s"]
        row["size_vs_a"] = row["size_bytes"] / a["size_bytes"]
    return rows


def print_table(rows: dict) -> None:
    head = ["variant", "median s", "min-max s", "size MB", "time/b", "time/a", "size/a"]
    body = [[f"{k}  {r['label']}", f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}",
             f"{r['size_bytes'] / MB:.1f}", f"{r['time_vs_b']:.2f}x", f"{r['time_vs_a']:.2f}x",
             f"{r['size_vs_a']:.2f}x"] for k, r in rows.items()]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    for line in [head, *body]:
        print("  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]))
    for k in ("c", "d"):
        run = rows[k]["runs"][-1]
        dump = run["extra"]["dump_bytes"]
        print(f"  {k}: dump file alone {dump / MB:.2f} MB; globals.sql {run['bytes'] - dump:,} bytes")


def check_targets(rows: dict) -> list[dict]:
    a, b, c = rows["a"], rows["b"], rows["c"]
    targets = [
        ("bankvault zstd time <= 1.10 x raw zstd pipeline (b)", c["median_s"] <= 1.10 * b["median_s"],
         f"{c['median_s']:.2f} s vs {b['median_s']:.2f} s = {c['time_vs_b']:.2f}x"),
        ("bankvault zstd >= 3x faster than raw pg_dump -Fc (a)", a["median_s"] >= 3 * c["median_s"],
         f"{a['median_s'] / c['median_s']:.2f}x faster"),
        ("bankvault zstd total size <= raw pg_dump -Fc size (a)", c["size_bytes"] <= a["size_bytes"],
         f"{c['size_bytes'] / MB:.1f} MB vs {a['size_bytes'] / MB:.1f} MB"),
    ]
    return [{"target": name, "passed": ok, "measured": got} for name, ok, got in targets]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="pgbench scale (20 = 2M accounts, ~300 MB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant; medians are reported")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args()
    if args.scale < 1 or args.repeat < 1:
        parser.error("--scale and --repeat must be at least 1")

    scratch = Path(tempfile.mkdtemp(prefix="bv-bench-"))
    clusters: list[LocalCluster] = []
    try:
        # The catalog's data is worth nothing after the run: fsync off.
        clusters.append(LocalCluster.create(throwaway=True))
        start_portal(clusters[0], scratch)
        # fsync on (throwaway=False): the source behaves like a real server, not a test toy.
        source = LocalCluster.create()
        clusters.append(source)
        source.start()

        from backups.engine import pgbin
        from backups.models import Database

        inst = pgbin.for_server()
        bench = Bench(scratch, source, inst.tool("pg_dump"))
        print(f"loading pgbench scale {args.scale} with random filler ...", flush=True)
        t0 = time.perf_counter()
        load_pgbench(source, bench, inst.tool("pgbench"), args.scale)
        (db_bytes, pg_version), = source.sql(
            "SELECT pg_database_size(%s), current_setting('server_version')", params=(DBNAME,))
        raw_bytes, zst_bytes = measure_ratio(bench)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)

        db = Database(name="bench", host="127.0.0.1", port=source.port, dbname=DBNAME, user="postgres")
        db.set_password("trust-auth-ignores-it")  # the source trusts TCP clients on loopback
        db.save()
        bench.db = db

        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor() or "?")
        header = {
            "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "scale": args.scale,
            "repeat": args.repeat, "db_size_bytes": db_bytes, "postgresql": pg_version,
            "pg_dump": tool_version([bench.pg_dump, "--version"]), "zstd": tool_version(["zstd", "-V"]),
            "dump_uncompressed_bytes": raw_bytes, "dump_zstd3_bytes": zst_bytes,
            "compression_ratio_zstd3": raw_bytes / zst_bytes,
        }
        print(f"""
bankvault backup benchmark
  machine     {header['cores']} cores ({cpu}), Linux {header['kernel']}
  source      PostgreSQL {pg_version}, fsync on; pg_dump {header['pg_dump']}; zstd {header['zstd']}
  data        pgbench scale {args.scale}, {100_000 * args.scale:,} accounts with random filler;
              database {db_bytes / MB:.0f} MB; uncompressed dump {raw_bytes / MB:.0f} MB,
              {header['compression_ratio_zstd3']:.2f}x smaller with zstd -3
  runs        {args.repeat} per variant, interleaved a,b,c,d,e,a,...; median wall time; MB = 10^6 bytes
  note        bankvault (c, d) includes sha256 while writing, fsync, the globals dump, exact row
              counts, the manifest, verification (re-hash + pg_restore --list), catalog rows and
              audit events; the raw pipelines do none of that, except that pg_dump -Fc -f fsyncs
              its file by default (a, and the custom-format dump in e).
""", flush=True)

        variants = {"a": bench.a_raw_gzip, "b": bench.b_raw_zstd, "c": bench.c_bankvault_zstd,
                    "d": bench.d_bankvault_gzip, "e": bench.e_old_scripts}
        samples: dict[str, list] = {k: [] for k in variants}
        repo_archives = scratch / "repository" / "archives"
        for rep in range(1, args.repeat + 1):
            for key, fn in variants.items():  # round-robin spreads machine noise over all variants
                bench.fresh_out()
                seconds, size, extra = fn()
                samples[key].append({"seconds": round(seconds, 4), "bytes": size, "extra": extra})
                print(f"  run {rep}/{args.repeat}  {key}  {VARIANTS[key]:<34} {seconds:6.2f} s "
                      f"{size / MB:7.1f} MB", flush=True)
                shutil.rmtree(bench.out, ignore_errors=True)
                shutil.rmtree(repo_archives, ignore_errors=True)  # catalog rows stay; harmless here

        rows = summarize(samples)
        print()
        print_table(rows)
        targets = check_targets(rows)
        print("\ntargets")
        for t in targets:
            print(f"  {'PASS' if t['passed'] else 'FAIL'}  {t['target']:<56} {t['measured']}")

        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        path = results / f"backup_bench-{stamp}.json"
        path.write_text(json.dumps({"timestamp": stamp, "header": header, "variants": rows,
                                    "targets": targets}, indent=2) + "\n")
        print(f"\nresults: {path.relative_to(ROOT)}")
        return 1 if args.strict and not all(t["passed"] for t in targets) else 0
    finally:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()  # before the portal cluster goes away under them
        for cluster in reversed(clusters):
            cluster.destroy()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
