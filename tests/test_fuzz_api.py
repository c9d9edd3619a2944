"""The till API fuzzed from its own OpenAPI document (schemathesis) on a real loopback socket.

A real uvicorn server with a till token and a real SQLite outbox. Every answer is checked: never a
5xx, every 4xx in the agent's error shape, 401 without the token, nothing stored for a refused sale,
and every stored sale a fixpoint of the validator (from which the lanes can build KRA's request and
head office's transaction) with the journal still verifying. The tests run in file order on one server:

1. sales the validator accepts, of any content (Hypothesis), so storing, replays and conflicts are
   fuzzed and the ids the next step asks for exist;
2. schemathesis: every operation of the document, valid and invalid requests (its examples, coverage
   and fuzzing phases; schemathesis.pytest.from_fixture does not run on pytest 9, so the document
   is loaded from the function the /openapi.json route serves, and a test checks the two agree);
3. credit notes and receipts of stored sales, with bodies and parameters from Hypothesis strategies
   (arbitrary JSON and near-valid credit notes, beyond what the document describes);
4. the outbox as a whole once everything ran.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from conftest import RECEIPT_SIGNER, RULES, FakeClock, make_sale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, HookContext
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent import __version__
from agent.api import create_app
from agent.desk import ApiContext
from agent.intake import prepare
from agent.kra.payloads import Seller, sale_request
from agent.metrics import Metrics
from agent.openapi import openapi_document
from agent.queue.outbox import Outbox, SaleRecord
from agent.receipt_format import MEDIA_TYPES, WIDTHS
from agent.sales import PAYMENT_TYPES, canonical_json, content_hash, sale_from_dict, sale_to_dict
from agent.secret import Secret
from agent.sync.transaction import Terminal, tsms_transaction

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SELLER = Seller(tin="P052112956W", bhf_id="00")
TERMINAL = Terminal(hardware_id="TSMS-1", customer_code="C-1")
TOKEN = "fuzz-till-token-5b1e9c0d7a2f4e63"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FUZZ_EXAMPLES = 150  # per schemathesis operation, on top of its explicit examples and coverage cases


@dataclass
class LiveAgent:
    """The app served by uvicorn on 127.0.0.1 with a real outbox file, as `etims-agent run` serves it."""

    url: str
    outbox: Outbox
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket
    fuzzed: dict[str, int] = field(default_factory=dict)  # requests sent per operation

    @classmethod
    def start(cls, db_path: Path) -> LiveAgent:
        outbox = Outbox.open(db_path)
        clock = FakeClock()
        ctx = ApiContext(outbox=outbox, rules=RULES, clock=clock, max_body_bytes=1_048_576, started_at=clock(),
                         receipt_signer=RECEIPT_SIGNER, metrics=Metrics(outbox, clock))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(ctx, till_token=Secret(TOKEN)), log_config=None,
                                               access_log=False, lifespan="off", http="httptools"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        agent = cls(f"http://127.0.0.1:{sock.getsockname()[1]}", outbox, server, thread, sock)
        for _ in range(200):
            try:
                httpx.get(f"{agent.url}/health", headers=AUTH, timeout=5)
                break
            except httpx.TransportError:
                threading.Event().wait(0.05)
        return agent

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.outbox.close()

    def counts(self) -> tuple[int, int]:
        stats = self.outbox.stats()
        return stats.sales, stats.journal_entries


@pytest.fixture(name="agent", scope="module")
def _agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    agent = LiveAgent.start(tmp_path_factory.mktemp("fuzz") / "data" / "outbox.sqlite3")
    try:
        yield agent
    finally:
        agent.stop()


# --- checks shared by every request -------------------------------------------------------------

def assert_agent_answer(status: int, content_type: str, text: str) -> Any:
    """No 5xx; every 4xx is the agent's JSON error shape with a code and a message. Returns the JSON."""
    assert status < 500, f"server error {status}: {text[:500]}"
    if status < 400:
        return json.loads(text) if content_type.startswith("application/json") else None
    assert content_type.startswith("application/json"), (status, content_type, text[:200])
    body = json.loads(text)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "field"}, body
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"].strip(), body
    assert error["field"] is None or isinstance(error["field"], str), body
    return body


def assert_stored_sale_is_clean(record: SaleRecord) -> None:
    """What is stored is what the validator makes of it (parsing it again changes nothing), and the
    lanes can build KRA's request and head office's transaction from it."""
    parsed = sale_from_dict(record.sale)
    assert canonical_json(sale_to_dict(parsed)) == canonical_json(record.sale)
    assert content_hash(parsed) == record.content_hash
    request = sale_request(record.sale, record.amounts, 1, SELLER)
    assert re.fullmatch(r"20\d{12}", request["cfmDt"]), request
    assert tsms_transaction(record.sale, record.amounts, record.receipt_no, "00000000-0000-4000-8000-000000000000",
                            TERMINAL)["transaction_id"]
    if record.kind == "sale":  # credit notes are priced at their original's rates, checked by the hash above
        again = prepare(record.sale, RULES)
        assert again.content_hash == record.content_hash
        assert json.loads(again.amounts_json) == record.amounts
        assert again.total == record.total


def assert_sale_answer_matches_the_outbox(agent: LiveAgent, answer: dict[str, Any], before: tuple[int, int],
                                          status: int) -> None:
    sales, entries = agent.counts()
    if status == 201:  # one new sale, one journal entry, stored clean
        assert (sales, entries) == (before[0] + 1, before[1] + 1)
    else:  # a replay (200) or any refusal stores nothing and journals nothing
        assert (sales, entries) == before, f"HTTP {status} changed the outbox: {answer}"
    if status in (200, 201):
        record = agent.outbox.get(answer["till_id"], answer["sale_id"])
        assert record is not None, answer
        assert answer["receipt_no"] == record.receipt_no
        assert_stored_sale_is_clean(record)
        assert agent.outbox.verify() == []


def media_type(response: schemathesis.Response) -> str:
    values = response.headers.get("content-type") or [""]
    return values[0]


# --- sales of any content, stored ---------------------------------------------------------------

_TEXT = st.characters(exclude_categories=("Cc", "Cs"))
_ALNUM = string.ascii_letters + string.digits


def _text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(_TEXT, min_size=1, max_size=max_size).filter(lambda s: 0 < len(s.strip()) <= max_size)


def _code(alphabet: str, min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.sampled_from(alphabet), min_size=min_size, max_size=max_size)


def _amount(low: int, high: int) -> st.SearchStrategy[Any]:
    """Cents as "12.34", 12.34 or 12 (what tills send)."""
    cents = st.integers(low, high)
    return st.one_of(cents.map(lambda c: f"{Decimal(c) / 100:.2f}"), cents.map(lambda c: c / 100),
                     cents.map(lambda c: max(c // 100, 1)))


@st.composite
def _line(draw: st.DrawFn) -> dict[str, Any]:
    line: dict[str, Any] = {
        "item_code": draw(_text(20)), "item_class": draw(_code(_ALNUM, 1, 10)), "name": draw(_text(200)),
        "qty": draw(_amount(1, 100_000)), "unit_price": draw(_amount(0, 10_000_000)),
        "tax_band": draw(st.sampled_from("ABCDEabcde")),
        "qty_unit": draw(_code(string.ascii_uppercase + string.digits, 1, 5)),
        "pkg_unit": draw(_code(string.ascii_uppercase + string.digits, 1, 5)),
    }
    if draw(st.booleans()):
        line["discount"] = draw(st.sampled_from(["0", "0.00", 0]))
    if draw(st.booleans()):
        line["barcode"] = draw(_text(20))
    return line


UNIQUE = itertools.count(1)
# Few ids, so replays and conflicts happen; F-1/receipt is fetched as F-1%2Freceipt, not F-1's receipt.
SALE_IDS = ["F-1", "F-2", "F-3", "INV/2026/7", "F#9", "F-1/receipt"]
TILL_IDS = ["TILL-1", "TILL-2"]


@st.composite
def valid_sales(draw: st.DrawFn) -> dict[str, Any]:
    """Sales the validator accepts, of any content (times out of range etc. come from schemathesis)."""
    offset = timezone(timedelta(minutes=draw(st.integers(-12 * 60, 14 * 60))))
    issued = draw(st.datetimes(datetime(2000, 1, 2), datetime(2099, 12, 30)))
    random_id = _code(_ALNUM, 1, 1).flatmap(lambda first: _code(_ALNUM + "._:/#-", 0, 49).map(first.__add__))
    sale: dict[str, Any] = {
        "sale_id": draw(random_id | st.sampled_from(SALE_IDS)),
        "till_id": draw(st.sampled_from(TILL_IDS)),
        "issued_at": issued.replace(tzinfo=offset).isoformat(),
        "payment": draw(st.sampled_from([*PAYMENT_TYPES, "CASH", "Card"])),
        "lines": draw(st.lists(_line(), min_size=1, max_size=4)),
    }
    if draw(st.booleans()):
        sale["customer"] = {"pin": "P051234567Q", "name": draw(_text(60)), "phone": "+254 712-345-678"}
    return sale


@given(sales=st.lists(valid_sales(), min_size=1, max_size=2))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_sales_of_any_content_are_stored_clean(agent: LiveAgent, sales: list[dict[str, Any]]) -> None:
    """Sales the validator accepts, with any text, amounts, customer, time and offset (and the few it
    refuses): 201 stored clean, 200 a replay, 409 a conflict or 422 naming the field, each sent twice."""
    with httpx.Client(base_url=agent.url, headers=AUTH, timeout=30) as http:
        for sale in sales:
            if sale["sale_id"] not in SALE_IDS:  # Hypothesis draws "0" often: keep generated ids apart
                sale = {**sale, "sale_id": f"{sale['sale_id'][:40]}-{next(UNIQUE)}"}
            for attempt in range(2):
                before = agent.counts()
                response = http.post("/v1/sales", json=sale)
                body = assert_agent_answer(response.status_code, response.headers.get("content-type", ""),
                                           response.text)
                assert response.status_code in (200, 201, 409, 422), response.text
                assert_sale_answer_matches_the_outbox(agent, body if response.status_code < 300 else {}, before,
                                                      response.status_code)
                if attempt:  # the same request again: never a new sale
                    assert response.status_code != 201, response.text
        agent.fuzzed["valid sales"] = agent.fuzzed.get("valid sales", 0) + len(sales)


# --- the document-driven fuzz -------------------------------------------------------------------

# The document the agent serves (test_served_document_is_the_fuzzed_one checks the live copy is this).
schema = schemathesis.openapi.from_dict(openapi_document(__version__, RULES.max_lines))
# schemathesis's own checks that the answers match the document. Not its negative_data_rejection (an
# oversized body is refused 413, not in its list; the agent also reads spellings the document leaves out,
# such as surrounding spaces) nor positive_data_acceptance (some requests the document allows are still
# refused: a discount above its line, a credit note beyond what was sold, a reused id with 409).
CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = {result.ok().label for result in schema.get_all_operations() if isinstance(result, Ok)}


@schema.hook("before_generate_path_parameters")
def _mix_in_stored_ids(context: HookContext, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | st.fixed_dictionaries({"sale_id": st.sampled_from(SALE_IDS)})


@schema.hook("before_generate_query")
def _mix_in_tills(context: HookContext, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    if context.operation is not None and "{sale_id}" in context.operation.path:  # they all take ?till_id=
        return strategy | st.fixed_dictionaries({"till_id": st.sampled_from(TILL_IDS)})
    return strategy


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_clean_answer(case: Case, agent: LiveAgent) -> None:
    """No 5xx and the error shape on any request; 401 without the token; the outbox stays clean."""
    label = case.operation.label
    agent.fuzzed[label] = agent.fuzzed.get(label, 0) + 1
    before = agent.counts()

    anonymous = case.call(base_url=agent.url, timeout=30)
    assert anonymous.status_code == 401, (label, anonymous.status_code, anonymous.text[:200])
    refusal = assert_agent_answer(401, media_type(anonymous), anonymous.text)
    assert refusal["error"]["code"] == "unauthorized"
    assert agent.counts() == before

    response = case.call(base_url=agent.url, headers=AUTH, timeout=30)
    case.validate_response(response, checks=CONFORMANCE)
    text = response.content.decode("utf-8", "replace")  # an ESC/POS receipt is bytes, not UTF-8
    body = assert_agent_answer(response.status_code, media_type(response), text)
    assert response.status_code != 401, text
    if label in ("POST /v1/sales", "POST /v1/sales/{sale_id}/credit-notes"):
        assert_sale_answer_matches_the_outbox(agent, body if response.status_code < 300 else {}, before,
                                              response.status_code)
    elif label == "GET /v1/sales/{sale_id}" and response.status_code == 200:
        record = agent.outbox.get(body["till_id"], body["sale_id"])
        assert record is not None and record.receipt_no == body["receipt_no"]
    else:
        assert agent.counts() == before


def test_served_document_is_the_fuzzed_one(agent: LiveAgent) -> None:
    """The fuzzed document is the one the running agent serves at /openapi.json."""
    served = httpx.get(f"{agent.url}/openapi.json", headers=AUTH, timeout=5)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(openapi_document(__version__, RULES.max_lines)))


# --- credit notes and receipts with any body and parameters -------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_ANY = _JSON | st.sampled_from(["", "01", "06", "13", "1", "1.5", "1e30", "-1", "NaN", "Infinity", "0.001"])


@st.composite
def credit_note_bodies(draw: st.DrawFn) -> Any:
    """Arbitrary JSON, or a credit note shaped right with any value in any field."""
    if draw(st.booleans()):
        return draw(_JSON)
    lines = st.lists(st.fixed_dictionaries({"line": st.sampled_from([1, 2]), "qty": st.sampled_from(["1", "0.5"])}),
                     min_size=1, max_size=2, unique_by=lambda line: line["line"])
    near_lines = st.lists(st.fixed_dictionaries({"line": st.integers(0, 3) | _ANY, "qty": _ANY}), max_size=3)
    body: dict[str, Any] = {}
    for name, good in (("credit_note_id", st.sampled_from(["CN-1", "CN-2", "CN/3"])),
                       ("reason", st.sampled_from(["01", "06", "13"])),
                       ("issued_at", st.just("2026-11-22T10:00:00+03:00")),
                       ("lines", lines | near_lines)):
        if name in ("credit_note_id", "reason") or draw(st.booleans()):
            body[name] = draw(good | _ANY)
    return body


QUERY = st.dictionaries(st.sampled_from(["till_id", "format", "width", "copy"]),
                        st.sampled_from(["TILL-1", "TILL-2", *MEDIA_TYPES, *map(str, WIDTHS), "auto", "true"])
                        | st.text(max_size=8), max_size=4)


@given(kind=st.sampled_from(["receipt", "credit-notes"]), sale_id=st.sampled_from(["S-1", "S-2"]) | st.sampled_from(
       ["CN-1", "CN/3", "NOPE"]), query=st.just({}) | QUERY, body=credit_note_bodies())
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_credit_notes_and_receipts_with_any_body(agent: LiveAgent, kind: str, sale_id: str,
                                                query: dict[str, str], body: Any) -> None:
    """Credit notes and receipts on stored sales, with any body and parameters: no 5xx, the error
    shape, and a credit note stored only when answered 201, stored clean."""
    with httpx.Client(base_url=agent.url, headers=AUTH, timeout=30) as http:
        for sale in ("S-1", "S-2"):  # the originals (replays after the first example)
            seeded = http.post("/v1/sales", json=make_sale(sale_id=sale))
            assert seeded.status_code in (200, 201), seeded.text
        before = agent.counts()
        if kind == "receipt":
            response = http.get(f"/v1/sales/{sale_id}/receipt", params=query)
        else:
            response = http.post(f"/v1/sales/{sale_id}/credit-notes", params=query,
                                 content=json.dumps(body, allow_nan=True))
    answer = assert_agent_answer(response.status_code, response.headers.get("content-type", ""), response.text)
    if kind == "credit-notes" and response.status_code == 201:
        assert agent.counts() == (before[0] + 1, before[1] + 1)
        record = agent.outbox.get(answer["till_id"], answer["sale_id"])
        assert record is not None and record.kind == "credit_note"
        assert_stored_sale_is_clean(record)
        assert agent.outbox.verify() == []
    else:
        assert agent.counts() == before, (response.status_code, response.text[:300])


# --- after the run ------------------------------------------------------------------------------

def test_after_fuzzing_the_outbox_verifies_and_holds_only_clean_sales(agent: LiveAgent) -> None:
    """Runs after the fuzz tests above (file order): the journal verifies and every stored sale and
    credit note parses back to itself."""
    if set(agent.fuzzed) != {"valid sales", *OPERATIONS}:
        pytest.skip(f"checks what the whole module's fuzzing stored; only {sorted(agent.fuzzed)} ran")
    assert agent.fuzzed["POST /v1/sales"] >= FUZZ_EXAMPLES // 2, agent.fuzzed
    records = agent.outbox.all_sales()
    assert sum(r.kind == "sale" for r in records) >= 5, "the fuzzing stored (almost) no sale; the hooks broke"
    assert agent.outbox.verify() == []
    for record in records:
        assert_stored_sale_is_clean(record)
