"""What the OSCU simulator knows and decides, with no I/O: devices, code tables, the branch ledgers,
request validation and the fault plan (kra-oscu.md §2-§4, §6, §7.5).

This is an independent reading of KRA's behaviour, written to catch the agent's mistakes: it shares
no payload or amount code with the agent. Everything here runs under the simulator's lock; the
HTTP layer (`agent.kra.simulator`) turns `Answer`s into responses.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from agent.clock import NAIROBI

# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SimDevice:
    """A device KRA approved: PIN, branch and the serial declared in the service request."""

    tin: str = "P052112956W"
    bhf_id: str = "00"
    serial: str = "SIM-0001"


@dataclass(frozen=True)
class SimulatorConfig:
    seed: int = 1
    devices: tuple[SimDevice, ...] = (SimDevice(),)
    numbering: str = "lenient"  # "lenient": invcNo unique only; "strict": must be last + 1
    reinit_code: str = "902"  # answer to a second selectInitOsdcInfo: "902" (spec) or "901"
    require_registered_items: bool = True  # itemCd of a sale line must have been sent to saveItem
    strict_http_status: int = 200  # HTTP status of the strict "expected value" refusal: 200 or 400
    tax_convention: str = "either"  # line tax accepted as "net", "gross" (spec samples) or "either"


_CONFIG_CHOICES: dict[str, tuple[Any, ...]] = {
    "numbering": ("lenient", "strict"),
    "reinit_code": ("902", "901"),
    "require_registered_items": (True, False),
    "strict_http_status": (200, 400),
    "tax_convention": ("either", "net", "gross"),
}


def changed_config(config: SimulatorConfig, changes: Mapping[str, Any]) -> SimulatorConfig:
    """`config` with the runtime-changeable settings replaced; ValueError names a bad one."""
    for key, value in changes.items():
        choices = _CONFIG_CHOICES.get(key)
        if choices is None:
            raise ValueError(f"{key!r} cannot be changed at runtime; use one of {sorted(_CONFIG_CHOICES)}")
        if isinstance(value, bool) != isinstance(choices[0], bool) or value not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, not {value!r}")
    return replace(config, **dict(changes))


# --- result codes (§4.1) ----------------------------------------------------------------------

MESSAGES: dict[str, str] = {
    "000": "Successful",
    "001": "There is no search result",
    "891": "An error occurred while creating the request URL",
    "892": "An error occurred while creating the request header",
    "893": "An error occurred while creating the request body",
    "894": "An error occurred during server communication",
    "895": "Request method is not allowed",
    "896": "Request status error",
    "899": "An error occurred on the client",
    "900": "There is no Header information",
    "901": "It is not valid device",
    "902": "This device is installed",
    "903": "Only VSCU device can be verified",
    "910": "Request parameter error",
    "911": "There is no request full text",
    "912": "Request method error",
    "921": "Sales data that has been declared cannot be received",
    "922": "Sales invoice data can be received only after receiving the sales data",
    "990": "Maximum number of views exceeded",
    "991": "An error occurred during registration",
    "992": "An error occurred during modification",
    "993": "An error occurred during deletion",
    "994": "Overlapped data",
    "995": "No downloaded file",
    "999": "An unknown error occurred",
}


@dataclass(frozen=True)
class Answer:
    """What the simulator answers: a KRA envelope (resultDt is added when it is sent)."""

    code: str
    message: str = ""
    data: Any = None
    http_status: int = 200
    processed: bool = True  # False when the request was refused before any endpoint logic ran

    @staticmethod
    def of(code: str, detail: str = "", data: Any = None, http_status: int = 200) -> Answer:
        base = MESSAGES.get(code, "Simulated error")
        return Answer(code, f"{base}: {detail}" if detail else base, data, http_status)


# --- code tables (§2.2, §3.6, §3.7) -----------------------------------------------------------

TAX_RATES: dict[str, Decimal] = {"A": Decimal(0), "B": Decimal(16), "C": Decimal(0), "D": Decimal(0), "E": Decimal(8)}
TAX_TYPES = tuple(TAX_RATES)

_Codes = tuple[tuple[str, str, str | None], ...]  # (cd, cdNm, userDfnCd1)


def _plain(*pairs: str) -> _Codes:
    return tuple((pairs[i], pairs[i + 1], None) for i in range(0, len(pairs), 2))


CODE_CLASSES: tuple[tuple[str, str, _Codes], ...] = (
    ("04", "Taxation Type", (("A", "A-Exempt", "0"), ("B", "B-16.00%", "16"), ("C", "C-0%", "0"),
                             ("D", "D-Non VAT", "0"), ("E", "E-8%", "8"))),
    ("05", "Country", _plain("KE", "KENYA", "UG", "UGANDA", "TZ", "TANZANIA", "RW", "RWANDA", "BI", "BURUNDI",
                             "SS", "SOUTH SUDAN", "ET", "ETHIOPIA", "SO", "SOMALIA", "CD", "CONGO (DRC)",
                             "ZA", "SOUTH AFRICA", "EG", "EGYPT", "NG", "NIGERIA", "AE", "UNITED ARAB EMIRATES",
                             "SA", "SAUDI ARABIA", "IN", "INDIA", "PK", "PAKISTAN", "CN", "CHINA", "JP", "JAPAN",
                             "KR", "KOREA, REPUBLIC OF", "MY", "MALAYSIA", "ID", "INDONESIA", "TR", "TURKEY",
                             "GB", "UNITED KINGDOM", "DE", "GERMANY", "FR", "FRANCE", "IT", "ITALY",
                             "NL", "NETHERLANDS", "BE", "BELGIUM", "US", "UNITED STATES")),
    ("07", "Payment Type", _plain("01", "CASH", "02", "CREDIT", "03", "CASH/CREDIT", "04", "BANK CHECK",
                                  "05", "DEBIT&CREDIT CARD", "06", "MOBILE MONEY", "07", "OTHER")),
    ("09", "Branch Status", _plain("01", "Open", "02", "Closed")),
    ("10", "Quantity Unit", _plain("U", "Pieces/item [Number]", "KG", "Kilo-Gramme", "GRM", "Gram",
                                   "MGM", "Milligram", "L", "Litre", "LTR", "Litre", "ML", "Millilitre",
                                   "M", "Metre", "CM", "Centimetre", "MM", "Millimetre", "M2", "Square Metre",
                                   "M3", "Cubic Metre", "PA", "Packet", "SET", "Set", "DZ", "Dozen",
                                   "NO", "Number", "TNE", "Tonne", "BA", "Barrel", "BLL", "Barrel (petroleum)",
                                   "CA", "Can", "4B", "Pair", "BX", "Box", "PR", "Pair", "CT", "Carton",
                                   "GAL", "Gallon", "HR", "Hour", "DAY", "Day", "MIN", "Minute")),
    ("11", "Sale Status", _plain("01", "Wait for Approval", "02", "Approved", "03", "Cancel Requested",
                                 "04", "Canceled", "05", "Credit Note Generated", "06", "Transferred")),
    ("12", "Stock I/O Type", _plain("01", "Import", "02", "Purchase", "03", "Return", "04", "Stock Movement",
                                    "05", "Processing", "06", "Adjustment", "11", "Sale", "12", "Return",
                                    "13", "Stock Movement", "14", "Processing", "15", "Discarding",
                                    "16", "Adjustment")),
    ("14", "Transaction Type", _plain("C", "Copy", "N", "Normal", "P", "Proforma", "T", "Training")),
    ("17", "Packing Unit", _plain("NT", "Net", "OU", "Outer packaging unit", "AM", "Ampoule", "BA", "Barrel",
                                  "BE", "Bundle", "BG", "Bag", "BZ", "Bag (woven)", "BK", "Basket",
                                  "BQ", "Bottle (plastic)", "BV", "Bottle (glass)", "BX", "Box", "CA", "Can",
                                  "CR", "Crate", "CT", "Carton", "CTN", "Container", "DR", "Drum", "JR", "Jar",
                                  "PK", "Pack", "RO", "Roll", "SA", "Sack", "TU", "Tube")),
    ("24", "Item Type", _plain("1", "Raw Material", "2", "Finished Product", "3", "Service")),
    ("26", "Import Item Status", _plain("1", "Unsent", "2", "Waiting", "3", "Approved", "4", "Cancelled")),
    ("32", "Refund Reason", _plain("01", "Missing Quantity", "02", "Missing Data", "03", "Damaged",
                                   "04", "Wasted", "05", "Raw Material Shortage", "06", "Refund",
                                   "07", "Wrong Customer PIN", "08", "Wrong Customer name",
                                   "09", "Wrong Amount/price", "10", "Wrong Quantity", "11", "Wrong Item(s)",
                                   "12", "Wrong tax type", "13", "Other reason")),
    ("33", "Currency", _plain("KES", "Kenyan Shilling", "USD", "US Dollar", "EUR", "Euro", "GBP", "Pound Sterling",
                              "UGX", "Uganda Shilling", "TZS", "Tanzanian Shilling", "RWF", "Rwanda Franc",
                              "ZAR", "Rand", "AED", "UAE Dirham", "CNY", "Yuan Renminbi", "INR", "Indian Rupee",
                              "JPY", "Yen")),
    ("34", "Purchase Status", _plain("01", "Wait for Approval", "02", "Approved", "03", "Cancel Requested",
                                     "04", "Canceled", "05", "Credit Note Generated", "06", "Transferred")),
    ("37", "Sales Receipt Type", _plain("S", "Sale", "R", "Credit Note after Sale")),
    ("38", "Purchase Receipt Type", _plain("P", "Purchase", "R", "Credit Note after Purchase")),
)
CODE_TABLES_DT = "20230101000000"  # when the static tables last "changed", for lastReqDt


def codes(cd_cls: str) -> frozenset[str]:
    for cls, _, entries in CODE_CLASSES:
        if cls == cd_cls:
            return frozenset(cd for cd, _, _ in entries)
    raise KeyError(cd_cls)


def code_list() -> list[dict[str, Any]]:
    return [{"cdCls": cls, "cdClsNm": name, "cdClsDesc": None, "useYn": "Y",
             "userDfnNm1": "Rate" if cls == "04" else None, "userDfnNm2": None, "userDfnNm3": None,
             "dtlList": [{"cd": cd, "cdNm": nm, "cdDesc": nm, "useYn": "Y", "srtOrd": i,
                          "userDfnCd1": dfn, "userDfnCd2": None, "userDfnCd3": None}
                         for i, (cd, nm, dfn) in enumerate(entries, start=1)]}
            for cls, name, entries in CODE_CLASSES]


ITEM_CLASSES: tuple[tuple[str, str, int, str | None], ...] = (
    ("5059690800", "Food and beverage products (general)", 5, "B"),
    ("5010150000", "Fresh vegetables", 4, "A"),
    ("5020230000", "Soft drinks", 4, "B"),
    ("5020220000", "Bottled water", 4, "B"),
    ("5013160000", "Bread and bakery products", 4, "B"),
    ("5011150000", "Meat and poultry", 4, "B"),
    ("5015150000", "Edible vegetable and plant oils and fats", 4, "B"),
    ("5022100000", "Milk and dairy products", 4, "C"),
    ("5121000000", "Medicinal drugs", 4, "A"),
    ("1410150000", "Paper products", 4, "B"),
    ("4321150000", "Computers and accessories", 4, "B"),
    ("8111150000", "Software and computer services", 4, "B"),
    ("9010150000", "Restaurants and catering", 4, "B"),
    ("1510150000", "Petroleum fuels", 4, "E"),
)

CUSTOMERS: dict[str, tuple[str, str]] = {  # PIN -> (name, county)
    "A123456789Z": ("JOHN DOE", "NAIROBI"),
    "P051234567M": ("UZIMA WHOLESALERS LIMITED", "NAIROBI"),
    "P051876543K": ("PWANI HARDWARE LTD", "MOMBASA"),
    "A009876543B": ("JANE WANJIKU KAMAU", "KIAMBU"),
}

NOTICE: dict[str, Any] = {"noticeNo": 1, "title": "eTIMS OSCU simulator",
          "cont": "This is a local simulator of KRA's OSCU API. Receipts it signs are not tax receipts.",
          "dtlUrl": "https://etims-sbx.kra.go.ke/common/link/ebm/receipt/indexEbmNotice?noticeNo=1",
          "regrNm": "Administrator", "regDt": "20240415120000"}

# --- deterministic identities and signatures --------------------------------------------------

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_TIN = re.compile(r"[A-Z][0-9]{9}[A-Z]")


class Derive:
    """Keys, ids and signatures as HMAC-SHA256 of their inputs under a key made from the seed."""

    def __init__(self, seed: int) -> None:
        self._key = hashlib.sha256(f"etims-agent OSCU simulator, seed {seed}".encode()).digest()

    def _digest(self, *parts: object) -> bytes:
        return hmac.new(self._key, "\x1f".join(map(str, parts)).encode(), hashlib.sha256).digest()

    def _digits(self, n: int, *parts: object) -> str:
        return f"{int.from_bytes(self._digest(*parts), 'big') % 10 ** n:0{n}d}"

    def identity(self, device: SimDevice) -> dict[str, str]:
        who = (device.tin, device.bhf_id, device.serial)
        return {"cmcKey": self._digest("cmcKey", *who)[:16].hex().upper(),
                "sdcId": "KRACU0" + self._digits(9, "sdcId", *who),
                "dvcId": "99999" + self._digits(11, "dvcId", *who),
                "mrcNo": "WIS" + self._digits(8, "mrcNo", *who)}

    def intrl_data(self, tin: str, bhf_id: str, invc_no: int, tot_amt: Decimal) -> str:
        raw = self._digest("intrlData", tin, bhf_id, invc_no, f"{tot_amt:.2f}")[:16]
        return base64.b32encode(raw).decode()[:26]

    def rcpt_sign(self, tin: str, bhf_id: str, invc_no: int, tot_amt: Decimal) -> str:
        raw = self._digest("rcptSign", tin, bhf_id, invc_no, f"{tot_amt:.2f}")
        return "".join(_ALNUM[b % 36] for b in raw[:16])


# --- validation helpers -----------------------------------------------------------------------


class Invalid(Exception):
    """A 910: the message names the field."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)


def _path(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _text(doc: Mapping[str, Any], key: str, max_len: int, *, required: bool = False, at: str = "") -> str:
    """A CHAR field; absent, null and "" are the empty string (refused when required)."""
    value = doc.get(key)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise Invalid(_path(at, key), f"must be a string, not {_kind(value)}")
    if required and not value.strip():
        raise Invalid(_path(at, key), "is required")
    if len(value) > max_len:
        raise Invalid(_path(at, key), f"is {len(value)} characters long, at most {max_len} are allowed")
    return value


def _code(doc: Mapping[str, Any], key: str, allowed: Collection[str], *, required: bool = False,
          at: str = "", what: str = "code") -> str:
    value = _text(doc, key, 5, required=required, at=at)
    if value and value not in allowed:
        raise Invalid(_path(at, key), f"{value!r} is not a valid {what} ({', '.join(sorted(allowed))})")
    return value


def _number(doc: Mapping[str, Any], key: str, digits: int = 18, scale: int = 2, *, required: bool = True,
            at: str = "", minimum: Decimal | None = Decimal(0)) -> Decimal:
    """An N(digits, scale) field sent as a JSON number; absent/null is 0 when not required."""
    value = doc.get(key)
    if value is None:
        if required:
            raise Invalid(_path(at, key), "is required")
        return Decimal(0)
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise Invalid(_path(at, key), f"must be a JSON number, not {_kind(value)}")
    number = Decimal(value)
    if not number.is_finite():
        raise Invalid(_path(at, key), "must be a finite number")
    if abs(number) >= Decimal(10) ** (digits - scale):
        raise Invalid(_path(at, key), f"{value} has more than {digits - scale} integer digits")
    if number != number.quantize(Decimal(1).scaleb(-scale)):
        raise Invalid(_path(at, key), f"{value} has more than {scale} decimal places")
    if minimum is not None and number < minimum:
        raise Invalid(_path(at, key), f"{value} is below {minimum}")
    return number


def _integer(doc: Mapping[str, Any], key: str, *, digits: int = 38, minimum: int = 0, at: str = "") -> int:
    value = doc.get(key)
    if value is None:
        raise Invalid(_path(at, key), "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(_path(at, key), f"must be a JSON integer, not {_kind(value)}")
    if value < minimum:
        raise Invalid(_path(at, key), f"{value} is below {minimum}")
    if value >= 10 ** digits:
        raise Invalid(_path(at, key), f"{value} has more than {digits} digits")
    return value


def _moment(doc: Mapping[str, Any], key: str, *, date_only: bool = False, required: bool = False,
            at: str = "") -> str:
    size, fmt = (8, "%Y%m%d") if date_only else (14, "%Y%m%d%H%M%S")
    value = _text(doc, key, size, required=required, at=at)
    if value:
        try:
            if len(value) != size or not value.isdigit():
                raise ValueError
            datetime.strptime(value, fmt)
        except ValueError:
            raise Invalid(_path(at, key), f"{value!r} is not a {'YYYYMMDD' if date_only else 'YYYYMMDDhhmmss'} "
                                          "date") from None
    return value


def _yn(doc: Mapping[str, Any], key: str, *, at: str = "") -> str:
    return _code(doc, key, ("Y", "N"), required=True, at=at, what="Y/N flag")


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", Decimal: "a number"}.get(type(value), type(value).__name__)


def _users(doc: Mapping[str, Any]) -> None:
    for key, size in (("regrId", 20), ("regrNm", 60), ("modrId", 20), ("modrNm", 60)):
        _text(doc, key, size, required=True)


def kra_time(moment: datetime) -> str:
    return moment.astimezone(NAIROBI).strftime("%Y%m%d%H%M%S")


# --- ledgers ----------------------------------------------------------------------------------

_TOL_LINE = Decimal("0.01")
_TOL_TOTAL = Decimal("0.05")
_GAPS_SHOWN = 1000


@dataclass
class Invoice:
    request: dict[str, Any]
    invc_no: int
    trd_invc_no: str
    rcpt_ty_cd: str
    org_invc_no: int
    tot_amt: Decimal
    cust_tin: str
    sales_dt: str
    cur_rcpt_no: int
    tot_rcpt_no: int
    intrl_data: str
    rcpt_sign: str
    sdc_dt: datetime  # Nairobi, whole seconds

    def signature(self) -> dict[str, Any]:
        return {"curRcptNo": self.cur_rcpt_no, "totRcptNo": self.tot_rcpt_no, "intrlData": self.intrl_data,
                "rcptSign": self.rcpt_sign, "sdcDateTime": self.sdc_dt.strftime("%Y%m%d%H%M%S")}


@dataclass
class Branch:
    tin: str
    bhf_id: str
    items: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)  # itemCd -> (fields, changed)
    invoices: dict[int, Invoice] = field(default_factory=dict)
    receipts: dict[str, int] = field(default_factory=dict)  # per rcptTyCd
    total_receipts: int = 0
    already_signed_attempts: int = 0
    signed_by_trd: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    @property
    def last_invc_no(self) -> int:
        return max(self.invoices, default=0)


@dataclass
class DeviceRecord:
    device: SimDevice
    identity: dict[str, str]
    initialised: bool = False


SAVE_SALE = "saveTrnsSalesOsdc"
INIT = "selectInitOsdcInfo"


class SimState:
    """Everything KRA holds, and the logic of every endpoint. Not thread-safe: callers lock."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._derive = Derive(config.seed)
        self._handlers: dict[str, Callable[[dict[str, Any], Branch | None, datetime], Answer]] = {
            "selectCodeList": self._code_list,
            "selectItemClsList": self._item_classes,
            "selectCustomer": self._customer,
            "selectNoticeList": self._notices,
            "selectBhfList": self._branches,
            "saveBhfCustomer": self._save_branch_customer,
            "saveBhfUser": self._save_branch_user,
            "saveItem": self._save_item,
            "selectItemList": self._item_list,
            "selectImportItemList": self._empty_list,
            "selectTrnsPurchaseSalesList": self._empty_list,
            "selectStockMoveList": self._empty_list,
            SAVE_SALE: self._save_sale,
            "selectInvoiceDetails": self._invoice_details,
        }
        self.clear()

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(self._handlers) | {INIT}

    def clear(self) -> None:
        self.devices = {d.serial: DeviceRecord(d, self._derive.identity(d)) for d in self.config.devices}
        self.branches = {f"{d.tin}/{d.bhf_id}": Branch(d.tin, d.bhf_id) for d in self.config.devices}
        self.requests: dict[str, int] = {}
        self.results: dict[str, dict[str, int]] = {}
        self.connections = 0

    # --- bookkeeping called by the HTTP layer ---------------------------------------------------

    def note_request(self, path: str) -> None:
        self.requests[path] = self.requests.get(path, 0) + 1

    def note_result(self, path: str, code: str) -> None:
        per_path = self.results.setdefault(path, {})
        per_path[code] = per_path.get(code, 0) + 1

    def note_connection(self) -> None:
        self.connections += 1

    def note_attempt(self, headers: Mapping[str, str], body: bytes) -> None:
        """Count a saveTrnsSalesOsdc for a number this branch already signed, whatever happens next."""
        branch = self._authenticate(headers)
        if not isinstance(branch, Branch):
            return
        try:
            doc = _parse(body)
        except ValueError:
            return
        invc_no = doc.get("invcNo") if isinstance(doc, dict) else None
        if isinstance(invc_no, int) and not isinstance(invc_no, bool) and invc_no in branch.invoices:
            branch.already_signed_attempts += 1

    # --- requests -------------------------------------------------------------------------------

    def handle(self, path: str, headers: Mapping[str, str], body: bytes, now: datetime) -> Answer:
        """Answer one POST to /etims-api/<path>; `headers` has lower-case names."""
        if path not in self.paths:
            return Answer.of("912", f"there is no API /{path}", http_status=404)
        if not body.strip():
            return Answer.of("911")
        try:
            doc = _parse(body)
        except ValueError as exc:
            return Answer.of("910", f"the body is not valid JSON ({exc})")
        if not isinstance(doc, dict):
            return Answer.of("910", f"the body must be a JSON object, not {_kind(doc)}")
        try:
            if path == INIT:
                return self._init(doc)
            branch = self._authenticate(headers)
            if isinstance(branch, Answer):
                return branch
            for key, expected in (("tin", branch.tin), ("bhfId", branch.bhf_id)):
                if doc.get(key) not in (None, "", expected):
                    raise Invalid(key, f"{doc.get(key)!r} in the body differs from the {key} header {expected!r}")
            return self._handlers[path](doc, branch, now)
        except Invalid as exc:
            return Answer.of("910", str(exc))

    def _authenticate(self, headers: Mapping[str, str]) -> Branch | Answer:
        tin, bhf_id, key = (headers.get(h, "").strip() for h in ("tin", "bhfid", "cmckey"))
        missing = [name for name, value in (("tin", tin), ("bhfId", bhf_id), ("cmcKey", key)) if not value]
        if missing:
            return Answer.of("900", f"missing header {', '.join(missing)}")
        for record in self.devices.values():
            if record.initialised and hmac.compare_digest(record.identity["cmcKey"], key):
                device = record.device
                if (device.tin, device.bhf_id) != (tin, bhf_id):
                    return Answer.of("901", f"the cmcKey belongs to another PIN/branch, not {tin}/{bhf_id}")
                return self.branches[f"{tin}/{bhf_id}"]
        return Answer.of("901", "unknown cmcKey")

    def _init(self, doc: dict[str, Any]) -> Answer:
        tin = _text(doc, "tin", 11, required=True)
        bhf_id = _text(doc, "bhfId", 2, required=True)
        serial = _text(doc, "dvcSrlNo", 100, required=True)
        record = self.devices.get(serial)
        if record is None or (record.device.tin, record.device.bhf_id) != (tin, bhf_id):
            return Answer.of("901", f"no approved device {serial!r} for {tin}/{bhf_id}")
        if record.initialised:
            return Answer.of(self.config.reinit_code)
        record.initialised = True
        head_office = bhf_id == "00"
        info = {"tin": tin, "taxprNm": f"SIMULATED TAXPAYER {tin} LIMITED", "bsnsActv": "Retail trade",
                "bhfId": bhf_id, "bhfNm": "Headquarter" if head_office else f"Branch {bhf_id}",
                "bhfOpenDt": "20230101", "prvncNm": "NAIROBI", "dstrtNm": "WESTLANDS", "sctrNm": "PARKLANDS",
                "locDesc": "Simulated premises", "hqYn": "Y" if head_office else "N", "mgrNm": "Simulated Manager",
                "mgrTelNo": "0700000000", "mgrEmail": "manager@example.com", **record.identity}
        return Answer.of("000", data={"info": info})

    # --- lookups ----------------------------------------------------------------------------------

    @staticmethod
    def _since(doc: Mapping[str, Any]) -> str:
        return _moment(doc, "lastReqDt", required=True)

    def _code_list(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        if self._since(doc) >= CODE_TABLES_DT:
            return Answer.of("001")
        return Answer.of("000", data={"clsList": code_list()})

    def _item_classes(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        if self._since(doc) >= CODE_TABLES_DT:
            return Answer.of("001")
        return Answer.of("000", data={"itemClsList": [
            {"itemClsCd": cd, "itemClsNm": name, "itemClsLvl": level, "taxTyCd": tax, "mjrTgYn": "N", "useYn": "Y"}
            for cd, name, level, tax in ITEM_CLASSES]})

    def _notices(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        if self._since(doc) >= str(NOTICE["regDt"]):
            return Answer.of("001")
        return Answer.of("000", data={"noticeList": [dict(NOTICE)]})

    def _customer(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        pin = _text(doc, "custmTin", 11, required=True)
        known = dict(CUSTOMERS)
        known.update({d.tin: (f"SIMULATED TAXPAYER {d.tin} LIMITED", "NAIROBI") for d in self.config.devices})
        if pin not in known:
            return Answer.of("001")
        name, county = known[pin]
        return Answer.of("000", data={"custList": [
            {"tin": pin, "taxprNm": name, "taxprSttsCd": "A", "prvncNm": county, "dstrtNm": county,
             "sctrNm": county, "locDesc": None}]})

    def _branches(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        assert branch is not None
        if self._since(doc) >= CODE_TABLES_DT:
            return Answer.of("001")
        return Answer.of("000", data={"bhfList": [
            {"tin": b.tin, "bhfId": b.bhf_id, "bhfNm": "Headquarter" if b.bhf_id == "00" else f"Branch {b.bhf_id}",
             "bhfSttsCd": "01", "prvncNm": "NAIROBI", "dstrtNm": "WESTLANDS", "sctrNm": "PARKLANDS",
             "locDesc": None, "mgrNm": "Simulated Manager", "mgrTelNo": "0700000000",
             "mgrEmail": "manager@example.com", "hqYn": "Y" if b.bhf_id == "00" else "N"}
            for b in self.branches.values() if b.tin == branch.tin]})

    def _empty_list(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        self._since(doc)
        return Answer.of("001")

    def _save_branch_customer(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        _text(doc, "custNo", 9, required=True)
        tin = _text(doc, "custTin", 11, required=True)
        if not _TIN.fullmatch(tin):
            raise Invalid("custTin", f"{tin!r} is not a KRA PIN (letter, 9 digits, letter)")
        _text(doc, "custNm", 60, required=True)
        for key, size in (("adrs", 300), ("telNo", 20), ("email", 50), ("faxNo", 20), ("remark", 1000)):
            _text(doc, key, size)
        _yn(doc, "useYn")
        _users(doc)
        return Answer.of("000")

    def _save_branch_user(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        _text(doc, "userId", 20, required=True)
        _text(doc, "userNm", 60, required=True)
        _text(doc, "pwd", 255, required=True)
        for key, size in (("adrs", 200), ("cntc", 20), ("authCd", 100), ("remark", 2000)):
            _text(doc, key, size)
        _yn(doc, "useYn")
        _users(doc)
        return Answer.of("000")

    # --- items (§2.10, §2.11) ------------------------------------------------------------------------

    def _save_item(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        assert branch is not None
        item_cd = _text(doc, "itemCd", 20, required=True)
        cls = _text(doc, "itemClsCd", 10, required=True)
        if not cls.isdigit():
            raise Invalid("itemClsCd", f"{cls!r} is not an item classification code (digits)")
        _code(doc, "itemTyCd", codes("24"), required=True, what="item type")
        _text(doc, "itemNm", 200, required=True)
        _text(doc, "itemStdNm", 200)
        origin = _text(doc, "orgnNatCd", 5, required=True)
        if not re.fullmatch(r"[A-Z]{2}", origin):
            raise Invalid("orgnNatCd", f"{origin!r} is not a two-letter country code")
        _code(doc, "pkgUnitCd", codes("17"), required=True, what="packaging unit (class 17)")
        _code(doc, "qtyUnitCd", codes("10"), required=True, what="quantity unit (class 10)")
        _code(doc, "taxTyCd", TAX_TYPES, required=True, what="tax type")
        _text(doc, "btchNo", 10)
        _text(doc, "bcd", 20)
        _number(doc, "dftPrc")
        for level in range(1, 6):
            _number(doc, f"grpPrcL{level}", required=False)
        _text(doc, "addInfo", 7)
        _number(doc, "sftyQty", 13, required=False)
        _yn(doc, "isrcAplcbYn")
        _yn(doc, "useYn")
        _users(doc)
        fields = {k: v for k, v in doc.items() if k not in ("tin", "bhfId")}
        branch.items[item_cd] = (copy.deepcopy(fields), kra_time(now))
        return Answer.of("000")

    def _item_list(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        assert branch is not None
        since = self._since(doc)
        found = [{**fields, "tin": branch.tin, "regBhfId": branch.bhf_id, "rraModYn": "N"}
                 for fields, changed in branch.items.values() if changed > since]
        if not found:
            return Answer.of("001")
        return Answer.of("000", data={"itemList": found})

    # --- sales (§3) -------------------------------------------------------------------------------

    def _save_sale(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        assert branch is not None
        invc_no = _integer(doc, "invcNo", minimum=1)
        # Strict numbering answers a reused number like any other wrong one (kra-oscu.md §4.3: "a
        # resent, already-accepted invcNo would simply fail the expected value check").
        if self.config.numbering == "strict" and invc_no != branch.last_invc_no + 1:
            return Answer("910", f"Invc No: {invc_no} is invalid, use the expected value: {branch.last_invc_no + 1}",
                          http_status=self.config.strict_http_status)
        if invc_no in branch.invoices:
            return Answer.of("994", f"invcNo {invc_no} is already signed")
        self._check_sale(doc, branch)
        rcpt_ty_cd = doc["rcptTyCd"]
        org_invc_no = doc["orgInvcNo"]
        if rcpt_ty_cd == "R":
            self._check_credit_note(doc, branch, org_invc_no)
        elif org_invc_no != 0:
            raise Invalid("orgInvcNo", f"must be 0 on a sale (rcptTyCd S), not {org_invc_no}")
        tot_amt = Decimal(doc["totAmt"])
        branch.receipts[rcpt_ty_cd] = branch.receipts.get(rcpt_ty_cd, 0) + 1
        branch.total_receipts += 1
        invoice = Invoice(
            request=copy.deepcopy(doc), invc_no=invc_no, trd_invc_no=doc["trdInvcNo"], rcpt_ty_cd=rcpt_ty_cd,
            org_invc_no=org_invc_no, tot_amt=tot_amt, cust_tin=doc.get("custTin") or "", sales_dt=doc["salesDt"],
            cur_rcpt_no=branch.receipts[rcpt_ty_cd], tot_rcpt_no=branch.total_receipts,
            intrl_data=self._derive.intrl_data(branch.tin, branch.bhf_id, invc_no, tot_amt),
            rcpt_sign=self._derive.rcpt_sign(branch.tin, branch.bhf_id, invc_no, tot_amt),
            sdc_dt=now.astimezone(NAIROBI).replace(microsecond=0))
        branch.invoices[invc_no] = invoice
        branch.signed_by_trd.setdefault((rcpt_ty_cd, invoice.trd_invc_no), []).append(invc_no)
        return Answer.of("000", data=invoice.signature())

    def _check_sale(self, doc: Mapping[str, Any], branch: Branch) -> None:
        """Required fields, types, lengths, codes and arithmetic of a TrnsSalesSaveWrReq (raises Invalid)."""
        _text(doc, "trdInvcNo", 50, required=True)
        _integer(doc, "orgInvcNo")
        cust_tin = _text(doc, "custTin", 11)
        if cust_tin and not _TIN.fullmatch(cust_tin):
            raise Invalid("custTin", f"{cust_tin!r} is not a KRA PIN (letter, 9 digits, letter)")
        _text(doc, "custNm", 60)
        _code(doc, "salesTyCd", ("N",), what="transaction type for a sale")
        _code(doc, "rcptTyCd", ("S", "R"), required=True, what="sales receipt type")
        _code(doc, "pmtTyCd", codes("07"), what="payment type (class 07)")
        _code(doc, "salesSttsCd", ("02",), required=True, what="sale status for a new sale")
        _moment(doc, "cfmDt", required=True)
        _moment(doc, "salesDt", date_only=True, required=True)
        for key in ("stockRlsDt", "cnclReqDt", "cnclDt", "rfdDt"):
            _moment(doc, key)
        _code(doc, "rfdRsnCd", codes("32"), what="credit-note reason (class 32)")
        item_count = _integer(doc, "totItemCnt", digits=10)
        bands = {}
        for band in TAX_TYPES:
            taxable = _number(doc, f"taxblAmt{band}")
            rate = _number(doc, f"taxRt{band}", 7)
            tax = _number(doc, f"taxAmt{band}")
            if rate != TAX_RATES[band]:
                raise Invalid(f"taxRt{band}", f"{doc[f'taxRt{band}']} is not the rate of tax type {band} in the "
                                              f"code list ({TAX_RATES[band]})")
            bands[band] = (taxable, tax)
        totals = {key: _number(doc, key) for key in ("totTaxblAmt", "totTaxAmt", "totAmt")}
        _yn(doc, "prchrAcptcYn")
        _text(doc, "remark", 400)
        _users(doc)
        self._check_receipt(doc, cust_tin)

        lines = doc.get("itemList")
        if not isinstance(lines, list):
            raise Invalid("itemList", "is required (an array of lines)" if lines is None
                          else f"must be an array, not {_kind(lines)}")
        if not lines:
            raise Invalid("itemList", "must have at least one line")
        if item_count != len(lines):
            raise Invalid("totItemCnt", f"{item_count} differs from the {len(lines)} lines of itemList")
        sums = {band: [Decimal(0), Decimal(0)] for band in TAX_TYPES}
        total = [Decimal(0), Decimal(0), Decimal(0)]
        conventions: dict[str, int] = {}
        for index, line in enumerate(lines):
            band, taxable, tax, amount, convention = self._check_line(line, index, branch)
            sums[band][0] += taxable
            sums[band][1] += tax
            total[0] += taxable
            total[1] += tax
            total[2] += amount
            if convention:
                conventions.setdefault(convention, index)
        if len(conventions) > 1:
            raise Invalid(f"itemList[{conventions['gross']}]",
                          f"uses a tax-inclusive taxblAmt while itemList[{conventions['net']}] uses a "
                          "tax-exclusive one; use one convention for the whole invoice")
        for band in TAX_TYPES:
            for key, declared, computed in ((f"taxblAmt{band}", bands[band][0], sums[band][0]),
                                            (f"taxAmt{band}", bands[band][1], sums[band][1])):
                if abs(declared - computed) > _TOL_TOTAL:
                    raise Invalid(key, f"{declared} is not the sum over the type-{band} lines ({computed})")
        for key, computed in zip(("totTaxblAmt", "totTaxAmt", "totAmt"), total, strict=True):
            if abs(totals[key] - computed) > _TOL_TOTAL:
                raise Invalid(key, f"{totals[key]} is not the sum over the lines ({computed})")

    @staticmethod
    def _check_receipt(doc: Mapping[str, Any], cust_tin: str) -> None:
        receipt = doc.get("receipt")
        if not isinstance(receipt, dict):
            raise Invalid("receipt", "is required (an object)" if receipt is None
                          else f"must be an object, not {_kind(receipt)}")
        receipt_tin = _text(receipt, "custTin", 11, at="receipt")
        if receipt_tin and receipt_tin != cust_tin:
            raise Invalid("receipt.custTin", f"{receipt_tin!r} differs from custTin {cust_tin!r}")
        _text(receipt, "custMblNo", 20, at="receipt")
        if receipt.get("rptNo") is not None:
            _integer(receipt, "rptNo", digits=10, at="receipt")
        _moment(receipt, "rcptPbctDt", required=True, at="receipt")
        for key, size in (("trdeNm", 60), ("adrs", 200), ("topMsg", 400), ("btmMsg", 400)):
            _text(receipt, key, size, at="receipt")
        _yn(receipt, "prchrAcptcYn", at="receipt")

    def _check_line(self, line: object, index: int,
                    branch: Branch) -> tuple[str, Decimal, Decimal, Decimal, str | None]:
        at = f"itemList[{index}]"
        if not isinstance(line, dict):
            raise Invalid(at, f"must be an object, not {_kind(line)}")
        seq = _integer(line, "itemSeq", digits=4, minimum=1, at=at)
        if seq != index + 1:
            raise Invalid(f"{at}.itemSeq", f"is {seq}; lines are numbered 1, 2, 3... in order (expected {index + 1})")
        item_cd = _text(line, "itemCd", 20, required=True, at=at)
        if self.config.require_registered_items:
            registered = branch.items.get(item_cd)
            if registered is None:
                raise Invalid(f"{at}.itemCd", f"{item_cd!r} is not registered on this branch (send saveItem first)")
            if registered[0].get("useYn") == "N":
                raise Invalid(f"{at}.itemCd", f"{item_cd!r} is deactivated (useYn N)")
        _text(line, "itemClsCd", 10, required=True, at=at)
        _text(line, "itemNm", 200, required=True, at=at)
        _text(line, "bcd", 20, at=at)
        _code(line, "pkgUnitCd", codes("17"), required=True, at=at, what="packaging unit (class 17)")
        _number(line, "pkg", 13, at=at)
        _code(line, "qtyUnitCd", codes("10"), required=True, at=at, what="quantity unit (class 10)")
        if _number(line, "qty", 13, at=at) == 0:
            raise Invalid(f"{at}.qty", "must be positive")
        _number(line, "prc", at=at)
        _number(line, "splyAmt", at=at)
        if _number(line, "dcRt", 5, at=at) > 100:
            raise Invalid(f"{at}.dcRt", f"{line['dcRt']} is more than 100 %")
        _number(line, "dcAmt", at=at)
        _text(line, "isrccCd", 10, at=at)
        _text(line, "isrccNm", 100, at=at)
        _number(line, "isrcRt", 3, 0, required=False, at=at)
        _number(line, "isrcAmt", required=False, at=at)
        band = _code(line, "taxTyCd", TAX_TYPES, required=True, at=at, what="tax type")
        taxable = _number(line, "taxblAmt", at=at)
        tax = _number(line, "taxAmt", at=at)
        amount = _number(line, "totAmt", at=at)
        return band, taxable, tax, amount, self._line_convention(at, band, taxable, tax, amount)

    def _line_convention(self, at: str, band: str, taxable: Decimal, tax: Decimal, amount: Decimal) -> str | None:
        """Which convention the line follows ("net", "gross", None when both fit); raises when none does.

        net (Odoo, Kenyan practice): taxAmt = taxblAmt * r/100 and totAmt = taxblAmt + taxAmt.
        gross (the spec's samples): taxblAmt is tax-inclusive, taxAmt = taxblAmt * r/(100+r), totAmt = taxblAmt.
        """
        rate = TAX_RATES[band]
        net_tax = taxable * rate / 100
        gross_tax = taxable * rate / (100 + rate)
        net = abs(tax - net_tax) <= _TOL_LINE and abs(taxable + tax - amount) <= _TOL_LINE
        gross = abs(tax - gross_tax) <= _TOL_LINE and abs(taxable - amount) <= _TOL_LINE
        allowed = self.config.tax_convention
        net = net and allowed in ("either", "net")
        gross = gross and allowed in ("either", "gross")
        if net and gross:
            return None
        if net or gross:
            return "net" if net else "gross"
        if allowed != "gross" and abs(tax - net_tax) <= _TOL_LINE:
            raise Invalid(f"{at}.totAmt", f"{amount} is not taxblAmt + taxAmt ({taxable + tax})")
        if allowed != "net" and abs(tax - gross_tax) <= _TOL_LINE:
            raise Invalid(f"{at}.totAmt", f"{amount} differs from the tax-inclusive taxblAmt {taxable}")
        options = {"either": f"{_q(net_tax)} on a net taxblAmt or {_q(gross_tax)} on a tax-inclusive one",
                   "net": f"{_q(net_tax)}", "gross": f"{_q(gross_tax)} (tax-inclusive taxblAmt)"}[allowed]
        raise Invalid(f"{at}.taxAmt", f"{tax} is not the {rate}% tax (type {band}) of taxblAmt {taxable}: "
                                      f"expected {options}")

    def _check_credit_note(self, doc: Mapping[str, Any], branch: Branch, org_invc_no: int) -> None:
        if not doc.get("rfdRsnCd"):
            raise Invalid("rfdRsnCd", "is required on a credit note (class 32)")
        original = branch.invoices.get(org_invc_no)
        if original is None or original.rcpt_ty_cd != "S":
            raise Invalid("orgInvcNo", f"{org_invc_no} is not a signed sale of this branch")
        cust_tin = doc.get("custTin") or ""
        if cust_tin != original.cust_tin:
            raise Invalid("custTin", f"{cust_tin!r} differs from the PIN {original.cust_tin!r} on the original "
                                     f"invoice {org_invc_no}")
        if doc["salesDt"] < original.sales_dt:
            raise Invalid("salesDt", f"{doc['salesDt']} is before the date of the original invoice "
                                     f"({original.sales_dt})")

    def _invoice_details(self, doc: dict[str, Any], branch: Branch | None, now: datetime) -> Answer:
        assert branch is not None
        invoice = branch.invoices.get(_integer(doc, "invcNo", minimum=1))
        if invoice is None:
            return Answer.of("001")
        sale = copy.deepcopy(invoice.request)
        receipt: dict[str, Any] = sale["receipt"]  # an object: checked before the sale was stored
        sale["receipt"] = {**receipt, **invoice.signature(),
                           "sdcDateTime": invoice.sdc_dt.strftime("%Y-%m-%d %H:%M:%S.0")}
        return Answer.of("000", data={"salesList": [sale]})

    # --- the view for tests -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        branches: dict[str, Any] = {}
        for name, branch in self.branches.items():
            last = branch.last_invc_no
            gaps: list[int] = []
            gap_count = last - len([n for n in branch.invoices if n <= last])
            for number in range(1, last + 1):
                if len(gaps) >= _GAPS_SHOWN:
                    break
                if number not in branch.invoices:
                    gaps.append(number)
            branches[name] = {
                "invoices": {str(n): {"trdInvcNo": i.trd_invc_no, "rcptTyCd": i.rcpt_ty_cd,
                                      "orgInvcNo": i.org_invc_no, "totAmt": i.tot_amt, "custTin": i.cust_tin,
                                      "curRcptNo": i.cur_rcpt_no, "totRcptNo": i.tot_rcpt_no,
                                      "rcptSign": i.rcpt_sign, "intrlData": i.intrl_data,
                                      "sdcDateTime": i.sdc_dt.strftime("%Y%m%d%H%M%S")}
                             for n, i in sorted(branch.invoices.items())},
                "last_invc_no": last,
                "receipts": {**branch.receipts, "total": branch.total_receipts},
                "gaps": gaps,
                "gap_count": gap_count,
                "already_signed_attempts": branch.already_signed_attempts,
                "trd_invc_no_signed_twice": sorted({trd for (_, trd), numbers in branch.signed_by_trd.items()
                                                    if len(numbers) > 1}),
                "items": sorted(branch.items),
                "devices": [{"serial": r.device.serial, "initialised": r.initialised, "sdcId": r.identity["sdcId"]}
                            for r in self.devices.values()
                            if (r.device.tin, r.device.bhf_id) == (branch.tin, branch.bhf_id)],
            }
        return {"requests": dict(self.requests), "results": copy.deepcopy(self.results),
                "connections": self.connections, "branches": branches}


def _q(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# --- JSON out, numbers exact ------------------------------------------------------------------


def to_json(value: Any) -> str:
    """JSON text with Decimals written as exact numbers (never through float)."""
    out: list[str] = []
    _emit(value, out)
    return "".join(out)


def _emit(value: Any, out: list[str]) -> None:
    if value is None or isinstance(value, bool | str | float):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, Decimal):
        out.append(format(value, "f"))
    elif isinstance(value, Mapping):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(json.dumps(str(key), ensure_ascii=False))
            out.append(":")
            _emit(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- the fault plan ---------------------------------------------------------------------------


@dataclass
class CountedFault:
    kind: str  # "reset", "http_status", "malformed_json", "result_code"
    count: int
    paths: frozenset[str] | None  # None: every API path
    commit: bool = False
    code: str = ""
    status: int = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "paths": None if self.paths is None else sorted(self.paths)}
        if self.kind != "reset":
            out["commit"] = self.commit
        if self.kind == "result_code":
            out["code"] = self.code
        if self.kind == "http_status":
            out["status"] = self.status
        return out


FAULT_ORDER = ("reset", "http_status", "malformed_json", "result_code")  # which fault wins a request


@dataclass
class Faults:
    outage: bool = False
    latency_ms: float = 0
    hang_count: int = 0
    hang_seconds: float = 0
    counted: dict[str, CountedFault] = field(default_factory=dict)

    def merge(self, changes: Mapping[str, Any], known_paths: Collection[str]) -> None:
        """Apply POST /_sim/faults semantics: given entries replace, null clears; ValueError, nothing changed."""
        new = copy.deepcopy(self)
        for key, value in changes.items():
            if key == "outage":
                if value is not None and not isinstance(value, bool):
                    raise ValueError("outage must be true, false or null")
                new.outage = bool(value)
            elif key == "latency_ms":
                new.latency_ms = 0 if value is None else _non_negative(value, "latency_ms")
            elif key == "hang_after_commit":
                spec = _spec(value, key, {"count", "seconds"})
                new.hang_count = 0 if spec is None else _count(spec, key)
                new.hang_seconds = 0 if spec is None else _non_negative(spec.get("seconds"), f"{key}.seconds")
            elif key in FAULT_ORDER:
                allowed = {"count", "paths"} | ({"commit"} if key != "reset" else set()) | \
                    {"result_code": {"code"}, "http_status": {"status"}}.get(key, set())
                spec = _spec(value, key, allowed)
                fault = None if spec is None else self._counted(key, spec, known_paths)
                if fault is None or fault.count == 0:
                    new.counted.pop(key, None)
                else:
                    new.counted[key] = fault
            else:
                raise ValueError(f"unknown fault {key!r}; use outage, latency_ms, hang_after_commit, "
                                 f"{', '.join(FAULT_ORDER)}")
        self.__dict__.update(new.__dict__)

    @staticmethod
    def _counted(kind: str, spec: Mapping[str, Any], known_paths: Collection[str]) -> CountedFault:
        paths = spec.get("paths")
        if paths is not None:
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ValueError(f"{kind}.paths must be a list of API names such as 'saveTrnsSalesOsdc'")
            unknown = sorted(set(paths) - set(known_paths))
            if unknown:
                raise ValueError(f"{kind}.paths: unknown API {', '.join(unknown)}")
        commit = spec.get("commit", False)
        if not isinstance(commit, bool):
            raise ValueError(f"{kind}.commit must be true or false")
        fault = CountedFault(kind, _count(spec, kind), None if paths is None else frozenset(paths), commit)
        if kind == "result_code":
            code = spec.get("code")
            if not isinstance(code, str) or not re.fullmatch(r"[0-9A-Z]{1,4}", code):
                raise ValueError("result_code.code must be a result code such as \"894\"")
            fault.code = code
        if kind == "http_status":
            status = spec.get("status")
            if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
                raise ValueError("http_status.status must be an HTTP status such as 503")
            fault.status = status
        return fault

    def take(self, path: str) -> CountedFault | None:
        """The fault that answers this request instead of KRA, if any; uses up one of its count."""
        for kind in FAULT_ORDER:
            fault = self.counted.get(kind)
            if fault is not None and (fault.paths is None or path in fault.paths):
                fault.count -= 1
                if fault.count <= 0:
                    del self.counted[kind]
                return replace(fault)
        return None

    def take_hang(self) -> float:
        """Seconds to hold the answer of a processed saveTrnsSalesOsdc (0: none); uses up one."""
        if self.hang_count <= 0:
            return 0
        self.hang_count -= 1
        return self.hang_seconds

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"outage": self.outage, "latency_ms": self.latency_ms,
                               "hang_after_commit": None}
        if self.hang_count:
            out["hang_after_commit"] = {"count": self.hang_count, "seconds": self.hang_seconds}
        out.update({kind: (self.counted[kind].describe() if kind in self.counted else None) for kind in FAULT_ORDER})
        return out


def _spec(value: Any, key: str, allowed: set[str]) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object or null")
    extra = sorted(set(value) - allowed)
    if extra:
        raise ValueError(f"{key}: unknown field {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")
    return value


def _count(spec: Mapping[str, Any], key: str) -> int:
    count = spec.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{key}.count must be a non-negative integer")
    return count


def _non_negative(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal) or value < 0:
        raise ValueError(f"{key} must be a non-negative number")
    return float(value)
