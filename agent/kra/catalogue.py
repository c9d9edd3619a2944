"""A shop's item catalogue registered with KRA from a CSV file (saveItem), and KRA's code lists refreshed on
demand: what `etims-agent items register` and `etims-agent codes refresh` do.

Reading the CSV is pure (`parse_catalogue`): every bad row is reported with its line, column, problem and
fix, and the caller gets no items while any row is bad unless it asked to skip them. Each row's saveItem
body is built by `payloads.item_request`, the function the signing lane uses for a sale's items, and an
accepted item is recorded with `KraStore.item_registered`, as the lane records it; so the lane does not
register it again before its first sale, and a rerun sends only the rows whose body changed.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from agent.clock import Clock
from agent.errors import ConfigError
from agent.jsonwire import wire_json
from agent.kra.client import KraClient, KraReply
from agent.kra.code_lists import CODES, ITEM_CLASSES, CodeLists
from agent.kra.codes import Outcome, describe
from agent.kra.payloads import Seller, item_request
from agent.queue.kra_store import KraStore
from agent.sales import CENT, MAX_AMOUNT, TAX_BANDS, money

# --- the CSV format ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kra_name: str  # the saveItem field, also accepted as the column's name
    required: bool
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column("item_code", "itemCd", True, "the item code the till sends on sales (at most 20 characters)"),
    Column("name", "itemNm", True, "the item's name (at most 200 characters)"),
    Column("item_class", "itemClsCd", True, "KRA item classification code (digits, e.g. 5059690800)"),
    Column("tax_band", "taxTyCd", True, "A exempt, B 16 %, C zero-rated, D non-VAT, E 8 %"),
    Column("unit_price", "dftPrc", True, "default unit price, e.g. 58.00"),
    Column("qty_unit", "qtyUnitCd", False, "quantity unit, KRA code class 10 (default U, pieces)"),
    Column("pkg_unit", "pkgUnitCd", False, "packaging unit, KRA code class 17 (default NT, net)"),
    Column("origin_country", "orgnNatCd", False, "two-letter country of origin (default kra.origin_country)"),
    Column("item_type", "itemTyCd", False, "1 raw material, 2 finished product, 3 service (default 2)"),
    Column("barcode", "bcd", False, "the barcode, if any (at most 20 characters)"),
)
_BY_HEADER = {name.lower(): c.name for c in COLUMNS for name in (c.name, c.kra_name)}
_REQUIRED = tuple(c.name for c in COLUMNS if c.required)
MAX_ERRORS_SHOWN = 20

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ITEM_CLASS = re.compile(r"[0-9]{1,10}")
_UNIT = re.compile(r"[A-Z0-9]{1,5}")
_COUNTRY = re.compile(r"[A-Z]{2}")
ITEM_TYPES = ("1", "2", "3")


@dataclass(frozen=True, slots=True)
class Defaults:
    """Values for the optional columns; the lane sends the same for an item it registers from a sale."""

    qty_unit: str = "U"
    pkg_unit: str = "NT"
    origin_country: str = "KE"
    item_type: str = "2"


@dataclass(frozen=True, slots=True)
class KnownCodes:
    """KRA's codes from the cached lists; an empty set means "not fetched yet" and is not checked."""

    item_classes: frozenset[str] = frozenset()
    qty_units: frozenset[str] = frozenset()
    pkg_units: frozenset[str] = frozenset()
    countries: frozenset[str] = frozenset()


def known_codes(codes: Mapping[str, Any], item_classes: Mapping[str, Any]) -> KnownCodes:
    """The codes in use in the cached lists (`CodeLists`' cache format)."""
    def in_use(cls: str) -> frozenset[str]:
        listed = codes.get(cls, {}).get("codes", {}) if isinstance(codes.get(cls), dict) else {}
        return frozenset(cd for cd, e in listed.items() if isinstance(e, dict) and e.get("useYn", "Y") != "N")

    classes = frozenset(cd for cd, e in item_classes.items() if isinstance(e, dict) and e.get("useYn", "Y") != "N")
    return KnownCodes(item_classes=classes, qty_units=in_use("10"), pkg_units=in_use("17"), countries=in_use("05"))


@dataclass(frozen=True, slots=True)
class CatalogueItem:
    line: int  # where the row starts in the file
    code: str
    name: str
    item_class: str
    tax_band: str
    unit_price: Decimal
    qty_unit: str
    pkg_unit: str
    origin_country: str
    item_type: str
    barcode: str | None = None

    def as_line(self) -> dict[str, Any]:
        """The item in the shape of a stored sale line: what `item_request` reads."""
        line: dict[str, Any] = {"item_code": self.code, "item_class": self.item_class, "name": self.name,
                                "unit_price": money(self.unit_price), "tax_band": self.tax_band,
                                "qty_unit": self.qty_unit, "pkg_unit": self.pkg_unit}
        if self.barcode is not None:
            line["barcode"] = self.barcode
        return line

    def request(self, seller: Seller) -> str:
        """The saveItem body, byte for byte as the lane would send it for the same item."""
        return wire_json(item_request(self.as_line(), seller, origin_country=self.origin_country,
                                      item_type=self.item_type))

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, **self.as_line(), "origin_country": self.origin_country,
                "item_type": self.item_type}


@dataclass(frozen=True, slots=True)
class RowError:
    line: int  # 0: the file as a whole
    column: str | None
    problem: str
    fix: str

    def __str__(self) -> str:
        where = ", ".join(p for p in (f"line {self.line}" if self.line else "", f"column {self.column}"
                                      if self.column else "") if p)
        return f"{where + ': ' if where else ''}{self.problem}; {self.fix}"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "column": self.column, "problem": self.problem, "fix": self.fix}


class BadCatalogue(ConfigError):
    """The file cannot be used as it is; nothing was sent. Exit code 2, like any bad input."""

    def __init__(self, source: str, errors: Sequence[RowError], *, rows: bool) -> None:
        self.errors = tuple(errors)
        if not rows:  # the file as a whole (encoding, header, empty)
            shown = "; ".join(str(e) for e in self.errors)
            super().__init__(source, shown, "nothing was sent")
            return
        listed = "\n".join(f"  {e}" for e in self.errors[:MAX_ERRORS_SHOWN])
        if len(self.errors) > MAX_ERRORS_SHOWN:
            listed += f"\n  ... and {len(self.errors) - MAX_ERRORS_SHOWN} more"
        super().__init__(source, f"{len(self.errors)} bad row(s), so nothing was sent",
                         f"fix them and run the command again, or give --skip-bad to register only the good "
                         f"rows:\n{listed}")


@dataclass(frozen=True, slots=True)
class Catalogue:
    items: tuple[CatalogueItem, ...]
    errors: tuple[RowError, ...]  # bad rows left out (only when the caller chose to skip them)


class _Bad(Exception):
    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def parse_catalogue(data: bytes, *, source: str = "catalogue", defaults: Defaults = Defaults(),
                    known: KnownCodes = KnownCodes(), skip_bad: bool = False) -> Catalogue:
    """The items of a catalogue CSV; BadCatalogue if the file is unusable, or any row is bad and not `skip_bad`."""
    text = _decode(data, source)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text), strict=True)
    records = _records(reader, source)
    header_line, header = next(records, (0, []))
    if not header:
        raise BadCatalogue(source, [RowError(0, None, "the file is empty",
                                             "give a header row (" + ",".join(_REQUIRED) + ", ...) and one row "
                                             "per item")], rows=False)
    columns = _header(header, header_line, source)
    items: list[CatalogueItem] = []
    errors: list[RowError] = []
    first_line: dict[str, int] = {}
    rows = 0
    for line, cells in records:
        rows += 1
        if len(cells) != len(columns):
            errors.append(RowError(line, None, f"has {len(cells)} cell(s) but the header has {len(columns)}",
                                   "give every column (empty for a default), and put a value that contains "
                                   "a comma in double quotes"))
            continue
        values = dict(zip(columns, (c.strip() for c in cells), strict=True))
        item, row_errors = _row(line, values, defaults, known)
        code = values.get("item_code", "")
        if code in first_line:  # even if either row is bad otherwise: which one is meant is not for us to guess
            row_errors.append(RowError(line, "item_code", f"item code {code!r} is already on line {first_line[code]}",
                                       "list each item once; remove or merge the rows"))
            item = None
        elif code:
            first_line[code] = line
        if item is not None:
            items.append(item)
        errors += row_errors
    if rows == 0:
        raise BadCatalogue(source, [RowError(header_line, None, "there is a header but no items",
                                             "add one row per item under the header")], rows=False)
    if errors and not skip_bad:
        raise BadCatalogue(source, errors, rows=True)
    return Catalogue(tuple(items), tuple(errors))


def _decode(data: bytes, source: str) -> str:
    """UTF-8 with or without a BOM (Excel's "CSV UTF-8"), or UTF-16 with its BOM (Excel's "Unicode text")."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass  # reported below as not UTF-8, with the line
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BadCatalogue(source, [RowError(line, None, f"is not UTF-8 text (byte 0x{data[exc.start]:02x})",
                                             "save the file as \"CSV UTF-8\" (Excel: Save As, CSV UTF-8), or convert "
                                             "it, e.g. iconv -f WINDOWS-1252 -t UTF-8")], rows=False) from None


def _delimiter(text: str) -> str:
    """Comma, or the semicolon or tab some spreadsheets write instead: whichever the header uses most."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return max((",", ";", "\t"), key=first.count) if first else ","


def _records(reader: Any, source: str) -> Iterator[tuple[int, list[str]]]:
    """(line where the record starts, cells) for every non-blank record."""
    previous = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise BadCatalogue(source, [RowError(reader.line_num, None, f"is not valid CSV ({exc})",
                                                 "close every double quote, and double a quote inside a "
                                                 "quoted value (\"\")")], rows=False) from None
        start, previous = previous + 1, reader.line_num
        if any(c.strip() for c in cells):
            yield start, cells


def _header(cells: list[str], line: int, source: str) -> list[str]:
    errors: list[RowError] = []
    columns: list[str] = []
    for cell in cells:
        name = cell.strip()
        column = _BY_HEADER.get(name.lower())
        if column is None:
            errors.append(RowError(line, name or "(empty)", "is not a column of the catalogue",
                                   "rename or remove it; the columns are " + ", ".join(c.name for c in COLUMNS)))
        elif column in columns:
            errors.append(RowError(line, name, f"is the column {column} a second time", "keep one of them"))
        columns.append(column or "")
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        errors.append(RowError(line, None, f"the header lacks the column(s) {', '.join(missing)}",
                               "add them; the first row must name the columns, e.g. " + ",".join(_REQUIRED)))
    if errors:
        raise BadCatalogue(source, errors, rows=False)
    return columns


def _row(line: int, values: Mapping[str, str], defaults: Defaults,
         known: KnownCodes) -> tuple[CatalogueItem | None, list[RowError]]:
    errors: list[RowError] = []

    def take(column: str, read: Callable[[str], Any]) -> Any:
        try:
            return read(values.get(column, ""))
        except _Bad as bad:
            errors.append(RowError(line, column, bad.problem, bad.fix))
            return None

    code = take("item_code", lambda v: _text(v, 20, "the item code the till sends, e.g. KE2NTU0000001"))
    name = take("name", lambda v: _text(v, 200, "the item's name"))
    item_class = take("item_class", lambda v: _item_class(v, known.item_classes))
    band = take("tax_band", _tax_band)
    price = take("unit_price", _price)
    qty_unit = take("qty_unit", lambda v: _code(v or defaults.qty_unit, _UNIT, known.qty_units, "quantity unit",
                                                "class 10, e.g. U, KG, L"))
    pkg_unit = take("pkg_unit", lambda v: _code(v or defaults.pkg_unit, _UNIT, known.pkg_units, "packaging unit",
                                                "class 17, e.g. NT, BG, CT"))
    origin = take("origin_country", lambda v: _code(v or defaults.origin_country, _COUNTRY, known.countries,
                                                    "country", "two letters, e.g. KE"))
    item_type = take("item_type", lambda v: _item_type(v or defaults.item_type))
    barcode = take("barcode", lambda v: _text(v, 20, "", required=False))
    if errors:
        return None, errors
    return CatalogueItem(line=line, code=code, name=name, item_class=item_class, tax_band=band, unit_price=price,
                         qty_unit=qty_unit, pkg_unit=pkg_unit, origin_country=origin, item_type=item_type,
                         barcode=barcode), errors


# --- one reader per column: a clean value, or _Bad(problem, fix) --------------------------------

def _text(value: str, max_len: int, example: str, *, required: bool = True) -> str | None:
    if not value:
        if required:
            raise _Bad("is empty", f"give {example}")
        return None
    if _CONTROL.search(value):
        raise _Bad("contains control characters", "remove them (a tab or line break inside the value?)")
    if len(value) > max_len:
        raise _Bad(f"has {len(value)} characters", f"KRA allows at most {max_len}; shorten it")
    return value


def _item_class(value: str, known: frozenset[str]) -> str:
    if not _ITEM_CLASS.fullmatch(value):
        raise _Bad(f"{value!r} is not a KRA item classification code" if value else "is empty",
                   "give up to 10 digits from KRA's item classification list, e.g. 5059690800")
    if known and value not in known:
        raise _Bad(f"{value!r} is not in KRA's item classification list",
                   "pick a code from that list (`etims-agent codes refresh` updates the cached copy)")
    return value


def _tax_band(value: str) -> str:
    band = value.upper()
    if band not in TAX_BANDS:
        raise _Bad(f"{value!r} is not a tax band" if value else "is empty",
                   "use one of A (exempt), B (16 %), C (zero-rated), D (non-VAT), E (8 %)")
    return band


def _price(value: str) -> Decimal:
    if not value:
        raise _Bad("is empty", "give the default unit price, e.g. 58.00")
    if "," in value:
        raise _Bad(f"{value!r} contains a comma", "write the price with a decimal point and no thousands "
                   "separator, e.g. 1200.50")
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise _Bad(f"{value!r} is not a number", "write the price as digits, e.g. 58.00, without a currency") from None
    if not price.is_finite() or price < 0:
        raise _Bad(f"{value!r} is not a price", "give zero or more, e.g. 58.00")
    if price >= MAX_AMOUNT:
        raise _Bad(f"{value} is too large", f"KRA's limit is below {MAX_AMOUNT}")
    if price != price.quantize(CENT, rounding=ROUND_DOWN):
        raise _Bad(f"{value} has more than 2 decimal places", "round it to cents")
    return price.quantize(CENT).copy_abs() if price.is_zero() else price.quantize(CENT)


def _code(value: str, pattern: re.Pattern[str], known: frozenset[str], what: str, expected: str) -> str:
    code = value.upper()
    if not pattern.fullmatch(code):
        raise _Bad(f"{value!r} is not a {what} code", f"use a KRA {what} code ({expected})")
    if known and code not in known:
        raise _Bad(f"{code!r} is not in KRA's {what} list", f"use a code KRA lists ({expected}); "
                   "`etims-agent codes refresh` updates the cached lists")
    return code


def _item_type(value: str) -> str:
    if value not in ITEM_TYPES:
        raise _Bad(f"{value!r} is not an item type", "use 1 (raw material), 2 (finished product) or 3 (service)")
    return value


# --- registering with KRA ---------------------------------------------------------------------------

class Status(StrEnum):
    REGISTERED = "registered"  # KRA accepted it, first time for this device's records
    UPDATED = "updated"  # recorded before with another body (e.g. a new price); KRA accepted the new one
    UNCHANGED = "unchanged"  # recorded with this very body: not sent again
    REFUSED = "refused"  # KRA said no; its message says why
    NOT_SENT = "not_sent"  # KRA stopped answering (or refused the device) before this row's turn


@dataclass(frozen=True, slots=True)
class Planned:
    item: CatalogueItem
    request: str
    previous: str | None  # what the outbox records for this code, if anything

    @property
    def unchanged(self) -> bool:
        return self.previous == self.request


def plan(items: Sequence[CatalogueItem], recorded: Mapping[str, str], seller: Seller) -> list[Planned]:
    """Each item with its saveItem body and what is recorded for its code (`ItemStore.requests`)."""
    return [Planned(item, item.request(seller), recorded.get(item.code)) for item in items]


@dataclass(frozen=True, slots=True)
class ItemResult:
    item: CatalogueItem
    status: Status
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"line": self.item.line, "item_code": self.item.code, "status": str(self.status),
                "message": self.message or None}


@dataclass
class Registration:
    results: list[ItemResult] = field(default_factory=list)
    stopped: str | None = None  # why the rest was not sent

    def counts(self) -> dict[str, int]:
        counts = {str(s): 0 for s in Status}
        for result in self.results:
            counts[str(result.status)] += 1
        return counts


# Refusals that are about the device, not the item: every further row would get the same.
_DEVICE_REFUSALS = frozenset({"900", "901", "902", "903"})


async def register(planned: Sequence[Planned], client: KraClient, store: KraStore, clock: Clock,
                   on_item: Callable[[ItemResult], None] | None = None) -> Registration:
    """Send saveItem for every planned item whose body is not recorded yet, one at a time, in file order.

    An accepted item (or one KRA says it has, 994) is recorded at once, so an interrupted run loses
    nothing and a rerun skips it. KRA unreachable (or unsure, e.g. a timeout) stops the run: a rerun
    sends the rest, and saveItem of an item KRA may already have is only an update.
    """
    done = Registration()
    for p in planned:
        if p.unchanged:
            result = ItemResult(p.item, Status.UNCHANGED)
        elif done.stopped is not None:
            result = ItemResult(p.item, Status.NOT_SENT)
        else:
            result = await _send(p, client, store, clock, done)
        done.results.append(result)
        if on_item is not None:
            on_item(result)
    return done


async def _send(p: Planned, client: KraClient, store: KraStore, clock: Clock, done: Registration) -> ItemResult:
    reply = await client.save_item(p.request)
    if reply.ok or reply.code == "994":  # 994: KRA has the item already; the lane records it the same way
        store.item_registered(p.item.code, p.request, clock())
        return ItemResult(p.item, Status.UPDATED if p.previous is not None else Status.REGISTERED,
                          "KRA already had it (994)" if reply.code == "994" else "")
    reason = describe(reply.code, reply.message) if reply.code.isdigit() else reply.message
    if reply.code in _DEVICE_REFUSALS:
        done.stopped = (f"KRA refused this device ({reason}); check kra.tin, kra.branch_id and kra.device_serial, "
                        "and that `etims-agent init` was run for this KRA")
        return ItemResult(p.item, Status.NOT_SENT, reason)
    if reply.outcome is Outcome.RETRY or (reply.outcome is Outcome.UNKNOWN and not reply.code.isdigit()):
        # Not reached, timed out, 5xx, or "later" (894, 990): the rows after it would fare the same.
        done.stopped = f"{reason}; check the network and kra.base_url"
        return ItemResult(p.item, Status.NOT_SENT, reason)
    return ItemResult(p.item, Status.REFUSED, reason)  # 910 and the like; 991/999 too: a rerun tries again


# --- code lists on demand ---------------------------------------------------------------------------

class Failures:
    """Every KRA answer that was neither a success nor "nothing new" (give it to KraClient as
    `on_reply`), so a command can say why a refresh failed (CodeLists only logs it)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, KraReply]] = []

    def __call__(self, path: str, reply: KraReply) -> None:
        if not reply.ok and reply.outcome is not Outcome.EMPTY:
            self.seen.append((path, reply))


@dataclass(frozen=True, slots=True)
class ListChange:
    total: int
    new: int
    changed: int
    fetched_at: datetime | None  # KRA's time of the last answer the cache took (None: never fetched)

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "new": self.new, "changed": self.changed,
                "fetched_at": self.fetched_at.isoformat() if self.fetched_at else None}


@dataclass(frozen=True, slots=True)
class CodesRefresh:
    ok: bool
    code_classes: int
    codes: ListChange
    item_classes: ListChange
    rates_before: dict[str, Decimal]
    rates: dict[str, Decimal]
    failures: tuple[tuple[str, KraReply], ...]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "code_classes": self.code_classes, "codes": self.codes.to_json(),
                "item_classes": self.item_classes.to_json(),
                "tax_rates": {band: str(rate) for band, rate in self.rates.items()},
                "tax_rates_changed": self.rates != self.rates_before,
                "errors": [{"path": path, "code": r.code, "message": r.message} for path, r in self.failures]}


async def refresh_codes(store: KraStore, client: KraClient, failures: Failures, clock: Clock,
                        default_rates: Mapping[str, Decimal]) -> CodesRefresh:
    """What the scheduler's refresh does (CodeLists.refresh), now, with what it changed in the cache;
    `failures` is the client's `on_reply`."""
    before_codes, before_classes = _cached(store, CODES), _cached(store, ITEM_CLASSES)
    lists = CodeLists(store, client, clock, default_rates)
    rates_before = dict(lists.rates())
    ok = await lists.refresh()
    after_codes, after_classes = _cached(store, CODES), _cached(store, ITEM_CLASSES)
    rates = dict(CodeLists(store, None, clock, default_rates).rates())
    return CodesRefresh(
        ok=ok, code_classes=len(after_codes[0]),
        codes=_change(_flat_codes(before_codes[0]), _flat_codes(after_codes[0]), after_codes[1]),
        item_classes=_change(before_classes[0], after_classes[0], after_classes[1]),
        rates_before=rates_before, rates=rates, failures=tuple(failures.seen))


def cached_known_codes(store: KraStore) -> KnownCodes:
    return known_codes(_cached(store, CODES)[0], _cached(store, ITEM_CLASSES)[0])


def _cached(store: KraStore, name: str) -> tuple[dict[str, Any], datetime | None]:
    found = store.code_list(name)
    if found is None or not isinstance(found[0], dict):
        return {}, None
    return found[0], found[1]


def _flat_codes(codes: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{cls}/{cd}": entry for cls, body in codes.items() if isinstance(body, dict)
            for cd, entry in (body.get("codes") or {}).items()}


def _change(before: Mapping[str, Any], after: Mapping[str, Any], fetched_at: datetime | None) -> ListChange:
    return ListChange(total=len(after), new=len(after.keys() - before.keys()),
                      changed=sum(1 for key in after.keys() & before.keys() if after[key] != before[key]),
                      fetched_at=fetched_at)
