"""The local repository: where archives live.

Layout under the root:

    archives/<database>/<YYYYMMDD_HHMMSS>_<kind>_r<run>/   one archive: manifest.json + files
    tmp/                                                    staging, same filesystem

An archive is built in tmp/ and renamed into archives/ in one step after every file and the
manifest are written and fsynced, so a directory under archives/ with a manifest.json is
complete by construction; a run that dies leaves only a staging directory, which is removed
by the run's own cleanup or by the next sweep.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .pgtools import BackupError, moved

CHUNK = 1 << 20


class RepositoryError(BackupError):
    pass


class RepositoryFull(RepositoryError):
    pass


class RepositoryNotWritable(RepositoryError):
    pass


def os_error(exc: OSError, path: Path | str, doing: str) -> RepositoryError:
    """Map an OSError while writing to the repository into words an operator can act on."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return RepositoryFull(
            f"the repository disk is full (no space left on device) while {doing}; "
            f"free space under {path} or enlarge the volume, then run the backup again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RepositoryNotWritable(
            f"the repository is not writable by this worker while {doing}: {exc.strerror} "
            f"({path}); fix the directory's owner/permissions or mount")
    return RepositoryError(f"repository I/O error while {doing}: {exc.strerror or exc} ({path})")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range():
    """Linux's sync_file_range(2), which Python's os module does not offer; None elsewhere."""
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _sync_file_range() if sys.platform.startswith("linux") else None
SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_EVERY = 8 << 20


class ReadBack(threading.Thread):
    """Reads a file back through its own descriptor while it is being written, a little behind
    the writer, and hashes what it finds there: verification's re-hash, done beside the write
    instead of after it. Every byte is still read from the file after it was written; what the
    reader finds beyond the writer's length, or short of it, shows as a size mismatch."""

    def __init__(self, path: Path):
        super().__init__(name=f"read-back-{path.name}", daemon=True)
        self._fd = os.open(path, os.O_RDONLY)
        self._h = hashlib.sha256()
        self._read = 0  # hashed so far
        self._ready = 0  # written and flushed so far: safe to read up to here
        self._length: int | None = None  # the writer's final length, once it closed the file
        self._stopping = False
        self._cond = threading.Condition()
        self.error: OSError | None = None
        self.result: tuple[str, int] | None = None
        self.start()

    def advance(self, written: int) -> None:
        with self._cond:
            self._ready = written
            self._cond.notify()

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and self._length is None and self._read >= self._ready:
                        self._cond.wait()
                    if self._stopping:
                        return
                    limit = self._ready if self._length is None else self._length
                    last = self._length is not None
                while self._read < limit:
                    data = os.pread(self._fd, min(CHUNK, limit - self._read), self._read)
                    if not data:  # shorter than written: the size check below says so
                        last = True
                        break
                    self._h.update(data)
                    self._read += len(data)
                if last:
                    self.result = (self._h.hexdigest(), os.fstat(self._fd).st_size)
                    return
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self._fd)

    def finish(self, length: int) -> tuple[str, int]:
        """(sha256 of the first ``length`` bytes read back, the file's size on disk)."""
        with self._cond:
            self._length = length
            self._cond.notify()
        self.join()
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join(timeout=30)


class HashingWriter:
    """A file opened for writing that hashes every byte written and counts them.

    Every WRITEBACK_EVERY bytes it asks the kernel to start writing what came before to disk
    (sync_file_range, without waiting, as PostgreSQL's *_flush_after settings do), so that the
    fsync in close() waits for the last few MiB instead of the whole file.

    With ``read_back``, a ReadBack follows the writer: after close(), ``read_back`` holds the
    sha256 and size of what the file holds, read back from it."""

    def __init__(self, path: Path, read_back: bool = False):
        self.path = path
        self._f = open(path, "xb")  # noqa: SIM115 - closed in close()
        self._h = hashlib.sha256()
        self.bytes = 0
        self._written_back = 0
        self._follower = ReadBack(path) if read_back else None
        self._offered = 0
        self.read_back: tuple[str, int] | None = None

    def write(self, data) -> int:
        self._h.update(data)
        self._f.write(data)
        self.bytes += len(data)
        moved(len(data))
        if self._follower is not None and self.bytes - self._offered >= CHUNK:
            self._f.flush()
            self._follower.advance(self.bytes)
            self._offered = self.bytes
        if _SYNC_FILE_RANGE is not None and self.bytes - self._written_back >= WRITEBACK_EVERY:
            self._f.flush()
            # A hint only: an error here shows again, and is raised, at the fsync in close().
            _SYNC_FILE_RANGE(self._f.fileno(), self._written_back, self.bytes - self._written_back,
                             SYNC_FILE_RANGE_WRITE)
            self._written_back = self.bytes
        return len(data)

    def flush(self):
        self._f.flush()

    def close(self) -> str:
        """fsync and close (then read back the rest); returns the sha256 hex digest."""
        if not self._f.closed:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            except BaseException:
                self.abort()
                raise
            self._f.close()
            if self._follower is not None:
                self.read_back = self._follower.finish(self.bytes)
        return self._h.hexdigest()

    def abort(self) -> None:
        if self._follower is not None:
            self._follower.stop()
        if not self._f.closed:
            with contextlib.suppress(OSError):  # the buffer may not flush (disk full): closing anyway
                self._f.close()

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class LocalRepository:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def archive_dir(self, relpath: str) -> Path:
        path = (self.root / relpath).resolve()
        if not str(path).startswith(str(self.root.resolve()) + os.sep):
            raise RepositoryError(f"archive path {relpath!r} lies outside the repository")
        return path

    def ensure(self) -> None:
        """Create the layout; fail with a clear message when we cannot write."""
        try:
            for sub in ("archives", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            # A unique name: several runs in one process (threads) may probe at once.
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.tmp)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise os_error(exc, self.root, "preparing the repository") from None

    @contextmanager
    def staging(self, run_id: int) -> Iterator[Path]:
        """A scratch directory for one run, removed unless it was committed."""
        self.ensure()
        path = self.tmp / f"run-{run_id}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            path.mkdir()
        except OSError as exc:
            raise os_error(exc, self.tmp, "creating the staging directory") from None
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, staging: Path, relpath: str) -> Path:
        """Move a finished staging directory to its final place in one rename."""
        final = self.archive_dir(relpath)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(staging)
            if final.exists():
                raise RepositoryError(f"archive directory {relpath} already exists; refusing to overwrite")
            os.rename(staging, final)
            fsync_dir(final.parent)
        except OSError as exc:
            raise os_error(exc, final, "moving the archive into place") from None
        return final

    def sweep_staging(self, keep_run_ids: set[int] = frozenset(), older_than: float = 0) -> list[Path]:
        """Remove staging directories of runs that are not alive any more."""
        removed = []
        if not self.tmp.is_dir():
            return removed
        now = time.time()
        for entry in self.tmp.iterdir():
            if not entry.name.startswith("run-"):
                continue
            try:
                run_id = int(entry.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if run_id in keep_run_ids:
                continue
            if older_than and now - entry.stat().st_mtime < older_than:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        return removed

    def disk_usage(self) -> shutil._ntuple_diskusage:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root)


def default_repository() -> LocalRepository:
    from django.conf import settings

    return LocalRepository(settings.BANKVAULT_REPOSITORY)
