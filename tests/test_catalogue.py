"""`items register|list` and `codes refresh`: the catalogue CSV read and checked (pure), then the commands run
through typer's runner and as real processes against KRA simulators, beside a running agent."""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_process import ROOT, Agents, SimulatorProcess, run_cli
from conftest import make_sale
from typer.testing import CliRunner, Result

from agent.cli import app
from agent.jsonwire import wire_json
from agent.kra.catalogue import (
    BadCatalogue,
    CatalogueItem,
    Defaults,
    KnownCodes,
    known_codes,
    parse_catalogue,
)
from agent.kra.code_lists import merge_codes, merge_item_classes
from agent.kra.payloads import Seller, item_request
from agent.kra.sim_state import ITEM_CLASSES, code_list
from agent.kra.simulator import Simulator, SimulatorConfig
from agent.queue.outbox import Outbox
from agent.sales import parse_sale, sale_to_dict

runner = CliRunner()
EXAMPLE = ROOT / "installer" / "examples" / "catalogue.csv"
BRANCH = "P052112956W/00"
HEADER = "item_code,name,item_class,tax_band,unit_price\n"


def parse(text: str, **kwargs: Any) -> tuple[CatalogueItem, ...]:
    return parse_catalogue(text.encode(), source="t.csv", **kwargs).items


def problems(text: str | bytes, **kwargs: Any) -> list[str]:
    """The errors BadCatalogue lists, as text."""
    with pytest.raises(BadCatalogue) as raised:
        parse_catalogue(text.encode() if isinstance(text, str) else text, source="t.csv", **kwargs)
    assert raised.value.key == "t.csv"
    return [str(e) for e in raised.value.errors]


class TestParse:
    def test_the_example_file(self) -> None:
        items = parse_catalogue(EXAMPLE.read_bytes(), source=EXAMPLE.name).items
        assert [i.code for i in items][:2] == ["KE2NTXU0000001", "KE2NTKG0000002"]
        oil = next(i for i in items if i.code == "KE2JRXU0000005")
        assert (oil.name, oil.origin_country, oil.pkg_unit, str(oil.unit_price)) == (
            "Cooking oil, 5 litre jar", "MY", "JR", "1250.00")
        assert next(i for i in items if i.code.startswith("KE3")).item_type == "3"

    def test_the_body_is_the_lanes_for_the_same_item(self) -> None:
        """A row sends byte for byte what the lane sends for a sale line of that item (payloads.item_request)."""
        sale = make_sale()
        sale["lines"][0]["barcode"] = "6161100000017"
        line = sale_to_dict(parse_sale(sale))["lines"][0]
        seller = Seller("P052112956W", "00", "till-user", "Till User")
        item = parse(HEADER.rstrip() + ",qty_unit,pkg_unit,barcode\n"
                     "KE2NTU0000001,Bread 400g,5059690800,b,58,u,nt,6161100000017\n")[0]
        assert item.request(seller) == wire_json(item_request(line, seller, origin_country="KE"))

    def test_defaults_kra_names_and_any_case_in_the_header(self) -> None:
        item = parse("ITEMCD,itemNm,ItemClsCd,taxtycd,DFTPRC\nA1,Tea,5059690800,e,10.5\n",
                     defaults=Defaults(origin_country="UG"))[0]
        assert (item.qty_unit, item.pkg_unit, item.origin_country, item.item_type, item.barcode) == (
            "U", "NT", "UG", "2", None)
        assert (item.tax_band, str(item.unit_price)) == ("E", "10.50")

    def test_bom_utf16_semicolons_blank_lines_and_quotes(self) -> None:
        text = HEADER + '\nA1,"Sugar, 1 kg",5059690800,B,150\n\n'
        assert parse_catalogue(codecs.BOM_UTF8 + text.encode(), source="t.csv").items[0].name == "Sugar, 1 kg"
        assert parse_catalogue(text.encode("utf-16"), source="t.csv").items[0].code == "A1"
        semi = parse("item_code;name;item_class;tax_band;unit_price\nA1;Mandazi;5013160000;B;10.00\n")
        assert semi[0].name == "Mandazi"

    def test_every_bad_row_is_named_with_column_problem_and_fix(self) -> None:
        found = problems(HEADER + "A1,Tea,5059690800,B,10\n"  # line 2: good
                         "A2,,50x9,F,12.345\n"  # line 3: four problems
                         "A3,Salt,5059690800,B,\"1,200\"\n"
                         "A4,Oil,5059690800,B,-1\n"
                         "A5,Rice,5059690800,B,ten\n"
                         "A6,Milk,5059690800,B\n")
        assert found == [
            "line 3, column name: is empty; give the item's name",
            "line 3, column item_class: '50x9' is not a KRA item classification code; give up to 10 digits from "
            "KRA's item classification list, e.g. 5059690800",
            "line 3, column tax_band: 'F' is not a tax band; use one of A (exempt), B (16 %), C (zero-rated), "
            "D (non-VAT), E (8 %)",
            "line 3, column unit_price: 12.345 has more than 2 decimal places; round it to cents",
            "line 4, column unit_price: '1,200' contains a comma; write the price with a decimal point and no "
            "thousands separator, e.g. 1200.50",
            "line 5, column unit_price: '-1' is not a price; give zero or more, e.g. 58.00",
            "line 6, column unit_price: 'ten' is not a number; write the price as digits, e.g. 58.00, without a "
            "currency",
            "line 7: has 4 cell(s) but the header has 5; give every column (empty for a default), and put a value "
            "that contains a comma in double quotes",
        ]

    def test_the_message_says_nothing_was_sent_and_how_to_go_on(self) -> None:
        with pytest.raises(BadCatalogue) as raised:
            parse_catalogue((HEADER + "A1,Tea,5059690800,Z,1\n").encode(), source="shop.csv")
        message = str(raised.value)
        assert message.startswith("shop.csv: 1 bad row(s), so nothing was sent;")
        assert "--skip-bad" in message and "line 2, column tax_band" in message

    def test_skip_bad_keeps_the_good_rows(self) -> None:
        catalogue = parse_catalogue((HEADER + "A1,Tea,5059690800,Z,1\nA2,Coffee,5059690800,B,2\n").encode(),
                                    source="t.csv", skip_bad=True)
        assert [i.code for i in catalogue.items] == ["A2"]
        assert [(e.line, e.column) for e in catalogue.errors] == [(2, "tax_band")]

    def test_duplicate_codes_name_the_first_line_even_if_that_row_is_bad(self) -> None:
        found = problems(HEADER + "A1,Tea,5059690800,B,1\nA2,Coffee,5059690800,B,1.001\nA2,Coffee,5059690800,B,2\n"
                         "A1,Tea again,5059690800,B,1\n", skip_bad=False)
        assert found[1:] == [
            "line 4, column item_code: item code 'A2' is already on line 3; list each item once; remove or merge "
            "the rows",
            "line 5, column item_code: item code 'A1' is already on line 2; list each item once; remove or merge "
            "the rows",
        ]

    def test_a_record_over_two_lines_keeps_the_line_numbers_right(self) -> None:
        found = problems(HEADER + 'A1,"Bread\nloaf",5059690800,B,1\nA2,Tea,5059690800,X,1\n')
        assert [f.split(":")[0] for f in found] == ["line 2, column name", "line 4, column tax_band"]
        assert "control characters" in found[0]

    @pytest.mark.parametrize(("data", "expected"), [
        (b"", "the file is empty; give a header row (item_code,name,item_class,tax_band,unit_price, ...)"),
        (b"\n \n", "the file is empty"),
        (HEADER.encode() + b"\n", "line 1: there is a header but no items; add one row per item under the header"),
        (b"item_code,name,item_class,tax_band\n", "line 1: the header lacks the column(s) unit_price"),
        (HEADER.rstrip().encode() + b",colour\n", "line 1, column colour: is not a column of the catalogue"),
        (HEADER.rstrip().encode() + b",itemCd\n", "line 1, column itemCd: is the column item_code a second time"),
        (HEADER.encode() + b"A1,Caf\xe9,5059690800,B,1\n", "line 2: is not UTF-8 text (byte 0xe9); save the file "
                                                          "as \"CSV UTF-8\""),
        (HEADER.encode() + b'A1,"Tea,5059690800,B,1\n', "is not valid CSV"),
    ], ids=["empty", "blank", "header-only", "missing-column", "unknown-column", "twice", "cp1252", "open-quote"])
    def test_an_unusable_file(self, data: bytes, expected: str) -> None:
        with pytest.raises(BadCatalogue) as raised:
            parse_catalogue(data, source="t.csv", skip_bad=True)  # no rows to skip: the file itself is wrong
        assert expected in str(raised.value)
        assert str(raised.value).endswith("nothing was sent")

    def test_codes_are_checked_against_the_cached_lists(self) -> None:
        known = known_codes(merge_codes({}, {"clsList": code_list()}),
                            merge_item_classes({}, {"itemClsList": [{"itemClsCd": c[0]} for c in ITEM_CLASSES]}))
        found = problems("item_code,name,item_class,tax_band,unit_price,qty_unit,pkg_unit,origin_country\n"
                         "A1,Tea,1234567890,B,1,XX,ZZ,QQ\nA2,Tea,5059690800,B,1,kg,bg,ug\n", known=known)
        assert [f.split(":")[0] for f in found] == ["line 2, column item_class", "line 2, column qty_unit",
                                                    "line 2, column pkg_unit", "line 2, column origin_country"]
        assert "codes refresh" in found[0]
        assert parse(HEADER + "A1,Tea,1234567890,B,1\n", known=KnownCodes())[0].item_class == "1234567890"


# --- the commands ---------------------------------------------------------------------------------

def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def kra_config(folder: Path, api_url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kra.toml"
    path.write_text(f'data_dir = "data"\n[kra]\nbase_url = "{api_url}"\n[secrets]\nbackend = "file"\n'
                    '[log]\nlevel = "warning"\n')
    return path


def recorded(config: Path) -> dict[str, str]:
    box = Outbox.open(config.parent / "data" / "outbox.sqlite3", readonly=True)
    try:
        with box._read() as conn:
            return dict(conn.execute("SELECT item_code, request FROM kra_items").fetchall())
    finally:
        box.close()


@pytest.fixture(name="sim")
def _sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig()).start() as sim:
        yield sim


@pytest.fixture(name="device")
def _device(tmp_path: Path, sim: Simulator) -> Path:
    """A config for an initialised device of the in-process simulator."""
    config = kra_config(tmp_path, sim.api_url)
    init = invoke("init", "--config", str(config))
    assert init.exit_code == 0, init.output
    return config


def write_csv(folder: Path, body: str) -> Path:
    path = folder / "items.csv"
    path.write_text(HEADER + body)
    return path


class TestCommands:
    @pytest.mark.parametrize("command", [["codes", "refresh"], ["items", "list"], ["items", "register"]],
                             ids=" ".join)
    def test_help_has_an_example_and_the_exit_codes(self, command: list[str]) -> None:
        result = invoke(*command, "--help")
        assert result.exit_code == 0
        assert "Example: etims-agent " + " ".join(command) in result.output and "Exit codes: 0" in result.output

    def test_built_in_simulator_is_explained(self, tmp_path: Path) -> None:
        """The default KRA lives inside the agent process: one sentence, exit 2; a dry run still checks the file."""
        config = tmp_path / "agent.toml"
        config.write_text('data_dir = "data"\n')
        for args in (["codes", "refresh"], ["items", "register", str(EXAMPLE)]):
            result = invoke(*args, "--config", str(config))
            assert result.exit_code == 2, result.output
            assert "kra.environment: is the built-in simulator, which lives inside the agent process, so this " \
                   "command cannot reach it; set kra.base_url" in result.output
        dry = invoke("items", "register", str(EXAMPLE), "--dry-run", "--config", str(config))
        assert dry.exit_code == 0, dry.output
        assert "would register  6" in dry.output and "nothing was sent" in dry.output

    def test_an_uninitialised_device_is_sent_to_init(self, tmp_path: Path) -> None:
        config = kra_config(tmp_path, "http://127.0.0.1:9/etims-api")  # never contacted
        for args in (["codes", "refresh"], ["items", "register", str(EXAMPLE)]):
            result = invoke(*args, "--config", str(config))
            assert result.exit_code == 2, result.output
            assert "is not initialised with KRA" in result.output and "run `etims-agent init` first" in result.output

    def test_a_bad_file_sends_nothing(self, tmp_path: Path, device: Path, sim: Simulator) -> None:
        csv = write_csv(tmp_path, "A1,Tea,5059690800,B,1\nA2,Coffee,5059690800,Q,1\n")
        result = invoke("items", "register", str(csv), "--config", str(device))
        assert result.exit_code == 2
        assert "1 bad row(s), so nothing was sent" in result.output and "line 3, column tax_band" in result.output
        assert "saveItem" not in sim.state()["requests"]
        skipped = invoke("items", "register", str(csv), "--skip-bad", "--config", str(device))
        assert skipped.exit_code == 0, skipped.output
        assert "bad rows left out (--skip-bad):\n  line 3, column tax_band" in skipped.output
        assert sim.state()["branches"][BRANCH]["items"] == ["A1"]
        missing = invoke("items", "register", str(tmp_path / "nope.csv"), "--config", str(device))
        assert missing.exit_code == 2 and "cannot be read" in missing.output

    def test_refusals_994_and_a_changed_item(self, tmp_path: Path, device: Path, sim: Simulator) -> None:
        """KRA's refusal is shown with its message and not recorded (a rerun sends it); 994 counts as registered;
        a changed price is sent again as an update."""
        csv = write_csv(tmp_path, "A1,Tea,5059690800,B,1\nA2,Coffee,5059690800,B,2\nA3,Cocoa,5059690800,B,3\n")
        sim.set_faults(result_code={"code": "910", "count": 1, "paths": ["saveItem"]})
        first = invoke("items", "register", str(csv), "--json", "--config", str(device))
        assert first.exit_code == 1
        body = json.loads(first.stdout)
        assert body["counts"] == {"registered": 2, "updated": 0, "unchanged": 0, "refused": 1, "not_sent": 0}
        assert body["results"][0]["message"] == "KRA 910 (request parameter error): Request parameter error"
        assert "KRA refused 1 item(s)" in first.stderr
        assert set(recorded(device)) == {"A2", "A3"}
        sim.set_faults(result_code={"code": "994", "count": 1, "paths": ["saveItem"]})
        csv.write_text(csv.read_text().replace("Cocoa,5059690800,B,3", "Cocoa,5059690800,B,3.50"))
        second = invoke("items", "register", str(csv), "--config", str(device))
        assert second.exit_code == 0, second.output
        assert "registered      1\n  updated         1\n  already there   1" in second.output
        assert '"dftPrc":3.50' in recorded(device)["A3"]
        assert sim.state()["requests"]["saveItem"] == 5

    def test_kra_down_is_one_sentence_and_exit_1(self, tmp_path: Path, device: Path, sim: Simulator) -> None:
        csv = write_csv(tmp_path, "A1,Tea,5059690800,B,1\nA2,Coffee,5059690800,B,2\n")
        sim.set_faults(outage=True)
        refresh = invoke("codes", "refresh", "--config", str(device))
        assert refresh.exit_code == 1
        assert f"etims-agent: KRA at {sim.api_url} did not answer (KRA unreachable" in refresh.stderr
        assert "check the network and kra.base_url, then run the command again" in refresh.stderr
        assert "Traceback" not in refresh.output
        register = invoke("items", "register", str(csv), "--config", str(device))
        assert register.exit_code == 1
        assert "not sent        2" in register.stdout
        assert "2 item(s) were not sent" in register.stderr and "Traceback" not in register.output
        sim.set_faults(outage=False)
        assert invoke("items", "register", str(csv), "--config", str(device)).exit_code == 0
        assert set(recorded(device)) == {"A1", "A2"}

    def test_dry_run_and_list(self, tmp_path: Path, device: Path, sim: Simulator) -> None:
        dry = invoke("items", "register", str(EXAMPLE), "--dry-run", "--json", "--config", str(device))
        assert dry.exit_code == 0
        assert json.loads(dry.stdout)["counts"]["registered"] == 6
        assert "saveItem" not in sim.state()["requests"]
        assert invoke("items", "list", "--config", str(device)).output == "no items are registered with KRA yet\n"
        assert invoke("items", "register", str(EXAMPLE), "--config", str(device)).exit_code == 0
        listed = invoke("items", "list", "--tax-band", "b", "--search", "OIL", "--json", "--config", str(device))
        assert listed.exit_code == 0
        (oil,) = json.loads(listed.stdout)
        assert (oil["item_code"], oil["unit_price"], oil["origin_country"]) == ("KE2JRXU0000005", "1250.00", "MY")
        text = invoke("items", "list", "--item-class", "5022100000", "--config", str(device)).output
        assert "KE2NTXL0000004       Fresh milk (loose)" in text and "1 of 6 registered item(s)" in text
        bad = invoke("items", "list", "--tax-band", "Z", "--config", str(device))
        assert bad.exit_code == 2 and "--tax-band: 'Z' is not a tax band" in bad.output


class TestAgainstProcesses:
    """A `simulate kra` process, an agent process, and the commands beside it."""

    def state(self, kra: SimulatorProcess) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{kra.control_url}/_sim/state", timeout=10).json()
        return body

    def test_register_then_sell_without_registering_again(self, tmp_path: Path, kra: SimulatorProcess) -> None:
        with Agents(tmp_path, kra_url=kra.api_url) as agents:
            config = str(agents.config)
            init = invoke("init", "--config", config)
            assert init.exit_code == 0, init.output
            first = invoke("items", "register", str(EXAMPLE), "--config", config)
            assert first.exit_code == 0, first.output
            assert "registered      6" in first.stdout
            state = self.state(kra)
            codes = [i.code for i in parse_catalogue(EXAMPLE.read_bytes()).items]
            assert state["branches"][BRANCH]["items"] == sorted(codes)
            assert state["requests"]["saveItem"] == 6

            again = run_cli("items", "register", str(EXAMPLE), "--config", config)  # a real process
            assert again.returncode == 0, again.stderr
            assert "already there   6" in again.stdout
            assert self.state(kra)["requests"]["saveItem"] == 6

            agent = agents.start()
            refreshed = run_cli("codes", "refresh", "--config", config)  # beside the running agent
            assert refreshed.returncode == 0, refreshed.stderr
            assert refreshed.stdout.startswith("code lists ") and "tax rates      A 0 %, B 16 %" in refreshed.stdout
            as_json = invoke("codes", "refresh", "--json", "--config", config)
            assert as_json.exit_code == 0, as_json.output
            assert json.loads(as_json.stdout)["item_classes"]["total"] == len(ITEM_CLASSES)

            # One line of the catalogue and one item KRA has not seen: only the latter is registered by the lane.
            sale = make_sale(sale_id="CAT-1", lines=[
                {"item_code": "KE2NTXU0000001", "item_class": "5013160000", "name": "Bread 400g", "qty": "2",
                 "unit_price": "58.00", "tax_band": "B", "qty_unit": "U", "pkg_unit": "NT"},
                {"item_code": "KE2NTKG0000099", "item_class": "5059690800", "name": "Sugar", "qty": "1",
                 "unit_price": "150.00", "tax_band": "B", "qty_unit": "KG", "pkg_unit": "NT"}])
            with httpx.Client(base_url=agent.url, timeout=30) as http:
                assert http.post("/v1/sales", json=sale).status_code == 201
                deadline = time.monotonic() + 20
                while http.get("/v1/sales/CAT-1").json().get("status") != "signed":
                    assert time.monotonic() < deadline, agent.log()
                    time.sleep(0.05)
            state = self.state(kra)
            assert state["requests"]["saveItem"] == 7
            assert state["branches"][BRANCH]["invoices"]["1"]["trdInvcNo"] == "CAT-1"
            assert "KE2NTKG0000099" in state["branches"][BRANCH]["items"]
            listed = invoke("items", "list", "--json", "--config", config)
            assert len(json.loads(listed.stdout)) == 7  # the lane's registration is listed too
            assert agent.terminate() == 0, agent.log()

