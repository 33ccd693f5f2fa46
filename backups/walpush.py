#!/usr/bin/python3 -S
"""bankvault's WAL archive and restore commands, run by PostgreSQL itself.

    archive_command = '/usr/bin/python3 -S .../bankvault-walpush push --area AREA %p %f'
    restore_command = '/usr/bin/python3 -S .../bankvault-walpush fetch --area AREA %f %p'

    encrypted WAL (a policy of the database names recipient keys):
    archive_command = '... push --area AREA --encrypt-to FPR[,FPR] --keys DIR --gpg /usr/bin/gpg %p %f'

PostgreSQL runs these as its own OS user, once per segment, on a busy server: so this file uses
the standard library only (no virtualenv, no Django start-up), imports as little as it can
(start-up is a third of the cost of a push), and `manage.py databases archive-command`
installs a copy where that user can read it.

Storage, under the database's WAL area:

    <area>/<first 16 hex chars>/<segment>-<sha256>[.zst][.gpg]   segments, .partial and .backup files
    <area>/<timeline>.history-<sha256>[.zst][.gpg]               timeline history files

The sha256 is of the original content and is part of the name, so content and checksum appear
together in one atomic link(). A segment that is already archived with the same content is a
success; with different content a failure, and the stored copy is never touched. Writes go to
a temp name, are fsynced, and only then linked into place.

Exit status for `fetch`: 0 restored; 1 not in the archive (the normal end of recovery); 127 the
stored copy is damaged or ambiguous, which makes PostgreSQL abort recovery instead of ending
it early at the damaged segment.

Encryption (`--encrypt-to`): the segment is compressed (zstd) and encrypted (gpg, to the public
keys DIR/<FPR>.asc that `manage.py databases archive-command` installs) on its way to the temp
file; the name's sha256 is still that of the original content. This script never decrypts:
the private key stays with bankvault's workers, whose recovery stages decrypted WAL into the
spool that `fetch --spool` reads; `fetch` refuses an encrypted copy it would have to decrypt.
"""

import hashlib
import os
import sys

CHUNK = 1 << 20
HEX = frozenset("0123456789ABCDEF")
ABORT = 127  # > 125: PostgreSQL treats it like a signal and aborts recovery
STALE_TEMP_SECONDS = 600
ZSTD_ARGS = ["-q", "-c", "-1", "-T2"]  # inline compression: fast, both cores (the archiver waits)


class PushError(Exception):
    pass


# -- names -----------------------------------------------------------------------------------------
def is_segment(name):
    """24 hex digits, optionally followed by .partial or .XXXXXXXX.backup."""
    return len(name) >= 24 and HEX.issuperset(name[:24])


def valid_name(name):
    if "/" in name:
        return False
    if len(name) == 24 or name.endswith(".partial") and len(name) == 32:
        return is_segment(name)
    if name.endswith(".backup") and len(name) == 40:
        return is_segment(name) and HEX.issuperset(name[25:33])
    if name.endswith(".history") and len(name) == 16:
        return HEX.issuperset(name[:8])
    return False


def parse_stored(entry):
    """("<name>", "<sha256>", suffix) for a stored file name, or None. The suffix is "" (the WAL
    file as it is), ".zst", ".gpg" or ".zst.gpg" (encrypted): empty, and so false, exactly when
    the stored bytes are the WAL file itself."""
    base, suffix = entry, ""
    if base.endswith(".gpg"):
        base, suffix = base[:-4], ".gpg"
    if base.endswith(".zst"):
        base, suffix = base[:-4], ".zst" + suffix
    name, _, sha = base.rpartition("-")
    if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha) or not valid_name(name):
        return None
    return name, sha, suffix


def subdir(area, name):
    """Where a WAL file of this name lives."""
    if is_segment(name):
        return os.path.join(area, name[:16])
    return area


def stored(area, name):
    """[(filename, sha256, suffix)] of the stored copies of ``name`` (suffix: see parse_stored)."""
    try:
        entries = os.listdir(subdir(area, name))
    except FileNotFoundError:
        return []
    found = []
    prefix = name + "-"
    for entry in entries:
        if entry.startswith(prefix):
            parsed = parse_stored(entry)
            if parsed and parsed[0] == name:
                found.append((entry, parsed[1], parsed[2]))
    return found


def command_line(python, script, action, area, extra=()):
    """The archive_command (action "push") or restore_command ("fetch") for an area; ``extra``
    options (e.g. --encrypt-to ...) go before the file arguments."""
    import shlex

    args = ["%p", "%f"] if action == "push" else ["%f", "%p"]
    return " ".join([shlex.quote(python), "-S", shlex.quote(str(script)), action, "--area",
                     shlex.quote(str(area)), *(shlex.quote(str(e)) for e in extra), *args])


def install(script_dir):
    """Copy this script to ``script_dir``/bankvault-walpush (readable and runnable by all),
    atomically; return its path."""
    os.makedirs(script_dir, exist_ok=True)
    target = os.path.join(script_dir, "bankvault-walpush")
    with open(__file__, "rb") as f:
        source = f.read()
    try:
        with open(target, "rb") as f:
            if f.read() == source:
                return target
    except FileNotFoundError:
        pass
    tmp = os.path.join(script_dir, f".bankvault-walpush.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(source)
    os.chmod(tmp, 0o755)
    os.rename(tmp, target)
    return target


# -- helpers ---------------------------------------------------------------------------------------
def log(msg):
    sys.stderr.write(f"bankvault-walpush: {msg}\n")
    sys.stderr.flush()


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale_temps(directory):
    import time

    now = time.time()
    try:
        for entry in os.listdir(directory):
            if entry.startswith(".tmp-"):
                path = os.path.join(directory, entry)
                try:
                    if now - os.stat(path).st_mtime > STALE_TEMP_SECONDS:
                        os.unlink(path)
                except OSError:
                    pass
    except OSError:
        pass


def _kernel_copy(source, out_fd):
    """Copy a file into ``out_fd`` inside the kernel (copy_file_range): several times faster
    than through this process's memory; plain read/write where the kernel cannot."""
    src = os.open(source, os.O_RDONLY)
    try:
        done = 0
        try:
            # Until end of file, not up to st_size: the source is not always a plain file.
            while n := os.copy_file_range(src, out_fd, 1 << 30):
                done += n
        except OSError:
            if done:  # a pipe cannot seek, but then the kernel copied nothing
                os.lseek(src, done, os.SEEK_SET)
            while chunk := os.read(src, CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out_fd, view):]
    finally:
        os.close(src)


def _zstd():
    for candidate in ("/usr/bin/zstd", "/usr/local/bin/zstd", "/bin/zstd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _spawn(argv, stdout_fd, stdin_fd=None):
    """Start a tool with stdout on ``stdout_fd`` (posix_spawn: no subprocess import). Our own
    descriptors are close-on-exec (PEP 446); only the dup2 targets are inherited."""
    actions = [(os.POSIX_SPAWN_DUP2, stdout_fd, 1)]
    if stdin_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, stdin_fd, 0))
    return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)


def _wait(pid):
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- encryption -------------------------------------------------------------------------------------
def encryption(fingerprints, keys_dir, gpg=None):
    """Check an --encrypt-to list against the installed key files; returns (gpg, [key files])."""
    fprs = [f.strip().upper() for f in fingerprints.split(",") if f.strip()]
    if not fprs:
        raise PushError("--encrypt-to names no key")
    files = []
    for fpr in fprs:
        if len(fpr) != 40 or not HEX.issuperset(fpr):
            raise PushError(f"--encrypt-to: {fpr!r} is not a key fingerprint (40 hex digits)")
        path = os.path.join(keys_dir, fpr + ".asc")
        if not os.path.isfile(path):
            raise PushError(f"unknown recipient key {fpr}: {path} is missing; run `manage.py databases "
                            "archive-command NAME` on the portal to install the database's keys")
        files.append(path)
    gpg = gpg or next((c for c in ("/usr/bin/gpg", "/usr/local/bin/gpg", "/bin/gpg") if os.access(c, os.X_OK)),
                      None)
    if not gpg or not os.access(gpg, os.X_OK):
        raise PushError(f"gpg is not installed ({gpg or '/usr/bin/gpg'}); cannot encrypt WAL")
    return gpg, files


def _encrypt_into(source, fd, gpg, key_files):
    """zstd | gpg --encrypt into ``fd``, while this process hashes the source: three
    processes, one pass each. Returns the sha256 of the source and the suffix stored."""
    keys_dir = os.path.dirname(key_files[0])
    argv = [gpg, "--batch", "--no-tty", "--no-options", "--homedir", keys_dir, "--no-keyring",
            "--no-random-seed-file", "--no-permission-warning", "--trust-model", "always",
            "--compress-algo", "none", "--quiet", "--encrypt"]
    for path in key_files:
        argv += ["--recipient-file", path]
    argv += ["--output", "-"]
    zstd = _zstd()
    if zstd is None:  # encrypted but not compressed: still never plaintext on disk
        src = os.open(source, os.O_RDONLY)
        try:
            gpid = _spawn(argv, fd, src)
        finally:
            os.close(src)
        try:
            sha = sha256_of(source)
        finally:
            rc = _wait(gpid)
        if rc != 0:
            raise PushError(f"gpg could not encrypt to {', '.join(key_files)} (exit {rc}): a recipient key is "
                            "expired or unusable (gpg's message is above)")
        return sha, ".gpg"
    r, w = os.pipe()
    try:
        zpid = _spawn([zstd, *ZSTD_ARGS, source], w)
        try:
            gpid = _spawn(argv, fd, r)
        except BaseException:
            _wait(zpid)
            raise
    finally:
        os.close(r)
        os.close(w)
    try:
        sha = sha256_of(source)
    finally:
        rc_zstd = _wait(zpid)
        rc_gpg = _wait(gpid)
    if rc_gpg != 0:
        raise PushError(f"gpg could not encrypt to {', '.join(key_files)} (exit {rc_gpg}): a recipient key is "
                        "expired or unusable (gpg's message is above)")
    if rc_zstd != 0:
        raise PushError(f"zstd failed with exit status {rc_zstd}")
    return sha, ".zst.gpg"


# -- push ------------------------------------------------------------------------------------------
def push(area, source, name, compress="zstd", encrypt=None):
    """Archive ``source`` as WAL file ``name``. Returns the stored file name.

    compress: "zstd" stores the segment as it is and compresses it afterwards in a detached
    process (so the archiver, which waits for us, never waits for compression); "inline"
    compresses before returning; "none" never compresses.
    encrypt: (gpg, [public key files]) from encryption(): compressed and encrypted inline (a
    plaintext copy never lands in the area), whatever ``compress`` says."""
    if not valid_name(name):
        raise PushError(f"{name!r} is not a WAL file name")
    directory = subdir(area, name)
    existing = stored(area, name)
    if existing:
        sha = sha256_of(source)
        for entry, stored_sha, _ in existing:
            if stored_sha == sha:
                return entry  # already archived with identical content
        raise PushError(f"{name} is already archived with different content ({existing[0][0]}); "
                        "refusing to overwrite it")
    os.makedirs(directory, exist_ok=True)
    _clean_stale_temps(directory)
    zstd = _zstd() if compress == "inline" else None
    temp = os.path.join(directory, f".tmp-{name}-{os.getpid()}-{os.urandom(4).hex()}")
    # 0644: the portal (catalog, verification) and the server (restore_command) run as
    # different users; access is guarded by the repository's directories.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    suffix = ""
    try:
        if encrypt:
            sha, suffix = _encrypt_into(source, fd, *encrypt)
        elif zstd:
            # zstd reads the segment itself while we hash it: two cores, one pass each.
            pid = _spawn([zstd, *ZSTD_ARGS, source], fd)
            try:
                sha = sha256_of(source)
            finally:
                rc = _wait(pid)
            if rc != 0:
                raise PushError(f"zstd failed with exit status {rc} (disk full?)")
            suffix = ".zst"
        else:
            _kernel_copy(source, fd)
            sha = sha256_of(temp)  # the checksum of what was stored
        os.fsync(fd)
        os.close(fd)
        fd = None
        final = f"{name}-{sha}{suffix}"
        try:
            # link() never replaces: if the name exists, the content (hash) is identical.
            os.link(temp, os.path.join(directory, final))
        except FileExistsError:
            pass
        fsync_dir(directory)
        return final
    finally:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass


# -- compaction --------------------------------------------------------------------------------------
def compact(area, dirs=None):
    """Compress every plain stored WAL file of ``area`` (or of the given subdirectories): the
    .zst copy is written, fsynced and linked before the plain one is removed, and both carry the
    same content sha256, so readers accept either at any moment. One compactor per area."""
    import fcntl

    zstd = _zstd()
    if zstd is None:
        return 0
    lock = os.open(os.path.join(area, ".compact.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another compactor is at it, and will see our file too
        done = 0
        while True:
            todo = []
            for d in dirs if dirs is not None else _all_dirs(area):
                try:
                    entries = os.listdir(d)
                except FileNotFoundError:
                    continue
                todo += [(d, e) for e in entries if not e.startswith(".") and (p := parse_stored(e)) and not p[2]]
            if not todo:
                return done
            for d, entry in sorted(todo):
                _compact_one(zstd, d, entry)
                done += 1
    finally:
        os.close(lock)


def _all_dirs(area):
    dirs = [area]
    try:
        dirs += [os.path.join(area, e) for e in os.listdir(area) if len(e) == 16 and HEX.issuperset(e)]
    except FileNotFoundError:
        pass
    return dirs


def _compact_one(zstd, directory, entry):
    plain = os.path.join(directory, entry)
    target = plain + ".zst"
    temp = os.path.join(directory, f".tmp-{entry}.zst-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        rc = _wait(_spawn([zstd, "-q", "-c", "-3", plain], fd))
        if rc != 0:
            return  # no space, most likely: the plain copy stays, which is just as good
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, target)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)
    fsync_dir(directory)
    os.unlink(plain)  # only now: the compressed copy is durable
    fsync_dir(directory)


def compact_in_background(area, directory):
    """Fork a detached, idle-priority compactor and return at once."""
    try:
        pid = os.fork()
    except OSError:
        return
    if pid:
        os.waitpid(pid, 0)  # the middle process exits at once
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        # Compression is deferrable: run only when a core would otherwise be idle, so the
        # archiver's next pushes (and the database) always come first.
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            os.nice(19)
        compact(area, dirs=[directory])
    except BaseException:
        pass
    os._exit(0)


# -- fetch -----------------------------------------------------------------------------------------
def _copy(src, dest):
    """Copy ``src`` to ``dest`` through a temp name, so ``dest`` is whole or absent."""
    temp = dest + ".bankvault-tmp"
    with open(src, "rb") as s, open(temp, "wb") as d:
        while chunk := s.read(CHUNK):
            d.write(chunk)
    os.rename(temp, dest)


def restore_to(area, name, dest, allow_partial=False, encrypted_rc=ABORT):
    """Copy WAL file ``name`` out of the archive to ``dest``, verifying its sha256.
    Returns 0, 1 (not archived) or ABORT (damaged/ambiguous); ``encrypted_rc`` when the only
    copy is encrypted (this script holds no private key)."""
    copies = stored(area, name)
    if not copies and allow_partial and len(name) == 24 and is_segment(name):
        # Streaming mode: the newest segment may exist only as pg_receivewal's .partial.
        partial = os.path.join(area, ".stream", name + ".partial")
        if os.path.exists(partial):
            _copy(partial, dest)
            return 0
    if not copies:
        return 1
    if len({sha for _, sha, _ in copies}) > 1:
        log(f"{name} is stored more than once with different content: {', '.join(c[0] for c in copies)}")
        return ABORT
    # Plain first (mid-compaction), encrypted last.
    entry, sha, compressed = sorted(copies, key=lambda c: (c[2].endswith(".gpg"), c[2]))[0]
    if compressed.endswith(".gpg"):
        log(f"{entry} is encrypted: only bankvault's recovery, which decrypts in its worker, can restore it")
        return encrypted_rc
    path = os.path.join(subdir(area, name), entry)
    with open(path, "rb"):
        pass  # unreadable (permissions) is an error of its own, not "damaged"
    temp = dest + ".bankvault-tmp"
    try:
        if compressed:
            zstd = _zstd()
            if not zstd:
                log(f"zstd is not installed; cannot decompress {entry}")
                return ABORT
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                rc = _wait(_spawn([zstd, "-q", "-d", "-c", path], fd))
            finally:
                os.close(fd)
            if rc != 0:
                log(f"{entry} cannot be decompressed: the stored file is damaged")
                return ABORT
        else:
            _copy(path, temp)
        got = sha256_of(temp)
        if got != sha:
            log(f"{entry} failed its checksum (expected {sha}, got {got}): the stored file is damaged")
            return ABORT
        os.rename(temp, dest)
        return 0
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass


def fetch_from_spool(spool, name, dest, timeout):
    """A restore that pre-stages verified WAL into ``spool`` (bankvault's PITR engine): wait for
    the stager to produce ``name`` or to say it has nothing more. Returns 0/1, or None to fall
    back to the archive."""
    import time

    deadline = time.monotonic() + timeout
    path = os.path.join(spool, name)
    try:
        with open(os.path.join(spool, ".plan")) as f:
            if name not in f.read().split():
                return None  # not something the stager will bring: ask the archive now
    except FileNotFoundError:
        pass
    while True:
        if os.path.exists(path):
            # The stager verified it; PostgreSQL may ask for a file twice, so copy, not move.
            _copy(path, dest)
            return 0
        if os.path.exists(path + ".missing"):
            return 1
        if os.path.exists(os.path.join(spool, ".done")) or time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def _planned(spool, name):
    try:
        with open(os.path.join(spool, ".plan")) as f:
            return name in f.read().split()
    except FileNotFoundError:
        return False


# -- command line (hand-parsed: argparse alone costs more than a push's hashing) ---------------------
USAGE = """usage: bankvault-walpush push --area AREA [--compress zstd|inline|none]
                              [--encrypt-to FPR[,FPR...] --keys DIR [--gpg PATH]] PATH NAME
       bankvault-walpush fetch --area AREA [--spool DIR] [--spool-timeout SECONDS] [--allow-partial] NAME DEST"""


def _parse(argv):
    opts, args = {}, []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            raise SystemExit(USAGE)
        if arg == "--allow-partial":
            opts["allow_partial"] = True
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                value = next(it, None)
                if value is None:
                    raise ValueError(f"{arg} needs a value")
            opts[key.replace("-", "_")] = value
        else:
            args.append(arg)
    return opts, args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("push", "fetch"):
        log(USAGE)
        return 2
    try:
        opts, args = _parse(argv[1:])
        if "area" not in opts or len(args) != 2:
            raise ValueError("missing arguments")
    except ValueError as exc:
        log(f"{exc}\n{USAGE}")
        return 2

    if argv[0] == "push":
        compress = opts.get("compress", "zstd")
        encrypt = None
        try:
            if "encrypt_to" in opts:
                if "keys" not in opts:
                    raise PushError("--encrypt-to needs --keys DIR")
                encrypt = encryption(opts["encrypt_to"], opts["keys"], opts.get("gpg"))
            stored_as = push(opts["area"], args[0], args[1], compress, encrypt)
        except (PushError, OSError) as exc:
            # Non-zero: PostgreSQL keeps the segment and retries; nothing is lost.
            log(f"cannot archive {args[1]}: {exc}")
            return 1
        if compress == "zstd" and encrypt is None and not stored_as.endswith(".zst"):
            compact_in_background(opts["area"], subdir(opts["area"], args[1]))
        return 0

    name, dest = args
    # Without a spool nothing here can decrypt, so an encrypted copy aborts recovery. With one, a
    # name the stager planned but did not bring (it failed) aborts too; one beyond the plan (WAL
    # archived after recovery started) is "not available": recovery ends where it was planned to.
    encrypted_rc = ABORT
    if opts.get("spool"):
        rc = fetch_from_spool(opts["spool"], name, dest, float(opts.get("spool_timeout", 600)))
        if rc is not None:
            return rc
        if not _planned(opts["spool"], name):
            encrypted_rc = 1
    try:
        return restore_to(opts["area"], name, dest, opts.get("allow_partial", False), encrypted_rc)
    except OSError as exc:
        log(f"cannot restore {name}: {exc}")
        return ABORT


if __name__ == "__main__":
    sys.exit(main())
