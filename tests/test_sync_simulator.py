"""The TSMS head-office simulator over real sockets: terminal auth and tokens, signed submissions and
their idempotency, structural and checksum refusals, the fairness limit, heartbeat, status, void,
every fault and the state it keeps. Bodies are signed with `agent.sync.checksum`."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from conftest import FakeClock

from agent.sync.checksum import sign_submission, void_checksum
from agent.sync.sim_state import ApiRequest, Faults, SimState, parse_body, route, structural_errors
from agent.sync.simulator import SimTerminal, Simulator, TsmsSimulatorConfig

pytestmark = pytest.mark.timeout(60)

TERMINAL = SimTerminal()
SERIAL, API_KEY = TERMINAL.serial_number, TERMINAL.api_key
OTHER = SimTerminal(serial_number="TSMS-SIM-0002", api_key="sim-api-key-0002", tenant_id=1, terminal_id=8)
ADJUSTMENTS = ("promo_discount", "senior_discount", "pwd_discount", "vip_card_discount",
               "service_charge_distributed_to_employees", "service_charge_retained_by_management",
               "employee_discount")


# --- payloads ---------------------------------------------------------------------------------


def api(sim: Simulator) -> str:
    return f"{sim.api_url}/api/v1"


def new_uuid() -> str:
    return str(uuid.uuid4())


def transaction(n: int = 1, *, gross: float = 1120.0, hardware_id: str = SERIAL, **changes: Any) -> dict[str, Any]:
    """A valid transaction object (unsigned): 16 % VAT on net sales."""
    net = round(gross / 1.16, 2)
    tx: dict[str, Any] = {
        "transaction_id": new_uuid(),
        "hardware_id": hardware_id,
        "receipt_no": f"R-{n:06d}",
        "transaction_timestamp": "2026-11-21T11:04:30Z",
        "gross_sales": gross,
        "net_sales": net,
        "promo_status": "NONE",
        "customer_code": "C-T1001",
        "adjustments": [{"adjustment_type": kind, "amount": 0} for kind in ADJUSTMENTS],
        "taxes": [{"tax_type": "VAT", "amount": round(gross - net, 2)},
                  {"tax_type": "VATABLE_SALES", "amount": net},
                  {"tax_type": "SC_VAT_EXEMPT_SALES", "amount": 0},
                  {"tax_type": "OTHER_TAX", "amount": 0}],
    }
    tx.update(changes)
    return tx


def envelope(*txs: dict[str, Any], submission_uuid: str | None = None, terminal: SimTerminal = TERMINAL,
             version: str | None = "v2.1", **changes: Any) -> dict[str, Any]:
    """A submission of `txs` (one: the single form), signed unless version is None."""
    body: dict[str, Any] = {
        "submission_uuid": submission_uuid or new_uuid(),
        "tenant_id": terminal.tenant_id,
        "terminal_id": terminal.terminal_id,
        "submission_timestamp": "2026-11-21T11:05:00Z",
        "transaction_count": len(txs),
    }
    if len(txs) == 1:
        body["transaction"] = copy.deepcopy(txs[0])
    else:
        body["transactions"] = copy.deepcopy(list(txs))
    body.update(changes)
    if version is None:
        return body
    signed: dict[str, Any] = sign_submission(body, version=version)
    return signed


class Pos:
    """A terminal talking to the simulator's API port."""

    def __init__(self, sim: Simulator, terminal: SimTerminal = TERMINAL) -> None:
        self.terminal = terminal
        self.http = httpx.Client(base_url=api(sim), timeout=5.0, headers={"Accept": "application/json"})
        self.token = ""

    def close(self) -> None:
        self.http.close()

    def login(self) -> str:
        response = self.http.post("/auth/terminal", json={"serial_number": self.terminal.serial_number,
                                                          "api_key": self.terminal.api_key})
        assert response.status_code == 200, response.text
        self.token = response.json()["data"]["access_token"]
        return self.token

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def submit(self, body: dict[str, Any] | str, status: int | None = None, *, token: str | None = None,
               headers: dict[str, str] | None = None) -> httpx.Response:
        content = body if isinstance(body, str) else json.dumps(body)
        response = self.http.post("/transactions/official", content=content,
                                  headers={"Content-Type": "application/json", **self.auth(token), **(headers or {})})
        if status is not None:
            assert response.status_code == status, response.text
        return response

    def post(self, path: str, body: Any = None, *, token: str | None = None) -> httpx.Response:
        return self.http.post(path, json=body, headers=self.auth(token))


@pytest.fixture(name="sim")
def _sim(clock: FakeClock) -> Iterator[Simulator]:
    with Simulator(TsmsSimulatorConfig(terminals=(TERMINAL, OTHER)), clock).start() as sim:
        yield sim


@pytest.fixture(name="pos")
def _pos(sim: Simulator) -> Iterator[Pos]:
    pos = Pos(sim)
    pos.login()
    yield pos
    pos.close()


# --- auth -------------------------------------------------------------------------------------


class TestAuth:
    def test_terminal_login_answers_a_sanctum_token(self, sim: Simulator) -> None:
        pos = Pos(sim)
        response = pos.http.post("/auth/terminal", json={"serial_number": SERIAL, "api_key": API_KEY})
        assert response.status_code == 200
        data = response.json()["data"]
        token_id, secret = data["access_token"].split("|")
        assert token_id.isdigit() and len(secret) == 40 and secret.isalnum()
        assert data["token_type"] == "Bearer" and data["expires_in"] is None
        assert data["serial_number"] == SERIAL and data["tenant_id"] == 1
        assert "transaction:create" in data["abilities"] and data["terminal_config"]["heartbeat_threshold"] == 300
        assert sim.state()["tokens_issued"] == 1
        pos.close()

    def test_a_new_login_deletes_the_older_tokens(self, sim: Simulator) -> None:
        pos = Pos(sim)
        first = pos.login()
        second = pos.login()
        assert first != second
        assert pos.post("/heartbeat", token=first).status_code == 401
        assert pos.post("/heartbeat", token=second).status_code == 200
        pos.close()

    @pytest.mark.parametrize(("body", "status"), [
        ({"serial_number": SERIAL, "api_key": "wrong"}, 401),
        ({"serial_number": "NOPE", "api_key": API_KEY}, 401),
        ({"serial_number": SERIAL}, 422),
        ({"serial_number": "", "api_key": API_KEY}, 422),
    ])
    def test_bad_credentials(self, sim: Simulator, body: dict[str, Any], status: int) -> None:
        response = httpx.post(f"{api(sim)}/auth/terminal", json=body)
        assert response.status_code == status
        if status == 422:
            assert response.json()["error"] == "Validation failed" and response.json()["errors"]
        else:
            assert response.json()["error"] == "Authentication failed"

    def test_refresh_revokes_every_old_token_including_the_one_used(self, sim: Simulator, pos: Pos) -> None:
        old = pos.token
        response = pos.post("/auth/refresh")
        assert response.status_code == 200
        new = response.json()["data"]["access_token"]
        assert new != old and response.json()["data"]["token_type"] == "Bearer"
        refused = pos.submit(envelope(transaction()), 401, token=old)
        assert refused.json() == {"message": "Unauthenticated."}
        assert pos.post("/auth/refresh", token=old).status_code == 401
        pos.submit(envelope(transaction()), 202, token=new)
        state = sim.state()
        assert state["tokens_issued"] == 2 and state["unauthorized"] == 2

    def test_no_token_is_401_and_counted(self, sim: Simulator) -> None:
        response = httpx.post(f"{api(sim)}/transactions/official", json=envelope(transaction()))
        assert response.status_code == 401 and response.json() == {"message": "Unauthenticated."}
        assert httpx.post(f"{api(sim)}/heartbeat", headers={"Authorization": "Bearer 1|nope"}).status_code == 401
        assert sim.state()["unauthorized"] == 2
        assert sim.state()["transactions"] == {}

    def test_revoke_tokens_fault_then_login_again(self, sim: Simulator, pos: Pos) -> None:
        sim.set_faults(revoke_tokens=True)
        pos.submit(envelope(transaction()), 401)
        pos.login()
        pos.submit(envelope(transaction()), 202)
        assert sim.state()["unauthorized"] == 1


# --- submissions ------------------------------------------------------------------------------


class TestSubmissions:
    def test_single_signed_submission_is_accepted_and_stored(self, sim: Simulator, pos: Pos) -> None:
        tx = transaction()
        body = envelope(tx)
        response = pos.submit(body, 202, headers={"X-Request-Id": "req-42"})
        answer = response.json()
        assert answer["success"] is True and answer["status"] == "queued"
        assert answer["message"] == "Submission accepted" and answer["submission_uuid"] == body["submission_uuid"]
        assert answer["intake_id"] == 1 and answer["correlation_id"] == "req-42"
        assert response.headers["X-Request-Id"] == "req-42"
        state = sim.state()
        stored = state["transactions"][tx["transaction_id"]]
        assert stored["receipt_no"] == "R-000001" and stored["hardware_id"] == SERIAL
        assert stored["gross_sales"] == 1120.0 and stored["net_sales"] == tx["net_sales"]
        assert stored["submission_uuid"] == body["submission_uuid"] and stored["times_received"] == 1
        assert stored["voided_at"] is None and stored["checksum_version"] == "v2.1"
        submission = state["submissions"][body["submission_uuid"]]
        assert submission["status"] == "ACCEPTED" and submission["transaction_count"] == 1
        assert submission["payload_checksum"] == body["payload_checksum"] and submission["replays"] == 0
        assert state["requests"] == {"auth/terminal": 1, "transactions/official": 1}

    def test_a_correlation_id_is_made_when_none_is_sent(self, pos: Pos) -> None:
        response = pos.submit(envelope(transaction()), 202)
        assert uuid.UUID(response.headers["X-Request-Id"]).version == 4
        assert response.json()["correlation_id"] == response.headers["X-Request-Id"]

    def test_batch_of_three(self, sim: Simulator, pos: Pos) -> None:
        txs = [transaction(n, gross=100.0 * n) for n in (1, 2, 3)]
        body = envelope(*txs)
        assert body["transaction_count"] == 3 and "transaction" not in body
        pos.submit(body, 202)
        state = sim.state()
        assert sorted(state["transactions"]) == sorted(tx["transaction_id"] for tx in txs)
        assert state["submissions"][body["submission_uuid"]]["transaction_count"] == 3

    def test_identical_replay_is_already_accepted_and_stores_nothing_new(self, sim: Simulator, pos: Pos) -> None:
        tx = transaction()
        body = envelope(tx)
        first = pos.submit(body, 202).json()
        again = pos.submit(body, 202).json()
        assert again["message"] == "Submission already accepted" and again["intake_id"] == first["intake_id"]
        assert again["data"]["intake_status"] == "ACCEPTED"
        state = sim.state()
        assert len(state["transactions"]) == 1 and state["transactions"][tx["transaction_id"]]["times_received"] == 1
        assert len(state["submissions"]) == 1 and state["submissions"][body["submission_uuid"]]["replays"] == 1
        assert state["duplicates"] == []

    def test_same_uuid_with_a_changed_amount_conflicts(self, sim: Simulator, pos: Pos) -> None:
        tx = transaction()
        body = envelope(tx)
        pos.submit(body, 202)
        changed = envelope(transaction(gross=1130.0, transaction_id=tx["transaction_id"]),
                           submission_uuid=body["submission_uuid"])
        answer = pos.submit(changed, 409).json()
        assert answer["error_code"] == "IDEMPOTENCY_CONFLICT" and answer["submission_uuid"] == body["submission_uuid"]
        state = sim.state()
        assert state["conflicts"][0]["submission_uuid"] == body["submission_uuid"]
        assert state["conflicts"][0]["reason"] == "different payload_checksum"
        assert state["transactions"][tx["transaction_id"]]["gross_sales"] == 1120.0

    def test_same_uuid_from_another_terminal_conflicts(self, sim: Simulator, pos: Pos) -> None:
        body = envelope(transaction())
        pos.submit(body, 202)
        other = Pos(sim, OTHER)
        other.login()
        theirs = envelope(transaction(hardware_id=OTHER.serial_number), submission_uuid=body["submission_uuid"],
                          terminal=OTHER)
        assert other.submit(theirs, 409).json()["error_code"] == "IDEMPOTENCY_CONFLICT"
        assert sim.state()["conflicts"][0]["reason"] == "different terminal"
        other.close()

    def test_tampered_checksum_reveals_the_computed_hash(self, sim: Simulator, pos: Pos) -> None:
        body = envelope(transaction())
        good = body["payload_checksum"]
        body["payload_checksum"] = "0" * 64
        answer = pos.submit(body, 422).json()
        assert answer["error_code"] == "CRYPTOGRAPHIC_INTEGRITY_FAILURE"
        message = " ".join(answer["errors"])
        assert "Computed:" in message and good in message
        state = sim.state()
        assert state["transactions"] == {}
        assert state["submissions"][body["submission_uuid"]]["status"] == "REJECTED"
        assert state["rejections"][0]["error_code"] == "CRYPTOGRAPHIC_INTEGRITY_FAILURE"
        again = pos.submit(body, 422).json()  # the identical body again: the original refusal
        assert again["error_code"] == "CRYPTOGRAPHIC_INTEGRITY_FAILURE" and "already rejected" in again["message"]

    def test_a_tampered_amount_fails_the_transaction_checksum(self, pos: Pos) -> None:
        body = envelope(transaction())
        body["transaction"]["gross_sales"] = 1121.0
        answer = pos.submit(body, 422).json()
        assert answer["error_code"] == "CRYPTOGRAPHIC_INTEGRITY_FAILURE"
        assert any("Computed:" in error for error in answer["errors"])

    def test_a_rejected_uuid_resent_corrected_conflicts(self, sim: Simulator, pos: Pos) -> None:
        tx = transaction()
        bad = envelope(tx)
        bad["payload_checksum"] = "f" * 64
        pos.submit(bad, 422)
        corrected = envelope(tx, submission_uuid=bad["submission_uuid"])
        assert pos.submit(corrected, 409).json()["error_code"] == "IDEMPOTENCY_CONFLICT"
        pos.submit(envelope(tx), 202)  # a new uuid is the way out
        assert tx["transaction_id"] in sim.state()["transactions"]

    def test_hardware_mismatch_is_403_and_recorded(self, sim: Simulator, pos: Pos) -> None:
        tx = transaction(hardware_id="SOMEONE-ELSE")
        body = envelope(tx)
        answer = pos.submit(body, 403).json()
        assert answer["error_code"] == "HARDWARE_ID_MISMATCH" and answer["errors"]["hardware_id"]
        state = sim.state()
        assert state["submissions"][body["submission_uuid"]]["status"] == "REJECTED"
        assert state["rejections"] == [{"submission_uuid": body["submission_uuid"], "status": 403,
                                        "error_code": "HARDWARE_ID_MISMATCH", "errors": answer["errors"]}]
        fixed = envelope(transaction(transaction_id=tx["transaction_id"]), submission_uuid=body["submission_uuid"])
        pos.submit(fixed, 409)

    def test_the_serial_is_compared_trimmed(self, pos: Pos) -> None:
        body = envelope(transaction())
        body["transaction"]["hardware_id"] = f"  {SERIAL} "  # the server trims before checking and hashing
        pos.submit(body, 202)

    def test_strings_are_trimmed_before_hashing(self, pos: Pos) -> None:
        body = envelope(transaction())
        body["transaction"]["promo_status"] = " NONE  "
        body["transaction"]["customer_code"] = "C-T1001\n"
        pos.submit(body, 202)

    def test_v2_0_signature_is_accepted_as_a_fallback(self, sim: Simulator, pos: Pos) -> None:
        tx = transaction(gross=56.5)
        pos.submit(envelope(tx, version="v2.0"), 202)
        assert sim.state()["transactions"][tx["transaction_id"]]["checksum_version"] == "v2.0"

    def test_a_transaction_resent_under_a_new_uuid_is_a_duplicate(self, sim: Simulator, pos: Pos) -> None:
        tx = transaction()
        first = envelope(tx)
        pos.submit(first, 202)
        second = envelope(tx, transaction(2))
        pos.submit(second, 202)
        state = sim.state()
        assert state["duplicates"] == [{"transaction_id": tx["transaction_id"],
                                        "submission_uuid": second["submission_uuid"], "terminal_id": 7,
                                        "first_submission_uuid": first["submission_uuid"]}]
        stored = state["transactions"][tx["transaction_id"]]
        assert stored["submission_uuid"] == first["submission_uuid"] and stored["times_received"] == 2
        assert len(state["transactions"]) == 2

    def test_body_parsed_like_php(self) -> None:
        doc = parse_body(b'{"a": 1, "b": 1.0, "c": " x ", "d": "", "e": 99999999999999999999}')
        assert doc == {"a": 1, "b": 1.0, "c": "x", "d": None, "e": 1e20}
        assert type(doc["a"]) is int and type(doc["b"]) is float
        assert parse_body(b"[1, 2]") == {} and parse_body(b"{nope") == {} and parse_body(b'{"a": NaN}') == {}


# --- structural validation --------------------------------------------------------------------


def _missing_adjustment(body: dict[str, Any]) -> None:
    body["transaction"]["adjustments"] = body["transaction"]["adjustments"][:-1]


def _bad_uuid(body: dict[str, Any]) -> None:
    body["submission_uuid"] = str(uuid.uuid1())


def _count_mismatch(body: dict[str, Any]) -> None:
    body["transactions"] = [transaction(1), transaction(2)]
    body["transaction_count"] = 3
    del body["transaction"]


def _one_element_list(body: dict[str, Any]) -> None:
    body["transactions"] = [body.pop("transaction")]


def _second_without_vat(body: dict[str, Any]) -> None:
    second = transaction(2)
    second["taxes"] = [t for t in second["taxes"] if t["tax_type"] != "VAT"] + [{"tax_type": "X", "amount": 0}]
    body["transactions"] = [transaction(1), second]
    body["transaction_count"] = 2
    del body["transaction"]


def _other_tenant(body: dict[str, Any]) -> None:
    body["tenant_id"] = 2


def _bad_receipt(body: dict[str, Any]) -> None:
    body["transaction"]["receipt_no"] = "R 0001/A"


def _offset_timestamp(body: dict[str, Any]) -> None:
    body["transaction"]["transaction_timestamp"] = "2026-11-21T14:04:30+03:00"


def _negative_gross(body: dict[str, Any]) -> None:
    body["transaction"]["gross_sales"] = -1


class TestStructure:
    @pytest.mark.parametrize(("change", "field", "words"), [
        (_missing_adjustment, "transaction.adjustments", "employee_discount"),
        (_bad_uuid, "submission_uuid", "format is invalid"),
        (_count_mismatch, "transaction_count", "does not match"),
        (_one_element_list, "transaction", "required"),
        (_second_without_vat, "transactions.1.taxes", "VAT"),
        (_other_tenant, "tenant_id", "does not match"),
        (_bad_receipt, "transaction.receipt_no", "format is invalid"),
        (_offset_timestamp, "transaction.transaction_timestamp", "format is invalid"),
        (_negative_gross, "transaction.gross_sales", "at least 0"),
    ])
    def test_errors_name_dotted_fields(self, sim: Simulator, pos: Pos, change: Any, field: str, words: str) -> None:
        body = envelope(transaction(), version=None)
        change(body)
        body = sign_submission(body)
        answer = pos.submit(body, 422).json()
        assert answer["error_code"] == "STRUCTURAL_VALIDATION_FAILURE", answer
        assert field in answer["errors"], answer["errors"]
        assert any(words in message for message in answer["errors"][field]), answer["errors"][field]
        state = sim.state()
        assert state["transactions"] == {} and state["rejections"][0]["error_code"] == "STRUCTURAL_VALIDATION_FAILURE"

    def test_a_body_that_is_not_json_names_every_required_field(self, pos: Pos) -> None:
        answer = pos.submit("not json", 422).json()
        assert {"submission_uuid", "tenant_id", "terminal_id", "submission_timestamp", "transaction_count",
                "payload_checksum"} <= set(answer["errors"])

    def test_non_vat_sale_needs_only_the_exempt_amount(self) -> None:
        tx = transaction()
        tx["taxes"] = [{"tax_type": "SC_VAT_EXEMPT_SALES", "amount": 500}, {"tax_type": "OTHER_TAX", "amount": 0},
                       {"tax_type": "A", "amount": 0}, {"tax_type": "B", "amount": 0}]
        body = envelope(tx)
        assert structural_errors(body, TERMINAL) == {}
        tx["taxes"][0]["amount"] = 0
        assert "transaction.taxes" in structural_errors(envelope(tx), TERMINAL)

    def test_a_structural_rejection_blocks_its_uuid(self, pos: Pos) -> None:
        body = envelope(transaction(), version=None)
        body["transaction"]["adjustments"] = body["transaction"]["adjustments"][:6]
        body = sign_submission(body)
        pos.submit(body, 422)
        fixed = envelope(transaction(), submission_uuid=body["submission_uuid"])
        pos.submit(fixed, 409)

    def test_batch_over_the_limit(self, clock: FakeClock) -> None:
        with Simulator(TsmsSimulatorConfig(max_batch=2), clock).start() as sim:
            pos = Pos(sim)
            pos.login()
            answer = pos.submit(envelope(transaction(1), transaction(2), transaction(3)), 422).json()
            assert answer["error_code"] == "BATCH_LIMIT_EXCEEDED" and answer["max_batch_count"] == 2
            pos.submit(envelope(transaction(1), transaction(2)), 202)
            assert sim.state()["rejections"][0]["error_code"] == "BATCH_LIMIT_EXCEEDED"
            pos.close()

    def test_body_too_large(self, clock: FakeClock) -> None:
        with Simulator(TsmsSimulatorConfig(max_body_bytes=2000), clock).start() as sim:
            pos = Pos(sim)
            pos.login()
            big = envelope(*(transaction(n) for n in range(1, 4)))
            answer = pos.submit(big, 413).json()
            assert answer["error_code"] == "PAYLOAD_TOO_LARGE" and answer["max_payload_bytes"] == 2000
            pos.submit(envelope(transaction()), 202)
            state = sim.state()
            assert len(state["transactions"]) == 1 and big["submission_uuid"] not in state["submissions"]
            pos.close()


# --- fairness limit ---------------------------------------------------------------------------


class TestRateLimit:
    def test_the_51st_request_in_a_window_is_429_until_the_window_ends(self, sim: Simulator, pos: Pos,
                                                                      clock: FakeClock) -> None:
        for n in range(50):  # every outcome counts: half of these are refused
            pos.submit(envelope(transaction(n + 1)) if n % 2 else "{}", 202 if n % 2 else 422)
        clock.advance(10)
        refused = pos.submit(envelope(transaction(99)), 429)
        answer = refused.json()
        assert answer["error_code"] == "FAIRNESS_LIMIT_EXCEEDED" and answer["limit"] == 50
        assert refused.headers["Retry-After"] == "50" and answer["retry_after_seconds"] == 50
        assert sim.state()["rate_limited"] == 1
        pos.post("/heartbeat").raise_for_status()  # only submissions are limited
        clock.advance(50)
        pos.submit(envelope(transaction(100)), 202)

    def test_rate_limit_fault_changes_the_limit(self, sim: Simulator, pos: Pos) -> None:
        sim.set_faults(rate_limit=1)
        pos.submit(envelope(transaction(1)), 202)
        pos.submit(envelope(transaction(2)), 429)
        sim.set_faults(rate_limit=None)
        pos.submit(envelope(transaction(3)), 202)
        assert sim.state()["faults"]["rate_limit"] is None


# --- heartbeat, status, void ------------------------------------------------------------------


class TestOtherEndpoints:
    def test_heartbeat(self, sim: Simulator, pos: Pos) -> None:
        response = pos.post("/heartbeat")
        assert response.status_code == 200
        data = response.json()["data"]
        assert data == {"message": "Heartbeat received", "server_time": "2026-11-21T11:05:00.000000Z",
                        "next_heartbeat_due": "2026-11-21T11:10:00.000000Z"}
        assert sim.state()["heartbeats"] == 1
        assert httpx.post(f"{api(sim)}/heartbeat").status_code == 401

    def test_status(self, pos: Pos) -> None:
        tx = transaction()
        pos.submit(envelope(tx), 202)
        answer = pos.http.get(f"/transactions/{tx['transaction_id']}/status", headers=pos.auth())
        assert answer.status_code == 200
        data = answer.json()["data"]
        assert data["transaction_id"] == tx["transaction_id"] and data["job_status"] == "COMPLETED"
        assert pos.http.get(f"/transactions/{data['id']}/status", headers=pos.auth()).status_code == 200
        missing = pos.http.get(f"/transactions/{new_uuid()}/status", headers=pos.auth())
        assert missing.status_code == 404 and missing.json()["message"] == "Transaction not found"

    def test_void_then_void_again_is_409(self, sim: Simulator, pos: Pos, clock: FakeClock) -> None:
        tx = transaction()
        pos.submit(envelope(tx), 202)
        tid, reason = tx["transaction_id"], "Customer returned the goods"
        body = {"transaction_id": tid, "void_reason": reason, "payload_checksum": void_checksum(tid, reason)}
        clock.advance(60)
        answer = pos.post(f"/transactions/{tid}/void", body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["voided_at"] == "2026-11-21T11:06:00.000000Z"
        again = pos.post(f"/transactions/{tid}/void", body)
        assert again.status_code == 409 and again.json()["message"] == "Transaction already voided"
        state = sim.state()
        assert state["voids"] == 1 and state["transactions"][tid]["void_reason"] == reason
        assert state["transactions"][tid]["voided_at"] == "2026-11-21T11:06:00.000000Z"

    def test_void_refusals(self, sim: Simulator, pos: Pos) -> None:
        tx = transaction()
        pos.submit(envelope(tx), 202)
        tid, reason = tx["transaction_id"], "Wrong item"
        good = void_checksum(tid, reason)
        path = f"/transactions/{tid}/void"
        bad_checksum = pos.post(path, {"transaction_id": tid, "void_reason": reason, "payload_checksum": "a" * 64})
        assert bad_checksum.status_code == 422 and "payload_checksum" in bad_checksum.json()["errors"]
        invalid = pos.post(path, {"transaction_id": tid, "payload_checksum": good})
        assert invalid.status_code == 422 and "void_reason" in invalid.json()["errors"]
        other = new_uuid()
        mismatch = pos.post(f"/transactions/{other}/void",
                            {"transaction_id": tid, "void_reason": reason, "payload_checksum": good})
        assert mismatch.status_code == 422 and mismatch.json()["message"] == "Transaction ID mismatch"
        unknown = pos.post(f"/transactions/{other}/void", {"transaction_id": other, "void_reason": reason,
                                                          "payload_checksum": void_checksum(other, reason)})
        assert unknown.status_code == 404
        someone = Pos(sim, OTHER)
        someone.login()
        assert someone.post(path, {"transaction_id": tid, "void_reason": reason, "payload_checksum": good}
                            ).status_code == 404  # not this terminal's
        someone.close()
        assert sim.state()["voids"] == 0

    def test_unknown_route_and_wrong_method(self, sim: Simulator, pos: Pos) -> None:
        assert pos.post("/nowhere").status_code == 404
        assert pos.http.get("/heartbeat", headers=pos.auth()).status_code == 405


# --- faults -----------------------------------------------------------------------------------


class TestFaults:
    def test_outage_refuses_connections_and_counts_them(self, sim: Simulator, pos: Pos) -> None:
        before = sim.state()["connections"]
        assert before >= 1
        sim.set_faults(outage=True)
        with pytest.raises(httpx.ConnectError):
            pos.submit(envelope(transaction()))
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{api(sim)}/heartbeat")
        assert httpx.get(f"{sim.control_url}/_sim/state").json()["faults"]["outage"] is True
        assert httpx.post(f"{sim.control_url}/_sim/faults", json={"outage": None}).status_code == 200
        pos.submit(envelope(transaction()), 202)
        assert sim.state()["connections"] > before

    def test_each_client_opens_its_own_connection(self, sim: Simulator) -> None:
        before = sim.state()["connections"]
        for _ in range(3):
            httpx.post(f"{api(sim)}/heartbeat")
        assert sim.state()["connections"] - before == 3

    def test_unavailable_is_503_with_retry_after(self, sim: Simulator, pos: Pos) -> None:
        sim.set_faults(unavailable={"count": 1, "retry_after": 7})
        body = envelope(transaction())
        response = pos.submit(body, 503)
        assert response.headers["Retry-After"] == "7" and response.json()["retry_after_seconds"] == 7
        assert response.json()["service"] == "transaction-intake"
        assert sim.state()["transactions"] == {}
        pos.submit(body, 202)
        assert sim.state()["faults"]["unavailable"] is None

    def test_http_status_answers_html_and_stores_nothing(self, sim: Simulator, pos: Pos) -> None:
        sim.set_faults(http_status={"status": 500, "count": 2})
        body = envelope(transaction())
        for _ in range(2):
            response = pos.submit(body, 500)
            assert response.headers["content-type"].startswith("text/html")
        state = sim.state()
        assert state["transactions"] == {} and state["submissions"] == {}
        assert state["faults_served"] == {"http_status": 2}
        pos.submit(body, 202)

    def test_faults_can_be_limited_to_routes(self, sim: Simulator, pos: Pos) -> None:
        sim.set_faults(http_status={"status": 502, "count": 1, "paths": ["transactions/official"]})
        assert pos.post("/heartbeat").status_code == 200
        pos.submit(envelope(transaction()), 502)
        sim.set_faults(http_status={"status": 500, "count": 1})  # every route
        assert pos.post("/heartbeat").status_code == 500

    def test_unavailable_and_lost_answers_hit_submissions_unless_told_otherwise(self, sim: Simulator,
                                                                                 pos: Pos) -> None:
        sim.set_faults(unavailable={"count": 1}, lose_response={"count": 1})
        pos.login()
        assert pos.post("/heartbeat").status_code == 200
        assert sim.faults()["unavailable"] == {"count": 1, "paths": ["transactions/official"], "retry_after": 30}
        sim.set_faults(unavailable=None, lose_response={"count": 1, "paths": ["auth/terminal"]})
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            pos.login()
        assert sim.state()["tokens_issued"] == 3  # the lost answer's token was minted
        pos.login()
        pos.submit(envelope(transaction()), 202)

    def test_lose_response_commits_then_drops_the_connection(self, sim: Simulator, pos: Pos) -> None:
        sim.set_faults(lose_response={"count": 1})
        tx = transaction()
        body = envelope(tx)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            pos.submit(body)
        state = sim.state()
        assert tx["transaction_id"] in state["transactions"] and state["faults_served"] == {"lose_response": 1}
        assert pos.submit(body, 202).json()["message"] == "Submission already accepted"
        assert len(sim.state()["transactions"]) == 1

    def test_latency(self, sim: Simulator, pos: Pos) -> None:
        sim.set_faults(latency_ms=300)
        with pytest.raises(httpx.ReadTimeout):
            pos.http.post("/heartbeat", headers=pos.auth(), timeout=0.1)
        sim.set_faults(latency_ms=None)
        assert pos.post("/heartbeat").status_code == 200

    def test_faults_over_http_on_both_ports(self, sim: Simulator, pos: Pos) -> None:
        answer = httpx.post(f"{sim.api_url}/_sim/faults", json={"lose_response": {"count": 2}}).json()
        assert answer["faults"]["lose_response"] == {"count": 2, "paths": ["transactions/official"]}
        bad = httpx.post(f"{sim.control_url}/_sim/faults", json={"meltdown": True})
        assert bad.status_code == 400 and "unknown fault" in bad.json()["error"]
        assert httpx.post(f"{sim.control_url}/_sim/faults", json={"http_status": {"count": 1}}).status_code == 400
        reset = httpx.post(f"{sim.control_url}/_sim/reset", json={"state": True})
        assert reset.status_code == 200 and reset.json()["faults"]["lose_response"] is None
        assert sim.state()["tokens_issued"] == 0
        pos.submit(envelope(transaction()), 401)  # the state was forgotten, tokens too

    def test_reset_keeps_the_state_by_default(self, sim: Simulator, pos: Pos) -> None:
        pos.submit(envelope(transaction()), 202)
        sim.set_faults(outage=True, rate_limit=3)
        sim.reset()
        assert sim.faults()["outage"] is False and sim.faults()["rate_limit"] is None
        assert len(sim.state()["transactions"]) == 1
        pos.submit(envelope(transaction()), 202)


# --- pure parts -------------------------------------------------------------------------------


def test_routes() -> None:
    assert route("transactions/official") == ("transactions/official", None)
    assert route("transactions/abc/void/") == ("transactions/void", "abc")
    assert route("transactions/12/status") == ("transactions/status", "12")
    assert route("transactions") is None and route("auth/me") is None


def test_fault_merge_is_all_or_nothing() -> None:
    faults = Faults()
    with pytest.raises(ValueError, match="paths"):
        faults.merge({"outage": True, "lose_response": {"paths": ["heartbeats"]}})
    assert faults.outage is False
    assert faults.merge({"revoke_tokens": True, "latency_ms": 5}) is True
    assert faults.latency_ms == 5


def test_state_is_deterministic_per_seed() -> None:
    def token(seed: int) -> str:
        state = SimState(TsmsSimulatorConfig(seed=seed))
        body = json.dumps({"serial_number": SERIAL, "api_key": API_KEY}).encode()
        answer = state.handle(ApiRequest("POST", "auth/terminal", {}, body), datetime(2026, 1, 1, tzinfo=UTC))
        return str(answer.body["data"]["access_token"])
    assert token(1) == token(1) != token(2)
