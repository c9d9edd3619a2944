"""The OpenAPI 3.1 document served at /openapi.json: every route of agent/api.py as it answers.

The request schemas state the validator's rules (agent/sales.py, agent/credit_notes.py), built from
its own constants, so anything the document allows the validator accepts. What JSON Schema cannot
state is said in descriptions: rules that compare fields (a discount within its line, a credit note
within what was sold), issued_at's bounds as instants, and the few other spellings the agent also
reads and stores in the form described here (surrounding white space, other number notations).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from agent.credit_notes import REFUND_REASONS
from agent.receipt_format import MEDIA_TYPES, WIDTHS
from agent.sales import ITEM_CLASS, MAX_AMOUNT, MAX_QTY, PAYMENT_TYPES, SALE_ID, TAX_BANDS, TILL_ID

_CONTROLS = r"\x00-\x1f\x7f-\x9f"  # C0, DEL and C1 controls: refused in every text field
_CANNOT_STATE = (
    "Also refused, though JSON Schema cannot say so: per line, qty x unit_price (rounded to the cent) "
    f"of {MAX_AMOUNT} or more, and a discount above it; a sale total of {MAX_AMOUNT} or more; an issued_at "
    "before 2000-01-01T00:00:00Z or from 2100-01-01T00:00:00Z on, as an instant (the pattern, which cannot "
    "compare instants across offsets, leaves out the local days 2000-01-01 and 2099-12-31). Also accepted, "
    "and stored in the form described here: text and numbers in strings with surrounding white space (removed "
    "before the checks, so it counts towards no length), phone numbers with other white space, numbers in "
    "strings with a sign, an exponent or digit-group underscores, and issued_at in other ISO 8601 forms (no "
    "seconds, a space for T, basic format)."
)


def _text(max_len: int, *, optional: bool = False) -> dict[str, Any]:
    """Free text: no control characters; a required one needs a character other than white space."""
    if optional:  # null, "" and white space mean absent
        return {"type": ["string", "null"], "maxLength": max_len, "pattern": f"^[^{_CONTROLS}]*$"}
    return {"type": "string", "minLength": 1, "maxLength": max_len,
            "pattern": rf"^[^{_CONTROLS}]*[^\s{_CONTROLS}][^{_CONTROLS}]*$"}


def _code(pattern: str, max_len: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^{pattern}$",
            **({} if max_len is None else {"maxLength": max_len}), **extra}


def _any_case(words: Iterable[str]) -> str:
    """One of these words in any letter case: the validator reads codes case-blind."""
    return "|".join("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)
                    for word in words)


def _decimal(limit: Decimal, *, positive: bool) -> dict[str, Any]:
    """A JSON number or a string: at most 2 decimal places (trailing zeros do not count, "1.500" is
    1.5), below `limit` (a power of ten), and above 0 (`positive`) or at least 0."""
    digits = len(str(int(limit))) - 1  # limit == 10**digits
    fraction = r"(?:\.[0-9]{0,2}0*)?"
    forms = [rf"0*[1-9][0-9]{{0,{digits - 1}}}{fraction}",  # 1 and above
             r"0*\.(?:[1-9][0-9]?|0[1-9])0*"]  # 0.01 to 0.99
    if not positive:
        forms.append(r"0+(?:\.0*)?|0*\.0+")  # zero
    low = {"exclusiveMinimum": 0} if positive else {"minimum": 0}
    return {"type": ["string", "number"], "pattern": f"^(?:{'|'.join(forms)})$", "multipleOf": 0.01,
            **low, "exclusiveMaximum": int(limit),
            "description": f"A number or a string (send strings to avoid float rounding), below {int(limit)}, "
                           "with at most 2 decimal places."}


# issued_at: an RFC 3339 time with seconds and an offset, in the local years 2000 to 2099. The first and
# last local day are left out: whether they are in range depends on the offset (see _CANNOT_STATE).
_ISSUED_AT: dict[str, Any] = {
    "type": "string", "format": "date-time", "maxLength": 40,
    "pattern": r"^(?!2000-01-01|2099-12-31)20[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
               r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$",
    "description": "ISO 8601 with a UTC offset, e.g. 2026-11-21T14:05:00+03:00; from 2000 to 2099.",
}
_SALE_ID = _code(SALE_ID.pattern, 50, description="The till's receipt number; becomes KRA trdInvcNo.")
_TILL_ID = _code(TILL_ID.pattern, 20)
_QTY = _decimal(MAX_QTY, positive=True)
_AMOUNT = _decimal(MAX_AMOUNT, positive=False)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref("Error")), **extra}


_UNAUTHORIZED = _error("Missing or wrong till token (code unauthorized)",
                       headers={"WWW-Authenticate": {"schema": {"type": "string"}}})
_STORAGE = _error("The outbox cannot be read or written (code storage)")
_DISK_FULL = _error("The disk is full (code disk_full): nothing was stored; send the request again later")
_TOO_LARGE = _error("Body larger than http.max_body_bytes (code too_large)")
_LOOKUP = {"404": _error("No such sale (code not_found)"),
           "409": _error("Several tills have this sale_id and no till_id was given (code ambiguous)")}
_SALE_RESPONSE = {
    "content": _json(_ref("SaleResult")),
    "headers": {"Server-Timing": {
        "description": "Milliseconds: `store` (the sale checked and stored), `kra` (how long KRA took to sign "
                       "it; only on an answer with KRA's signature), `total` (the whole answer, from the decoded "
                       "body), e.g. `store;dur=1.1, kra;dur=21.3, total;dur=26.0`",
        "schema": {"type": "string",
                   "pattern": r"^store;dur=[0-9]+\.[0-9](, kra;dur=[0-9]+\.[0-9])?, total;dur=[0-9]+\.[0-9]$"}}},
}
_SALE_PARAMETERS = [
    {"name": "sale_id", "in": "path", "required": True, "schema": _SALE_ID,
     "description": "Percent-encode '/' as %2F, as clients encode path parameters. A literal '/' works as well, "
                    "except in an id that ends in /receipt: /v1/sales/A/receipt is the receipt of sale A."},
    {"name": "till_id", "in": "query", "required": False, "schema": _TILL_ID,
     "description": "Needed when several tills used the same sale_id."},
]


def _operation(summary: str, responses: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Every operation answers 401 without the till token, when one is configured."""
    return {"summary": summary, **fields, "responses": {**responses, "401": _UNAUTHORIZED}}


def openapi_document(version: str, max_lines: int, refund_reasons: Iterable[str] = REFUND_REASONS) -> dict[str, Any]:
    """`max_lines`: the configured sales.max_lines; `refund_reasons`: KRA's class 32 codes in use."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "etims-agent till API", "version": version,
                 "description": "Post each sale; it is stored durably before the answer is sent. Every error "
                                "is {\"error\": {\"code\", \"message\", \"field\"}}; an unknown path answers 404 "
                                "and a wrong method 405 in that shape."},
        "security": [{}, {"tillToken": []}],
        "paths": {
            "/v1/sales": {"post": _operation(
                "Accept a sale (idempotent on till_id + sale_id)",
                requestBody={"required": True, "content": _json(_ref("Sale"))},
                responses={
                    "201": {"description": "Stored; first time this sale was seen", **_SALE_RESPONSE},
                    "200": {"description": "Replay of a sale already stored; the stored result", **_SALE_RESPONSE},
                    "409": _error("Same sale_id already stored with other content (code conflict), or taken "
                                  "before and since pruned by retention (code pruned)"),
                    "413": _TOO_LARGE,
                    "422": _error("Invalid sale or JSON; `field` names the offending value"),
                    "503": _error("The outbox cannot be written (code storage), or the offline budget is "
                                  "exhausted (code offline_budget_exhausted)"),
                    "507": _DISK_FULL,
                },
            )},
            "/v1/sales/{sale_id}": {"get": _operation(
                "A stored sale's (or credit note's) status and receipt",
                parameters=_SALE_PARAMETERS,
                responses={"200": {"description": "The sale", **_SALE_RESPONSE}, **_LOOKUP, "503": _STORAGE},
            )},
            "/v1/sales/{sale_id}/receipt": {"get": _operation(
                "The receipt to print; the first print of each receipt (temporary, then signed) is the "
                "original, every later one says COPY",
                parameters=[
                    *_SALE_PARAMETERS,
                    {"name": "format", "in": "query", "schema": {"enum": list(MEDIA_TYPES), "default": "text"}},
                    {"name": "width", "in": "query", "description": "Columns of the paper (text and escpos).",
                     "schema": {"type": "integer", "enum": list(WIDTHS), "default": 42}},
                    {"name": "copy", "in": "query", "description": "auto: COPY after the first print.",
                     "schema": {"enum": ["auto", "true", "false"], "default": "auto"}},
                ],
                responses={
                    "200": {"description": "The receipt in the format asked for",
                            "content": {media.split(";")[0]: {"schema": {"type": "string"}}
                                        for media in MEDIA_TYPES.values()}},
                    **_LOOKUP,
                    "422": _error("A bad format, width or copy (code bad_parameter)"),
                    "503": _STORAGE,
                    "507": _DISK_FULL,  # every rendering is counted in the outbox
                },
            )},
            "/v1/sales/{sale_id}/credit-notes": {"post": _operation(
                "Credit a whole sale, or some of its lines (idempotent on till_id + credit_note_id)",
                parameters=_SALE_PARAMETERS,
                requestBody={"required": True, "content": _json(_ref("CreditNote"))},
                responses={
                    "201": {"description": "Stored; first time this credit note was seen", **_SALE_RESPONSE},
                    "200": {"description": "Replay of a credit note already stored", **_SALE_RESPONSE},
                    "404": _LOOKUP["404"],
                    "409": _error("Several tills have this sale_id and no till_id was given (code ambiguous), "
                                  "or the credit_note_id is stored with other content (code conflict), or "
                                  "was taken before and since pruned (code pruned)"),
                    "413": _TOO_LARGE,
                    "422": _error("Invalid credit note or JSON, or the sale is itself a credit note; `field` "
                                  "names the offending value"),
                    "503": _STORAGE,
                    "507": _DISK_FULL,
                },
            )},
            "/v1/status": {"get": _operation(
                "Lanes, backlog, offline budget, clock, devices and the agent's receipt key",
                responses={"200": {"description": "Status", "content": _json(_ref("Status"))}, "503": _STORAGE},
            )},
            "/health": {"get": _operation(
                "Liveness: the outbox answers",
                responses={"200": {"description": "Healthy", "content": _json(
                               {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}})},
                           "503": _error("The outbox is unusable (code storage)")},
            )},
            "/metrics": {"get": _operation(
                "Prometheus metrics: sales by KRA and TSMS state, backlog, parked sales, lanes, latencies",
                responses={"200": {"description": "Prometheus text format 0.0.4",
                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                           "404": _error("Metrics are not enabled in this agent (code not_found)"),
                           "503": _STORAGE},
            )},
            "/openapi.json": {"get": _operation(
                "This document",
                responses={"200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}},
            )},
        },
        "components": {
            "securitySchemes": {"tillToken": {"type": "http", "scheme": "bearer",
                                              "description": "Required when http.till_token is set."}},
            "schemas": {
                "Sale": {
                    "type": "object", "additionalProperties": False, "description": _CANNOT_STATE,
                    "required": ["sale_id", "till_id", "issued_at", "payment", "lines"],
                    "properties": {
                        "sale_id": _SALE_ID,
                        "till_id": _TILL_ID,
                        "issued_at": _ISSUED_AT,
                        "payment": _code(f"(?:{_any_case(PAYMENT_TYPES)})", description="One of "
                                         f"{', '.join(PAYMENT_TYPES)} (any letter case); KRA code class 07."),
                        "customer": {"type": ["object", "null"], "additionalProperties": False, "properties": {
                            "pin": {"type": ["string", "null"], "pattern": "^(?:[A-Za-z][0-9]{9}[A-Za-z])?$",
                                    "description": "KRA PIN: a letter, 9 digits and a letter, e.g. P051234567Q."},
                            "name": _text(60, optional=True),
                            "phone": {"type": ["string", "null"], "maxLength": 30,
                                      "pattern": r"^(?:[ -]*\+?(?:[ -]*[0-9]){7,15}[ -]*)?$",
                                      "description": "7 to 15 digits after an optional +; spaces and - are "
                                                     "ignored."}}},
                        "lines": {"type": "array", "minItems": 1, "maxItems": max_lines, "items": _ref("Line")},
                    },
                },
                "Line": {
                    "type": "object", "additionalProperties": False,
                    "required": ["item_code", "item_class", "name", "qty", "unit_price",
                                 "tax_band", "qty_unit", "pkg_unit"],
                    "properties": {
                        "item_code": _text(20), "item_class": _code(ITEM_CLASS.pattern),
                        "name": _text(200), "qty": _QTY, "unit_price": _AMOUNT,
                        "discount": {**_AMOUNT, "type": ["string", "number", "null"],
                                     "description": "Amount off the line, same VAT basis as unit_price; at most "
                                                    "qty x unit_price. " + _AMOUNT["description"]},
                        "tax_band": _code(f"(?:{_any_case(TAX_BANDS)})", description="Any letter case."),
                        "qty_unit": _code("[A-Za-z0-9]{1,5}", description="KRA code class 10, e.g. U, KG, L."),
                        "pkg_unit": _code("[A-Za-z0-9]{1,5}", description="KRA code class 17, e.g. NT, BG, CT."),
                        "barcode": _text(20, optional=True),
                    },
                },
                "CreditNote": {
                    "type": "object", "additionalProperties": False, "required": ["credit_note_id", "reason"],
                    "description": "Credits what is left of the whole sale, unless `lines` names some. Also refused, "
                                   "though JSON Schema cannot say so: a line number named twice or beyond the sale's "
                                   "lines, or written with a decimal point (1.0); a quantity above what is left of "
                                   "the item (sold, less earlier credit notes); an issued_at before the sale's; a "
                                   "sale KRA refused.",
                    "properties": {
                        "credit_note_id": {**_SALE_ID, "description": "The till's number for the credit note; "
                                                                      "unique among the till's sales."},
                        "reason": {"type": "string", "enum": list(refund_reasons),
                                   "description": "KRA code class 32 (06 refund); KRA's own list once fetched."},
                        "issued_at": {**_ISSUED_AT, "description": "Defaults to now. " + _ISSUED_AT["description"]},
                        "lines": {"type": ["array", "null"], "minItems": 1, "items": {
                            "type": "object", "additionalProperties": False, "required": ["line", "qty"],
                            "properties": {"line": {"type": "integer", "minimum": 1,
                                                    "description": "The sale's line, counted from 1."},
                                           "qty": _QTY}}},
                    },
                },
                "SaleResult": {
                    "type": "object",
                    "required": ["sale_id", "till_id", "kind", "status", "receipt_no", "accepted_at", "receipt"],
                    "properties": {
                        "sale_id": {"type": "string"}, "till_id": {"type": "string"},
                        "kind": {"enum": ["sale", "credit_note"]},
                        "status": {"enum": ["signed", "pending", "rejected"]},
                        "receipt_no": {"type": "integer", "description": "The agent's gap-free receipt number."},
                        "error": {"type": "string", "description": "Why KRA refused the sale (status rejected)."},
                        "accepted_at": {"type": "string", "format": "date-time"},
                        "credits": {"type": "object", "description": "The sale a credit note credits.",
                                    "required": ["sale_id", "till_id", "receipt_no", "reason"]},
                        "receipt": {"type": "object", "required": ["kind", "issued_at", "payment", "lines", "totals"],
                                    "properties": {
                                        "kind": {"enum": ["signed", "temporary"]},
                                        "number": {"type": "integer"}, "label": {"type": "string"},
                                        "notice": {"type": "string", "description": (
                                            "Print it as given. A temporary receipt's says it is not a KRA tax "
                                            "invoice yet; a signed receipt has one only when KRA's simulator or "
                                            "sandbox signed it: then it is no tax invoice at all.")},
                                        "lines": {"type": "array"},
                                        "totals": {"type": "object", "required": ["taxable", "tax", "total"]},
                                        "kra": {"type": "object",
                                                "description": "KRA's signature block (signed receipts)."}}},
                    },
                },
                "Status": {
                    "type": "object", "required": ["agent", "outbox", "lanes", "devices", "offline_budget", "clock"],
                    "properties": {"lanes": {"type": "object", "required": ["kra", "tsms"]}},
                },
                "Error": {
                    "type": "object", "required": ["error"], "additionalProperties": False,
                    "properties": {"error": {"type": "object", "required": ["code", "message", "field"],
                                             "additionalProperties": False,
                                             "properties": {"code": {"type": "string"},
                                                            "message": {"type": "string"},
                                                            "field": {"type": ["string", "null"]}}}},
                },
            },
        },
    }
