"""The KRA OSCU simulator over real sockets: initialisation, headers, lookups, items, sales and credit
notes with their validation, numbering, invoice details, every fault, the state counters and
determinism. Payloads are built here by hand, with this file's own arithmetic."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import pytest
from conftest import FakeClock

from agent.kra.simulator import SimDevice, Simulator, SimulatorConfig

pytestmark = pytest.mark.timeout(60)

TIN, BHF, SERIAL = "P052112956W", "00", "SIM-0001"
BRANCH = f"{TIN}/{BHF}"
EARLY = "20180101000000"
START = datetime(2026, 11, 21, 11, 5, tzinfo=UTC)  # 14:05 in Nairobi
RATES = {"A": 0, "B": 16, "C": 0, "D": 0, "E": 8}
ITEMS: dict[str, tuple[str, str, str]] = {  # itemCd -> (itemClsCd, taxTyCd, qtyUnitCd)
    "KE2NTU0000001": ("5059690800", "B", "U"),
    "KE2NTKG0000002": ("5010150000", "A", "KG"),
    "KE2NTL0000003": ("1510150000", "E", "L"),
}
BREAD = ("KE2NTU0000001", "2", "58.00")
SUKUMA = ("KE2NTKG0000002", "1.5", "40.00")
FUEL = ("KE2NTL0000003", "10", "180.50")
Line = tuple[str, str, str]  # itemCd, quantity, VAT-inclusive unit price


# --- payloads, with this file's own arithmetic ------------------------------------------------


def money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def dumps(body: Any) -> str:
    return json.dumps(body, default=float)


def item_body(item_cd: str) -> dict[str, Any]:
    cls, band, unit = ITEMS[item_cd]
    return {"itemCd": item_cd, "itemClsCd": cls, "itemTyCd": "2", "itemNm": f"Item {item_cd}",
            "orgnNatCd": "KE", "pkgUnitCd": "NT", "qtyUnitCd": unit, "taxTyCd": band, "dftPrc": 100,
            "isrcAplcbYn": "N", "useYn": "Y", "regrId": "test", "regrNm": "Test", "modrId": "test", "modrNm": "Test"}


def sale_body(invc_no: int, lines: tuple[Line, ...] = (BREAD, SUKUMA), *, trd: str | None = None,
              gross: bool = False, org_invc_no: int = 0, reason: str | None = None, cust_tin: str | None = None,
              sales_dt: str = "20261121") -> dict[str, Any]:
    """A saveTrnsSalesOsdc body; a credit note when org_invc_no is given. Net taxblAmt unless gross."""
    items, bands = [], {band: [Decimal(0), Decimal(0)] for band in RATES}
    for seq, (item_cd, qty, price) in enumerate(lines, start=1):
        cls, band, unit = ITEMS[item_cd]
        paid = money(Decimal(qty) * Decimal(price))
        rate = RATES[band]
        tax = money(paid * rate / (100 + rate))
        taxable = paid if gross else paid - tax
        bands[band][0] += taxable
        bands[band][1] += tax
        items.append({"itemSeq": seq, "itemCd": item_cd, "itemClsCd": cls, "itemNm": f"Item {item_cd}",
                      "pkgUnitCd": "NT", "pkg": Decimal(qty), "qtyUnitCd": unit, "qty": Decimal(qty),
                      "prc": Decimal(price), "splyAmt": paid, "dcRt": 0, "dcAmt": 0, "taxTyCd": band,
                      "taxblAmt": taxable, "taxAmt": tax, "totAmt": paid})
    moment = f"{sales_dt}140500"
    body: dict[str, Any] = {
        "trdInvcNo": trd or f"T-{invc_no}", "invcNo": invc_no, "orgInvcNo": org_invc_no,
        "custTin": cust_tin, "custNm": None, "salesTyCd": "N", "rcptTyCd": "R" if org_invc_no else "S",
        "pmtTyCd": "01", "salesSttsCd": "02", "cfmDt": moment, "salesDt": sales_dt, "stockRlsDt": moment,
        "totItemCnt": len(items),
        "totTaxblAmt": sum((b[0] for b in bands.values()), Decimal(0)),
        "totTaxAmt": sum((b[1] for b in bands.values()), Decimal(0)),
        "totAmt": sum((i["totAmt"] for i in items), Decimal(0)),
        "prchrAcptcYn": "N", "regrId": "test", "regrNm": "Test", "modrId": "test", "modrNm": "Test",
        "receipt": {"custTin": cust_tin, "rcptPbctDt": moment, "prchrAcptcYn": "N"},
        "itemList": items,
    }
    for band, (taxable, tax) in bands.items():
        body[f"taxblAmt{band}"], body[f"taxRt{band}"], body[f"taxAmt{band}"] = taxable, RATES[band], tax
    if org_invc_no:
        body["rfdDt"] = moment
        body["rfdRsnCd"] = reason
    return body


# --- fixtures ---------------------------------------------------------------------------------


class Device:
    """An initialised device talking to the simulator's API port."""

    def __init__(self, sim: Simulator, info: dict[str, Any]) -> None:
        self.info = info
        self.root = sim.api_url.removesuffix("/etims-api")  # the API port, for /_sim/... and stray paths
        self.key: str = info["cmcKey"]
        self.http = httpx.Client(base_url=sim.api_url, timeout=5.0,
                                 headers={"tin": TIN, "bhfId": BHF, "cmcKey": self.key})

    def call(self, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        response = self.http.post(f"/{path}", content=dumps(body), headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def sign(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.call("saveTrnsSalesOsdc", body)
        assert answer["resultCd"] == "000", answer
        data: dict[str, Any] = answer["data"]
        return data


def init(sim: Simulator, serial: str = SERIAL, tin: str = TIN, bhf_id: str = BHF) -> dict[str, Any]:
    response = httpx.post(f"{sim.api_url}/selectInitOsdcInfo", json={"tin": tin, "bhfId": bhf_id, "dvcSrlNo": serial})
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


def invoices(sim: Simulator) -> dict[str, Any]:
    found: dict[str, Any] = sim.state()["branches"][BRANCH]["invoices"]
    return found


@pytest.fixture(name="clock", scope="module")
def _clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture(name="shared", scope="module")
def _shared(clock: FakeClock) -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(), clock=clock).start() as sim:
        yield sim


@pytest.fixture(name="sim")
def _sim(shared: Simulator, clock: FakeClock) -> Iterator[Simulator]:
    """The shared simulator, emptied, with default settings and the clock at START."""
    shared.reset(state=True)
    shared.configure(numbering="lenient", reinit_code="902", require_registered_items=True, strict_http_status=200,
                     tax_convention="either")
    clock.now = START
    yield shared
    shared.reset(state=True)


@pytest.fixture(name="device")
def _device(sim: Simulator) -> Iterator[Device]:
    """The simulator's device, initialised, with every test item registered."""
    device = Device(sim, init(sim)["data"]["info"])
    for item_cd in ITEMS:
        assert device.call("saveItem", item_body(item_cd))["resultCd"] == "000"
    yield device
    device.http.close()


# --- tests ------------------------------------------------------------------------------------


class TestInit:
    def test_first_init_returns_the_device_information(self, sim: Simulator) -> None:
        """A configured serial initialises once with every §2.1 field, a 32-hex cmcKey and a KRACU0 SCU id."""
        answer = init(sim)
        assert answer["resultCd"] == "000"
        assert re.fullmatch(r"\d{14}", answer["resultDt"])
        info = answer["data"]["info"]
        assert set(info) >= {"tin", "taxprNm", "bsnsActv", "bhfId", "bhfNm", "bhfOpenDt", "prvncNm", "dstrtNm",
                             "sctrNm", "locDesc", "hqYn", "mgrNm", "mgrTelNo", "mgrEmail", "dvcId", "sdcId",
                             "mrcNo", "cmcKey"}
        assert (info["tin"], info["bhfId"]) == (TIN, BHF)
        assert re.fullmatch(r"[0-9A-Fa-f]{32}", info["cmcKey"])
        assert re.fullmatch(r"KRACU0\d{9}", info["sdcId"])
        device = sim.state()["branches"][BRANCH]["devices"]
        assert device == [{"serial": SERIAL, "initialised": True, "sdcId": info["sdcId"]}]

    def test_second_init_is_902_without_a_key(self, sim: Simulator) -> None:
        """Initialising the same serial again answers 902 and does not hand out the key."""
        init(sim)
        answer = init(sim)
        assert answer["resultCd"] == "902"
        assert answer["data"] is None

    def test_second_init_is_901_when_configured(self, sim: Simulator) -> None:
        """With reinit_code 901 (set through the control API) a second initialisation answers 901."""
        response = httpx.post(f"{sim.control_url}/_sim/config", json={"reinit_code": "901"})
        assert response.status_code == 200 and response.json()["config"]["reinit_code"] == "901"
        assert init(sim)["resultCd"] == "000"
        assert init(sim)["resultCd"] == "901"

    def test_unknown_serial_or_other_branch_is_901(self, sim: Simulator) -> None:
        """A serial KRA never approved, or an approved one under another branch, answers 901."""
        assert init(sim, serial="NOT-APPROVED")["resultCd"] == "901"
        assert init(sim, bhf_id="01")["resultCd"] == "901"
        assert init(sim)["resultCd"] == "000"


class TestHeaders:
    def test_missing_headers_are_900(self, sim: Simulator) -> None:
        """A call without tin, bhfId or cmcKey answers 900."""
        key = init(sim)["data"]["info"]["cmcKey"]
        url = f"{sim.api_url}/selectCodeList"
        assert httpx.post(url, json={"lastReqDt": EARLY}).json()["resultCd"] == "900"
        partial = httpx.post(url, json={"lastReqDt": EARLY}, headers={"tin": TIN, "bhfId": BHF})
        assert partial.json()["resultCd"] == "900"
        shouted = httpx.post(url, json={"lastReqDt": EARLY}, headers={"TIN": TIN, "BHFID": BHF, "CMCKEY": key})
        assert shouted.json()["resultCd"] == "000"

    def test_unknown_key_or_mismatched_branch_is_901(self, sim: Simulator) -> None:
        """An unknown cmcKey, or a key sent with another PIN/branch, answers 901."""
        key = init(sim)["data"]["info"]["cmcKey"]
        url = f"{sim.api_url}/selectCodeList"
        wrong_key = httpx.post(url, json={"lastReqDt": EARLY}, headers={"tin": TIN, "bhfId": BHF, "cmcKey": "0" * 32})
        assert wrong_key.json()["resultCd"] == "901"
        wrong_branch = httpx.post(url, json={"lastReqDt": EARLY}, headers={"tin": TIN, "bhfId": "01", "cmcKey": key})
        assert wrong_branch.json()["resultCd"] == "901"

    def test_key_of_a_device_not_yet_initialised_is_901(self, sim: Simulator) -> None:
        """After a state reset the old key is no longer known."""
        key = init(sim)["data"]["info"]["cmcKey"]
        sim.reset(state=True)
        response = httpx.post(f"{sim.api_url}/selectCodeList", json={"lastReqDt": EARLY},
                              headers={"tin": TIN, "bhfId": BHF, "cmcKey": key})
        assert response.json()["resultCd"] == "901"


class TestLookups:
    def test_code_list_has_the_kenyan_rates_and_classes(self, device: Device) -> None:
        """Class 04 carries A 0, B 16, C 0, D 0, E 8 in userDfnCd1, and the other classes are present."""
        answer = device.call("selectCodeList", {"lastReqDt": EARLY})
        classes = {c["cdCls"]: {d["cd"]: d for d in c["dtlList"]} for c in answer["data"]["clsList"]}
        assert {"04", "05", "07", "10", "11", "14", "17", "24", "32", "33", "37"} <= set(classes)
        assert {cd: Decimal(d["userDfnCd1"]) for cd, d in classes["04"].items()} == RATES
        assert set(classes["07"]) == {f"0{i}" for i in range(1, 8)}
        assert {"U", "KG", "L"} <= set(classes["10"])
        assert {"NT", "BG", "CT", "OU"} <= set(classes["17"])
        assert set(classes["32"]) == {f"{i:02d}" for i in range(1, 14)}

    def test_lookups_answer_and_honour_last_req_dt(self, device: Device) -> None:
        """Item classes, notices and customers answer; a recent lastReqDt or an unknown PIN gives 001."""
        classes = device.call("selectItemClsList", {"lastReqDt": EARLY})["data"]["itemClsList"]
        by_code = {c["itemClsCd"]: c for c in classes}
        assert by_code["5059690800"]["taxTyCd"] == "B" and "5010150000" in by_code
        assert len(device.call("selectNoticeList", {"lastReqDt": EARLY})["data"]["noticeList"]) == 1
        for path in ("selectCodeList", "selectItemClsList", "selectNoticeList"):
            recent = device.call(path, {"lastReqDt": "20261121000000"})
            assert (recent["resultCd"], recent["data"]) == ("001", None), path
        customer = device.call("selectCustomer", {"custmTin": "A123456789Z"})["data"]["custList"][0]
        assert customer["tin"] == "A123456789Z" and customer["taxprNm"]
        assert device.call("selectCustomer", {"custmTin": "A000000000A"})["resultCd"] == "001"
        assert device.call("selectCodeList", {})["resultCd"] == "910"

    def test_items_are_listed_after_last_req_dt(self, sim: Simulator, clock: FakeClock) -> None:
        """selectItemList is 001 when empty and returns only items saved after lastReqDt."""
        device = Device(sim, init(sim)["data"]["info"])
        with device.http:
            assert device.call("selectItemList", {"lastReqDt": EARLY})["resultCd"] == "001"
            first = device.call("saveItem", item_body("KE2NTU0000001"))
            assert (first["resultCd"], first["data"]) == ("000", None)
            clock.advance(60)
            device.call("saveItem", item_body("KE2NTKG0000002"))
            listed = device.call("selectItemList", {"lastReqDt": EARLY})["data"]["itemList"]
            assert [i["itemCd"] for i in listed] == ["KE2NTU0000001", "KE2NTKG0000002"]
            assert listed[0]["tin"] == TIN and listed[0]["regBhfId"] == BHF and listed[0]["taxTyCd"] == "B"
            later = device.call("selectItemList", {"lastReqDt": first["resultDt"]})["data"]["itemList"]
            assert [i["itemCd"] for i in later] == ["KE2NTKG0000002"]
            assert device.call("selectItemList", {"lastReqDt": "20301231000000"})["resultCd"] == "001"
        assert sim.state()["branches"][BRANCH]["items"] == ["KE2NTKG0000002", "KE2NTU0000001"]

    @pytest.mark.parametrize(("change", "field"), [
        ({"itemNm": None}, "itemNm"),
        ({"itemNm": "x" * 201}, "itemNm"),
        ({"pkgUnitCd": "ZZ"}, "pkgUnitCd"),
        ({"taxTyCd": "F"}, "taxTyCd"),
        ({"dftPrc": "100"}, "dftPrc"),
    ])
    def test_bad_item_is_910(self, device: Device, change: dict[str, Any], field: str) -> None:
        """A saveItem with a missing, too long, unknown-code or mistyped field answers 910 naming it."""
        answer = device.call("saveItem", {**item_body("KE2NTU0000001"), "itemCd": "KE2NTU0000099", **change})
        assert answer["resultCd"] == "910"
        assert field in answer["resultMsg"]


def _bump(key: str, by: str = "1") -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body[key] += Decimal(by)
    return change


def _bump_line(key: str, *also: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        for k in (key, *also):
            body["itemList"][0][k] += 1
    return change


REFUSALS = [
    pytest.param(lambda b: b.pop("trdInvcNo"), "trdInvcNo", id="missing-field"),
    pytest.param(lambda b: b.pop("taxAmtC"), "taxAmtC", id="missing-band-field"),
    pytest.param(lambda b: b["itemList"][0].pop("qtyUnitCd"), "itemList[0].qtyUnitCd", id="missing-line-field"),
    pytest.param(lambda b: b.pop("receipt"), "receipt", id="missing-receipt"),
    pytest.param(lambda b: b.update(trdInvcNo="X" * 51), "trdInvcNo", id="too-long"),
    pytest.param(lambda b: b.update(invcNo="1"), "invcNo", id="number-as-string"),
    pytest.param(lambda b: b.update(totAmt="139.00"), "totAmt", id="amount-as-string"),
    pytest.param(lambda b: b.update(cfmDt="20261321140500"), "cfmDt", id="bad-date"),
    pytest.param(lambda b: b.update(rcptTyCd="X"), "rcptTyCd", id="bad-receipt-type"),
    pytest.param(lambda b: b.update(salesSttsCd="01"), "salesSttsCd", id="bad-sale-status"),
    pytest.param(lambda b: b.update(pmtTyCd="09"), "pmtTyCd", id="bad-payment-type"),
    pytest.param(lambda b: b.update(salesTyCd="T"), "salesTyCd", id="bad-transaction-type"),
    pytest.param(lambda b: b["itemList"][0].update(taxTyCd="F"), "itemList[0].taxTyCd", id="bad-tax-type"),
    pytest.param(lambda b: b["itemList"][0].update(itemCd="KE2NTU9999999"), "itemList[0].itemCd",
                 id="unregistered-item"),
    pytest.param(lambda b: b.update(orgInvcNo=4), "orgInvcNo", id="sale-with-original"),
    pytest.param(lambda b: b.update(totItemCnt=3), "totItemCnt", id="item-count"),
    pytest.param(lambda b: b.update(taxRtB=18), "taxRtB", id="wrong-rate"),
    pytest.param(_bump_line("totAmt"), "itemList[0].totAmt", id="line-does-not-add-up"),
    pytest.param(_bump_line("taxAmt", "totAmt"), "itemList[0].taxAmt", id="line-tax-not-the-rate"),
    pytest.param(_bump("taxblAmtB"), "taxblAmtB", id="band-sum"),
    pytest.param(_bump("totAmt", "0.06"), "totAmt", id="header-total"),
    pytest.param(lambda b: b["itemList"][0].update(qty=Decimal("2.125")), "itemList[0].qty", id="three-decimals"),
]


class TestSales:
    def test_valid_sale_is_signed(self, sim: Simulator, device: Device) -> None:
        """A correct sale gets receipt counters, 26-char base32 intrlData, 16-char rcptSign and Nairobi time."""
        first = device.sign(sale_body(1))
        assert first["curRcptNo"] == 1 and first["totRcptNo"] == 1
        assert re.fullmatch(r"[A-Z2-7]{26}", first["intrlData"])
        assert re.fullmatch(r"[A-Z0-9]{16}", first["rcptSign"])
        assert first["sdcDateTime"] == "20261121140500"
        second = device.sign(sale_body(2, (FUEL,)))
        assert (second["curRcptNo"], second["totRcptNo"]) == (2, 2)
        assert second["rcptSign"] != first["rcptSign"]
        stored = invoices(sim)
        assert stored["1"]["trdInvcNo"] == "T-1" and stored["1"]["rcptSign"] == first["rcptSign"]
        assert stored["2"]["totAmt"] == 1805.0
        assert sim.state()["branches"][BRANCH]["last_invc_no"] == 2

    def test_both_tax_conventions_are_accepted(self, device: Device) -> None:
        """Net taxblAmt (Kenyan practice) and tax-inclusive taxblAmt (the spec samples) are both accepted."""
        device.sign(sale_body(1, (BREAD, SUKUMA, FUEL)))
        device.sign(sale_body(2, (BREAD, SUKUMA, FUEL), gross=True))

    def test_mixed_conventions_in_one_invoice_are_910(self, device: Device) -> None:
        """One invoice may not mix net and tax-inclusive lines."""
        body = sale_body(1, (BREAD, FUEL))
        gross = sale_body(1, (BREAD, FUEL), gross=True)
        body["itemList"][1] = gross["itemList"][1]
        body["taxblAmtE"] = gross["taxblAmtE"]
        body["totTaxblAmt"] = body["taxblAmtB"] + body["taxblAmtE"]
        answer = device.call("saveTrnsSalesOsdc", body)
        assert answer["resultCd"] == "910" and "itemList[1]" in answer["resultMsg"]

    @pytest.mark.parametrize(("change", "field"), REFUSALS)
    def test_invalid_sale_is_910_naming_the_field(self, sim: Simulator, device: Device,
                                                  change: Callable[[dict[str, Any]], Any], field: str) -> None:
        """Each kind of payload error answers 910 with the field in the message, and nothing is signed."""
        body = sale_body(1)
        change(body)
        answer = device.call("saveTrnsSalesOsdc", body)
        assert answer["resultCd"] == "910", answer
        assert field in answer["resultMsg"]
        assert answer["data"] is None
        assert invoices(sim) == {}

    def test_unregistered_items_pass_when_not_required(self, sim: Simulator) -> None:
        """With require_registered_items off, a sale of items never sent to saveItem is signed."""
        sim.configure(require_registered_items=False)
        device = Device(sim, init(sim)["data"]["info"])
        with device.http:
            device.sign(sale_body(1))

    def test_body_pin_must_match_the_header(self, device: Device) -> None:
        """A tin repeated in the body is accepted when equal to the header and refused otherwise."""
        device.sign({**sale_body(1), "tin": TIN, "bhfId": BHF})
        answer = device.call("saveTrnsSalesOsdc", {**sale_body(2), "tin": "P000000000X"})
        assert answer["resultCd"] == "910" and "tin" in answer["resultMsg"]


class TestCreditNotes:
    def test_valid_credit_note_is_signed(self, sim: Simulator, device: Device) -> None:
        """A credit note of a signed sale, same PIN, with a reason, takes the next number and its own counter."""
        device.sign(sale_body(1, cust_tin="A123456789Z"))
        signed = device.sign(sale_body(2, org_invc_no=1, reason="06", cust_tin="A123456789Z", trd="C-1"))
        assert (signed["curRcptNo"], signed["totRcptNo"]) == (1, 2)
        note = invoices(sim)["2"]
        assert (note["rcptTyCd"], note["orgInvcNo"], note["custTin"]) == ("R", 1, "A123456789Z")

    def test_walk_in_credit_note_with_blank_pins_is_signed(self, device: Device) -> None:
        """A blank PIN on both the sale and its credit note is fine."""
        device.sign(sale_body(1))
        device.sign(sale_body(2, org_invc_no=1, reason="01"))

    @pytest.mark.parametrize(("kwargs", "field"), [
        ({"org_invc_no": 9, "reason": "06", "cust_tin": "A123456789Z"}, "orgInvcNo"),
        ({"org_invc_no": 1, "reason": "06", "cust_tin": "P051234567M"}, "custTin"),
        ({"org_invc_no": 1, "reason": "06", "cust_tin": None}, "custTin"),
        ({"org_invc_no": 1, "reason": None, "cust_tin": "A123456789Z"}, "rfdRsnCd"),
        ({"org_invc_no": 1, "reason": "14", "cust_tin": "A123456789Z"}, "rfdRsnCd"),
        ({"org_invc_no": 1, "reason": "06", "cust_tin": "A123456789Z", "sales_dt": "20261120"}, "salesDt"),
    ], ids=["original-missing", "pin-differs", "pin-dropped", "reason-missing", "reason-unknown", "dated-before"])
    def test_bad_credit_note_is_910(self, sim: Simulator, device: Device, kwargs: dict[str, Any], field: str) -> None:
        """A credit note whose original is missing, whose PIN differs, without a reason or dated earlier is 910."""
        device.sign(sale_body(1, cust_tin="A123456789Z"))
        answer = device.call("saveTrnsSalesOsdc", sale_body(2, trd="C-1", **kwargs))
        assert answer["resultCd"] == "910", answer
        assert field in answer["resultMsg"]
        assert list(invoices(sim)) == ["1"]

    def test_credit_note_of_a_credit_note_is_910(self, device: Device) -> None:
        """orgInvcNo must point to a sale, not to another credit note."""
        device.sign(sale_body(1))
        device.sign(sale_body(2, org_invc_no=1, reason="06"))
        answer = device.call("saveTrnsSalesOsdc", sale_body(3, org_invc_no=2, reason="06"))
        assert answer["resultCd"] == "910" and "orgInvcNo" in answer["resultMsg"]


class TestNumbering:
    def test_lenient_reuse_is_994_and_counted(self, sim: Simulator, device: Device) -> None:
        """Lenient numbering accepts any unused number; a signed number answers 994 and counts as an attempt."""
        device.sign(sale_body(1))
        again = device.call("saveTrnsSalesOsdc", sale_body(1))
        assert (again["resultCd"], again["data"]) == ("994", None)
        device.sign(sale_body(5))
        branch = sim.state()["branches"][BRANCH]
        assert branch["already_signed_attempts"] == 1
        assert branch["gaps"] == [2, 3, 4] and branch["gap_count"] == 3
        assert sorted(branch["invoices"]) == ["1", "5"]

    def test_strict_mode_names_the_expected_value(self, sim: Simulator, device: Device) -> None:
        """Strict numbering refuses anything but last + 1, a reused number too, with the "expected value" message."""
        sim.configure(numbering="strict")
        device.sign(sale_body(1))
        skipped = device.call("saveTrnsSalesOsdc", sale_body(3))
        assert skipped["resultCd"] == "910"
        assert skipped["resultMsg"] == "Invc No: 3 is invalid, use the expected value: 2"
        reused = device.call("saveTrnsSalesOsdc", sale_body(1))
        assert reused["resultMsg"] == "Invc No: 1 is invalid, use the expected value: 2"
        device.sign(sale_body(2))
        assert sim.state()["branches"][BRANCH]["gaps"] == []

    def test_strict_mode_http_400_variant(self, sim: Simulator, device: Device) -> None:
        """With strict_http_status 400 the same refusal comes as HTTP 400 with the same JSON body."""
        sim.configure(numbering="strict", strict_http_status=400)
        answer = device.call("saveTrnsSalesOsdc", sale_body(7), status=400)
        assert (answer["resultCd"], answer["resultMsg"]) == ("910", "Invc No: 7 is invalid, use the expected value: 1")

    def test_trader_number_signed_twice_is_reported(self, sim: Simulator, device: Device) -> None:
        """The same trdInvcNo signed under two invcNos is listed as double signing."""
        device.sign(sale_body(1, trd="R-1"))
        device.sign(sale_body(2, trd="R-2"))
        assert sim.state()["branches"][BRANCH]["trd_invc_no_signed_twice"] == []
        device.sign(sale_body(3, trd="R-1"))
        assert sim.state()["branches"][BRANCH]["trd_invc_no_signed_twice"] == ["R-1"]


class TestInvoiceDetails:
    def test_signed_sale_is_returned_with_its_receipt(self, device: Device, clock: FakeClock) -> None:
        """selectInvoiceDetails returns the stored request with the signature block in its receipt."""
        body = sale_body(1)
        signed = device.sign(body)
        clock.advance(3600)
        answer = device.call("selectInvoiceDetails", {"invcNo": 1})
        assert answer["resultCd"] == "000"
        sale = answer["data"]["salesList"][0]
        assert json.loads(dumps({k: v for k, v in body.items() if k != "receipt"})) == \
            {k: v for k, v in sale.items() if k != "receipt"}
        receipt = sale["receipt"]
        assert receipt["rcptPbctDt"] == body["receipt"]["rcptPbctDt"]
        assert {k: receipt[k] for k in ("curRcptNo", "totRcptNo", "intrlData", "rcptSign")} == \
            {k: signed[k] for k in ("curRcptNo", "totRcptNo", "intrlData", "rcptSign")}
        assert receipt["sdcDateTime"] == "2026-11-21 14:05:00.0"

    def test_unknown_invoice_is_001(self, device: Device) -> None:
        """An invoice number KRA never signed answers 001 with no data."""
        answer = device.call("selectInvoiceDetails", {"invcNo": 42})
        assert (answer["resultCd"], answer["data"]) == ("001", None)


class TestTransport:
    def test_bodies_that_are_not_json_objects(self, device: Device) -> None:
        """An empty body is 911; broken JSON or a JSON array is 910."""
        url = "/saveTrnsSalesOsdc"
        assert device.http.post(url, content=b"").json()["resultCd"] == "911"
        assert device.http.post(url, content=b"{not json").json()["resultCd"] == "910"
        assert device.http.post(url, content=b"[1, 2]").json()["resultCd"] == "910"

    def test_unknown_path_is_404_and_get_is_405(self, device: Device) -> None:
        """An unknown API is HTTP 404 and a GET HTTP 405, both with a 912 envelope."""
        missing = device.http.post("/selectNothing", json={})
        assert missing.status_code == 404 and missing.json()["resultCd"] == "912"
        elsewhere = device.http.post(f"{device.root}/other", json={})
        assert elsewhere.status_code == 404
        wrong = device.http.get("/selectCodeList")
        assert wrong.status_code == 405 and wrong.json()["resultCd"] == "912"


class TestFaults:
    def test_outage_refuses_connections_and_recovers(self, sim: Simulator, device: Device) -> None:
        """During an outage the API port refuses TCP (also on kept-alive clients); afterwards it serves again."""
        assert device.call("selectNoticeList", {"lastReqDt": EARLY})["resultCd"] == "000"
        set_on_api_port = device.http.post(f"{device.root}/_sim/faults", json={"outage": True})
        assert set_on_api_port.status_code == 200 and set_on_api_port.json()["faults"]["outage"] is True
        time.sleep(0.2)
        with pytest.raises(httpx.ConnectError):
            device.call("selectNoticeList", {"lastReqDt": EARLY})
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{sim.api_url}/selectNoticeList", json={"lastReqDt": EARLY})
        assert httpx.get(f"{sim.control_url}/_sim/state").json()["faults"]["outage"] is True
        assert httpx.post(f"{sim.control_url}/_sim/faults", json={"outage": False}).status_code == 200
        assert device.call("selectNoticeList", {"lastReqDt": EARLY})["resultCd"] == "000"

    def test_latency_delays_every_request(self, sim: Simulator, device: Device) -> None:
        """latency_ms is added to each API request."""
        sim.set_faults(latency_ms=200)
        started = time.monotonic()
        device.call("selectNoticeList", {"lastReqDt": EARLY})
        assert time.monotonic() - started >= 0.2
        sim.set_faults(latency_ms=0)

    def test_hang_after_commit_signs_but_loses_the_answer(self, sim: Simulator, device: Device) -> None:
        """The client times out, yet KRA signed the sale; the next call answers at once."""
        sim.set_faults(hang_after_commit={"count": 1, "seconds": 1.5})
        with httpx.Client(base_url=sim.api_url, timeout=0.3, headers=device.http.headers) as impatient, \
                pytest.raises(httpx.ReadTimeout):
            impatient.post("/saveTrnsSalesOsdc", content=dumps(sale_body(1)))
        assert invoices(sim)["1"]["trdInvcNo"] == "T-1"
        started = time.monotonic()
        device.sign(sale_body(2))
        assert time.monotonic() - started < 1.0
        assert device.call("selectInvoiceDetails", {"invcNo": 1})["resultCd"] == "000"

    def test_result_code_without_commit_stores_nothing(self, sim: Simulator, device: Device) -> None:
        """A forced 894 on saveTrnsSalesOsdc answers 894 without storing; other paths are untouched."""
        sim.set_faults(result_code={"code": "894", "count": 1, "paths": ["saveTrnsSalesOsdc"]})
        assert device.call("selectNoticeList", {"lastReqDt": EARLY})["resultCd"] == "000"
        answer = device.call("saveTrnsSalesOsdc", sale_body(1))
        assert (answer["resultCd"], answer["data"]) == ("894", None)
        assert invoices(sim) == {}
        device.sign(sale_body(1))

    def test_result_code_with_commit_stores_the_sale(self, sim: Simulator, device: Device) -> None:
        """A forced 999 with commit answers 999 although the sale was signed and can be looked up."""
        sim.set_faults(result_code={"code": "999", "count": 1, "paths": ["saveTrnsSalesOsdc"], "commit": True})
        assert device.call("saveTrnsSalesOsdc", sale_body(1))["resultCd"] == "999"
        assert list(invoices(sim)) == ["1"]
        assert device.call("selectInvoiceDetails", {"invcNo": 1})["resultCd"] == "000"
        assert device.call("saveTrnsSalesOsdc", sale_body(1))["resultCd"] == "994"

    def test_http_status_fault(self, sim: Simulator, device: Device) -> None:
        """http_status answers the next n requests with that status and a non-JSON body, storing nothing."""
        sim.set_faults(http_status={"status": 503, "count": 2})
        for _ in range(2):
            response = device.http.post("/saveTrnsSalesOsdc", content=dumps(sale_body(1)))
            assert response.status_code == 503
        assert invoices(sim) == {}
        device.sign(sale_body(1))

    def test_malformed_json_fault(self, sim: Simulator, device: Device) -> None:
        """malformed_json answers HTTP 200 with a truncated JSON body and stores nothing."""
        sim.set_faults(malformed_json={"count": 1})
        response = device.http.post("/saveTrnsSalesOsdc", content=dumps(sale_body(1)))
        assert response.status_code == 200
        with pytest.raises(ValueError):
            json.loads(response.content)
        assert invoices(sim) == {}
        device.sign(sale_body(1))

    def test_reset_fault_drops_the_connection(self, sim: Simulator, device: Device) -> None:
        """reset closes the connection after reading the request, without an answer or a commit."""
        sim.set_faults(reset={"count": 1, "paths": ["saveTrnsSalesOsdc"]})
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            device.http.post("/saveTrnsSalesOsdc", content=dumps(sale_body(1)))
        assert invoices(sim) == {}
        device.sign(sale_body(1))

    def test_reset_clears_faults_and_bad_faults_are_refused(self, sim: Simulator, device: Device) -> None:
        """POST /_sim/reset clears every fault; an unknown fault is HTTP 400 or ValueError and changes nothing."""
        sim.set_faults(outage=True, result_code={"code": "990", "count": 5})
        refused = httpx.post(f"{sim.control_url}/_sim/faults", json={"result_code": {"code": "991"}, "bogus": 1})
        assert refused.status_code == 400 and "bogus" in refused.json()["error"]
        with pytest.raises(ValueError, match="paths"):
            sim.set_faults(reset={"count": 1, "paths": ["saveTrnsSales"]})
        assert sim.faults()["result_code"] == {"code": "990", "count": 5, "paths": None, "commit": False}
        assert httpx.post(f"{sim.control_url}/_sim/reset").status_code == 200
        assert device.call("selectNoticeList", {"lastReqDt": EARLY})["resultCd"] == "000"


class TestStateCounters:
    def test_connections_counted_per_tcp_connection(self, sim: Simulator, device: Device) -> None:
        """A kept-alive client counts once however many requests it makes; a new client counts again."""
        before = sim.state()["connections"]
        for _ in range(3):
            device.call("selectNoticeList", {"lastReqDt": EARLY})
        with httpx.Client(base_url=sim.api_url, headers=device.http.headers) as other:
            other.post("/selectNoticeList", json={"lastReqDt": EARLY})
            other.post("/selectNoticeList", json={"lastReqDt": EARLY})
        state = sim.state()
        assert state["connections"] - before == 1
        assert state["requests"]["selectNoticeList"] == 5
        assert state["results"]["selectNoticeList"] == {"000": 5}

    def test_fresh_clients_count_one_connection_each(self, sim: Simulator, device: Device) -> None:
        """Three separate clients open three TCP connections."""
        before = sim.state()["connections"]
        for _ in range(3):
            with httpx.Client(base_url=sim.api_url, headers=device.http.headers) as client:
                client.post("/selectNoticeList", json={"lastReqDt": EARLY})
                client.post("/selectNoticeList", json={"lastReqDt": EARLY})
        assert sim.state()["connections"] - before == 3

    def test_state_is_served_on_both_ports(self, sim: Simulator, device: Device) -> None:
        """GET /_sim/state answers on the control port and on the API port with the same ledger."""
        device.sign(sale_body(1))
        on_control = httpx.get(f"{sim.control_url}/_sim/state").json()
        on_api = device.http.get(f"{device.root}/_sim/state").json()
        assert on_control["branches"] == on_api["branches"] == sim.state()["branches"]
        assert set(on_control["branches"][BRANCH]) >= {"invoices", "last_invc_no", "gaps", "already_signed_attempts",
                                                        "trd_invc_no_signed_twice", "items", "devices"}


class TestDeterminism:
    @staticmethod
    def _run(seed: int) -> tuple[str, dict[str, Any]]:
        with Simulator(SimulatorConfig(seed=seed, devices=(SimDevice(),)), clock=FakeClock(START)).start() as sim:
            device = Device(sim, init(sim)["data"]["info"])
            with device.http:
                for item_cd in ITEMS:
                    device.call("saveItem", item_body(item_cd))
                device.sign(sale_body(1))
                device.sign(sale_body(2, (FUEL,)))
            return device.key, invoices(sim)

    def test_same_seed_gives_the_same_keys_and_signatures(self) -> None:
        """Two simulators with one seed and the same requests give identical keys and signatures."""
        first, second, other = self._run(7), self._run(7), self._run(8)
        assert first == second
        assert other[0] != first[0]
        assert other[1]["1"]["rcptSign"] != first[1]["1"]["rcptSign"]


class TestServeForever:
    def test_command_serves_until_sigterm(self) -> None:
        """serve_forever announces both URLs, serves, and stops cleanly on SIGTERM."""
        code = ("from agent.kra.simulator import SimulatorConfig, serve_forever\n"
                "serve_forever(SimulatorConfig(), '127.0.0.1', 0, 0, "
                "on_ready=lambda api, control: print(api, control, flush=True))\n")
        with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as process:
            assert process.stdout is not None
            api, control = process.stdout.readline().split()
            assert init_url(api)["resultCd"] == "000"
            assert httpx.get(f"{control}/_sim/state").json()["requests"] == {"selectInitOsdcInfo": 1}
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0


def init_url(api_url: str) -> dict[str, Any]:
    response = httpx.post(f"{api_url}/selectInitOsdcInfo", json={"tin": TIN, "bhfId": BHF, "dvcSrlNo": SERIAL})
    answer: dict[str, Any] = response.json()
    return answer
