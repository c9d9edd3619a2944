"""Hypothesis on everything that reads input from outside: the till's sale and credit note, the serial
bytes and messages, KRA's and head office's answers (malformed JSON, missing fields, wrong types,
huge values), the till token and the bind address.

Each reader either gives a usable value or refuses with the agent's own error naming what is wrong
(InvalidSale with a field, KraError with a way out, ConfigError); answers from upstream are
classified, never raised. Plain regression tests for the bugs these properties found are at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RULES, FakeClock, api_client, make_sale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from agent.api import create_app
from agent.app import check_exposure
from agent.config import HttpSettings, SerialPortSettings, parse_config
from agent.credit_notes import Original, prepare_credit_note
from agent.desk import ApiContext, SaleDesk
from agent.devices.framing import ACK, ETX, LF, NAK, STX, BadFrame, Decoder, Garbage, Message, TooLong, reply_bytes
from agent.devices.serial_intake import PortReader, answer_bytes
from agent.errors import ConfigError, InvalidSale, KraError
from agent.intake import accept, prepare
from agent.jsonwire import wire_json
from agent.kra.client import KraClient, KraReply, parse_reply
from agent.kra.code_lists import merge_codes, merge_item_classes, refund_reasons, tax_rates
from agent.kra.codes import SUCCESS_CODES, Outcome, describe, expected_invoice_number
from agent.kra.device import Initialised, initialise
from agent.kra.lane import SIGNATURE_FIELDS, KraLane, _first_sale, signature_from
from agent.kra.payloads import Seller, parse_kra_datetime, sale_request
from agent.queue.kra_store import KraStore
from agent.queue.outbox import NewSale, Outbox
from agent.queue.tsms_store import TsmsStore
from agent.sales import DEFAULT_TAX_RATES, TAX_BANDS, canonical_json
from agent.secret import Secret
from agent.sync import client as tsms
from agent.sync.lane import SyncSettings, TsmsLane, _describe, head_office_builder
from agent.sync.transaction import Terminal, tsms_transaction

EXAMPLES = 100
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- JSON as the agent decodes it (json.loads with parse_float=Decimal) ------------------------

# Text that trips number, time and string readers: number-like, huge, control characters, non-ASCII digits.
_NASTY_TEXT = st.sampled_from([
    "", " ", "0", "-0", "1e999999999", "-1E-999999999", "1e30", "NaN", "sNaN", "Infinity", "-inf", "1_000",
    "\u0661\u0662\u0663", " 58.00 ", "58,00", "0x10", "\x00", "a\x1fb", "\u2028", "\ufffd", "9" * 5000,
    "x" * 100_000,
    "2026-11-21T14:05:00", "2026-11-21T14:05:00Z", "2026-02-30T00:00:00+03:00", "P051234567Q",
])
_NUMBERS = st.one_of(
    st.integers(), st.sampled_from([10**4000, -(10**299), 2**63, -(2**64)]),  # JSON ints stop at 4300 digits
    st.decimals(allow_nan=False, allow_infinity=False),
    st.sampled_from([Decimal("1E+999999999"), Decimal("-1E-999999999"), Decimal("0.001"), Decimal("-0"),
                     Decimal("1E+16"), Decimal("99999999999.99")]),
    st.floats(),  # json.loads turns NaN and Infinity into floats even with parse_float=Decimal
)
# ISO 8601 times of any year and offset, naive too (issued_at)
ISO_TIMES = st.builds(lambda moment, minutes, naive: (moment if naive else moment.replace(
    tzinfo=timezone(timedelta(minutes=minutes)))).isoformat(), st.datetimes(), st.integers(-1439, 1439), st.booleans())
SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, st.text(max_size=30), _NASTY_TEXT, ISO_TIMES)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=10)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, default=str, allow_nan=True).encode()


# --- the sale validator -----------------------------------------------------------------------

VALID: dict[str, Any] = make_sale(customer={"pin": "P051234567Q", "name": "Jane Wanjiru", "phone": "+254712345678"})
VALID["lines"][0]["barcode"] = "6161100110012"
REMOVABLE = {"customer", "customer.pin", "customer.name", "customer.phone", "lines[0].discount",
             "lines[1].discount", "lines[0].barcode", "lines[0]", "lines[1]"}


def paths(value: Any, prefix: str = "") -> list[str]:
    """Every field path of a sale, in the validator's spelling: customer.pin, lines[1].qty."""
    out: list[str] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            out += [path, *paths(inner, path)]
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            out += [f"{prefix}[{i}]", *paths(inner, f"{prefix}[{i}]")]
    return out


SALE_PATHS = paths(VALID)
_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def replaced(sale: dict[str, Any], path: str, value: Any, *, delete: bool = False) -> dict[str, Any]:
    """A deep copy of the sale with the value at `path` replaced (or removed)."""
    copy: dict[str, Any] = json.loads(json.dumps(sale))
    steps: list[str | int] = [int(i) if i else key for key, i in _STEP.findall(path)]
    parent: Any = copy
    for step in steps[:-1]:
        parent = parent[step]
    if delete:
        del parent[steps[-1]]
    else:
        parent[steps[-1]] = value
    return copy


def assert_clean_refusal(exc: InvalidSale) -> None:
    assert isinstance(exc.field, str)
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", exc.code), exc.code
    assert isinstance(exc.message, str) and exc.message.strip(), exc.message
    assert str(exc)


SELLER = Seller(tin="P052112956W", bhf_id="00")
TERMINAL = Terminal(hardware_id="TSMS-1", customer_code="C-1")


def assert_fixpoint(new: NewSale) -> None:
    """An accepted sale's stored form is accepted again as exactly itself, and the lanes can build
    KRA's request and head office's transaction from it (no stored garbage)."""
    stored = json.loads(new.sale_json, parse_float=Decimal)
    again = prepare(stored, RULES)
    assert (again.sale_json, again.content_hash, again.amounts_json, again.total) == \
        (new.sale_json, new.content_hash, new.amounts_json, new.total)
    assert canonical_json(stored) == new.sale_json
    amounts = json.loads(new.amounts_json)
    request = sale_request(stored, amounts, 1, SELLER)
    assert re.fullmatch(r"20\d{6}", request["salesDt"]) and re.fullmatch(r"20\d{12}", request["cfmDt"]), request
    transaction = tsms_transaction(stored, amounts, 1, "00000000-0000-4000-8000-000000000000", TERMINAL)
    assert json.loads(wire_json(transaction))["transaction_id"]


class TestSaleValidator:
    @FAST
    @given(JSON_VALUES)
    def test_any_json_is_accepted_clean_or_refused_naming_a_field(self, data: Any) -> None:
        try:
            new = prepare(data, RULES)
        except InvalidSale as exc:
            assert_clean_refusal(exc)
            if isinstance(data, dict) and data and "" not in data:
                assert exc.field, exc  # only a body that is not an object is refused as a whole
        else:
            assert_fixpoint(new)

    @FAST
    @given(st.sampled_from(SALE_PATHS), JSON_VALUES | SCALARS, st.booleans())
    def test_any_value_in_any_field_is_refused_there(self, path: str, value: Any, delete: bool) -> None:
        """A valid sale with one value replaced (or removed): refused naming that field (or one inside
        it, or, for an amount, another amount of the same line), or accepted as a clean sale."""
        data = replaced(VALID, path, value, delete=delete)
        try:
            new = prepare(data, RULES)
        except InvalidSale as exc:
            assert_clean_refusal(exc)
            line = re.match(r"lines\[\d+\]", path)
            amount = line is not None and path.rsplit(".", 1)[-1] in ("qty", "unit_price", "discount")
            assert exc.field == path or exc.field.startswith((f"{path}.", f"{path}[")) or (
                amount and line is not None and exc.field.startswith(f"{line.group()}.")), (path, exc)
            if delete:
                assert path not in REMOVABLE and exc.code == "required", (path, exc)
        else:
            assert not delete or path in REMOVABLE, path  # a required field cannot just go
            assert_fixpoint(new)

    @FAST
    @given(st.dictionaries(st.text(max_size=12).filter(lambda k: k not in VALID), SCALARS, min_size=1, max_size=3))
    def test_an_unknown_field_is_named(self, extra: dict[str, Any]) -> None:
        with pytest.raises(InvalidSale) as refused:
            prepare({**VALID, **extra}, RULES)
        assert refused.value.code == "unknown_field"
        assert refused.value.field in extra


# --- credit notes -----------------------------------------------------------------------------

_SOLD = prepare(VALID, RULES)
ORIGINAL = Original(id=1, till_id="TILL-1", sale_id="R-0001", kra_state="signed",
                    sale=json.loads(_SOLD.sale_json), amounts=json.loads(_SOLD.amounts_json), credited={})
NOW = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


@st.composite
def credit_note_requests(draw: st.DrawFn) -> Any:
    """Any JSON, or a credit note with any value in any field."""
    if draw(st.booleans()):
        return draw(JSON_VALUES)
    good: dict[str, st.SearchStrategy[Any]] = {
        "credit_note_id": st.sampled_from(["CN-1", "CN/2"]), "reason": st.sampled_from(["01", "06", "13"]),
        "issued_at": st.sampled_from(["2026-11-22T10:00:00+03:00", "2026-11-20T10:00:00+03:00"]),
        "lines": st.lists(st.fixed_dictionaries({"line": st.integers(-1, 3) | SCALARS,
                                                 "qty": st.sampled_from(["1", "0.5", "1.5"]) | SCALARS}),
                          max_size=3),
    }
    return {name: draw(strategy | JSON_VALUES) for name, strategy in good.items() if draw(st.integers(0, 4))}


class TestCreditNoteValidator:
    @FAST
    @given(credit_note_requests())
    def test_any_request_is_accepted_or_refused_naming_a_field(self, data: Any) -> None:
        try:
            new = prepare_credit_note(data, ORIGINAL, NOW)
        except InvalidSale as exc:
            assert_clean_refusal(exc)
            if isinstance(data, dict) and "" not in data:
                assert exc.field, exc
        else:
            assert new.kind == "credit_note" and new.original_id == ORIGINAL.id
            assert Decimal(0) < new.total <= _SOLD.total
            stored = json.loads(new.sale_json)
            assert canonical_json(stored) == new.sale_json


# --- serial framing (test_framing.py covers chunking, garbage and damage; this: any bytes) ---------

class TestSerialBytes:
    @FAST
    @given(st.binary(max_size=200) | st.lists(st.sampled_from([b"\x02", b"\x03", b"\n", b"\r", b"7299", b"{}",
                                                               b"\xff"]), max_size=40).map(b"".join),
           st.sampled_from(["plain", "framed"]), st.integers(1, 64))
    def test_any_bytes_give_well_formed_events(self, data: bytes, mode: str, max_bytes: int) -> None:
        """Whatever arrives: only the four event kinds, each with what the till needs to hear (NAK
        with a reason for a bad frame, the size of a refused message), messages within the limit."""
        for event in Decoder(mode, max_bytes).feed(data):
            reply = reply_bytes(event, mode)
            if isinstance(event, Message):
                assert len(event.payload) <= max_bytes
                assert (LF not in event.payload) if mode == "plain" else not ({STX, ETX} & set(event.payload))
                assert reply == (bytes([ACK]) if mode == "framed" else b"")
            elif isinstance(event, BadFrame):
                assert mode == "framed" and event.reason.strip()
                assert reply == bytes([NAK])
            elif isinstance(event, TooLong):
                assert event.size > max_bytes
                assert reply == (bytes([NAK]) if mode == "framed" else b"")
            else:
                assert isinstance(event, Garbage) and mode == "framed" and event.count > 0
                assert reply == b""


@dataclass
class SerialDesk:
    reader: PortReader
    loop: asyncio.AbstractEventLoop
    outbox: Outbox


@pytest.fixture(name="serial_desk", scope="module")
def _serial_desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SerialDesk]:
    """A port reader's message handling on a real desk and outbox (the port itself is not opened)."""
    outbox = Outbox.open(tmp_path_factory.mktemp("serial") / "outbox.sqlite3")
    clock = FakeClock()
    desk = SaleDesk(ApiContext(outbox=outbox, rules=RULES, clock=clock, max_body_bytes=1_048_576,
                               started_at=clock()))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield SerialDesk(PortReader(SerialPortSettings(url="loop://"), desk.sale, loop), loop, outbox)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        outbox.close()


class TestSerialMessages:
    @SLOWER
    @given(st.binary(max_size=100) | JSON_VALUES.map(json_bytes) | st.builds(
        lambda path, value: json_bytes(replaced(VALID, path, value)), st.sampled_from(SALE_PATHS), SCALARS),
        st.sampled_from(["plain", "framed"]))
    def test_any_message_gets_an_answer_in_the_http_shape(self, serial_desk: SerialDesk, payload: bytes,
                                                          mode: str) -> None:
        """A message off the wire, whatever it holds, is answered in the port's mode with the HTTP status
        and body: the error shape for a refusal, and nothing stored."""
        before = serial_desk.outbox.stats().sales
        answer = serial_desk.reader._handle(payload)
        events = Decoder(mode).feed(answer_bytes(answer, mode))
        assert len(events) == 1 and isinstance(events[0], Message)
        body = json.loads(events[0].payload)
        assert body["http_status"] == answer.status
        if answer.status >= 400:  # 409: a sale id used before with other content
            assert answer.status in (409, 422) and set(body) == {"http_status", "error"}
            assert set(body["error"]) == {"code", "message", "field"} and body["error"]["message"]
            assert serial_desk.outbox.stats().sales == before
        else:
            assert answer.status in (200, 201) and body["receipt"]["kind"] == "temporary"


# --- KRA's answers ----------------------------------------------------------------------------

_RESULT_CODES = st.sampled_from(["000", "0", "001", "894", "901", "902", "994", "999", " 000 ", "", "abc"]) | SCALARS


@st.composite
def kra_documents(draw: st.DrawFn) -> Any:
    """Answers shaped like KRA's, with any value where a field should be, sometimes in the gateway envelope."""
    doc: dict[str, Any] = draw(st.dictionaries(st.sampled_from(["resultCd", "resultMsg", "resultDt", "data"]),
                                               JSON_VALUES, max_size=4))
    if draw(st.booleans()):
        doc["resultCd"] = draw(_RESULT_CODES)
    if draw(st.booleans()):
        doc["data"] = draw(st.fixed_dictionaries({}, optional={
            "curRcptNo": SCALARS, "rcptSign": SCALARS, "sdcDateTime": SCALARS | st.just("2026-11-21 14:05:07.123"),
            "salesList": st.lists(JSON_VALUES | st.fixed_dictionaries({"trdInvcNo": SCALARS, "receipt": JSON_VALUES}),
                                  max_size=2),
            "info": JSON_VALUES | st.fixed_dictionaries({"cmcKey": SCALARS, "sdcId": SCALARS, "mrcNo": SCALARS}),
            "clsList": JSON_VALUES}))
    return {"responseBody": doc} if draw(st.booleans()) else doc


KRA_BODIES = st.one_of(st.binary(max_size=100), JSON_VALUES.map(json_bytes), kra_documents().map(json_bytes),
                       st.sampled_from([b"", b"null", b"[" * 50_000, b'{"resultCd": "000"', b"\xff\xfe"]))
STATUSES = st.sampled_from([200, 201, 204, 400, 401, 404, 429, 500, 502, 503, 504]) | st.integers(100, 599)


def _doc(body: bytes) -> Any:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("responseBody"), dict):
        return doc["responseBody"]
    return doc


class TestKraAnswers:
    @FAST
    @given(STATUSES, KRA_BODIES)
    def test_any_answer_is_classified(self, status: int, body: bytes) -> None:
        reply = parse_reply(status, body)
        assert isinstance(reply, KraReply) and isinstance(reply.outcome, Outcome)
        assert isinstance(reply.code, str) and isinstance(reply.message, str)
        assert describe(reply.code, reply.message).strip()
        doc = _doc(body)
        if not isinstance(doc, dict) or "resultCd" not in doc:
            # no result code: never a success, and never a refusal when KRA may have acted on it
            assert reply.outcome is not Outcome.SUCCESS
            if status >= 500:
                assert reply.outcome is Outcome.UNKNOWN
        elif reply.outcome is Outcome.SUCCESS:
            assert str(doc["resultCd"]).strip() in SUCCESS_CODES

    @FAST
    @given(KRA_BODIES)
    def test_what_the_lane_reads_from_an_answer_never_raises(self, body: bytes) -> None:
        """The signing lane's readers, on whatever data a 000 answer carries."""
        data = parse_reply(200, body).data
        signature = signature_from(data)
        assert set(signature) == set(SIGNATURE_FIELDS)
        assert isinstance(signature["sdcDateTime"], str)
        found = _first_sale(data)
        assert found is None or isinstance(found, dict)
        if found is not None:
            assert set(signature_from(found.get("receipt") or {})) == set(SIGNATURE_FIELDS)
        assert json.dumps(signature, sort_keys=True)  # it is stored as JSON

    @FAST
    @given(JSON_VALUES | _NASTY_TEXT | st.text(st.sampled_from("0123456789 -:."), max_size=20))
    def test_kra_times_parse_or_are_none(self, text: Any) -> None:
        parsed = parse_kra_datetime(text)
        assert parsed is None or parsed.tzinfo is not None
        number = expected_invoice_number(str(text))
        assert number is None or number >= 0

    @FAST
    @given(st.lists(KRA_BODIES, min_size=1, max_size=2))
    def test_code_list_updates_merge_into_a_usable_cache(self, bodies: list[bytes]) -> None:
        """Each selectCodeList / selectItemClsList answer, whatever its data, folds into a cache that
        still gives five usable tax rates and the refund reasons, and can be stored as JSON."""
        codes: dict[str, Any] = {}
        classes: dict[str, Any] = {}
        for body in bodies:
            data = parse_reply(200, body).data
            codes = merge_codes(codes, data)
            classes = merge_item_classes(classes, data)
            rates = tax_rates(codes, DEFAULT_TAX_RATES)
            assert set(rates) == set(TAX_BANDS)
            assert all(isinstance(r, Decimal) and r.is_finite() and 0 <= r < 100 for r in rates.values())
            reasons = refund_reasons(codes)
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in reasons.items())
            json.dumps(codes, sort_keys=True)  # as save_code_list stores them
            json.dumps(classes, sort_keys=True)

    @SLOWER
    @given(STATUSES, KRA_BODIES)
    def test_device_initialisation_returns_a_key_or_explains(self, status: int, body: bytes) -> None:
        """selectInitOsdcInfo answered anyhow: a key and SCU id, or KraError with a way out."""
        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(status, content=body)

        client = KraClient("https://kra.invalid/etims-api", tin="P052112956W", bhf_id="00", cmc_key=None,
                           transport=httpx.MockTransport(answer))

        async def run() -> Initialised:
            try:
                return await initialise(client, tin="P052112956W", bhf_id="00", serial="DEV-1")
            finally:
                await client.aclose()

        try:
            done = asyncio.run(run())
        except KraError as exc:
            assert len(str(exc)) > 20 and ("etims-agent" in str(exc) or "kra" in str(exc).lower()), str(exc)
        else:
            assert done.cmc_key.reveal() and done.sdc_id
            assert "cmcKey" not in done.info


# --- head office's answers --------------------------------------------------------------------

TSMS_DOCS = st.fixed_dictionaries({}, optional={
    "message": SCALARS, "error": SCALARS, "error_code": SCALARS | st.just("BATCH_LIMIT_EXCEEDED"),
    "errors": JSON_VALUES, "retry_after": SCALARS, "retry_after_seconds": SCALARS, "conflict": JSON_VALUES,
    "data": JSON_VALUES | st.fixed_dictionaries({}, optional={"access_token": SCALARS, "server_time": SCALARS}),
})
TSMS_BODIES = st.one_of(st.binary(max_size=100), JSON_VALUES.map(json_bytes), TSMS_DOCS.map(json_bytes))
_ASCII = st.characters(min_codepoint=32, max_codepoint=126)
RETRY_AFTER = st.dictionaries(st.sampled_from(["retry-after", "Retry-After"]),
                              st.sampled_from(["0", "30", "-5", "1e9", "nan", "inf", "Wed, 21 Oct 2026 07:28:00 GMT",
                                               "86400", "86401", " 12 ", ""]) | st.text(_ASCII, max_size=10),
                              max_size=1)  # header values arrive as ASCII (httpx decodes them)


class TestTsmsAnswers:
    @FAST
    @given(STATUSES, TSMS_BODIES, RETRY_AFTER)
    def test_any_answer_is_classified(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        reply = tsms.classify(status, body, httpx.Headers(headers))
        assert isinstance(reply.outcome, tsms.Outcome) and isinstance(reply.message, str) and reply.message
        assert isinstance(reply.data, dict)
        if reply.retry_after_s is not None:
            assert 0 <= reply.retry_after_s <= 86400
        if reply.outcome is tsms.Outcome.WAIT:
            assert reply.retry_after_s is not None
        if 200 <= status < 300 and not isinstance(_doc(body) if body else {}, dict):
            assert reply.outcome is tsms.Outcome.TRANSIENT  # a 2xx that is not JSON is not an acceptance
        token = tsms._token(reply)
        assert token is None or (reply.outcome is tsms.Outcome.ACCEPTED and token.reveal())
        assert _describe(reply).startswith("TSMS ")


class Credentials:
    """The lane's secret store as a plain object (a token is present, so no authentication)."""

    def __init__(self) -> None:
        self.saved: list[Secret | None] = []

    def api_key(self) -> Secret | None:
        return Secret("sim-api-key-0001")

    def token(self) -> Secret | None:
        return Secret("token-0001")

    def save_token(self, token: Secret | None) -> None:
        self.saved.append(token)


@pytest.fixture(name="tsms_outbox", scope="module")
def _tsms_outbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbox]:
    outbox = Outbox.open(tmp_path_factory.mktemp("tsms") / "outbox.sqlite3")
    yield outbox
    outbox.close()


def tsms_lane(outbox: Outbox, status: int, body: bytes) -> TsmsLane:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body)

    client = tsms.TsmsClient("https://tsms.invalid", transport=httpx.MockTransport(answer))
    return TsmsLane(TsmsStore(outbox), client, Credentials(), TERMINAL,
                    SyncSettings(tenant_id=1, terminal_id=7, serial_number="TSMS-1"), FakeClock())


class TestTsmsLaneReaders:
    @SLOWER
    @given(STATUSES, TSMS_BODIES | st.builds(
        lambda t: json_bytes({"data": {"server_time": t}}),
        st.sampled_from(["2026-11-21T11:05:00Z", "2026-11-21T11:05:00", "2026-11-21T11:05:00+03:00",
                         "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "yesterday", ""]) | SCALARS))
    def test_heartbeat_and_token_rotation_never_raise(self, tsms_outbox: Outbox, status: int, body: bytes) -> None:
        lane = tsms_lane(tsms_outbox, status, body)
        asyncio.run(lane.heartbeat())
        assert lane.clock_offset_s is None or isinstance(lane.clock_offset_s, float)
        asyncio.run(lane.rotate_token())


# --- the till's way in: the bind refusal and the token ----------------------------------------

HOSTS = st.one_of(
    st.ip_addresses().map(str), st.text(max_size=20),
    st.sampled_from(["127.0.0.1", "127.255.255.254", "::1", "localhost", "0.0.0.0", "::", "", "0", "127.1",
                     "2130706433", "0x7f000001", "::ffff:127.0.0.1", "[::1]", "LOCALHOST", "localhost.", " 127.0.0.1",
                     "127.0.0.1\n", "192.168.1.10", "fe80::1%lo", "::1%lo", "0:0:0:0:0:0:0:1"]),
)
BASE_CONFIG = parse_config("", base_dir=Path("etc"), env={}, source="test.toml")
TOKEN = "till-token-7c2e9a41d05b"


@pytest.fixture(name="guarded", scope="module")
def _guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    outbox = Outbox.open(tmp_path_factory.mktemp("token") / "outbox.sqlite3")
    try:
        with api_client(outbox, FakeClock(), token=Secret(TOKEN)) as client:
            yield client
    finally:
        outbox.close()


class TestTillAccess:
    @FAST
    @given(HOSTS)
    def test_only_a_loopback_host_is_served_without_a_token(self, host: str) -> None:
        """Any http.host the agent would listen on without a till token resolves to loopback only
        (checked with the resolver, not the agent's own rule); everything else is refused."""
        try:
            check_exposure(dataclasses.replace(BASE_CONFIG, http=HttpSettings(host=host)))
        except ConfigError as exc:
            assert exc.key == "http.host" and "till_token" in exc.hint
            return
        try:
            found = socket.getaddrinfo(host, 0, flags=0 if host == "localhost" else socket.AI_NUMERICHOST)
        except socket.gaierror:
            return  # no address at all: nothing can be bound
        assert found and all(ipaddress.ip_address(info[4][0]).is_loopback for info in found), (host, found)

    @FAST
    @given(st.one_of(
        st.binary(max_size=60),
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", ""]).flatmap(
            lambda scheme: st.sampled_from([TOKEN, TOKEN[:-1], TOKEN + "0", TOKEN.upper(), f" {TOKEN} ", f"{TOKEN}\t",
                                            TOKEN.replace("-", "\u2010"), ""]).map(lambda token: f"{scheme} {token}")
        ).map(lambda text: text.encode("utf-8")),
    ))
    def test_only_the_right_token_gets_in(self, guarded: TestClient, header: bytes) -> None:
        """Whatever Authorization header arrives: in only with `Bearer <token>` (any case of the
        scheme, spaces around the token); otherwise 401 in the error shape, the token never echoed."""
        response = guarded.get("/v1/status", headers={"Authorization": header})
        scheme, _, given_token = header.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and given_token.strip() == TOKEN:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 401, (header, response.text)
            assert set(response.json()["error"]) == {"code", "message", "field"}
            assert TOKEN not in response.text


# --- regressions: plain tests for what the properties above found ------------------------------

class TestRegressions:
    @pytest.mark.parametrize("reason", [[], {}, ["06"], {"06": 1}])
    def test_credit_note_reason_of_the_wrong_type_is_refused(self, reason: Any) -> None:
        """A list or object as the refund reason crashed with TypeError (unhashable): HTTP 500."""
        with pytest.raises(InvalidSale) as refused:
            prepare_credit_note({"credit_note_id": "CN-1", "reason": reason}, ORIGINAL, NOW)
        assert (refused.value.field, refused.value.code) == ("reason", "bad_reason")

    @pytest.mark.parametrize("qty", ["1e30", "1E+28", 10**40, "100000000000"])
    def test_credit_note_huge_quantity_is_refused(self, qty: Any) -> None:
        """A quantity too big to round to cents raised decimal.InvalidOperation: HTTP 500."""
        with pytest.raises(InvalidSale) as refused:
            prepare_credit_note({"credit_note_id": "CN-1", "reason": "06", "lines": [{"line": 1, "qty": qty}]},
                                ORIGINAL, NOW)
        assert (refused.value.field, refused.value.code) == ("lines[0].qty", "bad_quantity")

    def test_credit_note_api_answers_422_not_500(self, tmp_path: Path) -> None:
        """Both over HTTP, through the route the OpenAPI document does not list."""
        outbox = Outbox.open(tmp_path / "outbox.sqlite3")
        try:
            with api_client(outbox, FakeClock()) as client:
                assert client.post("/v1/sales", json=make_sale()).status_code == 201
                for body in ({"credit_note_id": "CN-1", "reason": []},
                             {"credit_note_id": "CN-1", "reason": "06", "lines": [{"line": 1, "qty": "1e30"}]}):
                    response = client.post("/v1/sales/R-0001/credit-notes", json=body)
                    assert response.status_code == 422, response.text
                    assert set(response.json()["error"]) == {"code", "message", "field"}
                assert outbox.stats().sales == 1
        finally:
            outbox.close()

    @pytest.mark.parametrize("qty", [1, "1"])
    @pytest.mark.parametrize("value", ["1e999999999", Decimal("1E+999999999"), Decimal("-1E+999999999")])
    def test_amount_with_a_huge_exponent_is_refused(self, value: Any, qty: Any) -> None:
        """abs() of 1E+999999999 raised decimal.Overflow: HTTP 500, and over serial the port's reader
        thread died (it only expects pyserial errors)."""
        for field in ("qty", "unit_price", "discount"):
            sale = make_sale()
            sale["lines"][0] = {**sale["lines"][0], "qty": qty, field: value}
            with pytest.raises(InvalidSale) as refused:
                prepare(sale, RULES)
            assert (refused.value.field, refused.value.code) == (f"lines[0].{field}", "too_large")

    @pytest.mark.parametrize("issued_at", ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00",
                                           "0005-01-01T00:00:00+00:00", "1999-12-31T23:59:59+00:00",
                                           "2100-01-01T03:00:00+03:00"])
    def test_sale_time_outside_2000_to_2099_is_refused(self, issued_at: str) -> None:
        """Such a sale was stored, then the KRA lane could not build its request (OverflowError, or a
        malformed YYYYMMDD for year 5) and, being the head of the lane, held up every later sale;
        with head office enabled the intake itself failed with HTTP 500."""
        with pytest.raises(InvalidSale) as refused:
            prepare(make_sale(issued_at=issued_at), RULES)
        assert (refused.value.field, refused.value.code) == ("issued_at", "out_of_range")
        assert prepare(make_sale(issued_at="2099-12-31T23:59:59+00:00"), RULES).sale_id == "R-0001"

    def test_bad_numbers_and_times_over_http_are_422_not_500(self, tmp_path: Path) -> None:
        """The two above through the API, with head office on (it builds the transaction at intake)."""
        outbox = Outbox.open(tmp_path / "outbox.sqlite3")
        rules = dataclasses.replace(RULES, head_office=head_office_builder(TERMINAL))
        ctx = ApiContext(outbox=outbox, rules=rules, clock=FakeClock(), max_body_bytes=1_048_576,
                         started_at=FakeClock()())
        bodies = [json.dumps(make_sale()).replace('"qty": "2"', '"qty": 1e999999999'),
                  json.dumps(make_sale(issued_at="9999-12-31T23:59:59-12:00"))]
        try:
            with TestClient(create_app(ctx)) as client:
                for body in bodies:
                    response = client.post("/v1/sales", content=body)
                    assert response.status_code == 422, response.text
                    assert response.json()["error"]["field"] in ("lines[0].qty", "issued_at")
                assert client.post("/v1/sales", json=make_sale()).status_code == 201
            assert outbox.stats().sales == 1
        finally:
            outbox.close()

    @pytest.mark.parametrize("data", [[], ["x"], "signed", 7, [{"rcptSign": "X"}]])
    def test_signature_from_data_that_is_not_an_object(self, data: Any) -> None:
        """A 000 answer whose data is not an object raised AttributeError in the signing lane, after the
        invoice number was allocated and sent."""
        assert signature_from(data) == {**dict.fromkeys(SIGNATURE_FIELDS), "sdcDateTime": ""}

    def test_a_000_answer_with_odd_data_signs_the_sale_once(self, tmp_path: Path) -> None:
        """The lane's consequence of the above: its catch-all put the sale back to `queued` with its
        number used, so the next round allocated a second invoice number and KRA signed it twice."""
        sent: list[int] = []

        def kra(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/saveTrnsSalesOsdc"):
                sent.append(json.loads(request.content)["invcNo"])
                return httpx.Response(200, json={"resultCd": "000", "resultMsg": "It is succeeded", "data": ["?"]})
            return httpx.Response(200, json={"resultCd": "000", "resultMsg": "It is succeeded", "data": None})

        outbox = Outbox.open(tmp_path / "outbox.sqlite3")
        clock = FakeClock()
        accept(outbox, make_sale(), RULES, clock())
        client = KraClient("https://kra.invalid/etims-api", tin="P052112956W", bhf_id="00", cmc_key=Secret("k"),
                           transport=httpx.MockTransport(kra))
        lane = KraLane(KraStore(outbox), client, SELLER, clock)

        async def run() -> None:
            task = asyncio.create_task(lane.run())
            for _ in range(3):  # rounds well past the catch-all's 30 s retry
                clock.advance(60)
                lane.notify()
                # Not cancelled right after notify(): on Python 3.11 asyncio.wait_for (in the lane's
                # idle sleep) swallows a cancel that arrives as the event it waits for is set.
                await asyncio.sleep(0.2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await lane.close()

        try:
            asyncio.run(run())
            (record,) = outbox.all_sales()
            assert sent == [1]
            assert (record.kra_state, record.kra_invc_no) == ("signed", 1)
            assert outbox.verify() == []
        finally:
            outbox.close()

    @pytest.mark.parametrize("cls", [{"cdCls": "04", "codes": "x", "dtlList": [{"cd": "B", "userDfnCd1": "10"}]},
                                     {"cdCls": "04", "dtlList": 5}, {"cdCls": "04", "dtlList": {"cd": "B"}}])
    def test_code_list_class_of_the_wrong_shape_is_skipped(self, cls: dict[str, Any]) -> None:
        """A class whose `codes` or `dtlList` was not what KRA documents raised TypeError in the refresh."""
        merged = merge_codes({}, {"clsList": [cls]})
        assert isinstance(merged["04"]["codes"], Mapping)
        assert set(tax_rates(merged, DEFAULT_TAX_RATES)) == set(TAX_BANDS)

    @pytest.mark.parametrize("server_time", ["2026-11-21T11:05:00", "2026-11-21"])
    def test_heartbeat_with_a_time_without_offset(self, tsms_outbox: Outbox, server_time: str) -> None:
        """A server_time without a UTC offset raised TypeError (naive minus aware) in the heartbeat job."""
        lane = tsms_lane(tsms_outbox, 200, json_bytes({"data": {"server_time": server_time}}))
        asyncio.run(lane.heartbeat())
        assert lane.clock_offset_s is None
