"""The technician's outbox, receipt-show and config-show commands, through Typer's runner on real SQLite files.

The `box` fixture stays open beside the commands, as the running agent's outbox would: sales are moved
through their states with the lanes' own store methods, and after a command it must still append to
the journal (its cached chain head is stale by then).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import RULES, FakeClock, make_sale
from typer.testing import CliRunner, Result

from agent.app import receipt_signer
from agent.cli import app
from agent.config import Config, load_config
from agent.intake import accept
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox, SaleRecord
from agent.queue.tsms_store import TsmsStore

runner = CliRunner()

TILL_TOKEN = "till-token-SECRET-0123456789"
TSMS_KEY = "tsms-api-key-SECRET-0123456789"
CMC_KEY = "cmc-key-SECRET-from-the-environment"
SIGNATURE = {"rcptSign": "SIGN" * 4, "intrlData": "DATA" * 4, "curRcptNo": 7, "totRcptNo": 7,
             "sdcDateTime": "20261121140501"}


@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'data_dir = "data"\n[http]\ntill_token = "{TILL_TOKEN}"\n'
                    f'[tsms]\napi_key = "{TSMS_KEY}"\n[secrets]\nbackend = "file"\n')
    return path


@pytest.fixture(name="box")
def _box(config: Path) -> Iterator[Outbox]:
    box = Outbox.open(config.parent / "data" / "outbox.sqlite3")
    yield box
    box.close()


clock = FakeClock()


def cli(config: Path, *args: str, code: int = 0, env: dict[str, str] | None = None) -> Result:
    result = runner.invoke(app, [*args, "--config", str(config)], env=env)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def sale(box: Outbox, sale_id: str, till_id: str = "TILL-1") -> int:
    return accept(box, make_sale(sale_id=sale_id, till_id=till_id), RULES, clock()).record.id


def sent(box: Outbox, ref: int) -> int:
    """The lane gives the sale its invoice number and stores the request (in_flight)."""
    invc_no, _ = KraStore(box).allocate(ref, lambda n: json.dumps({"invcNo": n, "ref": ref}), clock(), items=[])
    return invc_no


def deferred(box: Outbox, ref: int, state: str) -> None:
    """Sent, then no answer that settles it: retry or unknown, due in an hour."""
    sent(box, ref)
    KraStore(box).defer(ref, state, datetime.now(UTC) + timedelta(hours=1), "894: connection refused")


def signed(box: Outbox, ref: int) -> None:
    sent(box, ref)
    KraStore(box).signed(ref, SIGNATURE, clock(), adopted=False)


def rejected_by_head_office(box: Outbox, refs: list[int], uuid: str = "sub-0001") -> None:
    tsms = TsmsStore(box)
    tsms.create_submission(uuid, json.dumps({"sales": refs}), refs, {}, clock())
    tsms.rejected(uuid, 422, "payload_checksum does not match", clock())


def record(box: Outbox, ref: int) -> SaleRecord:
    found = box.by_id(ref)
    assert found is not None
    return found


def entries(box: Outbox, ref: int) -> list[tuple[str, dict[str, Any]]]:
    return [(e.event, json.loads(e.detail)) for e in box.journal() if e.sale_ref == ref]


def column(box: Outbox, ref: int, name: str) -> Any:
    with box._read() as conn:
        return conn.execute(f"SELECT {name} FROM sales WHERE id = ?", (ref,)).fetchone()[0]


def verify_ok(config: Path, box: Outbox) -> None:
    """`verify` passes, and the agent's own outbox (its cached journal head now stale) still appends."""
    cli(config, "verify")
    sale(box, f"AFTER-{len(box.journal())}")
    assert "journal OK" in cli(config, "verify").output


class TestHelp:
    @pytest.mark.parametrize("command", [["outbox", "list"], ["outbox", "show"], ["outbox", "retry"],
                                         ["outbox", "park"], ["outbox", "requeue"], ["receipt", "show"],
                                         ["config", "show"]])
    def test_every_command_has_an_example_and_exit_codes(self, command: list[str]) -> None:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert "Example: etims-agent " + " ".join(command) in result.output
        assert "Exit codes: 0" in result.output


class TestList:
    def test_newest_first_one_line_each(self, config: Path, box: Outbox) -> None:
        """One line per sale, newest first, with the KRA state and invoice number and the error shortened."""
        first, second, third = sale(box, "S0"), sale(box, "S1"), sale(box, "S2")
        signed(box, first)
        sent(box, second)
        KraStore(box).park(second, "910", "item class 99999999 is not known to KRA " * 5, clock(), release=True)
        rejected_by_head_office(box, [third])
        lines = cli(config, "outbox", "list").output.splitlines()
        assert lines[0].split()[:4] == ["id", "till", "sale", "id"]
        assert [line.split()[2] for line in lines[1:]] == ["S2", "S1", "S0"]
        assert "signed #1" in lines[3] and "pending" in lines[3] and "171.00" in lines[3]
        assert "parked" in lines[2] and "910: item class 99999999" in lines[2] and lines[2].endswith("...")
        assert "rejected" in lines[1] and "payload_checksum does not match" in lines[1]
        assert all(len(line) < 200 for line in lines)

    def test_filters_limit_order_and_json(self, config: Path, box: Outbox) -> None:
        refs = [sale(box, f"S{i}") for i in range(4)]
        sale(box, "S0", till_id="TILL-2")
        sent(box, refs[0])
        KraStore(box).park(refs[0], "910", "refused " * 20, clock(), release=True)
        rejected_by_head_office(box, refs[1:3])

        def ids(*args: str) -> list[str]:
            return [f"{s['till_id']}/{s['sale_id']}" for s in json.loads(cli(config, "outbox", "list", "--json",
                                                                               *args).stdout)]

        assert ids() == ["TILL-2/S0", "TILL-1/S3", "TILL-1/S2", "TILL-1/S1", "TILL-1/S0"]
        assert ids("--kra", "parked") == ["TILL-1/S0"]
        assert ids("--tsms", "rejected") == ["TILL-1/S2", "TILL-1/S1"]
        assert ids("--kra", "queued", "--tsms", "rejected", "--oldest-first") == ["TILL-1/S1", "TILL-1/S2"]
        assert ids("--till", "TILL-2") == ["TILL-2/S0"]
        assert ids("--limit", "2", "--oldest-first") == ["TILL-1/S0", "TILL-1/S1"]
        parked = json.loads(cli(config, "outbox", "list", "--json", "--kra", "parked").stdout)[0]
        assert parked["kra_error"] == "910: " + "refused " * 20  # in full
        assert parked["total"] == "171.00" and parked["kind"] == "sale"
        assert json.loads(cli(config, "outbox", "list", "--json", "--tsms", "rejected").stdout)[0]["tsms_error"] \
            == "payload_checksum does not match"
        assert cli(config, "outbox", "list", "--kra", "void").output == "no sales match\n"

    def test_bad_state_exits_2_and_missing_outbox_exits_4(self, config: Path, tmp_path: Path) -> None:
        missing = cli(config, "outbox", "list", code=4)
        assert "no outbox" in missing.output
        assert not (tmp_path / "data" / "outbox.sqlite3").exists()  # never created by a command
        Outbox.open(tmp_path / "data" / "outbox.sqlite3").close()
        bad = cli(config, "outbox", "list", "--kra", "waiting", code=2)
        assert "--kra: 'waiting' is not a KRA lane state" in bad.output and "parked" in bad.output
        assert "--tsms" in cli(config, "outbox", "list", "--tsms", "sent", code=2).output


class TestShow:
    def test_everything_about_one_sale(self, config: Path, box: Outbox) -> None:
        ref = sale(box, "S0")
        deferred(box, ref, "retry")
        rejected_by_head_office(box, [ref], uuid="sub-42")
        box.count_print(ref, "temporary", clock())
        body = json.loads(cli(config, "outbox", "show", "S0", "--json").stdout)
        assert body["till_id"] == "TILL-1" and body["receipt_no"] == 1 and body["total"] == "171.00"
        assert body["sale"]["lines"][0]["name"] == "Bread 400g" and body["amounts"]["tax"] == "16.00"
        kra = body["kra"]
        assert kra["state"] == "retry" and kra["invc_no"] == 1 and kra["attempts"] == 1
        assert kra["request"] == {"invcNo": 1, "ref": ref}
        assert kra["error"] == "894: connection refused" and kra["next_attempt_at"] > "2026"
        assert kra["signature"] is None and kra["sales_ahead"] == 0
        sub = body["tsms"]["submission"]
        assert body["tsms"]["state"] == "rejected"
        assert sub["uuid"] == "sub-42" and sub["state"] == "rejected" and sub["last_status"] == 422
        assert sub["last_error"] == "payload_checksum does not match"
        assert body["receipt_prints"] == [{"kind": "temporary", "prints": 1, "first_at": body["receipt_prints"][0]
                                           ["first_at"]}]
        assert [e["event"] for e in body["journal"]] == ["accepted", "sent", "tsms_rejected"]
        assert body["journal"][2]["detail"]["submission_uuid"] == "sub-42"

        text = cli(config, "outbox", "show", "S0").output
        for expected in ("sale TILL-1/S0", "894: connection refused", '{"invcNo":1,', "sub-42 (rejected",
                         "payload_checksum does not match", "temporary          1 (first", " sent ",
                         " tsms_rejected ", "Bread 400g"):
            assert expected in text

    def test_signed_sale_shows_kras_signature(self, config: Path, box: Outbox) -> None:
        ref = sale(box, "S0")
        signed(box, ref)
        body = json.loads(cli(config, "outbox", "show", "S0", "--json").stdout)
        assert body["kra"]["signature"] == SIGNATURE and body["kra"]["state"] == "signed"
        assert [e["event"] for e in body["journal"]] == ["accepted", "sent", "signed"]
        assert "SIGNSIGN" in cli(config, "outbox", "show", "S0").output

    def test_ambiguous_id_exits_2_naming_the_tills_and_unknown_exits_1(self, config: Path, box: Outbox) -> None:
        sale(box, "S0")
        sale(box, "S0", till_id="TILL-2")
        ambiguous = cli(config, "outbox", "show", "S0", code=2)
        assert "TILL-1, TILL-2" in ambiguous.output and "--till-id" in ambiguous.output
        chosen = json.loads(cli(config, "outbox", "show", "S0", "--till-id", "TILL-2", "--json").stdout)
        assert chosen["till_id"] == "TILL-2"
        assert "no sale 'NOPE'" in cli(config, "outbox", "show", "NOPE", code=1).output
        wrong_till = cli(config, "outbox", "show", "S0", "--till-id", "TILL-9", code=1)
        assert "TILL-1, TILL-2" in wrong_till.output


class TestRetry:
    @pytest.mark.parametrize("state", ["retry", "unknown"])
    def test_kra_sale_becomes_due_now(self, config: Path, box: Outbox, state: str) -> None:
        ref = sale(box, "S0")
        deferred(box, ref, state)
        before = len(box.journal())
        result = cli(config, "outbox", "retry", "S0")
        assert "due now" in result.output and "backoff ceiling of 300 s" in result.output
        work = KraStore(box).next_work()
        assert work is not None and work.id == ref and work.state == state
        assert work.next_attempt_at is not None and work.next_attempt_at <= datetime.now(UTC)
        assert len(box.journal()) == before  # not a fiscal event, as the lane's own deferral

    def test_queued_sale_behind_others_says_so(self, config: Path, box: Outbox) -> None:
        sale(box, "S0")
        sale(box, "S1")
        assert "1 older sale(s) are ahead of it" in cli(config, "outbox", "retry", "S1").output

    def test_rejected_at_head_office_goes_back_to_pending(self, config: Path, box: Outbox) -> None:
        ref = sale(box, "S0")
        signed(box, ref)
        rejected_by_head_office(box, [ref], uuid="sub-1")
        result = cli(config, "outbox", "retry", "S0")
        assert "left the rejected submission sub-1" in result.output and "new submission" in result.output
        assert "(KRA: KRA has signed it: nothing to retry)" in result.output
        assert record(box, ref).tsms_state == "pending" and column(box, ref, "tsms_submission") is None
        assert [u.id for u in TsmsStore(box).unsynced(10)] == [ref]
        event, detail = entries(box, ref)[-1]
        assert event == "requeued"
        assert detail["operator"] is True and detail["lane"] == "tsms" and detail["submission_uuid"] == "sub-1"
        assert detail["command"] == "retry" and detail["error"] == "422: payload_checksum does not match"
        TsmsStore(box).create_submission("sub-2", "{}", [ref], {}, clock())  # it travels again, new uuid
        assert column(box, ref, "tsms_submission") == "sub-2"
        verify_ok(config, box)

    @pytest.mark.parametrize(("setup", "says"), [
        ("signed", "KRA has signed it: nothing to retry"),
        ("in_flight", "in flight: the lane is waiting for KRA's answer"),
        ("parked", "outbox requeue"),
    ])
    def test_refused_when_nothing_waits(self, config: Path, box: Outbox, setup: str, says: str) -> None:
        ref = sale(box, "S0")
        if setup == "signed":
            signed(box, ref)
        elif setup == "in_flight":
            sent(box, ref)
        else:
            sent(box, ref)
            KraStore(box).park(ref, "910", "refused", clock(), release=True)
        state, journal = record(box, ref), len(box.journal())
        result = cli(config, "outbox", "retry", "S0", code=1)
        assert "nothing to retry" in result.output and says in result.output
        assert "TSMS: it waits for the next submission" in result.output and "Nothing was changed" in result.output
        assert record(box, ref) == state and len(box.journal()) == journal

    def test_unknown_sale_exits_1(self, config: Path, box: Outbox) -> None:
        sale(box, "S0")
        assert "no sale 'S9'" in cli(config, "outbox", "retry", "S9", code=1).output


class TestPark:
    def test_queued_sale_is_parked_and_journalled(self, config: Path, box: Outbox) -> None:
        first, second = sale(box, "S0"), sale(box, "S1")
        result = cli(config, "outbox", "park", "S0", "--reason", "duplicate of S1 (till fault)")
        assert "parked TILL-1/S0" in result.output
        parked = record(box, first)
        assert parked.kra_state == "parked" and parked.kra_error == "operator: duplicate of S1 (till fault)"
        assert parked.kra_invc_no is None
        event, detail = entries(box, first)[-1]
        assert event == "parked"
        assert detail == {"code": "operator", "message": "duplicate of S1 (till fault)", "invc_no": None,
                          "released": False, "operator": True}
        work = KraStore(box).next_work()
        assert work is not None and work.id == second  # the lane skips it
        show = json.loads(cli(config, "outbox", "show", "S0", "--json").stdout)
        assert show["kra"]["state"] == "parked" and show["journal"][-1]["event"] == "parked"
        verify_ok(config, box)

    @pytest.mark.parametrize("state", ["in_flight", "retry", "unknown"])
    def test_refused_for_a_sale_kra_may_hold(self, config: Path, box: Outbox, state: str) -> None:
        ref = sale(box, "S0")
        if state == "in_flight":
            sent(box, ref)
        else:
            deferred(box, ref, state)
        before, journal = record(box, ref), len(box.journal())
        result = cli(config, "outbox", "park", "S0", "--reason", "stuck", code=1)
        assert f"is {state} on the KRA lane (invoice 1)" in result.output
        assert "KRA may already hold it" in result.output and "Nothing was changed" in result.output
        assert record(box, ref) == before and len(box.journal()) == journal

    def test_refused_when_signed_or_already_parked(self, config: Path, box: Outbox) -> None:
        signed(box, sale(box, "S0"))
        assert "KRA has signed it" in cli(config, "outbox", "park", "S0", "--reason", "x", code=1).output
        sale(box, "S1")
        cli(config, "outbox", "park", "S1", "--reason", "x")
        assert "already parked" in cli(config, "outbox", "park", "S1", "--reason", "x", code=1).output

    def test_reason_is_required(self, config: Path, box: Outbox) -> None:
        sale(box, "S0")
        cli(config, "outbox", "park", "S0", code=2)
        assert "--reason: is empty" in cli(config, "outbox", "park", "S0", "--reason", "  ", code=2).output
        assert record(box, 1).kra_state == "queued"


class TestRequeue:
    def test_parked_sale_goes_back_to_the_head_of_the_lane(self, config: Path, box: Outbox) -> None:
        first = sale(box, "S0")
        sent(box, first)
        KraStore(box).park(first, "910", "item class unknown", clock(), release=True)
        later = sale(box, "S1")
        work = KraStore(box).next_work()
        assert work is not None and work.id == later
        result = cli(config, "outbox", "requeue", "S0", "--reason", "item class fixed at KRA")
        assert "queued again with no invoice number" in result.output and "before every later sale" in result.output
        back = record(box, first)
        assert (back.kra_state, back.kra_invc_no, back.kra_error) == ("queued", None, None)
        assert column(box, first, "kra_attempts") == 0
        assert box._reader.execute("SELECT count(*) FROM outgoing WHERE sale_ref = ? AND lane = 'kra'",
                                   (first,)).fetchone()[0] == 0  # the old request is gone with its number
        event, detail = entries(box, first)[-1]
        assert event == "requeued"
        assert detail == {"lane": "kra", "from": "parked", "to": "queued", "error": "910: item class unknown",
                          "invc_no": None, "reason": "item class fixed at KRA", "operator": True}
        work = KraStore(box).next_work()
        assert work is not None and work.id == first and work.state == "queued"  # lowest id first
        assert sent(box, first) == 1  # the number the park handed back
        verify_ok(config, box)

    def test_sale_that_kept_its_number_drops_it_with_a_caution(self, config: Path, box: Outbox) -> None:
        ref = sale(box, "S0")
        sent(box, ref)
        KraStore(box).park(ref, "reconcile", "KRA holds invoice 1 for another document", clock(), release=False)
        result = cli(config, "outbox", "requeue", "S0")
        assert "it no longer holds invoice 1" in result.output and "caution:" in result.output
        assert record(box, ref).kra_invc_no is None
        assert entries(box, ref)[-1][1]["invc_no"] == 1
        assert sent(box, ref) == 2  # a new number: 1 is KRA's other document

    def test_rejected_and_parked_both_go_back(self, config: Path, box: Outbox) -> None:
        ref = sale(box, "S0")
        rejected_by_head_office(box, [ref], uuid="sub-7")
        cli(config, "outbox", "park", "S0", "--reason", "hold")
        result = cli(config, "outbox", "requeue", "S0", "--reason", "both fixed")
        assert "KRA: TILL-1/S0 is queued again" in result.output
        assert "TSMS: TILL-1/S0 left the rejected submission sub-7" in result.output
        back = record(box, ref)
        assert (back.kra_state, back.tsms_state) == ("queued", "pending")
        assert [(e, d.get("lane"), d.get("operator")) for e, d in entries(box, ref)[-2:]] == [
            ("requeued", "kra", True), ("requeued", "tsms", True)]
        verify_ok(config, box)

    def test_rejected_only(self, config: Path, box: Outbox) -> None:
        ref = sale(box, "S0")
        signed(box, ref)
        rejected_by_head_office(box, [ref])
        result = cli(config, "outbox", "requeue", "S0")
        assert "(KRA: it is signed, not parked; left as it is)" in result.output
        assert record(box, ref).tsms_state == "pending" and record(box, ref).kra_state == "signed"

    def test_refused_for_anything_else(self, config: Path, box: Outbox) -> None:
        ref = sale(box, "S0")
        journal = len(box.journal())
        result = cli(config, "outbox", "requeue", "S0", code=1)
        assert "nothing to requeue" in result.output and "only a parked sale" in result.output
        assert record(box, ref).kra_state == "queued" and len(box.journal()) == journal

    def test_refused_while_a_later_sale_holds_an_unsettled_number(self, config: Path, box: Outbox) -> None:
        first = sale(box, "S0")
        cli(config, "outbox", "park", "S0", "--reason", "hold")
        deferred(box, sale(box, "S1"), "retry")
        result = cli(config, "outbox", "requeue", "S0", code=1)
        assert "the later sale 'S1'" in result.output and "holds KRA invoice 1 and is retry" in result.output
        assert record(box, first).kra_state == "parked"


class TestReceiptShow:
    def test_temporary_receipt_in_every_format_not_counted(self, config: Path, box: Outbox) -> None:
        signer = receipt_signer(load_config(config))  # the agent's key, made at its first start
        ref = sale(box, "S0")
        text = cli(config, "receipt", "show", "S0", "--width", "32")
        assert "TEMPORARY RECEIPT" in text.stdout and "COPY" not in text.stdout
        assert signer.key_id in text.stdout and "warning" not in text.output
        assert max(len(line) for line in text.stdout.splitlines()) <= 32
        assert "<html" in cli(config, "receipt", "show", "S0", "--format", "html").stdout
        escpos = cli(config, "receipt", "show", "S0", "--format", "escpos").stdout_bytes
        assert escpos.startswith(b"\x1b@") and escpos.endswith(b"\x1dVB\x00")
        view = json.loads(cli(config, "receipt", "show", "S0", "--format", "json").stdout)
        assert view["sale_id"] == "S0" and view["status"] == "pending"
        assert view["receipt"]["kind"] == "temporary" and view["receipt"]["chain"]["key_id"] == signer.key_id
        assert box.prints_of(ref, "temporary") == 0  # showing is not printing
        box.count_print(ref, "temporary", clock())
        assert "*** COPY ***" in cli(config, "receipt", "show", "S0").stdout  # as the till's next print

    def test_signed_receipt(self, config: Path, box: Outbox) -> None:
        ref = sale(box, "S0")
        KraStore(box).save_device(tin="P052112956W", bhf_id="00", serial="SIM-0001", sdc_id="KRACU0100000001",
                                  mrc_no=None, info={"taxprNm": "Wanjiku Stores"}, now=clock())
        signed(box, ref)
        text = cli(config, "receipt", "show", "S0").stdout
        assert "TAX INVOICE" in text and "KRACU0100000001/1" in text and "SIGN-SIGN" in text
        assert box.prints_of(ref, "signed") == 0

    def test_refusals(self, config: Path, box: Outbox) -> None:
        sale(box, "S0")
        assert "--format" in cli(config, "receipt", "show", "S0", "--format", "pdf", code=2).output
        assert "--width" in cli(config, "receipt", "show", "S0", "--width", "40", code=2).output
        cli(config, "receipt", "show", "S9", code=1)
        sale(box, "S0", till_id="TILL-2")
        assert "TILL-1, TILL-2" in cli(config, "receipt", "show", "S0", code=2).output


class TestConfigShow:
    def test_every_section_and_no_secret(self, config: Path) -> None:
        env = {"ETIMS_AGENT_KRA_CMC_KEY": CMC_KEY}
        as_json = cli(config, "config", "show", "--json", env=env)
        body = json.loads(as_json.stdout)
        assert set(body) == {f.name for f in dataclasses.fields(Config)}
        assert body["http"]["till_token"] == "********" and body["tsms"]["api_key"] == "********"
        assert body["kra"]["cmc_key"] == "********"
        assert body["data_dir"] == str(config.parent / "data") and body["http"]["port"] == 8089
        assert body["tax"]["default_rates"]["B"] == "16"
        text = cli(config, "config", "show", env=env)
        assert "http.till_token = ********" in text.stdout and "tsms.api_key = ********" in text.stdout
        assert "kra.backoff_max_s = 300.0" in text.stdout and "printers = (none)" in text.stdout
        assert "warning: http.till_token is in the config file" in text.output
        for output in (as_json.output, text.output):
            for secret in (TILL_TOKEN, TSMS_KEY, CMC_KEY, "SECRET"):
                assert secret not in output

    def test_bad_config_exits_2(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text("[http]\nport = -1\n")
        assert "http.port" in cli(path, "config", "show", code=2).output
