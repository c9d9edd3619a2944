"""The OpenAPI 3.1 document served at /openapi.json.

Limits and code lists come from the same constants the validator uses, so the published contract
cannot drift from what the agent actually accepts.
"""

from __future__ import annotations

from typing import Any

from agent.sales import PAYMENT_TYPES, TAX_BANDS

_MONEY = {"type": ["string", "number"], "pattern": r"^\d+(\.\d{1,2})?$",
          "description": "Decimal with at most 2 places; send strings to avoid float rounding."}


def _text(max_len: int, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_len, **extra}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(version: str, max_lines: int) -> dict[str, Any]:
    sale_response = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/SaleResult"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "etims-agent till API", "version": version,
                 "description": "Post each sale; it is stored durably before the answer is sent."},
        "paths": {
            "/v1/sales": {"post": {
                "summary": "Accept a sale (idempotent on till_id + sale_id)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Sale"}}}},
                "responses": {
                    "201": {"description": "Stored; first time this sale was seen", **sale_response},
                    "200": {"description": "Replay of a sale already stored; the stored result", **sale_response},
                    "401": _error_response("Missing or wrong till token"),
                    "409": _error_response("Same sale_id already stored with other content"),
                    "413": _error_response("Body larger than http.max_body_bytes"),
                    "422": _error_response("Invalid sale; `field` names the offending value"),
                    "503": _error_response("The outbox cannot be written, or the offline budget is exhausted "
                                           "(code offline_budget_exhausted)"),
                    "507": _error_response("The disk is full (code disk_full): nothing was stored; send the "
                                           "sale again later"),
                },
            }},
            "/v1/sales/{sale_id}": {"get": {
                "summary": "A stored sale's status and receipt",
                "parameters": [
                    {"name": "sale_id", "in": "path", "required": True, "schema": _text(50)},
                    {"name": "till_id", "in": "query", "required": False, "schema": _text(20),
                     "description": "Needed when several tills used the same sale_id."},
                ],
                "responses": {"200": {"description": "The sale", **sale_response},
                              "404": _error_response("No such sale"),
                              "409": _error_response("Several tills have this sale_id")},
            }},
            "/v1/status": {"get": {"summary": "Lanes, backlog and age of the oldest unsigned sale",
                                   "responses": {"200": {"description": "Status"}}}},
            "/health": {"get": {"summary": "Liveness: the outbox answers",
                                "responses": {"200": {"description": "Healthy"},
                                              "503": _error_response("The outbox is unusable")}}},
        },
        "components": {
            "securitySchemes": {"tillToken": {"type": "http", "scheme": "bearer",
                                              "description": "Required when http.till_token is set."}},
            "schemas": {
                "Sale": {
                    "type": "object", "additionalProperties": False,
                    "required": ["sale_id", "till_id", "issued_at", "payment", "lines"],
                    "properties": {
                        "sale_id": _text(50, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/#-]*$",
                                         description="The till's receipt number; becomes KRA trdInvcNo."),
                        "till_id": _text(20, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
                        "issued_at": {"type": "string", "format": "date-time",
                                      "description": "ISO 8601 with a UTC offset."},
                        "payment": {"enum": list(PAYMENT_TYPES)},
                        "customer": {"type": "object", "additionalProperties": False, "properties": {
                            "pin": {"type": "string", "pattern": r"^[A-Za-z][0-9]{9}[A-Za-z]$"},
                            "name": _text(60), "phone": _text(30)}},
                        "lines": {"type": "array", "minItems": 1, "maxItems": max_lines,
                                  "items": {"$ref": "#/components/schemas/Line"}},
                    },
                },
                "Line": {
                    "type": "object", "additionalProperties": False,
                    "required": ["item_code", "item_class", "name", "qty", "unit_price",
                                 "tax_band", "qty_unit", "pkg_unit"],
                    "properties": {
                        "item_code": _text(20), "item_class": _text(10, pattern="^[0-9A-Za-z]+$"),
                        "name": _text(200), "qty": _MONEY, "unit_price": _MONEY,
                        "discount": {**_MONEY, "description": "Amount off the line, same VAT basis as unit_price."},
                        "tax_band": {"enum": list(TAX_BANDS)},
                        "qty_unit": _text(5), "pkg_unit": _text(5), "barcode": _text(20),
                    },
                },
                "SaleResult": {
                    "type": "object", "required": ["sale_id", "till_id", "status", "receipt_no", "receipt"],
                    "properties": {
                        "sale_id": {"type": "string"}, "till_id": {"type": "string"},
                        "status": {"enum": ["signed", "pending", "rejected"]},
                        "receipt_no": {"type": "integer", "description": "The agent's gap-free receipt number."},
                        "error": {"type": "string", "description": "Why KRA refused the sale (status rejected)."},
                        "accepted_at": {"type": "string", "format": "date-time"},
                        "receipt": {"type": "object", "required": ["kind"], "properties": {
                            "kind": {"enum": ["signed", "temporary"]},
                            "number": {"type": "integer"}, "label": {"type": "string"},
                            "notice": {"type": "string"},
                            "kra": {"type": "object", "description": "KRA's signature block (signed receipts)."}}},
                    },
                },
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["code", "message", "field"],
                                             "properties": {"code": {"type": "string"},
                                                            "message": {"type": "string"},
                                                            "field": {"type": ["string", "null"]}}}},
                },
            },
        },
    }
