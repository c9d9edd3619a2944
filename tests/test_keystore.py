"""The secret store on real files under tmp_path: round trips, isolation, sealing, damage, keyring choice."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import ClassVar

import keyring.errors
import pytest
from keyring.backend import KeyringBackend
from keyring.backends import chainer, fail, null

from agent.errors import ConfigError, StorageError
from agent.keystore import (
    KEY_FILE,
    SECRETS_FILE,
    EncryptedFileKeyring,
    SecretStore,
    is_platform_keyring,
    open_secret_store,
    service_name,
)
from agent.secret import Secret

CMC = "kra.cmc_key"
CMC_VALUE = "CMC-9f1c2e7a4b5d6e8f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f"
TOKEN = "http.till_token"
TOKEN_VALUE = "till-token-Zq8xW3vR"
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX modes; Windows uses NTFS ACLs")


class DictKeyring(KeyringBackend):
    """A stand-in for a platform keyring: a dict, with the priority of a real backend.

    Its constructor takes an argument so that keyring's own discovery (which builds every backend
    class with no arguments) can never pick it up for other tests.
    """

    priority = 1

    def __init__(self, entries: dict[tuple[str, str], str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.entries = entries

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if (service, username) not in self.entries:
            raise keyring.errors.PasswordDeleteError("Password not found")
        del self.entries[(service, username)]


class FailingKeyring(DictKeyring):
    """A platform keyring whose reads raise the exception it was given and whose writes are refused."""

    def __init__(self, error: Exception) -> None:
        super().__init__({})
        self.error = error

    def get_password(self, service: str, username: str) -> str | None:
        raise self.error

    def set_password(self, service: str, username: str, password: str) -> None:
        raise keyring.errors.PasswordSetError(f"refused to store {password}")


class EmptyChain(chainer.ChainerBackend):
    """keyring's chainer as it is on a box where no backend is usable."""

    backends: ClassVar[list[KeyringBackend]] = []

    def __init__(self, marker: object) -> None:
        super().__init__()  # type: ignore[no-untyped-call]


def file_store(data_dir: Path) -> SecretStore:
    return open_secret_store(data_dir, "file")


def disk_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())


class TestRoundTrip:
    def test_set_get_delete(self, tmp_path: Path) -> None:
        """A secret comes back as a Secret, can be replaced, and is gone after delete."""
        store = file_store(tmp_path)
        assert store.get(CMC) is None
        store.set(CMC, Secret(CMC_VALUE))
        got = store.get(CMC)
        assert isinstance(got, Secret) and got.reveal() == CMC_VALUE
        store.set(CMC, Secret("replaced"))
        assert store.get(CMC) == Secret("replaced")
        store.delete(CMC)
        assert store.get(CMC) is None

    def test_delete_absent_is_not_an_error(self, tmp_path: Path) -> None:
        """Deleting a secret that was never stored, in an empty or a populated store, does nothing."""
        store = file_store(tmp_path)
        store.delete(CMC)
        store.set(TOKEN, Secret(TOKEN_VALUE))
        store.delete(CMC)
        assert store.get(TOKEN) == Secret(TOKEN_VALUE)

    def test_several_secrets_are_independent(self, tmp_path: Path) -> None:
        """Setting or deleting one secret leaves the others as they were."""
        store = file_store(tmp_path)
        store.set(CMC, Secret(CMC_VALUE))
        store.set(TOKEN, Secret(TOKEN_VALUE))
        store.delete(CMC)
        assert store.get(CMC) is None
        assert store.get(TOKEN) == Secret(TOKEN_VALUE)

    def test_reopen_after_restart_keeps_secrets(self, tmp_path: Path) -> None:
        """A new store object on the same data dir (as after a restart) reads what the old one stored."""
        file_store(tmp_path).set(CMC, Secret(CMC_VALUE))
        again = file_store(tmp_path)
        assert again.get(CMC) == Secret(CMC_VALUE)
        assert open_secret_store(tmp_path, "auto", platform_keyring=fail.Keyring()).get(CMC) == Secret(CMC_VALUE)

    def test_two_data_dirs_do_not_share(self, tmp_path: Path) -> None:
        """Stores on different data dirs never see each other's secrets."""
        a, b = file_store(tmp_path / "a"), file_store(tmp_path / "b")
        a.set(CMC, Secret("key-of-a"))
        assert b.get(CMC) is None
        b.set(CMC, Secret("key-of-b"))
        assert a.get(CMC) == Secret("key-of-a")
        assert b.get(CMC) == Secret("key-of-b")

    def test_only_secret_values_are_accepted(self, tmp_path: Path) -> None:
        """A bare string, an empty secret or a malformed name is refused before anything is written."""
        store = file_store(tmp_path)
        with pytest.raises(TypeError, match="Secret"):
            store.set(CMC, CMC_VALUE)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            store.set(CMC, Secret(""))
        for bad in ("", "KRA.cmc", "kra..cmc", "kra/cmc", "x" * 65):
            with pytest.raises(ValueError, match="secret name"):
                store.get(bad)
        assert list(tmp_path.iterdir()) == []


class TestOnDisk:
    def test_nothing_in_clear(self, tmp_path: Path) -> None:
        """Neither the values (raw or base64) nor the names of secrets appear in any file of the data dir."""
        store = file_store(tmp_path)
        store.set(CMC, Secret(CMC_VALUE))
        store.set(TOKEN, Secret(TOKEN_VALUE))
        data = disk_bytes(tmp_path)
        for text in (CMC_VALUE, TOKEN_VALUE, CMC, TOKEN):
            assert text.encode() not in data
            assert base64.b64encode(text.encode())[:-4] not in data

    def test_file_formats(self, tmp_path: Path) -> None:
        """The secrets file is a JSON envelope naming the cipher and key id; the key file is one v1 line."""
        file_store(tmp_path).set(CMC, Secret(CMC_VALUE))
        envelope = json.loads((tmp_path / SECRETS_FILE).read_text())
        assert set(envelope) == {"format", "version", "cipher", "key_id", "nonce", "ciphertext"}
        assert (envelope["format"], envelope["version"], envelope["cipher"]) == ("etims-agent-secrets", 1,
                                                                                 "AES-256-GCM")
        body = [ln for ln in (tmp_path / KEY_FILE).read_text().splitlines() if ln and not ln.startswith("#")]
        assert len(body) == 1 and body[0].startswith("v1:")

    def test_atomic_write_leaves_no_temp_file(self, tmp_path: Path) -> None:
        """After many writes the data dir holds exactly the secrets file and the key file."""
        store = file_store(tmp_path)
        for i in range(20):
            store.set(TOKEN, Secret(f"{TOKEN_VALUE}-{i}"))
        store.delete(TOKEN)
        assert sorted(p.name for p in tmp_path.iterdir()) == [SECRETS_FILE, KEY_FILE]

    @posix_only
    def test_files_are_created_private(self, tmp_path: Path) -> None:
        """The key file and the secrets file are created mode 0600, whatever the umask allows."""
        old = os.umask(0o000)
        try:
            file_store(tmp_path).set(CMC, Secret(CMC_VALUE))
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / SECRETS_FILE).stat().st_mode) == 0o600

    @posix_only
    def test_readable_key_file_is_refused(self, tmp_path: Path) -> None:
        """A key file others can read stops the store, with the chmod 600 fix in the message."""
        store = file_store(tmp_path)
        store.set(CMC, Secret(CMC_VALUE))
        (tmp_path / KEY_FILE).chmod(0o644)
        with pytest.raises(StorageError, match=r"chmod 600") as err:
            store.get(CMC)
        assert str(tmp_path / KEY_FILE) in str(err.value) and "0644" in str(err.value)
        with pytest.raises(StorageError, match=r"chmod 600"):
            store.set(TOKEN, Secret(TOKEN_VALUE))
        (tmp_path / KEY_FILE).chmod(0o600)
        assert store.get(CMC) == Secret(CMC_VALUE)


class TestDamage:
    def test_tampered_file_is_a_clear_error(self, tmp_path: Path) -> None:
        """A flipped byte in the sealed content fails the integrity check, naming the file and the fix."""
        store = file_store(tmp_path)
        store.set(CMC, Secret(CMC_VALUE))
        path = tmp_path / SECRETS_FILE
        envelope = json.loads(path.read_text())
        sealed = bytearray(base64.b64decode(envelope["ciphertext"]))
        sealed[5] ^= 0x01
        envelope["ciphertext"] = base64.b64encode(bytes(sealed)).decode()
        path.write_text(json.dumps(envelope))
        with pytest.raises(StorageError, match="integrity check") as err:
            store.get(CMC)
        assert str(path) in str(err.value) and "restore it from a backup" in str(err.value)
        with pytest.raises(StorageError, match="integrity check"):
            store.set(TOKEN, Secret(TOKEN_VALUE))  # never overwrites the damaged file with an empty store

    @pytest.mark.parametrize("content", [b"", b"\x00\xff garbage", b"[1, 2]", b'{"format": "something else"}',
                                         b'{"format": "etims-agent-secrets", "version": 1, "cipher": "AES-256-GCM"}'])
    def test_garbage_file_is_a_clear_error(self, tmp_path: Path, content: bytes) -> None:
        """A truncated or foreign secrets file is reported as damaged, never read as an empty store."""
        store = file_store(tmp_path)
        store.set(CMC, Secret(CMC_VALUE))
        (tmp_path / SECRETS_FILE).write_bytes(content)
        with pytest.raises(StorageError, match="is damaged") as err:
            store.get(CMC)
        assert str(tmp_path / SECRETS_FILE) in str(err.value)

    def test_newer_format_asks_for_an_upgrade(self, tmp_path: Path) -> None:
        """A secrets file from a newer agent says to upgrade rather than calling itself damaged."""
        store = file_store(tmp_path)
        store.set(CMC, Secret(CMC_VALUE))
        path = tmp_path / SECRETS_FILE
        path.write_text(json.dumps(dict(json.loads(path.read_text()), version=2)))
        with pytest.raises(StorageError, match="newer etims-agent"):
            store.get(CMC)

    def test_wrong_key_is_a_clear_error(self, tmp_path: Path) -> None:
        """Another store's key file in place of ours is reported as the wrong key, naming the key file."""
        ours, other = tmp_path / "ours", tmp_path / "other"
        file_store(ours).set(CMC, Secret(CMC_VALUE))
        file_store(other).set(CMC, Secret("other"))
        (ours / KEY_FILE).write_bytes((other / KEY_FILE).read_bytes())
        with pytest.raises(StorageError, match="different key") as err:
            file_store(ours).get(CMC)
        assert str(ours / KEY_FILE) in str(err.value)

    def test_missing_key_is_a_clear_error(self, tmp_path: Path) -> None:
        """A secrets file without its key file asks for the key from backup; no new key replaces it."""
        store = file_store(tmp_path)
        store.set(CMC, Secret(CMC_VALUE))
        (tmp_path / KEY_FILE).unlink()
        for attempt in (lambda: store.get(CMC), lambda: store.set(TOKEN, Secret(TOKEN_VALUE))):
            with pytest.raises(StorageError, match="is missing") as err:
                attempt()
            assert "backup" in str(err.value)
        assert not (tmp_path / KEY_FILE).exists()

    def test_malformed_key_file_is_a_clear_error(self, tmp_path: Path) -> None:
        """A key file that is not one v1 line of 256 bits is named as invalid."""
        store = file_store(tmp_path)
        store.set(CMC, Secret(CMC_VALUE))
        key = tmp_path / KEY_FILE
        key.write_text("v1:tooshort\n")
        with pytest.raises(StorageError, match="not a valid etims-agent key"):
            store.get(CMC)


class TestChoosingTheBackend:
    def test_detection_of_real_keyrings(self) -> None:
        """Only a backend of recommended priority counts; fail, null, an empty chain and our file do not."""
        assert is_platform_keyring(DictKeyring({}))
        assert not is_platform_keyring(fail.Keyring())
        assert not is_platform_keyring(null.Keyring())
        assert not is_platform_keyring(EmptyChain(None))
        assert not is_platform_keyring(EncryptedFileKeyring(Path("unused")))

    def test_auto_without_a_keyring_uses_the_file(self, tmp_path: Path) -> None:
        """With keyring's fail backend (a headless box), auto stores secrets in the encrypted file."""
        store = open_secret_store(tmp_path, "auto", platform_keyring=fail.Keyring())
        assert store.description.startswith("encrypted file ")
        store.set(CMC, Secret(CMC_VALUE))
        assert (tmp_path / SECRETS_FILE).exists()

    def test_auto_with_a_keyring_uses_it(self, tmp_path: Path) -> None:
        """With a real platform keyring, auto stores there under this data dir's service and writes no file."""
        entries: dict[tuple[str, str], str] = {}
        store = open_secret_store(tmp_path, "auto", platform_keyring=DictKeyring(entries))
        assert store.description.startswith("keyring: ")
        store.set(CMC, Secret(CMC_VALUE))
        assert entries == {(service_name(tmp_path), CMC): CMC_VALUE}
        assert store.get(CMC) == Secret(CMC_VALUE)
        store.delete(CMC)
        store.delete(CMC)
        assert entries == {}
        assert list(tmp_path.iterdir()) == []

    def test_auto_keeps_an_existing_file(self, tmp_path: Path) -> None:
        """Once secrets are in the file, auto keeps using it even if a keyring appears later."""
        open_secret_store(tmp_path, "auto", platform_keyring=fail.Keyring()).set(CMC, Secret(CMC_VALUE))
        later = open_secret_store(tmp_path, "auto", platform_keyring=DictKeyring({}))
        assert later.description.startswith("encrypted file ")
        assert later.get(CMC) == Secret(CMC_VALUE)

    def test_keyring_namespaces_separate_agents(self, tmp_path: Path) -> None:
        """Two data dirs on one platform keyring get different services; an explicit namespace is used as given."""
        shared: dict[tuple[str, str], str] = {}
        a = open_secret_store(tmp_path / "a", "keyring", platform_keyring=DictKeyring(shared))
        b = open_secret_store(tmp_path / "b", "keyring", platform_keyring=DictKeyring(shared))
        a.set(CMC, Secret("key-of-a"))
        assert b.get(CMC) is None
        named = open_secret_store(tmp_path / "a", "keyring", namespace="shop-2", platform_keyring=DictKeyring(shared))
        assert "etims-agent/shop-2" in named.description and named.get(CMC) is None
        assert service_name(tmp_path / "a") == service_name(tmp_path / "a" / ".." / "a")

    def test_keyring_backend_without_a_keyring_is_a_config_error(self, tmp_path: Path) -> None:
        """backend="keyring" with no usable keyring names the setting and suggests the file backend."""
        for platform in (fail.Keyring(), null.Keyring(), EmptyChain(None)):
            with pytest.raises(ConfigError, match=r"secrets\.backend.*no usable platform keyring") as err:
                open_secret_store(tmp_path, "keyring", platform_keyring=platform)
            assert '"file"' in str(err.value)

    def test_unknown_backend_is_a_config_error(self, tmp_path: Path) -> None:
        """A misspelt backend is refused with the list of valid ones."""
        with pytest.raises(ConfigError, match=r"secrets\.backend.*\"auto\", \"keyring\" or \"file\""):
            open_secret_store(tmp_path, "vault")

    def test_keyring_errors_become_ours_without_the_secret(self, tmp_path: Path) -> None:
        """keyring's exceptions become StorageError or ConfigError with advice, and never carry the secret."""
        store = open_secret_store(tmp_path, "keyring", platform_keyring=FailingKeyring(RuntimeError()))
        with pytest.raises(StorageError, match=r"could not store the secret 'kra.cmc_key'") as err:
            store.set(CMC, Secret(CMC_VALUE))
        assert CMC_VALUE not in str(err.value) and "********" in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__
        cases: list[tuple[Exception, type[Exception], str]] = [
            (keyring.errors.KeyringLocked("locked"), StorageError, "is locked"),
            (keyring.errors.NoKeyringError("none"), ConfigError, "secrets.backend"),
            (keyring.errors.InitError("dbus"), StorageError, "could not read"),
            (OSError("win32 error"), StorageError, "could not read"),
        ]
        for raised, expected, message in cases:
            failing = open_secret_store(tmp_path, "keyring", platform_keyring=FailingKeyring(raised))
            with pytest.raises(expected, match=message):
                failing.get(CMC)

    def test_description_never_contains_the_secret(self, tmp_path: Path) -> None:
        """The description names the place (file and key file, or keyring and service) but no secret."""
        stores = [file_store(tmp_path / "f"),
                  open_secret_store(tmp_path / "k", "keyring", platform_keyring=DictKeyring({}))]
        for store in stores:
            store.set(CMC, Secret(CMC_VALUE))
            assert CMC_VALUE not in store.description and CMC_VALUE not in repr(store)
        assert stores[0].description == (f"encrypted file {tmp_path / 'f' / SECRETS_FILE} "
                                         f"(key: {tmp_path / 'f' / KEY_FILE})")
        assert stores[1].description.endswith(f"(service {service_name(tmp_path / 'k')})")
