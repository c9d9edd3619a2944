"""The OpenAPI document the app serves, against the app itself: valid OpenAPI 3.1, every route
documented, and the request schemas agreeing with the validator on boundary values, both ways (a
value the document allows is accepted, a value it refuses is refused)."""

from __future__ import annotations

import copy
import json
import re
from decimal import Decimal
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from conftest import make_sale
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient


def served_document(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


def component_validator(doc: dict[str, Any], name: str) -> jsonschema_rs.Validator:
    """A validator for one request schema, its $refs resolved in the document, formats asserted."""
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": doc["components"]},
                                       validate_formats=True)


def test_document_is_valid_openapi(client: TestClient) -> None:
    """The OpenAPI 3.1 meta-schema holds, each schema is valid JSON Schema and compiles (its patterns too)."""
    doc = served_document(client)
    schemathesis.openapi.from_dict(doc).validate()
    for name, schema in doc["components"]["schemas"].items():
        jsonschema_rs.meta.validate(schema)
        component_validator(doc, name)
    for item in doc["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                jsonschema_rs.meta.validate(parameter["schema"])
                jsonschema_rs.validator_for(parameter["schema"])


def test_every_route_is_documented(client: TestClient) -> None:
    """The app's routes and the document's operations are the same set: a new route fails this until
    it is documented."""
    app = client.app
    assert isinstance(app, Starlette)
    assert all(isinstance(route, Route) for route in app.routes), "document mounts and other routes too"
    routes = {(re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path), method.lower())  # {sale_id:path} -> {sale_id}
              for route in app.routes if isinstance(route, Route)
              for method in route.methods or () if method != "HEAD"}  # Starlette answers HEAD for every GET
    documented = {(path, method) for path, item in served_document(client)["paths"].items() for method in item}
    assert routes == documented


# --- boundary values: the document and the validator agree --------------------------------------

ONE_LINE = {"item_code": "KE2NTU0000001", "item_class": "5059690800", "name": "Bread 400g", "qty": "1",
            "unit_price": "58.00", "tax_band": "B", "qty_unit": "U", "pkg_unit": "NT"}
SALE = make_sale(lines=[ONE_LINE], customer={"pin": "P051234567Q", "name": "Wanjiku Stores"})
CREDIT_NOTE = {"credit_note_id": "CN-1", "reason": "06"}


def changed(body: dict[str, Any], where: str, value: Any) -> str:
    """The body as JSON text with the value at `where` ("lines.0.qty") set. Numbers are written as
    Python writes them, so only values exact as floats or ints are given as JSON numbers."""
    body = copy.deepcopy(body)
    *parents, last = where.split(".")
    node: Any = body
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return json.dumps(body)


def document_allows(doc: dict[str, Any], schema: str, text: str) -> bool:
    return bool(component_validator(doc, schema).is_valid(json.loads(text, parse_float=Decimal)))


def agent_accepts(client: TestClient, path: str, text: str) -> bool:
    response = client.post(path, content=text, headers={"Content-Type": "application/json"})
    assert response.status_code in (201, 422), response.text
    return response.status_code == 201


SALE_CASES = [
    # KRA's N(13,2) quantities and N(18,2) amounts, at most 2 decimal places that matter
    ("lines.0.qty", "99999999999.99", True), ("lines.0.qty", "100000000000", False),
    ("lines.0.qty", 99999999999.99, True), ("lines.0.qty", 100000000000, False),
    ("lines.0.qty", "0.01", True), ("lines.0.qty", "0", False), ("lines.0.qty", 0, False),
    ("lines.0.qty", "-1", False), ("lines.0.qty", "1.500", True), ("lines.0.qty", "1.505", False),
    ("lines.0.qty", 0.001, False), ("lines.0.qty", True, False),
    ("lines.0.unit_price", "9999999999999999.99", True), ("lines.0.unit_price", "10000000000000000", False),
    ("lines.0.unit_price", 9999999999999999, True), ("lines.0.unit_price", 10000000000000000, False),
    ("lines.0.unit_price", "0", True), ("lines.0.unit_price", -0.01, False),
    ("lines.0.discount", "58.00", True), ("lines.0.discount", None, True), ("lines.0.discount", "-1", False),
    # issued_at: an instant from 2000-01-01T00:00:00Z up to 2100, with an offset
    ("issued_at", "1999-12-31T23:59:59+03:00", False),
    ("issued_at", "2000-01-01T00:00:00+03:00", False),  # 1999-12-31T21:00:00Z
    ("issued_at", "2000-01-02T00:00:00+03:00", True),
    ("issued_at", "2099-12-30T23:59:59-03:00", True),
    ("issued_at", "2100-01-01T00:00:00Z", False),
    ("issued_at", "2026-11-21T14:05:00Z", True), ("issued_at", "2026-11-21T14:05:00.5-00:00", True),
    ("issued_at", "2026-11-21T14:05:00", False), ("issued_at", "2026-11-21t14:05:00z", False),
    ("issued_at", "2026-02-29T10:00:00+03:00", False), ("issued_at", "2028-02-29T10:00:00+03:00", True),
    # codes are read in any letter case
    ("payment", "cash", True), ("payment", "MOBILE_MONEY", True), ("payment", "Card", True),
    ("payment", "bitcoin", False), ("lines.0.tax_band", "b", True), ("lines.0.tax_band", "F", False),
    ("lines.0.tax_band", "AB", False), ("lines.0.qty_unit", "kg", True), ("lines.0.qty_unit", "ABCDEF", False),
    ("customer.pin", "p051234567q", True), ("customer.pin", "P05123456Q", False),
    ("customer.pin", None, True), ("customer.pin", "", True),
    ("customer.phone", "+254 712-345-678", True), ("customer.phone", "123456", False),
    # ids, text, shape
    ("sale_id", "R" * 50, True), ("sale_id", "R" * 51, False), ("sale_id", "INV/2026/7#1", True),
    ("sale_id", "-1", False), ("sale_id", "R 1", False), ("sale_id", None, False),
    ("till_id", "T" * 20, True), ("till_id", "T" * 21, False), ("till_id", "T/1", False),
    ("lines.0.name", "N" * 200, True), ("lines.0.name", "N" * 201, False), ("lines.0.name", "Bread\x07", False),
    ("lines.0.name", "   ", False), ("lines.0.barcode", "", True), ("lines.0.item_class", "12345678901", False),
    ("customer", None, True), ("customer.email", "a@b", False), ("extra", 1, False), ("lines", [], False),
]


@pytest.mark.parametrize(("where", "value", "accepted"), SALE_CASES)
def test_sale_schema_and_validator_agree(client: TestClient, where: str, value: Any, accepted: bool) -> None:
    text = changed(SALE, where, value)
    assert (document_allows(served_document(client), "Sale", text), agent_accepts(client, "/v1/sales", text)) \
        == (accepted, accepted)


CREDIT_NOTE_CASES = [
    ("reason", "06", True), ("reason", "6", False), ("reason", "99", False), ("reason", 6, False),
    ("lines", None, True), ("lines", [], False), ("lines", [{"line": 1, "qty": "1"}], True),
    ("lines", [{"line": 1, "qty": 2}], True), ("lines", [{"line": 0, "qty": "1"}], False),
    ("lines", [{"line": 1, "qty": "0.001"}], False), ("lines", [{"line": 1, "qty": "0"}], False),
    ("lines", [{"line": 1}], False), ("lines", [{"line": 1, "qty": "1", "discount": "0"}], False),
    ("credit_note_id", "C" * 50, True), ("credit_note_id", "C" * 51, False), ("credit_note_id", None, False),
    ("issued_at", "2026-11-22T10:00:00+03:00", True), ("issued_at", "2100-01-01T00:00:00Z", False),
    ("issued_at", None, False), ("extra", 1, False),
]


@pytest.mark.parametrize(("where", "value", "accepted"), CREDIT_NOTE_CASES)
def test_credit_note_schema_and_validator_agree(client: TestClient, where: str, value: Any, accepted: bool) -> None:
    assert client.post("/v1/sales", json=make_sale()).status_code == 201
    text = changed(CREDIT_NOTE, where, value)
    assert (document_allows(served_document(client), "CreditNote", text),
            agent_accepts(client, "/v1/sales/R-0001/credit-notes", text)) == (accepted, accepted)
