"""TSMS SHA-256 payload checksums, byte-compatible with the head-office PHP server (pure).

The server (tsms-api.md §2) hashes PHP's `json_encode($x, JSON_UNESCAPED_SLASHES |
JSON_UNESCAPED_UNICODE)` of a canonical form of the decoded body: keys sorted at every depth, lists
kept in order, `{}` turned into `[]`, and money keys normalised by checksum version. Transactions
are hashed first (without their own `payload_checksum`); the envelope is hashed last, without only
its top-level `payload_checksum`, so the nested checksums are part of its input. A void hashes
`{transaction_id, void_reason}` (§4.6).

Everything PHP-specific lives in small helpers below: its float text, its `number_format` rounding,
`is_numeric` and `(float)` casts, and Laravel's `TrimStrings`/`ConvertEmptyStringsToNull` view of
the request. Values are plain JSON data plus `Decimal`, which stands for a JSON number.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

VERSIONS: tuple[str, ...] = ("v2.1", "v2.0", "legacy")

_MONEY_KEYS: dict[str, frozenset[str]] = {
    "v2.1": frozenset({"gross_sales", "net_sales", "amount"}),
    "v2.0": frozenset({"gross_sales", "net_sales", "amount"}),
    "legacy": frozenset({"base_amount", "amount"}),  # Era A: gross_sales was not cast
}
_UNSUPPORTED = "Unsupported payload structure: expected transaction or transactions"

# PHP's is_numeric() for strings: optional surrounding whitespace, decimal digits only (no hex,
# no "inf"), and `[0-9]` rather than `\d`, which would also accept non-ASCII digits.
_PHP_SPACE = " \t\n\r\v\f"
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMERIC_STRING = re.compile(f"[{_PHP_SPACE}]*{_NUMBER}[{_PHP_SPACE}]*")
_NUMERIC_PREFIX = re.compile(f"[{_PHP_SPACE}]*({_NUMBER})")  # what a (float) cast reads

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# json_encode escapes: `"` and `\`, every C0 control (short forms where JSON has one), and
# U+2028/U+2029 because JSON_UNESCAPED_LINE_TERMINATORS is not set. `/` and other non-ASCII stay raw.
_ESCAPES: dict[int, str] = {code: f"\\u{code:04x}" for code in range(0x20)}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", 0x2028: "\\u2028", 0x2029: "\\u2029"})
_ESCAPES.update({ord("\b"): "\\b", ord("\f"): "\\f", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_SURROGATE = re.compile("[\ud800-\udfff]")

# What Laravel 11's TrimStrings strips (Str::trim: PCRE `\s` under /u, plus NUL, U+FEFF, U+200B and
# U+200E), enumerated by running that regex under PHP 8.2 / PCRE2 10.42 over every code point.
_LARAVEL_TRIM = (
    "\x00\t\n\x0b\x0c\r \x85\xa0\u1680\u180e\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u200b\u200e\u2028\u2029\u202f\u205f\u3000\ufeff"
)


def canonical(value: Any, version: str) -> Any:
    """The structure the server hashes: dict keys sorted, `{}` -> `[]`, money keys normalised."""
    return _canonical(value, _money_keys(version), version)


def encode(value: Any) -> str:
    """PHP json_encode(JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE) of a canonical structure.

    Dicts are written in their own order (canonical() sorts them). A Decimal is a JSON number, so
    it is written as PHP writes the float it parses to; so is an int beyond 64 bits. NaN, infinity
    and lone surrogates raise ValueError: PHP's json_encode refuses them too.
    """
    if value is None:
        return "null"
    if isinstance(value, Encoded):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value)) if _INT64_MIN <= value <= _INT64_MAX else _php_float_text(float(value))
    if isinstance(value, float | Decimal):
        return _php_float_text(float(value))
    if isinstance(value, str):
        return _encode_string(value)
    if isinstance(value, Mapping):
        if not value:
            return "[]"  # an empty PHP array is a list
        return "{" + ",".join(f"{_encode_key(k)}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode(item) for item in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as TSMS JSON")


def checksum(obj: Mapping[str, Any], version: str = "v2.1") -> str:
    """Lowercase hex SHA-256 of `obj` without its top-level `payload_checksum` (nested ones kept)."""
    return _digest(_without_checksum(obj), version)


@dataclass(frozen=True, slots=True)
class Encoded:
    """A value already canonicalised and encoded: canonical() keeps it, encode() writes its text."""

    text: str


@dataclass(frozen=True, slots=True)
class SignedTransaction:
    body: dict[str, Any]  # a copy of the transaction, with its payload_checksum
    encoded: Encoded  # its canonical text, as the envelope's checksum reads it


def sign_transaction(transaction: Mapping[str, Any], version: str = "v2.1") -> SignedTransaction:
    """A transaction's checksum, and its canonical text for the envelope's. A transaction is
    canonicalised the same inside its envelope as alone (no key above it is a money key), so the
    envelope's checksum reuses the text instead of canonicalising every transaction a second time."""
    signed: dict[str, Any] = _plain_copy(transaction)
    signed["payload_checksum"] = checksum(signed, version)
    return SignedTransaction(signed, Encoded(encode(canonical(signed, version))))


def sign_envelope(envelope: Mapping[str, Any], key: str, transactions: list[SignedTransaction],
                  version: str = "v2.1") -> dict[str, Any]:
    """The signed envelope: `envelope`'s fields with the signed transactions under `key`
    ("transaction" for one, "transactions" for a list), and the envelope's own checksum."""
    if key not in ("transaction", "transactions") or (key == "transaction" and len(transactions) != 1):
        raise ValueError(f"one transaction goes under 'transaction', a list under 'transactions', not {key!r}")
    placed = ((transactions[0].body, transactions[0].encoded) if key == "transaction"
              else ([t.body for t in transactions], [t.encoded for t in transactions]))
    return _sealed(envelope, {key: placed}, version)


def sign_submission(envelope: Mapping[str, Any], version: str = "v2.1") -> dict[str, Any]:
    """A signed copy of the envelope: each transaction's checksum first, then the envelope's."""
    _money_keys(version)
    placed: dict[str, tuple[Any, Any]] = {}
    single = envelope.get("transaction")
    if isinstance(single, Mapping):
        done = sign_transaction(single, version)
        placed["transaction"] = (done.body, done.encoded)
    batch = envelope.get("transactions")
    if isinstance(batch, list):
        items = [sign_transaction(item, version) if isinstance(item, Mapping) else _plain_copy(item) for item in batch]
        placed["transactions"] = ([i.body if isinstance(i, SignedTransaction) else i for i in items],
                                  [i.encoded if isinstance(i, SignedTransaction) else i for i in items])
    return _sealed(envelope, placed, version)


def _sealed(envelope: Mapping[str, Any], placed: Mapping[str, tuple[Any, Any]], version: str) -> dict[str, Any]:
    """A copy of the envelope with its signed transactions put in (`key: (as sent, as hashed)`) and
    the envelope's checksum over the transactions' canonical texts."""
    signed: dict[str, Any] = _plain_copy(envelope)
    hashed = dict(signed)
    for key, (body, encoded) in placed.items():
        signed[key], hashed[key] = body, encoded
    signed["payload_checksum"] = checksum(hashed, version)
    return signed


def void_checksum(transaction_id: str, void_reason: str) -> str:
    """The void endpoint's checksum: over `{transaction_id, void_reason}` only (§4.6)."""
    return checksum({"transaction_id": transaction_id, "void_reason": void_reason})


def server_view(value: Any) -> Any:
    """The body as HEAD hashes it: Laravel's global middleware trims every string value and turns
    `""` into null, at any depth (keys are untouched). Returns a new structure."""
    if isinstance(value, str):
        return value.strip(_LARAVEL_TRIM) or None
    if isinstance(value, Mapping):
        return {key: server_view(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [server_view(item) for item in value]
    return value


def verify_submission(envelope: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """HEAD's check of a parsed (and server_view'd) body: `(version, [])` for the first version
    under which every layer is valid, else `(None, errors of the v2.1 attempt)`."""
    if envelope.get("transaction") is None and not isinstance(envelope.get("transactions"), list):
        return None, [_UNSUPPORTED]
    errors = _submission_errors(envelope, "v2.1")
    if not errors:
        return "v2.1", []
    if not _submission_errors(envelope, "v2.0"):  # HEAD's compatibility fallback
        return "v2.0", []
    return None, errors


def verify_void(transaction_id: str, void_reason: str, received: str) -> bool:
    """The void endpoint compares with `!==`: exact, so only lowercase hex passes."""
    return received == void_checksum(transaction_id, void_reason)


# --- canonicalisation -------------------------------------------------------------------------


def _money_keys(version: str) -> frozenset[str]:
    if version not in _MONEY_KEYS:
        raise ValueError(f"checksum version: {version!r} is not one of {', '.join(VERSIONS)}")
    return _MONEY_KEYS[version]


def _canonical(value: Any, money: frozenset[str], version: str) -> Any:
    if isinstance(value, Encoded):
        return value
    if isinstance(value, Mapping):
        if not value:
            return []  # json_decode(..., true) makes {} an empty array, which encodes as []
        out: dict[str, Any] = {}
        for key in sorted(value):
            item = _canonical(value[key], money, version)  # PHP recurses first, then casts
            out[key] = _normalise_money(item, version) if key in money else item
        return out
    if isinstance(value, list | tuple):
        return [_canonical(item, money, version) for item in value]
    return value


def _normalise_money(value: Any, version: str) -> Any:
    if version != "v2.1":
        return _php_float_cast(value)  # v2.0 and legacy: (float) $value
    if not _is_numeric(value):
        return value  # v2.1 leaves non-numeric values (null, "n/a", arrays) alone
    if isinstance(value, float | Decimal) and not math.isfinite(value):
        raise ValueError(f"money value {value} is not a finite number")
    # A Decimal goes through float too: the server parses the JSON number into a double before
    # number_format, and from about 1e13 up that double's cents can differ from the Decimal's
    # (99999999999999.99 hashes as "99999999999999.98"); exact rounding would then be rejected.
    return _php_number_format(_php_float_cast(value))


def _is_numeric(value: Any) -> bool:
    """PHP is_numeric(): ints, floats and numeric strings; bool is never a number."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float | Decimal):
        return True
    return isinstance(value, str) and _NUMERIC_STRING.fullmatch(value) is not None


def _php_float_cast(value: Any) -> float:
    """PHP's (float) cast: a string gives its leading number (or 0), an array 1 unless empty."""
    if isinstance(value, str):
        match = _NUMERIC_PREFIX.match(value)
        return float(match.group(1)) if match else 0.0
    if value is None:
        return 0.0
    if isinstance(value, list | tuple | Mapping):
        return 1.0 if value else 0.0
    return float(value)  # bool, int, float, Decimal


def _php_number_format(value: float) -> str:
    """number_format($value, 2, '.', ''): PHP's round() to cents, then "%.2f" of the magnitude."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"  # PHP formats the magnitude and drops the sign here
    rounded = _php_round_cents(value)
    text = f"{abs(rounded):.2f}"
    return "-" + text if rounded < 0 else text  # -0.001 rounds to zero: "0.00", not "-0.00"


def _php_round_cents(value: float) -> float:
    """PHP 8.2's _php_math_round(value, 2, PHP_ROUND_HALF_UP), float step by float step.

    PHP first rounds to 15 significant digits ("pre-rounding") when that is finer than cents, so a
    float such as 1.004999999999999 (which prints with 16 digits) rounds up to 1.01 as PHP does.
    """
    if not math.isfinite(value) or value == 0.0:
        return value
    places = 2
    precision_places = 14 - math.floor(math.log10(abs(value)))
    if places < precision_places < places + 15:
        tmp = _round_half_up(value * float(10**precision_places))
        tmp = tmp / float(10 ** (precision_places - places))
    else:
        tmp = value * float(10**places)
        if abs(tmp) >= 1e15:
            return value  # beyond double precision: PHP returns the value unrounded
    return _round_half_up(tmp) / float(10**places)


def _round_half_up(value: float) -> float:
    return math.floor(value + 0.5) if value >= 0.0 else math.ceil(value - 0.5)


# --- encoding -----------------------------------------------------------------------------------


def _encode_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"object keys must be strings, not {type(key).__name__}")
    return _encode_string(key)


def _encode_string(text: str) -> str:
    if _SURROGATE.search(text):
        raise ValueError("string holds a lone surrogate, which is not valid UTF-8")
    return '"' + text.translate(_ESCAPES) + '"'


def _php_float_text(value: float) -> str:
    """PHP's float text with serialize_precision=-1 and no JSON_PRESERVE_ZERO_FRACTION.

    The digits are the shortest round-trip ones (Python's repr finds the same). PHP writes them in
    plain notation unless the decimal point falls more than 17 places right or 3 zeros left of the
    first digit: so 1120.0 -> 1120, 1e16 -> 10000000000000000, 1e17 -> 1.0e+17, 1e-5 -> 1.0e-5.
    """
    if not math.isfinite(value):
        raise ValueError("PHP's json_encode cannot encode INF or NAN")
    if value == 0.0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    shortest = Decimal(repr(abs(value))).normalize()
    _, digit_tuple, exponent = shortest.as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + exponent  # value = 0.<digits> x 10**point
    if point > 17 or point < -3:
        power = point - 1
        return f"{sign}{digits[0]}.{digits[1:] or '0'}e{'+' if power >= 0 else '-'}{abs(power)}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    whole, fraction = digits[:point].ljust(point, "0"), digits[point:]
    return f"{sign}{whole}.{fraction}" if fraction else f"{sign}{whole}"


def _digest(value: Any, version: str) -> str:
    return hashlib.sha256(encode(canonical(value, version)).encode("utf-8")).hexdigest()


# --- signing and verifying --------------------------------------------------------------------


def _without_checksum(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: item for key, item in value.items() if key != "payload_checksum"}
    return value


def _plain_copy(value: Any) -> Any:
    """A deep copy in plain dicts and lists; scalars (str, numbers, Decimal) are immutable."""
    if isinstance(value, Mapping):
        return {key: _plain_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_copy(item) for item in value]
    return value


def _submission_errors(envelope: Mapping[str, Any], version: str) -> list[str]:
    """One version's attempt. Single form: both layers always. Batch: the envelope only if every
    item passed (so a bad item does not also report a misleading submission error)."""
    if envelope.get("transaction") is not None:  # PHP isset(): present and not null
        return _layer_errors("transaction", envelope["transaction"], version) + _layer_errors(
            "submission", envelope, version
        )
    errors: list[str] = []
    for index, transaction in enumerate(envelope["transactions"]):
        errors += _layer_errors(f"transaction at index {index}", transaction, version)
    return errors or _layer_errors("submission", envelope, version)


def _layer_errors(scope: str, obj: Any, version: str) -> list[str]:
    received = obj.get("payload_checksum") if isinstance(obj, Mapping) else None
    computed = _digest(_without_checksum(obj), version)
    if isinstance(received, str) and received.lower() == computed:  # hash_equals on lowercased
        return []
    shown = "missing" if received is None else str(received)
    return [f"Invalid payload_checksum for {scope} ({version}). Received: {shown}, Computed: {computed}"]
