"""What the TSMS simulator knows and decides, with no I/O and no clock reads (the time is passed in):
terminals and their Sanctum tokens, the intake (idempotency) table, stored transactions, the
fairness window, request validation and the fault plan (tsms-api.md §1, §3.1, §4; HEAD behaviour).

Everything here runs under the simulator's lock; the HTTP layer (`agent.sync.simulator`) turns
`Answer`s into responses. Checksums come from `agent.sync.checksum`, the same module the agent
signs with: a mistake there is not caught here, only one in how the agent builds and sends bodies.

Decisions where the reference is silent or only inferred:

* Input: the body is parsed like PHP's `json_decode` (floats stay float, integers int, integers
  beyond 64 bits become float; NaN/Infinity, invalid UTF-8 and a BOM fail), then passed through
  `server_view` (Laravel's TrimStrings + ConvertEmptyStringsToNull) before anything looks at it,
  structural validation included. A body that is not JSON, or not a JSON object, is taken as `{}`
  (so it fails validation with every required field named), as Laravel's `$request->all()` would.
* Order on `transactions/official`: 401, 413 (the real byte length of the body), fairness 429,
  422 BATCH_LIMIT_EXCEEDED, 422 STRUCTURAL_VALIDATION_FAILURE, 403 HARDWARE_ID_MISMATCH, the
  idempotency table, 422 CRYPTOGRAPHIC_INTEGRITY_FAILURE, 202. Not modelled: abilities (every
  token has all four), the group throttle (60/min) and `pos-ingestion` (120/min), which the fairness
  limit of 50 always hits first; licence, backpressure, the circuit breaker (see the `unavailable`
  fault), the tenant (200) and global (10000) fairness scopes, the `pos-auth`/`pos-read`/
  `pos-heartbeat` throttles, receipt_no dedup, terminal expiry.
* Fairness: per terminal, on `transactions/official` only. A window opens with the first request
  after the previous one ended and lasts `rate_window_s` (Redis INCR + EXPIRE style, not aligned to
  the clock). Every request that reaches the limiter is counted, whatever its outcome and the 429s
  included; 401s and 413s are answered before it and are not counted. Retry-After is the whole
  seconds left in the window (at least 1). The `rate_limit` fault replaces the per-window limit.
* BATCH_LIMIT_EXCEEDED when `transaction_count` (if an integer) or the length of `transactions`
  (if a list) exceeds `max_batch`.
* Structural validation reports every error at once (Laravel messages, attribute names with spaces
  for underscores), including the content checks (adjustment and tax types), the count check and
  tenant/terminal binding. `transaction_count` decides the form: 1 needs a `transaction` object
  (an error on `transaction` otherwise, also for a one-element `transactions`), N != 1 needs
  `transactions` with exactly N elements (an error on `transaction_count` otherwise). When the count
  is unusable, whichever of `transaction`/`transactions` is present is validated. `tenant_id`/
  `terminal_id` accept integers or integer strings (Laravel `integer`). Content checks run whenever
  the list is a list. The non-VAT exception: VAT and VATABLE_SALES may be absent when
  SC_VAT_EXEMPT_SALES is present with an amount > 0 and any VAT/VATABLE_SALES present is 0.
* HARDWARE_ID_MISMATCH names the failing transaction in its message; the key is `hardware_id`.
* Idempotency: one global table keyed by `submission_uuid` (HEAD's intake table). Checksums compare
  case-insensitively. The first row for a uuid is never overwritten: a later refusal under a known
  uuid (e.g. a structurally broken body reusing an accepted uuid) is listed in `rejections` only.
  403/422 structural/422 checksum refusals are stored REJECTED when `submission_uuid` is a string;
  413 and BATCH_LIMIT_EXCEEDED are listed in `rejections` but stored nowhere. A replay of a rejected
  submission answers 422 with the original code and errors and counts as a replay, not a rejection.
* Processing is immediate: an accepted submission's transactions are stored at once, job COMPLETED,
  validation VALID. A transaction_id already stored for the terminal (from any earlier submission,
  or earlier in the same batch) is a duplicate: the first is kept, `times_received` goes up and the
  pair is listed in `duplicates`. `intake_id`s and transaction ids (the numeric status key) count
  from 1; rejected intake rows take intake ids too.
* 401 bodies: Laravel's `{"message":"Unauthenticated."}` on the `auth:sanctum` routes (official,
  status, void); the controllers' own bodies on heartbeat and refresh (§4.2, §4.3).
* Tokens: "<id>|<40 letters and digits>" from a generator seeded by `seed`; a token without the
  "<id>|" part is matched on its secret alone (as Sanctum does). Minting (auth/terminal) deletes the
  terminal's other tokens; refresh deletes all of them, the one used included. `machine_number` in
  the auth answer is null (the config has none).
* `X-Request-Id` (or `X-Correlation-ID`) is echoed on every /api/v1 answer, else a UUID v4 is made
  (seeded) and sent; it is also the body's `correlation_id`.
* Status lookup (§4.4) matches `transaction_id` or the numeric id, any terminal (HEAD does not scope
  it); a voided transaction stays COMPLETED/VALID and shows `voided_at`.
* Void (§4.6): `transaction_id` must match Laravel's `uuid` (any version) and be ≤ 191 characters;
  `payload_checksum` must be 64 characters; the checksum is checked with `verify_void` on the
  trimmed values. Void and heartbeat are not rate limited.
* Timestamps are ISO UTC with microseconds and `Z` (Laravel `toISOString()`).
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.sync.checksum import server_view, verify_submission, verify_void

# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SimTerminal:
    """A POS terminal registered at head office: the serial is also the transactions' hardware_id."""

    serial_number: str = "TSMS-SIM-0001"
    api_key: str = "sim-api-key-0001"
    tenant_id: int = 1
    terminal_id: int = 7


@dataclass(frozen=True)
class TsmsSimulatorConfig:
    terminals: tuple[SimTerminal, ...] = (SimTerminal(),)
    rate_limit: int = 50  # fairness: submissions per terminal per window
    rate_window_s: float = 60.0
    max_batch: int = 500
    max_body_bytes: int = 2 * 1024 * 1024
    seed: int = 1

    def __post_init__(self) -> None:
        serials = [t.serial_number.strip() for t in self.terminals]
        if len(set(serials)) != len(serials) or len({t.terminal_id for t in self.terminals}) != len(serials):
            raise ValueError("terminals must have distinct serial numbers and terminal ids")
        if self.rate_limit < 0 or self.rate_window_s <= 0 or self.max_batch < 1 or self.max_body_bytes < 1:
            raise ValueError("rate_limit >= 0, rate_window_s > 0, max_batch >= 1 and max_body_bytes >= 1 are required")


HEARTBEAT_THRESHOLD_S = 300
ABILITIES = ("transaction:create", "transaction:read", "transaction:status", "heartbeat:send")
ADJUSTMENT_TYPES = ("promo_discount", "senior_discount", "pwd_discount", "vip_card_discount",
                    "service_charge_distributed_to_employees", "service_charge_retained_by_management",
                    "employee_discount")
REQUIRED_TAXES = ("VAT", "VATABLE_SALES", "SC_VAT_EXEMPT_SALES")

# --- routes -----------------------------------------------------------------------------------

AUTH, REFRESH, HEARTBEAT, OFFICIAL, STATUS, VOID = (
    "auth/terminal", "auth/refresh", "heartbeat", "transactions/official", "transactions/status", "transactions/void")
ROUTE_METHODS: dict[str, str] = {AUTH: "POST", REFRESH: "POST", HEARTBEAT: "POST", OFFICIAL: "POST",
                                 STATUS: "GET", VOID: "POST"}
ROUTES = frozenset(ROUTE_METHODS)


def route(path: str) -> tuple[str, str | None] | None:
    """(route name, path parameter) for a path below /api/v1/, or None when there is no such route."""
    parts = path.strip("/").split("/")
    joined = "/".join(parts)
    if joined in (AUTH, REFRESH, HEARTBEAT, OFFICIAL):
        return joined, None
    if len(parts) == 3 and parts[0] == "transactions" and parts[1] and parts[2] in ("status", "void"):
        return f"transactions/{parts[2]}", parts[1]
    return None


def route_name(path: str) -> str:
    """The name a request is counted under: the route, else the path itself."""
    found = route(path)
    return found[0] if found is not None else path.strip("/")


# --- answers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # JSON-able
    headers: Mapping[str, str] = field(default_factory=dict)


def iso(moment: datetime) -> str:
    """Laravel's toISOString(): UTC, microseconds, Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _unauthenticated(rid: str) -> Answer:
    return Answer(401, {"message": "Unauthenticated."}, {"X-Request-Id": rid})


# --- parsing and Laravel-style validation ---------------------------------------------------------

_INT64 = 2 ** 63


def _php_int(text: str) -> int | float:
    value = int(text)
    return value if -_INT64 <= value < _INT64 else float(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request input as Laravel's controllers see it: json_decode, then trim and "" -> null."""
    try:
        doc = json.loads(body.decode("utf-8"), parse_int=_php_int, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    view = server_view(doc)
    return view if isinstance(view, dict) else {}


UUID_V4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE)
UUID_ANY = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z?")
RECEIPT_NO = re.compile(r"[A-Za-z0-9.\-]{1,128}")
HEX64 = re.compile(r"[0-9a-f]{64}", re.IGNORECASE)
_NUMERIC = re.compile(r"[ \t\n\r\v\f]*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?[ \t\n\r\v\f]*")  # is_numeric
_INTEGER = re.compile(r"[+-]?(0|[1-9][0-9]*)")  # FILTER_VALIDATE_INT


def _number(value: Any) -> float | None:
    """The value of a Laravel `numeric` field, or None when it is not numeric."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _NUMERIC.fullmatch(value):
        return float(value)
    return None


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return None


class Errors:
    """Validation errors keyed by dotted field, Laravel style."""

    def __init__(self) -> None:
        self.by_field: dict[str, list[str]] = {}

    def add(self, key: str, message: str) -> None:
        self.by_field.setdefault(key, []).append(message)

    def __bool__(self) -> bool:
        return bool(self.by_field)

    def field(self, doc: Mapping[str, Any], key: str, at: str, kind: str, *, max_len: int | None = None,
              size: int | None = None, pattern: re.Pattern[str] | None = None, minimum: float | None = None,
              min_items: int | None = None) -> Any:
        """Check doc[key] (required); returns the value when it passed, else None."""
        name = f"{at}.{key}" if at else key
        label = name.replace("_", " ")
        value = doc.get(key)
        if value is None or (isinstance(value, list | dict) and not value):
            self.add(name, f"The {label} field is required.")
            return None
        before = len(self.by_field.get(name, ()))
        if kind == "string":
            if not isinstance(value, str):
                self.add(name, f"The {label} field must be a string.")
                return None
            if max_len is not None and len(value) > max_len:
                self.add(name, f"The {label} field must not be greater than {max_len} characters.")
            if size is not None and len(value) != size:
                self.add(name, f"The {label} field must be {size} characters.")
            if pattern is not None and not pattern.fullmatch(value):
                self.add(name, f"The {label} field format is invalid.")
        elif kind == "integer":
            number = _integer(value)
            if number is None:
                self.add(name, f"The {label} field must be an integer.")
                return None
            if minimum is not None and number < minimum:
                self.add(name, f"The {label} field must be at least {minimum:g}.")
            value = number
        elif kind == "numeric":
            amount = _number(value)
            if amount is None:
                self.add(name, f"The {label} field must be a number.")
                return None
            if minimum is not None and amount < minimum:
                self.add(name, f"The {label} field must be at least {minimum:g}.")
        elif kind == "list":
            if not isinstance(value, list):
                self.add(name, f"The {label} field must be an array.")
                return None
            if min_items is not None and len(value) < min_items:
                self.add(name, f"The {label} field must have at least {min_items} items.")
                return value  # the items are still checked
        elif kind == "object" and not isinstance(value, dict):
            self.add(name, f"The {label} field must be an array.")
            return None
        return value if len(self.by_field.get(name, ())) == before else None


def _check_transaction(errors: Errors, tx: Any, at: str) -> None:
    if not isinstance(tx, dict):
        errors.add(at, f"The {at.replace('_', ' ')} field must be an array.")
        return
    errors.field(tx, "transaction_id", at, "string", pattern=UUID_V4)
    errors.field(tx, "hardware_id", at, "string", max_len=255)
    errors.field(tx, "receipt_no", at, "string", pattern=RECEIPT_NO)
    errors.field(tx, "transaction_timestamp", at, "string", pattern=TIMESTAMP)
    errors.field(tx, "gross_sales", at, "numeric", minimum=0)
    errors.field(tx, "net_sales", at, "numeric")
    errors.field(tx, "promo_status", at, "string", max_len=255)
    errors.field(tx, "customer_code", at, "string", max_len=255)
    errors.field(tx, "payload_checksum", at, "string", size=64)
    adjustments = errors.field(tx, "adjustments", at, "list", min_items=7)
    if isinstance(adjustments, list):
        seen = _typed_items(errors, adjustments, f"{at}.adjustments", "adjustment_type", 50)
        missing = [kind for kind in ADJUSTMENT_TYPES if kind not in seen]
        if missing:
            errors.add(f"{at}.adjustments", f"Missing required adjustment types: {', '.join(missing)}.")
    taxes = errors.field(tx, "taxes", at, "list", min_items=4)
    if isinstance(taxes, list):
        amounts = _typed_items(errors, taxes, f"{at}.taxes", "tax_type", 20)
        missing = [kind for kind in REQUIRED_TAXES if kind not in amounts]
        exempt = amounts.get("SC_VAT_EXEMPT_SALES")
        if missing and exempt is not None and exempt > 0 and all(amounts.get(k, 0) == 0 for k in REQUIRED_TAXES[:2]):
            missing = []  # a non-VAT sale
        if missing:
            errors.add(f"{at}.taxes", f"Missing required tax types: {', '.join(missing)}.")


def _typed_items(errors: Errors, items: list[Any], at: str, type_key: str, max_len: int) -> dict[str, float]:
    """Check [{<type_key>, amount}] items; the amount of the first item of each type."""
    seen: dict[str, float] = {}
    for index, item in enumerate(items):
        where = f"{at}.{index}"
        if not isinstance(item, dict):
            errors.add(where, f"The {where.replace('_', ' ')} field must be an array.")
            continue
        kind = errors.field(item, type_key, where, "string", max_len=max_len)
        amount = errors.field(item, "amount", where, "numeric")
        if isinstance(kind, str) and kind not in seen:
            seen[kind] = _number(amount) or 0.0
    return seen


def structural_errors(doc: Mapping[str, Any], terminal: SimTerminal) -> dict[str, list[str]]:
    """Every §1.1/§1.2 error of a submission sent with `terminal`'s token; {} when it is valid."""
    errors = Errors()
    errors.field(doc, "submission_uuid", "", "string", pattern=UUID_V4)
    tenant_id = errors.field(doc, "tenant_id", "", "integer")
    if tenant_id is not None and tenant_id != terminal.tenant_id:
        errors.add("tenant_id", "The tenant id does not match the authenticated terminal's tenant.")
    terminal_id = errors.field(doc, "terminal_id", "", "integer")
    if terminal_id is not None and terminal_id != terminal.terminal_id:
        errors.add("terminal_id", "The terminal id does not match the authenticated terminal.")
    errors.field(doc, "submission_timestamp", "", "string", pattern=TIMESTAMP)
    count = errors.field(doc, "transaction_count", "", "integer", minimum=1)
    errors.field(doc, "payload_checksum", "", "string", pattern=HEX64)
    single = count == 1 if count is not None else "transaction" in doc
    if single:
        if count is not None and doc.get("transaction") is None:
            errors.add("transaction", "The transaction field is required when transaction count is 1.")
        elif errors.field(doc, "transaction", "", "object") is not None:
            _check_transaction(errors, doc["transaction"], "transaction")
    elif count is not None or "transactions" in doc:
        if count is not None and not doc.get("transactions"):
            errors.add("transactions", "The transactions field is required unless transaction count is 1.")
        else:
            items = errors.field(doc, "transactions", "", "list", min_items=1)
            if isinstance(items, list):
                if count is not None and len(items) != count:
                    errors.add("transaction_count", f"The transaction count ({count}) does not match the number "
                                                    f"of transactions submitted ({len(items)}).")
                for index, item in enumerate(items):
                    _check_transaction(errors, item, f"transactions.{index}")
    else:
        errors.add("transaction", "The transaction field is required when transactions is not present.")
    return errors.by_field


def submitted_transactions(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The transaction objects of a structurally valid submission."""
    if doc.get("transaction_count") is not None and _integer(doc["transaction_count"]) == 1:
        return [doc["transaction"]]
    return list(doc["transactions"])


# --- stored things ----------------------------------------------------------------------------


@dataclass
class Intake:
    """One row of the idempotency table."""

    submission_uuid: str
    terminal: SimTerminal
    payload_checksum: str | None
    status: str  # "ACCEPTED" | "REJECTED"
    transaction_count: int | None
    intake_id: int
    received_at: datetime
    error_code: str | None = None
    errors: Any = None
    checksum_version: str | None = None
    processing_status: str | None = None
    replays: int = 0


@dataclass
class StoredTransaction:
    pk: int
    terminal: SimTerminal
    transaction_id: str
    fields: dict[str, Any]  # as received (after the middleware)
    submission_uuid: str
    checksum_version: str | None
    created_at: datetime
    times_received: int = 1
    voided_at: datetime | None = None
    void_reason: str | None = None


@dataclass
class _Window:
    start: datetime
    count: int = 0


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str  # below /api/v1/
    headers: Mapping[str, str]  # lower-case names
    body: bytes


_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


class SimState:
    """Everything head office holds and the logic of every endpoint. Not thread-safe: callers lock."""

    def __init__(self, config: TsmsSimulatorConfig) -> None:
        self.config = config
        self.clear()

    def clear(self) -> None:
        self.terminals = {t.serial_number.strip(): t for t in self.config.terminals}
        self._random = random.Random(self.config.seed)
        self.tokens: dict[int, tuple[str, str]] = {}  # token id -> (secret, terminal serial)
        self._token_seq = 0
        self.intakes: dict[str, Intake] = {}
        self._intake_seq = 0
        self.transactions: dict[tuple[str, str], StoredTransaction] = {}  # (serial, transaction_id)
        self._transaction_seq = 0
        self.windows: dict[str, _Window] = {}
        self.last_seen: dict[str, datetime] = {}
        self.duplicates: list[dict[str, Any]] = []
        self.conflicts: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.requests: dict[str, int] = {}
        self.faults_served: dict[str, int] = {}
        self.rate_limited = self.unauthorized = self.tokens_issued = 0
        self.connections = self.heartbeats = self.voids = 0

    # --- bookkeeping called by the HTTP layer ---------------------------------------------------

    def note_request(self, name: str) -> None:
        self.requests[name] = self.requests.get(name, 0) + 1

    def note_connection(self) -> None:
        self.connections += 1

    def note_fault(self, kind: str) -> None:
        self.faults_served[kind] = self.faults_served.get(kind, 0) + 1

    def correlation_id(self, headers: Mapping[str, str]) -> str:
        given = (headers.get("x-request-id") or headers.get("x-correlation-id") or "").strip()
        return given or str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    def revoke_all_tokens(self) -> int:
        count = len(self.tokens)
        self.tokens.clear()
        return count

    # --- requests -------------------------------------------------------------------------------

    def handle(self, request: ApiRequest, now: datetime, *, rate_limit: int | None = None) -> Answer:
        """Answer one request to /api/v1/<path>; `rate_limit` replaces the configured fairness limit."""
        rid = self.correlation_id(request.headers)
        found = route(request.path)
        if found is None:
            answer = Answer(404, {"message": f"The route api/v1/{request.path.strip('/')} could not be found."})
        elif request.method != ROUTE_METHODS[found[0]]:
            answer = Answer(405, {"message": f"The {request.method} method is not supported for route "
                                             f"api/v1/{request.path.strip('/')}. Supported methods: "
                                             f"{ROUTE_METHODS[found[0]]}."})
        else:
            name, param = found
            if name == AUTH:
                answer = self._auth(request, now)
            else:
                terminal = self._bearer(request.headers)
                if name == REFRESH:
                    answer = self._refresh(terminal)
                elif terminal is None:
                    answer = (Answer(401, {"error": "Unauthenticated"}) if name == HEARTBEAT
                              else _unauthenticated(rid))
                elif name == HEARTBEAT:
                    answer = self._heartbeat(terminal, now)
                elif name == OFFICIAL:
                    limit = self.config.rate_limit if rate_limit is None else rate_limit
                    answer = self._submit(terminal, request.body, now, rid, limit)
                elif name == STATUS:
                    assert param is not None
                    answer = self._status(param)
                else:
                    assert param is not None
                    answer = self._void(terminal, param, request.body, now)
        if answer.status == 401:
            self.unauthorized += 1
        return Answer(answer.status, answer.body, {**answer.headers, "X-Request-Id": rid})

    def unavailable(self, headers: Mapping[str, str], retry_after: int) -> Answer:
        """The open-circuit answer (§3.1 row 8), for the `unavailable` fault."""
        rid = self.correlation_id(headers)
        return Answer(503, {"error": "Service unavailable", "service": "transaction-intake",
                            "message": "Circuit is open due to multiple failures",
                            "retry_after_seconds": retry_after, "correlation_id": rid},
                      {"Retry-After": str(retry_after), "X-Request-Id": rid})

    # --- auth (§4.1, §4.2) ----------------------------------------------------------------------

    def _bearer(self, headers: Mapping[str, str]) -> SimTerminal | None:
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        token_id, bar, secret = token.partition("|")
        if bar:
            entry = self.tokens.get(int(token_id)) if token_id.isascii() and token_id.isdigit() else None
            serial = entry[1] if entry is not None and entry[0] == secret else None
        else:
            serial = next((s for sec, s in self.tokens.values() if sec == token), None)
        return self.terminals.get(serial) if serial is not None else None

    def _mint(self, terminal: SimTerminal) -> str:
        serial = terminal.serial_number.strip()
        for token_id in [i for i, (_, s) in self.tokens.items() if s == serial]:
            del self.tokens[token_id]
        self._token_seq += 1
        secret = "".join(self._random.choice(_ALNUM) for _ in range(40))
        self.tokens[self._token_seq] = (secret, serial)
        self.tokens_issued += 1
        return f"{self._token_seq}|{secret}"

    def _auth(self, request: ApiRequest, now: datetime) -> Answer:
        doc = parse_body(request.body)
        errors = Errors()
        serial = errors.field(doc, "serial_number", "", "string", max_len=255)
        api_key = errors.field(doc, "api_key", "", "string")
        if errors:
            return Answer(422, {"error": "Validation failed", "message": "Invalid request data",
                                "errors": errors.by_field})
        terminal = self.terminals.get(serial)
        if terminal is None or terminal.api_key != api_key:
            return Answer(401, {"error": "Authentication failed",
                                "message": "Invalid serial number or API key, or terminal is inactive"})
        self.last_seen[terminal.serial_number.strip()] = now
        return Answer(200, {"success": True, "data": {
            "serial_number": terminal.serial_number, "tenant_id": terminal.tenant_id, "machine_number": None,
            "access_token": self._mint(terminal), "token_type": "Bearer", "expires_in": None,
            "abilities": list(ABILITIES),
            "terminal_config": {"supports_guest_count": False, "notifications_enabled": False,
                                "heartbeat_threshold": HEARTBEAT_THRESHOLD_S}}})

    def _refresh(self, terminal: SimTerminal | None) -> Answer:
        if terminal is None:
            return Answer(401, {"error": "Unauthenticated", "message": "No valid terminal token provided"})
        return Answer(200, {"success": True, "data": {"access_token": self._mint(terminal), "token_type": "Bearer",
                                                      "expires_in": None}})

    # --- heartbeat (§4.3) -----------------------------------------------------------------------

    def _heartbeat(self, terminal: SimTerminal, now: datetime) -> Answer:
        self.heartbeats += 1
        self.last_seen[terminal.serial_number.strip()] = now
        return Answer(200, {"success": True, "data": {
            "message": "Heartbeat received", "server_time": iso(now),
            "next_heartbeat_due": iso(now + timedelta(seconds=HEARTBEAT_THRESHOLD_S))}})

    # --- submissions (§1, §3.1) -----------------------------------------------------------------

    def _fairness(self, terminal: SimTerminal, now: datetime, limit: int, rid: str) -> Answer | None:
        serial = terminal.serial_number.strip()
        window = self.windows.get(serial)
        length = timedelta(seconds=self.config.rate_window_s)
        if window is None or not window.start <= now < window.start + length:
            window = self.windows[serial] = _Window(now)
        window.count += 1
        if window.count <= limit:
            return None
        self.rate_limited += 1
        reset_at = window.start + length
        retry_after = max(1, math.ceil((reset_at - now).total_seconds()))
        return Answer(429, {"success": False, "error_code": "FAIRNESS_LIMIT_EXCEEDED",
                            "message": "Too many submissions from this terminal. Please retry later.",
                            "scope": "terminal", "limit": limit, "count": window.count,
                            "retry_after_seconds": retry_after, "reset_at": iso(reset_at), "correlation_id": rid},
                      {"Retry-After": str(retry_after)})

    def _reject(self, terminal: SimTerminal, doc: Mapping[str, Any], now: datetime, answer: Answer, *,
                store: bool) -> Answer:
        body = answer.body
        uuid_ = doc.get("submission_uuid")
        self.rejections.append({"submission_uuid": uuid_ if isinstance(uuid_, str) else None,
                                "status": answer.status, "error_code": body.get("error_code"),
                                "errors": copy.deepcopy(body.get("errors"))})
        if store and isinstance(uuid_, str) and uuid_ not in self.intakes:
            checksum = doc.get("payload_checksum")
            self.intakes[uuid_] = Intake(
                uuid_, terminal, checksum.lower() if isinstance(checksum, str) else None, "REJECTED",
                _integer(doc.get("transaction_count")), self._next_intake(), now, body.get("error_code"),
                copy.deepcopy(body.get("errors")))
        return answer

    def _next_intake(self) -> int:
        self._intake_seq += 1
        return self._intake_seq

    def _submit(self, terminal: SimTerminal, body: bytes, now: datetime, rid: str, limit: int) -> Answer:
        if len(body) > self.config.max_body_bytes:
            return self._reject(terminal, {}, now, Answer(413, {
                "success": False, "error_code": "PAYLOAD_TOO_LARGE",
                "message": f"Payload exceeds the maximum allowed size of {self.config.max_body_bytes} bytes.",
                "max_payload_bytes": self.config.max_body_bytes, "correlation_id": rid}), store=False)
        refused = self._fairness(terminal, now, limit, rid)
        if refused is not None:
            return refused
        doc = parse_body(body)
        count = _integer(doc.get("transaction_count"))
        items = doc.get("transactions")
        if (count is not None and count > self.config.max_batch) or \
                (isinstance(items, list) and len(items) > self.config.max_batch):
            return self._reject(terminal, doc, now, Answer(422, {
                "success": False, "message": "Batch transaction count exceeds the maximum allowed.",
                "error_code": "BATCH_LIMIT_EXCEEDED", "max_batch_count": self.config.max_batch,
                "correlation_id": rid}), store=False)
        errors = structural_errors(doc, terminal)
        if errors:
            return self._reject(terminal, doc, now, Answer(422, {
                "success": False, "message": "Structural validation failed",
                "error_code": "STRUCTURAL_VALIDATION_FAILURE", "errors": errors, "correlation_id": rid}), store=True)
        transactions = submitted_transactions(doc)
        serial = terminal.serial_number.strip()
        wrong = [(i, tx["hardware_id"]) for i, tx in enumerate(transactions) if tx["hardware_id"].strip() != serial]
        if wrong:
            where = "transaction" if len(transactions) == 1 and "transaction" in doc else "transaction at index {}"
            messages = [f"The hardware id {hw!r} of the {where.format(i)} does not match the terminal's "
                        f"registered serial number." for i, hw in wrong]
            return self._reject(terminal, doc, now, Answer(403, {
                "success": False, "message": "Forbidden - hardware ID does not match terminal",
                "error_code": "HARDWARE_ID_MISMATCH", "errors": {"hardware_id": messages},
                "correlation_id": rid}), store=True)
        uuid_: str = doc["submission_uuid"]
        checksum: str = doc["payload_checksum"].lower()
        known = self.intakes.get(uuid_)
        if known is not None:
            return self._known(known, terminal, checksum, now, rid)
        version, checksum_errors = verify_submission(doc)
        if version is None:
            return self._reject(terminal, doc, now, Answer(422, {
                "success": False,
                "message": "Cryptographic integrity check failed. Payload may have been tampered with or "
                           "canonicalization logic is incorrect.",
                "error_code": "CRYPTOGRAPHIC_INTEGRITY_FAILURE", "errors": checksum_errors,
                "hint": "Ensure you are using the V2.1/V2.2 canonicalization strategy (ksort + 2-decimal strings).",
                "correlation_id": rid}), store=True)
        intake = Intake(uuid_, terminal, checksum, "ACCEPTED", len(transactions), self._next_intake(), now,
                        checksum_version=version)
        self.intakes[uuid_] = intake
        self.last_seen[serial] = now
        fresh = sum(self._store(terminal, tx, uuid_, version, now) for tx in transactions)
        intake.processing_status = "PROCESSED" if fresh else "DUPLICATE"
        return Answer(202, {"success": True, "status": "queued", "message": "Submission accepted",
                            "submission_uuid": uuid_, "intake_id": intake.intake_id, "correlation_id": rid,
                            "retryable": False})

    def _known(self, known: Intake, terminal: SimTerminal, checksum: str, now: datetime, rid: str) -> Answer:
        """The idempotency table already holds this uuid."""
        same_terminal = known.terminal.serial_number.strip() == terminal.serial_number.strip()
        if same_terminal and known.payload_checksum == checksum:
            known.replays += 1
            data = {"submission_uuid": known.submission_uuid, "intake_id": known.intake_id,
                    "intake_status": known.status, "processing_status": known.processing_status,
                    "last_error_code": known.error_code, "payload_checksum": known.payload_checksum,
                    "received_at": iso(known.received_at)}
            if known.status == "ACCEPTED":
                self.last_seen[terminal.serial_number.strip()] = now
                return Answer(202, {"success": True, "status": "accepted", "message": "Submission already accepted",
                                    "submission_uuid": known.submission_uuid, "intake_id": known.intake_id,
                                    "correlation_id": rid, "retryable": False, "data": data})
            return Answer(422, {"success": False,
                                "message": "Submission was already rejected. Correct the payload and resend with a "
                                           "new submission_uuid.",
                                "error_code": known.error_code, "errors": copy.deepcopy(known.errors),
                                "correlation_id": rid, "data": data})
        reason = "terminal" if not same_terminal else "payload_checksum"
        conflict = {"submission_uuid": known.submission_uuid, "reason": f"different {reason}",
                    "original": {"terminal_id": known.terminal.terminal_id, "payload_checksum": known.payload_checksum,
                                 "status": known.status},
                    "incoming": {"terminal_id": terminal.terminal_id, "payload_checksum": checksum}}
        self.conflicts.append(copy.deepcopy(conflict))
        return Answer(409, {"success": False,
                            "message": "Submission UUID already exists with a different terminal or payload. Correct "
                                       "the payload and resend with a new submission_uuid.",
                            "error_code": "IDEMPOTENCY_CONFLICT", "submission_uuid": known.submission_uuid,
                            "correlation_id": rid, "conflict": conflict})

    def _store(self, terminal: SimTerminal, tx: Mapping[str, Any], uuid_: str, version: str, now: datetime) -> bool:
        """Keep one accepted transaction; False when its id was already stored for the terminal."""
        key = (terminal.serial_number.strip(), tx["transaction_id"])
        first = self.transactions.get(key)
        if first is not None:
            first.times_received += 1
            self.duplicates.append({"transaction_id": tx["transaction_id"], "submission_uuid": uuid_,
                                    "terminal_id": terminal.terminal_id,
                                    "first_submission_uuid": first.submission_uuid})
            return False
        self._transaction_seq += 1
        self.transactions[key] = StoredTransaction(self._transaction_seq, terminal, tx["transaction_id"],
                                                   copy.deepcopy(dict(tx)), uuid_, version, now)
        return True

    # --- status (§4.4) --------------------------------------------------------------------------

    def _status(self, wanted: str) -> Answer:
        found = next((t for t in self.transactions.values() if t.transaction_id == wanted), None)
        if found is None and wanted.isascii() and wanted.isdigit():
            found = next((t for t in self.transactions.values() if t.pk == int(wanted)), None)
        if found is None:
            return Answer(404, {"success": False, "status": "error", "message": "Transaction not found"})
        created = iso(found.created_at)
        return Answer(200, {"success": True, "status": "success", "message": "Status lookup succeeded", "data": {
            "id": found.pk, "transaction_id": found.transaction_id,
            "customer_code": found.fields.get("customer_code"), "gross_sales": found.fields.get("gross_sales"),
            "net_sales": found.fields.get("net_sales"), "status": "completed", "processing_status": "PROCESSED",
            "job_status": "COMPLETED", "validation_status": "VALID", "completed_at": created, "attempts": 1,
            "error": None, "voided_at": iso(found.voided_at) if found.voided_at else None,
            "created_at": created, "updated_at": iso(found.voided_at or found.created_at)}})

    # --- void (§4.6) ----------------------------------------------------------------------------

    def _void(self, terminal: SimTerminal, path_id: str, body: bytes, now: datetime) -> Answer:
        doc = parse_body(body)
        errors = Errors()
        transaction_id = errors.field(doc, "transaction_id", "", "string", max_len=191, pattern=UUID_ANY)
        reason = errors.field(doc, "void_reason", "", "string", max_len=255)
        received = errors.field(doc, "payload_checksum", "", "string", size=64)
        if errors:
            return Answer(422, {"success": False, "message": "Validation failed", "errors": errors.by_field})
        if transaction_id != path_id:
            return Answer(422, {"success": False, "message": "Transaction ID mismatch",
                                "errors": {"transaction_id": ["The transaction ID in the body does not match the "
                                                              "one in the URL."]}})
        stored = self.transactions.get((terminal.serial_number.strip(), transaction_id))
        if stored is None:
            return Answer(404, {"success": False,
                                "message": "Transaction not found or does not belong to this terminal"})
        if stored.voided_at is not None:
            return Answer(409, {"success": False, "message": "Transaction already voided",
                                "voided_at": iso(stored.voided_at), "void_reason": stored.void_reason})
        if not verify_void(transaction_id, reason, received):
            return Answer(422, {"success": False, "message": "Invalid payload checksum",
                                "errors": {"payload_checksum": ["Checksum validation failed"]}})
        stored.voided_at, stored.void_reason = now, reason
        self.voids += 1
        return Answer(200, {"success": True, "message": "Transaction voided successfully by POS",
                            "transaction_id": transaction_id, "voided_at": iso(now), "void_reason": reason})

    # --- the view for tests -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        transactions: dict[str, Any] = {}
        for (_, transaction_id), t in self.transactions.items():
            key = transaction_id if transaction_id not in transactions else f"{t.terminal.terminal_id}:{transaction_id}"
            transactions[key] = {
                "terminal_id": t.terminal.terminal_id, "receipt_no": t.fields.get("receipt_no"),
                "hardware_id": t.fields.get("hardware_id"), "gross_sales": t.fields.get("gross_sales"),
                "net_sales": t.fields.get("net_sales"), "submission_uuid": t.submission_uuid,
                "times_received": t.times_received, "voided_at": iso(t.voided_at) if t.voided_at else None,
                "void_reason": t.void_reason, "checksum_version": t.checksum_version,
                "received_at": iso(t.created_at), "id": t.pk}
        submissions = {u: {"status": i.status, "transaction_count": i.transaction_count,
                           "payload_checksum": i.payload_checksum, "replays": i.replays,
                           "terminal_id": i.terminal.terminal_id, "intake_id": i.intake_id,
                           "error_code": i.error_code, "checksum_version": i.checksum_version,
                           "received_at": iso(i.received_at)}
                       for u, i in self.intakes.items()}
        return copy.deepcopy({
            "transactions": transactions, "duplicates": self.duplicates, "conflicts": self.conflicts,
            "rejections": self.rejections, "submissions": submissions, "rate_limited": self.rate_limited,
            "unauthorized": self.unauthorized, "tokens_issued": self.tokens_issued,
            "tokens_active": len(self.tokens), "requests": self.requests, "connections": self.connections,
            "heartbeats": self.heartbeats, "voids": self.voids, "faults_served": self.faults_served,
            "last_seen": {serial: iso(moment) for serial, moment in self.last_seen.items()}})


# --- the fault plan ---------------------------------------------------------------------------


@dataclass
class CountedFault:
    kind: str  # "http_status", "unavailable", "lose_response"
    count: int
    paths: frozenset[str] | None  # route names; None: every API route
    status: int = 0
    retry_after: int = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "paths": None if self.paths is None else sorted(self.paths)}
        if self.kind == "http_status":
            out["status"] = self.status
        if self.kind == "unavailable":
            out["retry_after"] = self.retry_after
        return out


# Without `paths`: http_status hits any API request; the intake circuit breaker (§3.1 row 8) and a
# lost answer after commit are about submissions.
DEFAULT_FAULT_PATHS: dict[str, tuple[str, ...] | None] = {"http_status": None, "unavailable": (OFFICIAL,),
                                                          "lose_response": (OFFICIAL,)}
ANSWERING_FAULTS = ("http_status", "unavailable")  # answer instead of the server, in this order of precedence
FAULT_NAMES = ("outage", "latency_ms", "http_status", "unavailable", "rate_limit", "revoke_tokens", "lose_response")


@dataclass
class Faults:
    outage: bool = False
    latency_ms: float = 0
    rate_limit: int | None = None
    counted: dict[str, CountedFault] = field(default_factory=dict)

    def merge(self, changes: Mapping[str, Any]) -> bool:
        """Apply POST /_sim/faults semantics (given entries replace, null clears); returns whether tokens
        are to be revoked now. ValueError, and nothing changes, on a bad entry."""
        new = copy.deepcopy(self)
        revoke = False
        for key, value in changes.items():
            if key == "outage":
                if value is not None and not isinstance(value, bool):
                    raise ValueError("outage must be true, false or null")
                new.outage = bool(value)
            elif key == "latency_ms":
                new.latency_ms = 0 if value is None else _non_negative(value, key)
            elif key == "rate_limit":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise ValueError("rate_limit must be a non-negative integer or null")
                new.rate_limit = value
            elif key == "revoke_tokens":
                if value is not None and not isinstance(value, bool):
                    raise ValueError("revoke_tokens must be true, false or null")
                revoke = bool(value)
            elif key in ("http_status", "unavailable", "lose_response"):
                fault = _counted(key, value)
                if fault is None or fault.count == 0:
                    new.counted.pop(key, None)
                else:
                    new.counted[key] = fault
            else:
                raise ValueError(f"unknown fault {key!r}; use {', '.join(FAULT_NAMES)}")
        self.__dict__.update(new.__dict__)
        return revoke

    def take(self, name: str, kinds: Collection[str] = ANSWERING_FAULTS) -> CountedFault | None:
        """The first of `kinds` that applies to route `name`, with one of its count used up."""
        for kind in kinds:
            fault = self.counted.get(kind)
            if fault is not None and (fault.paths is None or name in fault.paths):
                fault.count -= 1
                if fault.count <= 0:
                    del self.counted[kind]
                return copy.copy(fault)
        return None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"outage": self.outage, "latency_ms": self.latency_ms, "rate_limit": self.rate_limit}
        out.update({kind: (self.counted[kind].describe() if kind in self.counted else None)
                    for kind in ("http_status", "unavailable", "lose_response")})
        return out


def _counted(kind: str, value: Any) -> CountedFault | None:
    if value is None:
        return None
    allowed = {"count", "paths"} | {"http_status": {"status"}, "unavailable": {"retry_after"}}.get(kind, set())
    if not isinstance(value, dict):
        raise ValueError(f"{kind} must be an object or null")
    extra = sorted(set(value) - allowed)
    if extra:
        raise ValueError(f"{kind}: unknown field {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")
    count = value.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{kind}.count must be a non-negative integer")
    paths = value.get("paths")
    if paths is not None:
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"{kind}.paths must be a list of routes such as {OFFICIAL!r}")
        unknown = sorted(set(paths) - ROUTES)
        if unknown:
            raise ValueError(f"{kind}.paths: unknown route {', '.join(unknown)} (routes: {', '.join(sorted(ROUTES))})")
    if paths is None:
        paths = DEFAULT_FAULT_PATHS[kind]
    fault = CountedFault(kind, count, None if paths is None else frozenset(paths))
    if kind == "http_status":
        status = value.get("status")
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError("http_status.status must be an HTTP error status such as 500")
        fault.status = status
    if kind == "unavailable":
        retry_after = value.get("retry_after", 30)
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ValueError("unavailable.retry_after must be a non-negative integer (seconds)")
        fault.retry_after = retry_after
    return fault


def _non_negative(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key} must be a non-negative number")
    return float(value)
