"""Secrets at rest: the platform keyring where there is one, else an encrypted file of ours.

Secrets are the KRA `cmcKey` (issued once per device; losing it means going back to KRA), the TSMS
credentials and the till token. `open_secret_store(data_dir, backend)` returns a `SecretStore`:

* ``"keyring"``: the platform keyring through the `keyring` library (Windows Credential Manager,
  the macOS Keychain, the Secret Service on a Linux desktop). Entries live under the service name
  ``etims-agent/<namespace>``, so two agents on one machine never see each other's secrets; the
  namespace defaults to a short hash of the resolved data_dir.
* ``"file"``: `EncryptedFileKeyring`, a keyring backend of ours for headless boxes. Every secret
  sits in one file, ``<data_dir>/secrets.enc``, sealed with AES-256-GCM under a random key kept in
  ``<data_dir>/secrets.key`` (mode 0600, created so it is never readable by others even briefly).
  The file is rewritten atomically (temp file, fsync, rename), so a crash leaves the old or the new
  secrets, never half of them. A damaged or altered file, or the wrong key, is an error that names
  the file and what to do; it never reads as an empty store.
* ``"auto"``: the file if ``secrets.enc`` already exists (secrets never move by themselves), else
  the platform keyring if a real one is available, else the file.

Reading returns `Secret`, whose repr is masked. No secret is logged, printed, or put in an error
message; errors from the keyring library become `StorageError` or `ConfigError` here, at the edge.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets as random
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import keyring
import keyring.errors
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from keyring.backend import KeyringBackend
from keyring.backends import chainer, fail, null
from keyring.compat import properties

from agent.errors import AgentError, ConfigError, StorageError
from agent.files import fsync_dir
from agent.secret import Secret

BACKENDS = ("auto", "keyring", "file")
SERVICE = "etims-agent"  # the keyring service is "etims-agent/<namespace>"; the file needs no namespace
SECRETS_FILE = "secrets.enc"
KEY_FILE = "secrets.key"

FORMAT = "etims-agent-secrets"
VERSION = 1
CIPHER = "AES-256-GCM"
KEY_PREFIX = "v1:"
KEY_HEADER = (
    "# etims-agent secrets key. It unlocks secrets.enc beside it; without it the KRA cmcKey stored there\n"
    "# is lost. Keep a copy offline (not with backups of the data directory) and never share it.\n"
)
PAD_TO = 256  # the sealed size is a multiple of this, so it does not tell how long the secrets are
MAX_FILE_BYTES = 1_048_576
READD_HINT = "store the secrets again (`etims-agent init --cmc-key - --scu-id ...` adopts the device's cmcKey)"

_NAME = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_O_BINARY: int = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_POSIX = os.name == "posix"

_KEYRING_LABELS = {
    "keyring.backends.Windows": "Windows Credential Manager",
    "keyring.backends.macOS": "macOS Keychain",
    "keyring.backends.SecretService": "Secret Service",
    "keyring.backends.libsecret": "Secret Service (libsecret)",
    "keyring.backends.kwallet": "KWallet",
    "keyring.backends.fail": "none (keyring found no backend)",
    "keyring.backends.null": "none (keyring is disabled)",
}


class SecretStore(Protocol):
    """Named secrets; values go in and come out as `Secret`, never as bare strings."""

    def get(self, name: str) -> Secret | None: ...

    def set(self, name: str, value: Secret) -> None: ...

    def delete(self, name: str) -> None:
        """Remove the secret; no error if it is absent."""

    @property
    def description(self) -> str:
        """Where the secrets live, for messages and `doctor`; never contains a secret."""


def open_secret_store(data_dir: Path, backend: str = "auto", *, namespace: str | None = None,
                      platform_keyring: KeyringBackend | None = None) -> SecretStore:
    """The agent's secret store for `data_dir`.

    backend: "auto" (the platform keyring if a real one is available, else the encrypted file),
    "keyring" (the platform keyring; error if none), "file" (our encrypted file in data_dir).
    `namespace` separates agents sharing one platform keyring (default: a hash of the resolved
    data_dir). `platform_keyring` replaces `keyring.get_keyring()`, for tests and embedding.
    """
    if backend not in BACKENDS:
        raise ConfigError("secrets.backend", f"{backend!r} is not a secrets backend", 'use "auto", "keyring" or "file"')
    if backend == "file" or (backend == "auto" and (data_dir / SECRETS_FILE).exists()):
        return file_secret_store(data_dir)
    found: str
    try:
        platform = keyring.get_keyring() if platform_keyring is None else platform_keyring
        found = keyring_label(platform)
    except Exception as exc:  # a broken keyringrc.cfg or PYTHON_KEYRING_BACKEND
        platform, found = None, f"the keyring library could not load its backend: {type(exc).__name__}: {exc}"
    if platform is not None and is_platform_keyring(platform):
        service = service_name(data_dir, namespace)
        return KeyringSecretStore(platform, service, f"keyring: {keyring_label(platform)} (service {service})")
    if backend == "keyring":
        raise ConfigError(
            "secrets.backend",
            f'is "keyring" but this machine has no usable platform keyring (found: {found})',
            'set it to "file" to keep secrets in an encrypted file in data_dir, or to "auto"; '
            "on Linux a Secret Service must be running and unlocked for the agent's user",
        )
    return file_secret_store(data_dir)


def file_secret_store(data_dir: Path) -> KeyringSecretStore:
    """Our encrypted file in `data_dir`, whatever keyring the platform has."""
    backend = EncryptedFileKeyring(data_dir)
    return KeyringSecretStore(backend, SERVICE, f"encrypted file {backend.secrets_path} (key: {backend.key_path})")


def is_platform_keyring(backend: KeyringBackend) -> bool:
    """True if `backend` really keeps secrets: not keyring's fail or null backend, not our own file,
    not a chain with nothing usable in it, and of keyring's "recommended" priority (1 or more).

    The bar is 1, not just above 0, because the backends below 1 (keyrings.alt's plaintext file, for
    one) are the kind that would write secrets in clear; our own file is the better fallback.
    """
    if isinstance(backend, fail.Keyring | null.Keyring | EncryptedFileKeyring):
        return False
    try:
        priority = float(backend.priority)
    except Exception:  # a backend reports "not usable here" by raising from priority
        return False
    if priority < 1:
        return False
    if isinstance(backend, chainer.ChainerBackend):
        try:
            chained: list[KeyringBackend] = list(backend.backends)
        except Exception:
            return False
        return bool(chained) and is_platform_keyring(chained[0])  # the first one is where writes go
    return True


def keyring_label(backend: KeyringBackend) -> str:
    """A human name for a keyring backend, e.g. "Windows Credential Manager"."""
    if isinstance(backend, chainer.ChainerBackend):
        with suppress(Exception):
            return ", ".join(keyring_label(b) for b in backend.backends) + " (chained)"
    label = _KEYRING_LABELS.get(type(backend).__module__)
    return label if label is not None else str(backend.name)


def service_name(data_dir: Path, namespace: str | None = None) -> str:
    """The keyring service for the agent on `data_dir`: "etims-agent/<namespace>"."""
    if namespace is None:
        where = os.path.normcase(str(data_dir.resolve()))
        namespace = hashlib.sha256(where.encode()).hexdigest()[:12]
    elif not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace {namespace!r} is not 1-64 letters, digits, '.', '_' or '-'; choose another")
    return f"{SERVICE}/{namespace}"


class KeyringSecretStore:
    """A SecretStore over any keyring backend (the platform's, or our encrypted file).

    The only place keyring's exceptions are caught: they become our errors, without the secret.
    """

    def __init__(self, backend: KeyringBackend, service: str, description: str) -> None:
        self.backend = backend
        self.service = service
        self._description = description

    @property
    def description(self) -> str:
        return self._description

    def __repr__(self) -> str:
        return f"<KeyringSecretStore {self._description}>"

    def get(self, name: str) -> Secret | None:
        _check_name(name)
        with self._translated("read", name):
            value = self.backend.get_password(self.service, name)
        return None if value is None else Secret(value)

    def set(self, name: str, value: Secret) -> None:
        _check_name(name)
        if not isinstance(value, Secret):
            raise TypeError("secret values must be wrapped in Secret(...), so they can never be printed")
        if not value.reveal():
            raise ValueError(f"the secret {name!r} is empty; use delete() to remove a secret")
        with self._translated("store", name, value):
            self.backend.set_password(self.service, name, value.reveal())

    def delete(self, name: str) -> None:
        if self.get(name) is None:  # absent: backends disagree on whether that is an error; it is not
            return
        with self._translated("delete", name):
            self.backend.delete_password(self.service, name)

    @contextmanager
    def _translated(self, action: str, name: str, value: Secret | None = None) -> Iterator[None]:
        try:
            yield
        except AgentError:
            raise
        except keyring.errors.NoKeyringError:
            raise ConfigError(
                "secrets.backend",
                f"{self._description} is not usable, so the secret {name!r} cannot be {_past(action)}",
                'set secrets.backend = "file" to keep secrets in an encrypted file in data_dir',
            ) from None
        except keyring.errors.KeyringLocked:
            raise StorageError(
                f"{self._description} is locked, so the secret {name!r} cannot be {_past(action)}; unlock it for "
                'the user the agent runs as, or set secrets.backend = "file" to use an encrypted file in data_dir'
            ) from None
        except Exception as exc:  # the keyring backends raise more than keyring.errors (D-Bus, Win32)
            detail = f"{type(exc).__name__}: {exc}"
            if value is not None:
                detail = detail.replace(value.reveal(), "********")
            raise StorageError(
                f"{self._description} could not {action} the secret {name!r} ({detail}); check that the keyring "
                'works for the user the agent runs as, or set secrets.backend = "file" to use an encrypted file'
            ) from None


def _past(action: str) -> str:
    return {"read": "read", "store": "stored", "delete": "deleted"}.get(action, action)


def _check_name(name: str) -> None:
    if not (len(name) <= 64 and _NAME.fullmatch(name)):
        raise ValueError(f"secret name {name!r} is not a dotted lowercase identifier like 'kra.cmc_key'")


class EncryptedFileKeyring(KeyringBackend):
    """A keyring backend of ours: every secret in one AES-256-GCM file, under a key in a 0600 key file.

    It needs a data_dir, so keyring never picks it by itself; `open_secret_store` chooses it.
    Operations read the files each time (no key is kept in memory between calls).
    """

    @properties.classproperty
    def priority(cls) -> float:
        return 0.5  # usable but not a platform keyring; keyring cannot build it without a data_dir

    def __init__(self, data_dir: Path) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # keyring's __init__ has no annotations
        self.data_dir = data_dir
        self.secrets_path = data_dir / SECRETS_FILE
        self.key_path = data_dir / KEY_FILE
        self._lock = threading.Lock()  # one writer at a time here; DataDirLock keeps other processes out

    def get_password(self, service: str, username: str) -> str | None:
        with self._lock:
            return self._read().get(service, {}).get(username)

    def set_password(self, service: str, username: str, password: str) -> None:
        with self._lock:
            entries = self._read()
            entries.setdefault(service, {})[username] = password
            self._write(entries)

    def delete_password(self, service: str, username: str) -> None:
        with self._lock:
            entries = self._read()
            if username not in entries.get(service, {}):
                raise keyring.errors.PasswordDeleteError(f"no secret {username!r} in {self.secrets_path}")
            del entries[service][username]
            if not entries[service]:
                del entries[service]
            self._write(entries)

    # -- the secrets file ------------------------------------------------------------------------

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            with open(self.secrets_path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise _unreadable(self.secrets_path, exc) from None
        header, nonce, sealed = self._envelope(raw)
        key = self._load_key()
        if key is None:
            raise StorageError(
                f"the key file {self.key_path} is missing, so the secrets in {self.secrets_path} cannot be read; "
                f"restore {self.key_path} from your backup (without it those secrets are lost: move "
                f"{self.secrets_path} aside and {READD_HINT}, or ask KRA to reissue the cmcKey)"
            )
        if header["key_id"] != _key_id(key):
            raise StorageError(
                f"the secrets file {self.secrets_path} was sealed with a different key than the one in "
                f"{self.key_path}; put back the key file that belongs to it (from your backup), or move both "
                f"aside and {READD_HINT}"
            )
        try:
            plain = AESGCM(key).decrypt(nonce, sealed, _aad(header))
        except InvalidTag:
            raise StorageError(
                f"the secrets file {self.secrets_path} fails its integrity check: it was changed or damaged "
                f"after the agent wrote it; restore it from a backup made with the same key file, or move it "
                f"aside and {READD_HINT}"
            ) from None
        return self._entries(plain)

    def _envelope(self, raw: bytes) -> tuple[dict[str, Any], bytes, bytes]:
        if len(raw) > MAX_FILE_BYTES:
            raise self._damaged("it is far larger than any secrets file")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise self._damaged("it is not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise self._damaged("it is not an etims-agent secrets file")
        version = doc.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            raise StorageError(
                f"the secrets file {self.secrets_path} was written by a newer etims-agent (format version "
                f"{version}); upgrade this agent to read it"
            )
        if version != VERSION or doc.get("cipher") != CIPHER:
            raise self._damaged(f"unknown version or cipher ({version!r}, {doc.get('cipher')!r})")
        key_id = doc.get("key_id")
        if not (isinstance(key_id, str) and re.fullmatch(r"[0-9a-f]{16}", key_id)):
            raise self._damaged("its key_id is not 16 hex digits")
        try:
            nonce = base64.b64decode(doc.get("nonce", ""), validate=True)
            sealed = base64.b64decode(doc.get("ciphertext", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise self._damaged("its nonce or ciphertext is not base64") from None
        if len(nonce) != 12 or len(sealed) < 16:
            raise self._damaged("its nonce or ciphertext is too short")
        header = {"format": FORMAT, "version": VERSION, "cipher": CIPHER, "key_id": key_id}
        return header, nonce, sealed

    def _entries(self, plain: bytes) -> dict[str, dict[str, str]]:
        try:
            doc = json.loads(plain)
        except (UnicodeDecodeError, ValueError):
            raise self._damaged("its sealed content is not JSON") from None
        entries = doc.get("secrets") if isinstance(doc, dict) else None
        if not (isinstance(entries, dict) and all(
                isinstance(names, dict) and all(isinstance(v, str) for v in names.values())
                for names in entries.values())):
            raise self._damaged("its sealed content is not a table of secrets")
        return entries

    def _damaged(self, why: str) -> StorageError:
        return StorageError(
            f"the secrets file {self.secrets_path} is damaged ({why}); restore it from a backup made with the "
            f"same key file, or move it aside and {READD_HINT}"
        )

    def _write(self, entries: dict[str, dict[str, str]]) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise _unwritable(self.secrets_path, exc) from None
        key = self._load_key()
        if key is None:
            key = self._create_key()
        plain = json.dumps({"secrets": entries}, separators=(",", ":"), sort_keys=True).encode()
        plain += b" " * (-len(plain) % PAD_TO)
        header = {"format": FORMAT, "version": VERSION, "cipher": CIPHER, "key_id": _key_id(key)}
        nonce = os.urandom(12)
        sealed = AESGCM(key).encrypt(nonce, plain, _aad(header))
        doc = dict(header, nonce=base64.b64encode(nonce).decode(), ciphertext=base64.b64encode(sealed).decode())
        try:
            _replace_atomically(self.secrets_path, json.dumps(doc, indent=1).encode() + b"\n")
        except OSError as exc:
            raise _unwritable(self.secrets_path, exc) from None

    # -- the key file ----------------------------------------------------------------------------

    def _load_key(self) -> bytes | None:
        """The key, or None if there is no key file; refuses a key file others can read or change."""
        path = self.key_path
        try:
            fd = os.open(path, os.O_RDONLY | _O_BINARY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unreadable(path, exc) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._bad_key("it is not a regular file")
            if _POSIX and st.st_mode & 0o077:
                raise StorageError(
                    f"the key file {path} can be read or changed by other users (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}` so only the agent's user can use "
                    "it, and consider whether someone copied it"
                )
            raw = os.read(fd, 4097)
        except OSError as exc:
            raise _unreadable(path, exc) from None
        finally:
            os.close(fd)
        try:
            lines = [ln.strip() for ln in raw.decode("ascii").splitlines()]
        except UnicodeDecodeError:
            raise self._bad_key("it is not text") from None
        body = [ln for ln in lines if ln and not ln.startswith("#")]
        if len(body) != 1 or not body[0].startswith(KEY_PREFIX):
            raise self._bad_key(f"expected one line starting {KEY_PREFIX!r}")
        try:
            key = base64.b64decode(body[0][len(KEY_PREFIX):], altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise self._bad_key("the key is not base64") from None
        if len(key) != 32:
            raise self._bad_key("the key is not 256 bits")
        return key

    def _bad_key(self, why: str) -> StorageError:
        return StorageError(f"the key file {self.key_path} is not a valid etims-agent key ({why}); "
                            "restore it from your backup")

    def _create_key(self) -> bytes:
        """A new random key, written to a private temp file and then linked into place, so the key
        file is never visible half-written and a key another process made first is never replaced."""
        key = AESGCM.generate_key(bit_length=256)
        text = (KEY_HEADER + KEY_PREFIX + base64.urlsafe_b64encode(key).decode() + "\n").encode()
        tmp = _temp_name(self.key_path)
        try:
            _write_new(tmp, text)
            try:
                os.link(tmp, self.key_path)
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system: claim the name directly
                with suppress(FileExistsError):
                    _write_new(self.key_path, text)
            fsync_dir(self.data_dir)
        except OSError as exc:
            raise _unwritable(self.key_path, exc) from None
        finally:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        theirs = self._load_key()  # normally ours; another process's if it won the race
        if theirs is None:
            raise _unwritable(self.key_path, FileNotFoundError("it vanished after it was written"))
        return theirs


def _key_id(key: bytes) -> str:
    """Names the key without revealing it, so a wrong key is told apart from a damaged file."""
    return hmac.new(key, b"etims-agent key id", hashlib.sha256).hexdigest()[:16]


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{random.token_hex(4)}.tmp")


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) private to this user from the first byte, write, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o600)
    try:
        _give_to_directory_owner(fd, path.parent)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = _temp_name(path)
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _give_to_directory_owner(fd: int, directory: Path) -> None:
    """Run as root (say `sudo etims-agent init`) in a data_dir that belongs to the service user, hand
    the new file to that user; otherwise the service could not read its own secrets."""
    if _POSIX and os.geteuid() == 0:
        owner = os.stat(directory)
        if owner.st_uid != 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)


def _unreadable(path: Path, exc: OSError) -> StorageError:
    return StorageError(
        f"cannot read {path} ({exc.strerror or exc}); it must belong to the user the agent runs as: fix its "
        "owner (chown) and mode (chmod 600), or run this command as that user"
    )


def _unwritable(path: Path, exc: OSError) -> StorageError:
    return StorageError(
        f"cannot write {path} ({exc.strerror or exc}); check that data_dir is on a writable disk with free "
        "space and belongs to the user the agent runs as"
    )
