"""GnuPG encryption of archives and WAL.

Encrypting (backups, base backups, WAL) needs only public keys, which live in the catalog as
EncryptionKey rows. Each backup writes the keys it encrypts to into a private temporary
directory and hands them to gpg with --recipient-file, so what is encrypted to is exactly what
the catalog says, whatever the worker's own keyring holds. Decrypting (restores, drills, PITR,
read-back verification, the decrypt canary) needs the private key, which only the workers hold:
BANKVAULT_GPG_HOME, with the passphrase from BANKVAULT_GPG_PASSPHRASE(_FILE), fed to gpg through
a pipe (--passphrase-fd with --pinentry-mode loopback), never argv.

Why the gpg binary for the bytes and python-gnupg only for keys: python-gnupg buffers output
unless told otherwise and runs its own reader threads; bankvault needs gpg as one stage of its
own pipeline (pg_dump -> compress -> ENCRYPT -> sha256 -> file, and file -> DECRYPT ->
decompress -> pg_restore / tar), with back-pressure, its own hashing writer, and the status
lines (--status-fd) of every decryption: output counts only when gpg reports DECRYPTION_OKAY
with a good integrity check (GOODMDC, or AEAD) and exits 0. python-gnupg reads keys (the
admin's import, the recipients' pre-flight), where its parsing of gpg's colon listings is
what we want.

Compression happens before encryption, so gpg's own is off (--compress-algo none): after zstd
it costs time and gains nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings

from .pgtools import BackupError, StderrCollector, close_stdin, feed_stdin, kill, spawn, track
from .repository import CHUNK

log = logging.getLogger(__name__)

SUFFIX = ".gpg"
# libgpg-error codes (the low 16 bits of the numbers in "ERROR pkdecrypt_failed N").
_BAD_PASSPHRASE = 11
_NO_SECKEY = 17
_NO_PASSPHRASE = 177


class GpgError(BackupError):
    """Encryption or decryption failed; the message says what to do."""


class RecipientKeyError(GpgError):
    """A recipient key is unknown, unreadable, expired or cannot encrypt: nothing was written."""


class MissingPrivateKey(GpgError):
    """The workers' keyring holds no private key for the archive."""


class WrongPassphrase(GpgError):
    """The private key is there but its passphrase (BANKVAULT_GPG_PASSPHRASE) is wrong or missing."""


class IntegrityError(GpgError):
    """gpg did not confirm the integrity of what it decrypted: the output must not be used."""


# -- configuration ---------------------------------------------------------------------------------
def binary() -> str:
    return settings.BANKVAULT_GPG_BINARY


def resolved_binary() -> str:
    """The absolute path (archive_command runs with the server's PATH, not ours)."""
    return shutil.which(binary()) or binary()


def worker_home() -> Path:
    return Path(settings.BANKVAULT_GPG_HOME)


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GNUPG")}
    env["LC_ALL"] = "C"  # status lines are machine-readable anyway; messages in English for operators
    return env


# -- reading keys ---------------------------------------------------------------------------------
@dataclass
class KeyInfo:
    fingerprint: str
    owner: str
    expires_at: datetime | None  # when it can no longer encrypt (the primary or its last encryption subkey)
    secret: bool
    can_encrypt: bool            # has a usable encryption-capable (sub)key right now
    revoked: bool

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= datetime.now(tz=UTC)


def _epoch(value: str) -> datetime | None:
    return datetime.fromtimestamp(int(value), tz=UTC) if value and value.isdigit() else None


def inspect(armored: str) -> KeyInfo:
    """What an ASCII-armored key block says about itself. Raises GpgError unless it holds
    exactly one key."""
    import gnupg

    text = (armored or "").strip()
    if not text:
        raise GpgError("no key given: paste the ASCII-armored public key "
                       "(-----BEGIN PGP PUBLIC KEY BLOCK----- ...)")
    home = tempfile.mkdtemp(prefix="bv-gpg-scan-")
    try:
        keys = gnupg.GPG(gpgbinary=binary(), gnupghome=home).scan_keys_mem(text)
    except (OSError, ValueError) as exc:
        raise GpgError(f"gpg cannot be run ({binary()}): {exc}") from None
    finally:
        _kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)
    if "PRIVATE KEY BLOCK" in text or any(k.get("type") == "sec" for k in keys):
        raise GpgError("this is a SECRET (private) key: never paste a private key into bankvault. Export the "
                       "public half (gpg --armor --export FINGERPRINT) and paste that; the private key belongs "
                       "only in the workers' keyring (BANKVAULT_GPG_HOME)")
    if not keys:
        raise GpgError("this is not an OpenPGP public key: paste the whole ASCII-armored block, from "
                       "-----BEGIN PGP PUBLIC KEY BLOCK----- to -----END PGP PUBLIC KEY BLOCK-----")
    if len(keys) > 1:
        raise GpgError(f"the text holds {len(keys)} keys; add them one at a time")
    key = keys[0]
    primary_expiry = _epoch(key.get("expires", ""))
    enc_subkeys = [s for s in (key.get("subkey_info") or {}).values() if "e" in (s.get("cap") or "")]
    expiry = primary_expiry
    if enc_subkeys and all(_epoch(s.get("expires", "")) for s in enc_subkeys):
        last = max(_epoch(s["expires"]) for s in enc_subkeys)
        expiry = min(expiry, last) if expiry else last
    # gpg's combined capabilities: an upper-case E means the key has an encryption (sub)key
    # usable now (not expired, not revoked).
    return KeyInfo(fingerprint=key["fingerprint"], owner=(key.get("uids") or [""])[0], expires_at=expiry,
                   secret=False, can_encrypt="E" in (key.get("cap") or ""), revoked=key.get("trust") == "r")


def validate_public_key(armored: str) -> KeyInfo:
    """The admin's check before a key is stored: exactly one public key, not expired or
    revoked, able to encrypt. Raises GpgError with the reason."""
    info = inspect(armored)
    if info.revoked:
        raise GpgError(f"key {info.fingerprint} ({info.owner}) is revoked")
    if info.expired:
        raise GpgError(f"key {info.fingerprint} ({info.owner}) expired on {info.expires_at:%Y-%m-%d}; "
                       "extend it (gpg --quick-set-expire) and export it again")
    if not info.can_encrypt:
        raise GpgError(f"key {info.fingerprint} ({info.owner}) has no encryption-capable (sub)key; bankvault "
                       "can only encrypt to keys that can encrypt (add one with gpg --quick-add-key FPR cv25519 "
                       "encr)")
    return info


# -- the keys of a policy / database -----------------------------------------------------------------
def database_keys(db) -> list:
    """The keys a database's WAL and its manual backups are encrypted to: those of its enabled
    policies (a manual backup is never weaker than the scheduled ones)."""
    from ..models import EncryptionKey

    return list(EncryptionKey.objects.filter(policies__database=db, policies__enabled=True)
                .distinct().order_by("fingerprint"))


def keys_for_run(run) -> list:
    if run.policy_id is not None:
        return list(run.policy.encrypt_to.order_by("fingerprint"))
    return database_keys(run.database)


def keys_by_fingerprint(fingerprints: Iterable[str]) -> list:
    from ..models import EncryptionKey

    wanted = sorted({f.strip().upper() for f in fingerprints if f.strip()})
    found = {k.fingerprint: k for k in EncryptionKey.objects.filter(fingerprint__in=wanted)}
    unknown = [f for f in wanted if f not in found]
    if unknown:
        raise RecipientKeyError(f"unknown recipient key(s) {', '.join(unknown)}: not in bankvault's catalog; "
                                "import the public key in the admin (Backups > Encryption keys) first")
    return [found[f] for f in wanted]


# What gpg says about a key text depends on the text alone (an expiry is compared with the clock
# at every use, from the returned date), so a worker process remembers it; a repeated backup to
# the same keys then skips the scans and the import below. Failures raise and are not remembered.
inspect_cached = functools.lru_cache(maxsize=256)(inspect)


@functools.lru_cache(maxsize=256)
def _check_importable(texts: tuple[str, ...], fingerprints: tuple[str, ...]) -> None:
    """Raise RecipientKeyError unless the key texts import into a keyring of their own (catches
    keys gpg reads but will not use)."""
    import gnupg

    home = tempfile.mkdtemp(prefix="bv-gpg-import-")
    try:
        result = gnupg.GPG(gpgbinary=binary(), gnupghome=home).import_keys("\n".join(texts))
    finally:
        _kill_agent(home)
        shutil.rmtree(home, ignore_errors=True)
    imported = {r.get("fingerprint") for r in result.results if r.get("fingerprint")}
    missing = [f for f in fingerprints if f not in imported]
    if missing:
        raise RecipientKeyError(f"recipient key(s) {', '.join(missing)} do not import into a keyring: "
                                f"{result.stderr.strip()[-300:]}")


class Recipients:
    """The public keys one backup encrypts to, checked before anything is written: each is in
    the catalog, is the key its fingerprint says, has not expired, can encrypt, and imports into
    a scratch keyring; then a test encryption to all of them must succeed. A context manager:
    the key files live in a private temp directory for the backup's duration."""

    def __init__(self, keys: Iterable):
        self.keys = sorted(keys, key=lambda k: k.fingerprint)
        self.dir: Path | None = None
        self.files: list[Path] = []

    @property
    def fingerprints(self) -> list[str]:
        return [k.fingerprint for k in self.keys]

    def describe(self) -> dict:
        return {"tool": "gpg", "recipients": self.fingerprints, "compress_algo": "none",
                "owners": {k.fingerprint: k.owner for k in self.keys}}

    def __enter__(self) -> Recipients:
        self.dir = Path(tempfile.mkdtemp(prefix="bv-recipients-"))
        self.dir.chmod(0o700)
        try:
            self._prepare()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _prepare(self) -> None:

        if not self.keys:
            raise RecipientKeyError("no recipient keys to encrypt to")
        for key in self.keys:
            label = f"recipient key {key.fingerprint} ({key.owner})"
            try:
                info = inspect_cached(key.public_key)
            except GpgError as exc:
                raise RecipientKeyError(f"{label} cannot be read from the catalog: {exc.message}") from None
            if info.fingerprint != key.fingerprint:
                raise RecipientKeyError(f"{label}: the stored public key is a different key ({info.fingerprint}); "
                                        "import the right one in the admin")
            if info.revoked:
                raise RecipientKeyError(f"{label} is revoked; remove it from the policy")
            if info.expired:
                raise RecipientKeyError(f"{label} expired on {info.expires_at:%Y-%m-%d}: nothing was backed up. "
                                        "Extend the key (gpg --quick-set-expire), re-import it in the admin, "
                                        "or remove it from the policy")
            if not info.can_encrypt:
                raise RecipientKeyError(f"{label} has no usable encryption (sub)key")
            path = self.dir / f"{key.fingerprint}.asc"
            path.write_text(key.public_key)
            self.files.append(path)
        # Importable into a keyring of its own ...
        _check_importable(tuple(k.public_key for k in self.keys), tuple(self.fingerprints))
        # ... and a test encryption to all of them: gpg itself says whether it will use them.
        proc = subprocess.run(self.encrypt_argv(), input=b"", capture_output=True, env=_base_env(), timeout=60)
        if proc.returncode != 0:
            raise RecipientKeyError("gpg refuses to encrypt to " + ", ".join(self.fingerprints) + ": "
                                    + _gpg_reason(proc.stderr.decode(errors="replace")))

    def encrypt_argv(self) -> list[str]:
        argv = [binary(), "--batch", "--no-tty", "--no-options", "--homedir", str(self.dir), "--no-keyring",
                "--no-random-seed-file", "--no-permission-warning", "--trust-model", "always",
                "--compress-algo", "none", "--status-fd", "2", "--encrypt"]
        for path in self.files:
            argv += ["--recipient-file", str(path)]
        return argv + ["--output", "-"]

    def encryptor(self, sink, check: StreamCheck | None = None) -> Encryptor:
        return Encryptor(self.encrypt_argv(), sink, check)


def recipients_for(keys: list):
    """A Recipients context for ``keys``, or a no-op context (None) when there are none."""
    return Recipients(keys) if keys else contextlib.nullcontext(None)


def _gpg_reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[GNUPG:]")]
    if any("INV_RECP" in ln or "KEYEXPIRED" in ln for ln in stderr.splitlines()) or \
            any("Unusable public key" in ln for ln in lines):
        return "a recipient key is expired, revoked or unusable (" + "; ".join(lines[-2:]) + ")"
    return "; ".join(lines[-3:]) or "no error output"


def wide_pipes(*files) -> None:
    """Grow the pipes to and from gpg to 1 MiB (Linux; 64 KiB by default) so that gpg and the
    engine's threads trade fewer, larger chunks; silently left as they are where not allowed."""
    for f in files:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)


class Encryptor:
    """A writer (write/close, like the compressors) that pipes everything through gpg --encrypt
    into ``sink``. gpg's output is read on a thread so neither side blocks the other."""

    def __init__(self, argv: list[str], sink, check: StreamCheck | None = None):
        self.sink, self.check = sink, check
        self.error: BaseException | None = None
        self.proc, self.err = spawn(argv, _base_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        wide_pipes(self.proc.stdin, self.proc.stdout)
        self._pump = threading.Thread(target=self._copy_out, name="gpg-out", daemon=True)
        self._pump.start()

    def _copy_out(self) -> None:
        try:
            read, check = self.proc.stdout.read, self.check
            while chunk := read(CHUNK):
                self.sink.write(chunk)
                if check is not None:
                    check.feed(chunk)
        except BaseException as exc:  # the sink failed (disk full): stop gpg so the writer sees it
            self.error = exc
            kill(self.proc)

    def write(self, data) -> int:
        try:
            self.proc.stdin.write(data)
        except (BrokenPipeError, ValueError, OSError):
            self._raise()
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self.proc.stdin.close()
        self._pump.join()
        rc = self.proc.wait()
        if self.error is not None or rc != 0:
            self._raise()

    def _raise(self):
        self._pump.join(timeout=30)
        if self.error is not None:
            raise self.error
        self.proc.wait()
        raise GpgError(f"gpg could not encrypt (exit {self.proc.returncode}): {_gpg_reason(self.err.text())}",
                       self.err.text())

    def abort(self) -> None:
        kill(self.proc)
        self._pump.join(timeout=10)
        if self.check is not None:
            self.check.abort()


# -- the workers' private key ------------------------------------------------------------------------
def _passphrase() -> bytes:
    return (settings.BANKVAULT_GPG_PASSPHRASE or "").encode()


def _check_home() -> Path:
    home = worker_home()
    if not home.is_dir():
        raise MissingPrivateKey(f"the workers' GnuPG keyring {home} (BANKVAULT_GPG_HOME) does not exist, so no "
                                "private key can decrypt this archive; import the private key there "
                                f"(gpg --homedir {home} --import KEYFILE)")
    return home


def secret_fingerprints() -> set[str]:
    """Fingerprints (primary keys and subkeys) of the private keys in the workers' keyring."""
    home = worker_home()
    if not home.is_dir():
        return set()
    proc = subprocess.run([binary(), "--batch", "--no-tty", "--homedir", str(home), "--with-colons",
                           "--list-secret-keys"], capture_output=True, env=_base_env(), timeout=60)
    found = set()
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("fpr:"):
            found.add(line.split(":")[9])
    return found


def can_decrypt(recipients: Iterable[str]) -> bool:
    """Whether the workers hold the private key of at least one recipient (the passphrase is
    not tried: probe() does that)."""
    return bool(set(recipients) & secret_fingerprints())


def flush_passphrase_cache() -> None:
    """Make the next decryption prove the configured passphrase. gpg-agent caches a passphrase
    for minutes; without this, a wrong BANKVAULT_GPG_PASSPHRASE would go unnoticed while an
    earlier right one is cached. Later decryptions of the same operation use the cache again."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["gpg-connect-agent", "--homedir", str(worker_home()), "--no-autostart", "RELOADAGENT",
                        "/bye"], capture_output=True, env=_base_env(), timeout=30)


def _kill_agent(home: str) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True, timeout=30)


def _start_decrypt(source: str, *, stdin, stdout):
    """gpg --decrypt of ``source`` (a path, or "-" for stdin) with the workers' key: the
    passphrase in a pipe (never argv), the status lines collected on a thread.
    Returns (process, stderr collector, status lines, status thread)."""
    home = _check_home()
    pass_r, pass_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        # The passphrase goes into the pipe before gpg starts (it is far below a pipe's buffer).
        os.write(pass_w, _passphrase() + b"\n")
        os.close(pass_w)
        pass_w = -1
        argv = [binary(), "--batch", "--no-tty", "--homedir", str(home), "--pinentry-mode", "loopback",
                "--passphrase-fd", str(pass_r), "--status-fd", str(status_w), "--no-permission-warning",
                "--decrypt", source]
        log.info("running %s", " ".join(argv))  # the passphrase is in a pipe, not here
        proc = subprocess.Popen(argv, env=_base_env(), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                pass_fds=(pass_r, status_w), start_new_session=True)
        track(proc)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        for fd in (pass_r, status_w, pass_w):
            if fd >= 0:
                os.close(fd)
    status: list[str] = []

    def read_status():
        with os.fdopen(status_r, "rb") as f:
            for raw in f:
                line = raw.decode(errors="replace").strip()
                if line.startswith("[GNUPG:] "):
                    status.append(line[9:])

    thread = threading.Thread(target=read_status, name="gpg-status", daemon=True)
    thread.start()
    return proc, StderrCollector(proc.stderr), status, thread


class StreamCheck:
    """Decrypts an encrypted stream as it is written, to nowhere, for gpg's verdict alone.

    A backup feeds it the very bytes it hashes and stores; when gpg confirms the integrity of
    all of them, the stored file (same sha256) is proven to decrypt with the workers' key, as a
    read-back would prove, but while the dump runs instead of after it."""

    def __init__(self, label: str, recipients: Iterable[str]):
        self.label, self.recipients = label, list(recipients)
        self.proc, self.err, self.status, self._status_thread = _start_decrypt(
            "-", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        wide_pipes(self.proc.stdin)

    def feed(self, chunk) -> None:
        feed_stdin(self.proc, chunk)  # gpg may stop early (no key); its verdict says why

    def verdict(self, timeout: float = 600) -> None:
        """Return when gpg decrypted everything fed with a confirmed integrity check; raise the
        GpgError that says why not (MissingPrivateKey, WrongPassphrase, IntegrityError...)."""
        close_stdin(self.proc)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(self.proc)
            raise GpgError(f"gpg did not finish decrypting {self.label} within {timeout:.0f}s") from None
        self._status_thread.join(timeout=30)
        check_status(rc, self.status, self.err.text(), self.label, self.recipients)

    def abort(self) -> None:
        close_stdin(self.proc)
        kill(self.proc)


class DecryptingReader(io.RawIOBase):
    """The plaintext of an encrypted file, streamed out of gpg --decrypt.

    The end of the stream is where gpg's verdict is: at EOF (or finish(), which reads to the
    end first) gpg's exit status and status lines are checked, and anything but a confirmed
    integrity check (DECRYPTION_OKAY with GOODMDC or AEAD) raises — so a consumer that read
    everything learns of tampering before it counts the output as good."""

    def __init__(self, path: Path | str, label: str = "", recipients: Iterable[str] = ()):
        super().__init__()
        self.path = Path(path)
        self.label = label or self.path.name
        self.recipients = list(recipients)
        self.proc = None
        self._done = True  # until gpg runs
        self.proc, self.err, self.status, self._status_thread = _start_decrypt(
            str(self.path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        wide_pipes(self.proc.stdout)
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.proc.stdout.readinto(buffer)
        if not n:
            self._verdict()
        return n

    def finish(self) -> None:
        """Read to the end and require gpg's integrity verdict (a consumer may stop early:
        pg_restore --list reads only the table of contents)."""
        if self._done:
            return
        while self.proc.stdout.read(CHUNK):
            pass
        self._verdict()

    def _verdict(self) -> None:
        if self._done:
            return
        self._done = True
        rc = self.proc.wait()
        self._status_thread.join(timeout=30)
        check_status(rc, self.status, self.err.text(), self.label, self.recipients)

    def close(self) -> None:
        if not self.closed and self.proc is not None:
            if not self._done:
                kill(self.proc)  # stopped early, on purpose or by an error: nothing is vouched for
                self._done = True
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        super().close()


def check_status(rc: int, status: list[str], stderr: str, label: str, recipients: Iterable[str] = ()) -> None:
    """Raise the GpgError that gpg's exit status and status lines call for; return only when
    the decryption is complete and its integrity confirmed."""
    words = [line.split() for line in status if line]
    kinds = {w[0] for w in words}
    aead = any(w[0] == "DECRYPTION_INFO" and len(w) > 2 and w[2] != "0" for w in words)
    if rc == 0 and "DECRYPTION_OKAY" in kinds and ("GOODMDC" in kinds or aead) and \
            not kinds & {"BADMDC", "DECRYPTION_FAILED"}:
        return
    codes = {int(w[2]) & 0xFFFF for w in words if w[0] == "ERROR" and len(w) > 2 and w[2].isdigit()}
    enc_to = {w[1] for w in words if w[0] == "ENC_TO" and len(w) > 1}
    no_seckey = {w[1] for w in words if w[0] == "NO_SECKEY" and len(w) > 1}
    keys = ", ".join(recipients) or ", ".join(sorted(enc_to)) or "unknown keys"
    home = worker_home()
    if _BAD_PASSPHRASE in codes:
        raise WrongPassphrase(f"cannot decrypt {label}: the passphrase of the workers' private key is wrong "
                              "(BANKVAULT_GPG_PASSPHRASE or BANKVAULT_GPG_PASSPHRASE_FILE); nothing was decrypted")
    if _NO_PASSPHRASE in codes:
        raise WrongPassphrase(f"cannot decrypt {label}: the workers' private key needs a passphrase and none is "
                              "configured (set BANKVAULT_GPG_PASSPHRASE or BANKVAULT_GPG_PASSPHRASE_FILE)")
    if enc_to and enc_to <= no_seckey or (_NO_SECKEY in codes and "BEGIN_DECRYPTION" not in kinds):
        raise MissingPrivateKey(f"cannot decrypt {label}: it is encrypted to {keys}, and the workers' keyring "
                                f"({home}, BANKVAULT_GPG_HOME) holds none of their private keys")
    if "BADMDC" in kinds or "BEGIN_DECRYPTION" in kinds or "DECRYPTION_OKAY" in kinds:
        raise IntegrityError(f"{label} failed gpg's integrity check (the encrypted file was altered or cut "
                             "short); what was decrypted from it is discarded", stderr[-2000:])
    if "NODATA" in kinds or not enc_to:
        raise GpgError(f"{label} is not a GnuPG-encrypted file (or it is damaged beyond reading)", stderr[-2000:])
    raise GpgError(f"gpg could not decrypt {label} (exit {rc}): {_gpg_reason(stderr)}", stderr[-2000:])


class ContentReader:
    """An archive file's content: decrypted (when it is encrypted) and decompressed, as one
    readable stream. finish() reads to the end and requires gpg's integrity verdict."""

    def __init__(self, path: Path | str, algo: str, label: str = "", recipients: Iterable[str] = ()):
        self._dec = DecryptingReader(path, label, recipients)
        try:
            if algo == "zstd":
                import zstandard

                self._inner = zstandard.ZstdDecompressor().stream_reader(self._dec, read_across_frames=True,
                                                                         closefd=False)
            elif algo == "gzip":
                import gzip

                self._inner = gzip.GzipFile(fileobj=self._dec, mode="rb")
            elif algo == "none":
                self._inner = self._dec
            else:
                raise ValueError(f"unknown compression {algo!r}")
        except BaseException:
            self._dec.close()
            raise

    def read(self, size: int = -1) -> bytes:
        try:
            return self._inner.read(size)
        except GpgError:
            raise
        except Exception:
            # Garbage out of the decompressor: when gpg's verdict is that the file was altered,
            # that is the reason to report.
            self._dec.finish()
            raise

    def finish(self) -> None:
        self._dec.finish()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._inner is not self._dec:
                self._inner.close()
        self._dec.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_content(path: Path | str, algo: str, encrypted: bool, label: str = "", recipients: Iterable[str] = ()):
    """A readable stream of a file's original content. Unencrypted files read exactly as before."""
    if not encrypted:
        from . import compress

        return compress.open_decompressed(path, algo)
    return ContentReader(path, algo, label, recipients)


def decrypt_file(path: Path | str, label: str = "", recipients: Iterable[str] = ()) -> bytes:
    """The whole plaintext of a (small) encrypted file, integrity-checked. For WAL files."""
    reader = DecryptingReader(path, label, recipients)
    try:
        data = bytearray()
        while chunk := reader.read(CHUNK):
            data += chunk
        reader.finish()
        return bytes(data)
    finally:
        reader.close()


def probe(path: Path | str, label: str = "", recipients: Iterable[str] = (), timeout: float = 120) -> None:
    """Prove, before anything is touched, that the workers can decrypt ``path``: the private
    key is there and the configured passphrase opens it (the agent's cache is flushed first).
    Reads only the start of the file; the full read later checks integrity."""
    flush_passphrase_cache()
    reader = DecryptingReader(path, label, recipients)
    timer = threading.Timer(timeout, kill, args=(reader.proc,))
    timer.daemon = True
    timer.start()
    try:
        # The first byte of plaintext comes only after the session key was decrypted: key and
        # passphrase are proven. A failure ends the output at once and the verdict raises.
        if reader.read(1):
            return
        reader.finish()
    finally:
        timer.cancel()
        reader.close()


# -- WAL: the archive_command's keys ------------------------------------------------------------------
def wal_keys_dir(repo=None) -> Path:
    from .repository import default_repository

    return (repo or default_repository()).root / "bin" / "keys"


def walpush_args(db, repo=None) -> list[str]:
    """Extra arguments of a database's archive_command when its WAL is encrypted, else []."""
    keys = database_keys(db)
    if not keys:
        return []
    return ["--encrypt-to", ",".join(k.fingerprint for k in keys), "--keys", str(wal_keys_dir(repo)),
            "--gpg", resolved_binary()]


def install_wal_keys(keys: list, repo=None) -> Path:
    """Write the public keys the archive_command encrypts to next to the push script, where the
    server's OS user can read them (<repository>/bin/keys/<FPR>.asc, 0644), after the same
    checks a backup makes. Returns the directory."""
    with Recipients(keys):  # validates; raises RecipientKeyError
        pass
    directory = wal_keys_dir(repo)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    for key in keys:
        target = directory / f"{key.fingerprint}.asc"
        tmp = directory / f".{key.fingerprint}.asc.{os.getpid()}"
        tmp.write_text(key.public_key)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    return directory


__all__ = ["GpgError", "RecipientKeyError", "MissingPrivateKey", "WrongPassphrase", "IntegrityError", "Recipients",
           "inspect", "validate_public_key", "open_content", "decrypt_file", "probe", "can_decrypt"]
