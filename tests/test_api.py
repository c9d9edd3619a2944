"""The till API: every status code in-process, one real loopback socket, the token and bind checks."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import RULES, FakeClock, api_client, make_sale
from starlette.testclient import TestClient
from typer.testing import CliRunner

from agent.api import create_app
from agent.cli import app as cli_app
from agent.desk import ApiContext
from agent.queue.outbox import Outbox
from agent.receipts import TEMPORARY_NOTICE
from agent.secret import Secret


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if field is not None:
        assert body["error"]["field"] == field


class TestPostSale:
    def test_new_sale_is_201_with_a_temporary_receipt(self, client: TestClient) -> None:
        """A new sale is stored and answered 201 pending with a marked temporary receipt."""
        response = client.post("/v1/sales", json=make_sale())
        assert response.status_code == 201
        body = response.json()
        assert (body["sale_id"], body["till_id"], body["status"]) == ("R-0001", "TILL-1", "pending")
        receipt = body["receipt"]
        assert receipt["kind"] == "temporary"
        assert receipt["number"] == 1
        assert receipt["label"] == "T-000001"
        assert "NOT A KRA TAX INVOICE" in receipt["notice"] == TEMPORARY_NOTICE
        # 116.00 in band B (16/116 of it is 16.00 tax) + 55.00 in exempt band A
        assert receipt["totals"] == {"taxable": "155.00", "tax": "16.00", "total": "171.00"}
        assert [b["band"] for b in receipt["bands"]] == ["A", "B"]

    def test_replay_is_200_with_the_same_body(self, client: TestClient) -> None:
        """Posting the same sale again answers 200 with exactly the stored result."""
        first = client.post("/v1/sales", json=make_sale())
        again = client.post("/v1/sales", json=make_sale())
        assert again.status_code == 200
        assert again.json() == first.json()

    def test_conflict_is_409(self, client: TestClient) -> None:
        """The same sale id with other content answers 409 naming sale_id."""
        client.post("/v1/sales", json=make_sale())
        assert_error(client.post("/v1/sales", json=make_sale(payment="cash")), 409, "conflict", "sale_id")

    def test_invalid_sale_is_422_naming_the_field(self, client: TestClient) -> None:
        """A sale KRA would refuse is answered 422 with the offending field's path."""
        sale = make_sale()
        sale["lines"][1]["tax_band"] = "F"
        assert_error(client.post("/v1/sales", json=sale), 422, "bad_format", "lines[1].tax_band")
        assert client.get("/v1/status").json()["outbox"]["sales"] == 0

    @pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[" * 100_000])
    def test_malformed_json_is_422(self, client: TestClient, body: bytes) -> None:
        """A body that is not JSON is refused, never a crash."""
        assert_error(client.post("/v1/sales", content=body), 422, "invalid_json")

    @pytest.mark.parametrize("body", ["[]", "null", "42", '"sale"'])
    def test_json_that_is_not_an_object_is_422(self, client: TestClient, body: str) -> None:
        """JSON that is not an object is refused as the wrong type."""
        assert_error(client.post("/v1/sales", content=body), 422, "wrong_type")

    def test_floats_keep_their_decimal_value(self, client: TestClient) -> None:
        """JSON numbers are read as decimals, so 0.1 + 0.2 style errors cannot creep in."""
        sale = make_sale()
        sale["lines"] = [{**sale["lines"][0], "qty": 3, "unit_price": 0.1}]
        body = json.dumps(sale)
        response = client.post("/v1/sales", content=body)
        assert response.status_code == 201
        assert response.json()["receipt"]["totals"]["total"] == "0.30"

    def test_too_large_is_413(self, outbox: Outbox, clock: FakeClock) -> None:
        """A body over http.max_body_bytes is refused before it is parsed."""
        with api_client(outbox, clock, max_body_bytes=2048) as small:
            sale = make_sale()
            sale["lines"] = sale["lines"] * 40
            assert_error(small.post("/v1/sales", json=sale), 413, "too_large")

    def test_too_large_chunked_body_is_413(self, outbox: Outbox, clock: FakeClock) -> None:
        """A chunked body without Content-Length is cut off at the limit too."""
        with api_client(outbox, clock, max_body_bytes=2048) as small:
            chunks = iter([b'{"sale_id": "' + b"x" * 1500, b"y" * 1500 + b'"}'])
            assert_error(small.post("/v1/sales", content=chunks), 413, "too_large")


class TestStorageFailure:
    def test_unusable_outbox_is_503_not_a_crash(self, db_path: Path, clock: FakeClock) -> None:
        """When the outbox cannot be written the till gets 503 with advice; health says so too."""
        box = Outbox.open(db_path)
        with api_client(box, clock) as client:
            box.close()
            assert_error(client.post("/v1/sales", json=make_sale()), 503, "storage")
            assert_error(client.get("/health"), 503, "storage")


class TestReads:
    def test_get_sale(self, client: TestClient) -> None:
        """A stored sale can be fetched by id, with or without till_id."""
        posted = client.post("/v1/sales", json=make_sale()).json()
        assert client.get("/v1/sales/R-0001").json() == posted
        assert client.get("/v1/sales/R-0001", params={"till_id": "TILL-1"}).json() == posted

    def test_get_sale_with_slash_in_id(self, client: TestClient) -> None:
        """Receipt numbers with a slash work in the path."""
        client.post("/v1/sales", json=make_sale(sale_id="INV/2026/7"))
        assert client.get("/v1/sales/INV/2026/7").status_code == 200

    def test_sale_id_ending_in_receipt(self, client: TestClient) -> None:
        """A sale id may end in /receipt: sent with its '/' as %2F it names that sale, not sale A's receipt;
        a literal /receipt is still the receipt route."""
        ours = client.post("/v1/sales", json=make_sale(sale_id="A/receipt")).json()
        client.post("/v1/sales", json=make_sale(sale_id="A"))
        for path in ("/v1/sales/A%2Freceipt", "/v1/sales/A%2freceipt"):
            answer = client.get(path)
            assert answer.headers["content-type"] == "application/json", answer.text[:80]
            assert answer.json() == ours
        receipt_of_a = client.get("/v1/sales/A/receipt")
        assert receipt_of_a.headers["content-type"].startswith("text/plain")
        assert "A/receipt" not in receipt_of_a.text
        receipt = client.get("/v1/sales/A%2Freceipt/receipt")
        assert receipt.headers["content-type"].startswith("text/plain") and "A/receipt" in receipt.text

    def test_missing_sale_is_404(self, client: TestClient) -> None:
        """An unknown sale id answers 404."""
        assert_error(client.get("/v1/sales/NOPE"), 404, "not_found", "sale_id")
        client.post("/v1/sales", json=make_sale())
        assert_error(client.get("/v1/sales/R-0001", params={"till_id": "OTHER"}), 404, "not_found")

    def test_ambiguous_sale_needs_till_id(self, client: TestClient) -> None:
        """When two tills used one id, the answer asks for till_id."""
        client.post("/v1/sales", json=make_sale(till_id="A"))
        client.post("/v1/sales", json=make_sale(till_id="B"))
        assert_error(client.get("/v1/sales/R-0001"), 409, "ambiguous", "till_id")

    def test_status(self, client: TestClient, clock: FakeClock) -> None:
        """Status reports the backlog, its value and the age of the oldest unsigned sale."""
        first = client.post("/v1/sales", json=make_sale()).json()
        second = client.post("/v1/sales", json=make_sale(sale_id="R-0002")).json()
        clock.advance(90)
        body = client.get("/v1/status").json()
        assert body["outbox"] == {"sales": 2, "journal_entries": 2}
        assert body["lanes"]["kra"]["backlog"] == 2
        totals = [Decimal(answer["receipt"]["totals"]["total"]) for answer in (first, second)]
        assert Decimal(body["lanes"]["kra"]["backlog_value"]) == sum(totals)
        assert body["lanes"]["kra"]["oldest_unsigned_age_s"] == 90.0
        assert body["lanes"]["tsms"]["backlog"] == 2

    def test_health(self, client: TestClient) -> None:
        """Health answers ok while the outbox answers."""
        assert client.get("/health").json() == {"status": "ok"}

    def test_openapi(self, client: TestClient) -> None:
        """The OpenAPI document is served (tests/test_openapi.py checks what it says)."""
        doc = client.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.")
        assert {"/v1/sales", "/v1/sales/{sale_id}", "/v1/sales/{sale_id}/receipt", "/v1/status", "/health"} <= \
            set(doc["paths"])

    def test_unknown_path_and_method(self, client: TestClient) -> None:
        """Unknown paths and methods answer in the error shape too."""
        assert_error(client.get("/v2/nothing"), 404, "not_found")
        assert_error(client.delete("/v1/sales"), 405, "method_not_allowed")


class TestToken:
    TOKEN = "till-token-0123456789"

    @pytest.fixture(name="guarded")
    def _guarded(self, outbox: Outbox, clock: FakeClock) -> Iterator[TestClient]:
        with api_client(outbox, clock, token=Secret(self.TOKEN)) as client:
            yield client

    @pytest.mark.parametrize("header", [None, "Bearer wrong-token-000000", "Basic abc", "Bearer"])
    def test_missing_or_wrong_token_is_401(self, guarded: TestClient, header: str | None) -> None:
        """Without the right bearer token every endpoint, health included, answers 401."""
        headers = {} if header is None else {"Authorization": header}
        for method, path in (("POST", "/v1/sales"), ("GET", "/health"), ("GET", "/v1/status")):
            response = guarded.request(method, path, headers=headers, json=make_sale())
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert self.TOKEN not in response.text

    def test_right_token_is_accepted(self, guarded: TestClient) -> None:
        """With the right token the sale is stored."""
        headers = {"Authorization": f"Bearer {self.TOKEN}"}
        assert guarded.post("/v1/sales", json=make_sale(), headers=headers).status_code == 201


class TestRealSocket:
    def test_sales_over_a_real_loopback_socket(self, outbox: Outbox, clock: FakeClock) -> None:
        """The app served by uvicorn on 127.0.0.1 answers real HTTP requests over keep-alive."""
        ctx = ApiContext(outbox=outbox, rules=RULES, clock=clock,
                         max_body_bytes=1_048_576, started_at=clock())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(ctx), log_config=None, access_log=False,
                                               lifespan="off", http="httptools"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
                for _ in range(100):
                    try:
                        http.get("/health")
                        break
                    except httpx.TransportError:
                        threading.Event().wait(0.05)
                codes = [http.post("/v1/sales", json=make_sale(sale_id=f"S{i}")).status_code
                         for i in range(20)]
                assert codes == [201] * 20
                assert http.post("/v1/sales", json=make_sale(sale_id="S0")).status_code == 200
                assert http.get("/v1/sales/S19").json()["receipt"]["number"] == 20
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()


class TestRunRefusals:
    def test_run_refuses_a_non_loopback_bind_without_token(self, tmp_path: Path) -> None:
        """`etims-agent run` on 0.0.0.0 without a till token exits 2 before listening."""
        cfg = tmp_path / "agent.toml"
        cfg.write_text('[http]\nhost = "0.0.0.0"\nport = 0\n')
        result = CliRunner().invoke(cli_app, ["run", "--config", str(cfg)], catch_exceptions=False)
        assert result.exit_code == 2
        assert "http.host" in result.output
        assert "till_token" in result.output
        assert not (tmp_path / "data").exists()
