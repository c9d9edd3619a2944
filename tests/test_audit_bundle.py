"""`etims-agent export` and `verify --bundle`: audit bundles from real outboxes, checked and tampered with.

Sales are taken with the intake and moved through KRA with the lane's own store methods, on a real SQLite
file that stays open beside the commands as the running agent's would. One test runs both commands as
real processes beside a real agent that is taking sales.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_process import Agents, run_cli
from conftest import RULES, make_sale
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from typer.testing import CliRunner, Result

from agent.app import open_secrets, receipt_signer
from agent.audit_bundle import check, parse_period, select, signing_key
from agent.audit_bundle import write as write_bundle
from agent.cli import app
from agent.config import load_config
from agent.intake import accept
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox
from agent.receipt_signing import KEY_NAME, ReceiptSigner, key_id_of

runner = CliRunner()

SIGNATURE = {"rcptSign": "SIGN" * 4, "intrlData": "DATA" * 4, "curRcptNo": 7, "totRcptNo": 7,
             "sdcDateTime": "20261121140501"}
DAY_1, DAY_2, DAY_3 = (datetime(2026, 11, d, 9, 0, tzinfo=UTC) for d in (20, 21, 22))

Files = dict[str, bytes]


@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('data_dir = "data"\n[secrets]\nbackend = "file"\n')
    return path


@pytest.fixture(name="signer")
def _signer(config: Path) -> ReceiptSigner:
    return receipt_signer(load_config(config))  # the agent's key, as its first start makes it


@pytest.fixture(name="box")
def _box(config: Path, signer: ReceiptSigner) -> Iterator[Outbox]:
    box = Outbox.open(config.parent / "data" / "outbox.sqlite3")
    yield box
    box.close()


def cli(config: Path | None, *args: str, code: int = 0) -> Result:
    result = runner.invoke(app, [*args, *(["--config", str(config)] if config else [])])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def take(box: Outbox, sale_id: str, at: datetime) -> int:
    return accept(box, make_sale(sale_id=sale_id), RULES, at).record.id


def sign(box: Outbox, ref: int, at: datetime) -> int:
    """The lane numbers the sale and KRA signs it."""
    allocated = KraStore(box).allocate(ref, lambda n: json.dumps({"invcNo": n}), at, items=[])
    assert allocated is not None
    KraStore(box).signed(ref, SIGNATURE, at, adopted=False)
    return allocated[0]


@pytest.fixture(name="shop")
def _shop(box: Outbox) -> dict[str, list[int]]:
    """Three days of sales; the first four are signed, the rest wait for KRA (temporary receipts)."""
    KraStore(box).save_device(tin="P052112956W", bhf_id="00", serial="SIM-0001", sdc_id="KRACU0100000001",
                              mrc_no=None, info={"taxprNm": "Wanjiku Stores"}, now=DAY_1)
    days = {"day1": [take(box, "A0", DAY_1), take(box, "A1", DAY_1 + timedelta(hours=8))],
            "day2": [take(box, f"B{i}", DAY_2 + timedelta(hours=i)) for i in range(3)],
            "day3": [take(box, "C0", DAY_3)]}
    for i, ref in enumerate([*days["day1"], *days["day2"][:2]]):
        sign(box, ref, DAY_3 + timedelta(hours=1, minutes=i))
    return days


def export(config: Path, out: Path, start: str = "2026-11-21", end: str = "2026-11-22", *extra: str,
           code: int = 0) -> Result:
    return cli(config, "export", "--from", start, "--to", end, "--out", str(out), *extra, code=code)


def verify(config: Path | None, bundle: Path, *extra: str, code: int = 0) -> Result:
    return cli(config, "verify", "--bundle", str(bundle), *extra, code=code)


def read(bundle: Path) -> Files:
    with zipfile.ZipFile(bundle) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def write(bundle: Path, files: Files) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    bundle.write_bytes(buffer.getvalue())


def tampered(bundle: Path, change: Callable[[Files], None]) -> Path:
    files = read(bundle)
    change(files)
    out = bundle.with_name("tampered.zip")
    write(out, files)
    return out


def resigned(bundle: Path, key: Ed25519PrivateKey, change: Callable[[Files], None],
             manifest_change: Callable[[dict[str, Any]], None] = lambda m: None) -> Path:
    """Change the files, then make the manifest agree with them and sign it with `key`: what someone holding
    a key would do. Only what the bundle cannot hide (the journal, the content hashes, the key) can catch it."""
    files = read(bundle)
    change(files)
    manifest = json.loads(files["manifest.json"])
    manifest["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()
                         if n not in ("manifest.json", "manifest.sig")}
    manifest["counts"] = {"sales": len(files["sales.jsonl"].splitlines()),
                          "receipts": sum(n.startswith("receipts/") for n in files),
                          "journal_entries": len(files["journal.jsonl"].splitlines())}
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    manifest["key"] = {"algorithm": "Ed25519", "key_id": key_id_of(public),
                       "public_key": base64.b64encode(public).decode()}
    manifest_change(manifest)
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    files["manifest.sig"] = base64.b64encode(key.sign(files["manifest.json"]))
    out = bundle.with_name("resigned.zip")
    write(out, files)
    return out


def problems(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("PROBLEM ")]


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def agent_key(config: Path) -> Ed25519PrivateKey:
    stored = open_secrets(load_config(config)).get(KEY_NAME)
    assert stored is not None
    return signing_key(stored)


class TestExport:
    def test_bundle_holds_the_periods_sales_receipts_and_journal_signed_by_the_agent(
            self, config: Path, box: Outbox, signer: ReceiptSigner, shop: dict[str, list[int]]) -> None:
        out = config.parent / "audit.zip"
        summary = json.loads(export(config, out, "2026-11-21", "2026-11-22", "--json").stdout)
        assert summary["sales"] == 3 and summary["key_id"] == signer.key_id
        assert summary["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        files = read(out)
        day2 = shop["day2"]
        assert list(files) == ["sales.jsonl", "journal.jsonl", *[f"receipts/{r}.txt" for r in day2],
                               "manifest.json", "manifest.sig"]
        sales = jsonl(files["sales.jsonl"])
        assert [s["id"] for s in sales] == day2
        assert [s["kra"]["state"] for s in sales] == ["signed", "signed", "queued"]
        assert [s["kra"]["invc_no"] for s in sales] == [3, 4, None]
        assert sales[0]["kra"]["signature"] == SIGNATURE and sales[0]["total"] == "171.00"
        assert sales[2]["tsms"] == {"state": "pending", "synced_at": None}
        receipts = [files[f"receipts/{r}.txt"].decode() for r in day2]
        assert "TAX INVOICE" in receipts[0] and "KRACU0100000001/3" in receipts[0]
        assert "TEMPORARY RECEIPT" in receipts[2] and signer.key_id in receipts[2]
        assert all(len(line) <= 42 for text in receipts for line in text.splitlines())

        # The journal run covers the day's entries, anchored on the entry just before it.
        everything = box.journal()
        journal = jsonl(files["journal.jsonl"])
        in_day = [e for e in everything if "2026-11-21" <= e.at < "2026-11-22"]
        assert [e["seq"] for e in journal] == [e.seq for e in in_day]
        manifest = json.loads(files["manifest.json"])
        before = everything[in_day[0].seq - 2]
        assert manifest["journal"]["anchor"] == {"seq": before.seq, "hash": before.hash}
        assert manifest["counts"] == {"sales": 3, "receipts": 3, "journal_entries": len(in_day)}
        assert manifest["period"] == {"from": "2026-11-21T00:00:00+00:00", "to": "2026-11-22T00:00:00+00:00"}
        assert manifest["files"]["sales.jsonl"] == hashlib.sha256(files["sales.jsonl"]).hexdigest()
        # Anyone can check the signature with the public key alone (as /v1/status shows it).
        assert manifest["key"] == {"algorithm": "Ed25519", "key_id": signer.key_id, "public_key": signer.public_key}
        Ed25519PublicKey.from_public_bytes(signer.public_raw).verify(base64.b64decode(files["manifest.sig"]),
                                                                     files["manifest.json"])
        # Nothing from the secret store goes into a bundle.
        private = signer.to_secret().reveal()
        assert not any(private.encode() in data for data in files.values())

    def test_verify_passes_and_names_the_key(self, config: Path, signer: ReceiptSigner,
                                             shop: dict[str, list[int]]) -> None:
        out = config.parent / "audit.zip"
        text = export(config, out).output
        assert "exported 3 sales" in text and signer.key_id in text
        result = verify(config, out)
        assert "bundle OK" in result.output and problems(result) == []
        assert f"key id {signer.key_id}" in result.output and "this agent signed it (same key)" in result.output
        body = json.loads(verify(config, out, "--json").stdout)
        assert body["ok"] is True and body["signature_valid"] is True and body["local_key_matches"] is True
        assert body["counts"]["sales"] == 3 and body["key_id"] == signer.key_id
        # An auditor's machine has no agent: the key id is shown to compare with /v1/status, or given.
        auditor = config.parent / "auditor.toml"
        auditor.write_text('data_dir = "no-agent-here"\n')
        alone = verify(auditor, out, "--expect-key", signer.public_key)
        assert "its key is not available here" in alone.output and "bundle OK" in alone.output
        assert not (config.parent / "no-agent-here").exists()

    def test_period_filter(self, config: Path, shop: dict[str, list[int]]) -> None:
        """[from, to) by the time each sale was accepted; dates are midnight UTC, times may name an offset."""
        def ids(start: str, end: str) -> list[int]:
            out = config.parent / f"p-{len(list(config.parent.glob('p-*')))}.zip"
            export(config, out, start, end)
            verify(config, out)
            return [s["id"] for s in jsonl(read(out)["sales.jsonl"])]

        assert ids("2026-11-20", "2026-11-23") == [*shop["day1"], *shop["day2"], *shop["day3"]]
        assert ids("2026-11-20", "2026-11-21") == shop["day1"]
        # B1 was accepted at 10:00 UTC exactly: in a period from then, not in one up to then.
        assert ids("2026-11-21T10:00:00Z", "2026-11-22") == shop["day2"][1:]
        assert ids("2026-11-21T00:00:00", "2026-11-21T13:00:00+03:00") == shop["day2"][:1]
        assert ids("2026-11-25", "2026-11-26") == []

    def test_refuses_to_overwrite_unless_forced(self, config: Path, shop: dict[str, list[int]]) -> None:
        out = config.parent / "audit.zip"
        out.write_bytes(b"an auditor's earlier bundle")
        result = export(config, out, code=2)
        assert "--out" in result.output and "already exists" in result.output and "--force" in result.output
        assert out.read_bytes() == b"an auditor's earlier bundle"
        export(config, out, "2026-11-21", "2026-11-22", "--force")
        verify(config, out)
        assert sorted(p.name for p in config.parent.iterdir() if "audit" in p.name) == ["audit.zip"]  # no temp file

    def test_refusals_name_the_problem_and_the_fix(self, config: Path, tmp_path: Path,
                                                   shop: dict[str, list[int]]) -> None:
        out = config.parent / "audit.zip"
        bad = export(config, out, "2026-13-01", "2026-11-22", code=2).output
        assert "--from: 2026-13-01 is not a date; expected YYYY-MM-DD" in bad
        assert "--to" in export(config, out, "2026-11-22", "2026-11-21", code=2).output
        assert "does not exist" in export(config, tmp_path / "nowhere" / "a.zip", code=2).output
        fresh = tmp_path / "fresh" / "agent.toml"  # never started: no outbox, no key
        fresh.parent.mkdir()
        fresh.write_text('data_dir = "data"\n[secrets]\nbackend = "file"\n')
        assert "start it once" in export(fresh, out, code=2).output
        assert not out.exists()
        assert "does not exist" in verify(config, tmp_path / "missing.zip", code=2).output
        assert "only applies to a bundle" in cli(config, "verify", "--expect-key", "abc", code=2).output

    def test_same_outbox_period_and_time_give_the_same_bytes(self, config: Path, box: Outbox,
                                                             shop: dict[str, list[int]]) -> None:
        selection = select(box, parse_period("2026-11-20", "2026-11-23"))
        made = [write_bundle(config.parent / f"{n}.zip", selection, receipt_text=lambda s: f"receipt {s.sale_id}\n",
                             key=agent_key(config), created_at=DAY_3, agent_version="test", issuer={})
                for n in ("one", "two")]
        assert made[0].sha256 == made[1].sha256 and made[0].sales == 6
        assert check(made[0].path).ok

    @pytest.mark.parametrize("command", ["export", "verify"])
    def test_help_has_an_example_and_exit_codes(self, command: str) -> None:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert f"Example: etims-agent {command}" in result.output and "Exit codes: 0" in result.output


def _flip_a_byte(files: Files) -> None:
    data = bytearray(files["sales.jsonl"])
    at = data.index(b'"total":"171.00"') + len(b'"total":"')
    data[at] = ord("9")
    files["sales.jsonl"] = bytes(data)


def _drop_journal_line(files: Files) -> None:
    lines = files["journal.jsonl"].splitlines(keepends=True)
    files["journal.jsonl"] = b"".join(lines[:1] + lines[2:])


def _swap_journal_lines(files: Files) -> None:
    lines = files["journal.jsonl"].splitlines(keepends=True)
    files["journal.jsonl"] = b"".join([lines[1], lines[0], *lines[2:]])


def _edit_manifest(files: Files) -> None:
    files["manifest.json"] = files["manifest.json"].replace(b'"2026-11-23T00:00:00+00:00"',
                                                            b'"2026-11-24T00:00:00+00:00"')


def _sign_with_another_key(files: Files) -> None:
    files["manifest.sig"] = base64.b64encode(Ed25519PrivateKey.generate().sign(files["manifest.json"]))


class TestTampering:
    @pytest.fixture(name="bundle")
    def _bundle(self, config: Path, shop: dict[str, list[int]]) -> Path:
        out = config.parent / "audit.zip"
        export(config, out, "2026-11-20", "2026-11-23")
        return out

    @pytest.mark.parametrize(("change", "found"), [
        (_flip_a_byte, "sales.jsonl does not match its SHA-256 in the manifest"),
        (lambda files: files.pop("receipts/2.txt"), "receipts/2.txt is listed in the manifest but missing"),
        (_drop_journal_line, "expected entry 2 here; entries are missing or reordered"),
        (_swap_journal_lines, "does not follow the entry before it"),
        (_edit_manifest, "manifest.sig is not a valid signature of manifest.json"),
        (_sign_with_another_key, "manifest.sig is not a valid signature of manifest.json"),
        (lambda files: files.update({"receipts/99.txt": b"a receipt typed up elsewhere"}),
         "receipts/99.txt is in the bundle but not in the manifest"),
    ], ids=["byte-in-sales", "receipt-removed", "journal-line-removed", "journal-reordered", "manifest-edited",
            "signature-from-another-key", "receipt-added"])
    def test_fails_verify(self, config: Path, bundle: Path, change: Callable[[Files], None], found: str) -> None:
        verify(config, bundle)
        result = verify(config, tampered(bundle, change), code=1)
        assert any(found in line for line in problems(result)), result.output
        assert "bundle verification FAILED" in result.output
        body = json.loads(verify(config, tampered(bundle, change), "--json", code=1).stdout)
        assert body["ok"] is False and any(found in p for p in body["problems"])

    def test_damaged_or_incomplete_files_are_findings_not_crashes(self, config: Path, bundle: Path,
                                                                  tmp_path: Path) -> None:
        junk = tmp_path / "junk.zip"
        junk.write_bytes(b"not a zip at all")
        assert "not a readable zip file" in verify(config, junk, code=1).output
        raw = bytearray(bundle.read_bytes())
        with zipfile.ZipFile(bundle) as zf:  # a byte inside the compressed journal, as a bad disk would
            info = zf.getinfo("journal.jsonl")
        raw[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
        damaged = tmp_path / "damaged.zip"
        damaged.write_bytes(bytes(raw))
        assert any("journal.jsonl" in p for p in problems(verify(config, damaged, code=1)))
        no_manifest = tampered(bundle, lambda files: files.pop("manifest.json"))
        assert "manifest.json is missing or unreadable" in verify(config, no_manifest, code=1).output

    def test_bundle_remade_under_another_key_is_not_this_agents(self, config: Path, bundle: Path,
                                                                 signer: ReceiptSigner) -> None:
        """Consistent in itself, so only the key gives it away: this agent's, or the one the auditor expects."""
        forged = resigned(bundle, Ed25519PrivateKey.generate(), lambda files: None)
        result = verify(config, forged, code=1)
        forger = json.loads(read(forged)["manifest.json"])["key"]["key_id"]
        assert problems(result) == [f"PROBLEM the bundle is signed by key {forger}, not by this agent's key "
                                    f"{signer.key_id}"]
        auditor = config.parent / "auditor.toml"
        auditor.write_text('data_dir = "no-agent-here"\n')
        verify(auditor, forged)  # no key to compare with, none expected: the key id is all it has
        assert "not by the expected key" in verify(auditor, forged, "--expect-key", signer.key_id, code=1).output

    def test_edited_sale_is_caught_by_its_journalled_hash_even_when_resigned(self, config: Path,
                                                                             bundle: Path) -> None:
        def cheaper(files: Files) -> None:
            sales = jsonl(files["sales.jsonl"])
            sales[1]["sale"]["lines"][0]["unit_price"] = "18.00"
            files["sales.jsonl"] = b"".join(json.dumps(s).encode() + b"\n" for s in sales)

        result = verify(config, resigned(bundle, agent_key(config), cheaper), code=1)
        assert [p for p in problems(result) if "does not match its content hash" in p]

    def test_sale_left_out_is_caught_by_its_journal_entry(self, config: Path, bundle: Path) -> None:
        def without_second(files: Files) -> None:
            lines = files["sales.jsonl"].splitlines(keepends=True)
            files["sales.jsonl"] = b"".join(lines[:1] + lines[2:])
            files.pop("receipts/2.txt")

        result = verify(config, resigned(bundle, agent_key(config), without_second), code=1)
        assert problems(result) == [  # entry 1 is the device's initialisation
            "PROBLEM journal entry 3 records sale 2 accepted in the period, but sales.jsonl does not hold it",
            "PROBLEM KRA invoice numbers with no sale in the bundle: 2 (1); compare with KRA (selectInvoiceDetails)"]


class TestInvoiceNumbers:
    def test_numbers_held_outside_the_period_are_no_gap_but_a_missing_one_is(self, config: Path,
                                                                             box: Outbox) -> None:
        refs = [take(box, f"B{i}", DAY_2 + timedelta(hours=i)) for i in range(3)]
        later = take(box, "C0", DAY_3)
        for ref in (refs[0], later, refs[1], refs[2]):  # the day-3 sale took number 2 (a requeue, say)
            sign(box, ref, DAY_3 + timedelta(hours=1))
        out = config.parent / "audit.zip"
        export(config, out)
        manifest = json.loads(read(out)["manifest.json"])
        assert manifest["invoice_numbers"] == {"first": 1, "last": 4, "held_outside_period": [2],
                                               "renumbered": []}
        verify(config, out)

        def forget(manifest: dict[str, Any]) -> None:
            manifest["invoice_numbers"]["held_outside_period"] = []

        result = verify(config, resigned(out, agent_key(config), lambda files: None, forget), code=1)
        assert problems(result) == ["PROBLEM KRA invoice numbers with no sale in the bundle: 2 (1); compare "
                                    "with KRA (selectInvoiceDetails)"]


def test_export_and_verify_as_processes_beside_a_running_agent(tmp_path: Path) -> None:
    """The agent keeps taking sales while `export` reads its outbox; the bundle it writes verifies."""
    with Agents(tmp_path) as agents:
        agent = agents.start()
        stop = threading.Event()
        taken: list[str] = []
        refused: list[str] = []

        def till() -> None:
            with httpx.Client(base_url=agent.url, timeout=10.0) as http:
                while not stop.is_set():
                    sale_id = f"R-{len(taken):04d}"
                    response = http.post("/v1/sales", json=make_sale(sale_id=sale_id))
                    if response.status_code != 201:
                        refused.append(response.text)
                        return
                    taken.append(sale_id)

        poster = threading.Thread(target=till, daemon=True)
        poster.start()
        try:
            deadline = time.monotonic() + 30
            while len(taken) < 5 and not refused and time.monotonic() < deadline:
                stop.wait(0.05)
            assert len(taken) >= 5, refused
            today = datetime.now(UTC).date()
            out = tmp_path / "audit.zip"
            before = len(taken)
            exported = run_cli("export", "--from", str(today - timedelta(days=1)),
                               "--to", str(today + timedelta(days=1)), "--out", str(out),
                               "--config", str(agents.config), "--json")
            after = len(taken)
        finally:
            stop.set()
            poster.join(timeout=30)
        assert exported.returncode == 0, exported.stderr
        assert not refused and after > before  # the till was served all along
        summary = json.loads(exported.stdout)
        assert before <= summary["sales"] <= after
        checked = run_cli("verify", "--bundle", str(out), "--config", str(agents.config), "--json")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        body = json.loads(checked.stdout)
        assert body["ok"] and body["local_key_matches"] is True and body["key_id"] == summary["key_id"]
        assert agent.running
        status = httpx.get(f"{agent.url}/v1/status", timeout=10.0).json()
        assert status["agent"]["receipt_key"]["key_id"] == summary["key_id"]
