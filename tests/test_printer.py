"""Receipt printers: ESC/POS bytes on a pty or a device file, the signed copy after a temporary
receipt, COPY on reprints, a dead printer that never slows a sale down, receipts that wait for a
printer across a restart (and a kill -9), and a replayed sale printed once."""

from __future__ import annotations

import os
import select
import sqlite3
import time
import tty
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_process import Agents
from conftest import RULES, make_sale
from kra_agent import BHF, TIN, init_key, kra_lane
from starlette.testclient import TestClient

from agent.api import create_app
from agent.clock import system_clock
from agent.config import PrinterSettings
from agent.desk import ApiContext
from agent.devices.printer import Printer, Printers
from agent.intake import accept
from agent.kra.lane import KraLane
from agent.kra.simulator import Simulator, SimulatorConfig
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox
from agent.queue.print_jobs import PrintJobs
from agent.receipts import Seller

pytestmark = pytest.mark.timeout(60)
QR_PRINT = b"\x1d(k\x03\x001Q0"


def agent(outbox: Outbox, printer: PrinterSettings, lane: KraLane | None = None, sdc_id: str = "",
          budget: float = 2.0) -> tuple[TestClient, Printer]:
    unit = Printer(printer, outbox, system_clock)
    printers = Printers([unit])
    ctx = ApiContext(outbox=outbox, rules=RULES, clock=system_clock, max_body_bytes=1_048_576,
                     started_at=system_clock(), signer=lane, sign_budget_s=budget if lane else 0.0,
                     seller=Seller(tin=TIN, bhf_id=BHF, sdc_id=sdc_id) if lane else None,
                     devices=(printers,), on_answer=(printers.sale_answered,),
                     on_shutdown=(lane.close,) if lane else ())
    return TestClient(create_app(ctx)), unit


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def receipts(data: bytes) -> list[bytes]:
    """The printed receipts, split at the paper cut."""
    return [r for r in data.split(b"\x1dVB\x00") if r]


def test_signed_receipt_on_a_pty_has_the_native_qr(outbox: Outbox) -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    with Simulator(SimulatorConfig()).start() as sim:
        key, sdc_id = init_key(sim)
        client, _ = agent(outbox, PrinterSettings(url=path), kra_lane(outbox, sim, key, sdc_id), sdc_id)
        with client:
            body = client.post("/v1/sales", json=make_sale()).json()
            data = b""
            deadline = time.monotonic() + 10
            while b"\x1dVB\x00" not in data:
                assert time.monotonic() < deadline, data[-200:]
                if select.select([master], [], [], 0.2)[0]:
                    data += os.read(master, 65536)
    os.close(master)
    os.close(slave)
    url = body["receipt"]["kra"]["qr_url"].encode()
    assert data.startswith(b"\x1b@") and b"TAX INVOICE" in data and QR_PRINT in data
    assert b"\x1d(k" + (len(url) + 3).to_bytes(2, "little") + b"1P0" + url in data
    assert b"COPY" not in data


def test_temporary_then_signed_copy_to_a_device_file(tmp_path: Path, outbox: Outbox) -> None:
    """KRA down: the temporary receipt prints at once; when KRA signs it, the signed receipt follows."""
    device = tmp_path / "lp0"
    with Simulator(SimulatorConfig()).start() as sim:
        key, sdc_id = init_key(sim)
        sim.set_faults(outage=True)
        client, printer = agent(outbox, PrinterSettings(url=f"file:{device}", retry_interval_s=0.1),
                                kra_lane(outbox, sim, key, sdc_id), sdc_id, budget=0.3)
        with client:
            assert client.post("/v1/sales", json=make_sale()).json()["status"] == "pending"
            wait_for(lambda: device.exists() and len(receipts(device.read_bytes())) == 1)
            sim.set_faults(outage=False)
            wait_for(lambda: len(receipts(device.read_bytes())) == 2)
            reprint = client.get("/v1/sales/R-0001/receipt", params={"format": "escpos"}).content
    first, second = receipts(device.read_bytes())
    assert b"TEMPORARY RECEIPT" in first and QR_PRINT not in first
    assert b"TAX INVOICE" in second and QR_PRINT in second and b"COPY" not in second
    assert b"*** COPY ***" in reprint  # the signed receipt was printed once already
    assert printer.status()["printed"] == 2


def test_a_dead_printer_never_slows_intake(tmp_path: Path, outbox: Outbox) -> None:
    """With the printer unreachable, sales are answered as fast as ever; the receipts wait, status
    says why, and they all print once the printer is back."""
    device = tmp_path / "missing" / "lp0"
    client, printer = agent(outbox, PrinterSettings(url=f"file:{device}", retry_interval_s=0.1))
    with client:
        slowest = 0.0
        for i in range(30):
            started = time.monotonic()
            assert client.post("/v1/sales", json=make_sale(sale_id=f"S-{i}")).status_code == 201
            slowest = max(slowest, time.monotonic() - started)
        status = client.get("/v1/status").json()["devices"]["printers"][0]
        assert status["state"] == "failing" and status["queued"] == 30 and status["last_error"]
        device.parent.mkdir()
        wait_for(lambda: printer.status()["queued"] == 0)
    assert slowest < 0.5, f"a sale took {slowest:.3f} s with the printer down"
    assert len(receipts(device.read_bytes())) == 30


def test_network_printer_on_port_9100_style_socket(outbox: Outbox) -> None:
    """A raw TCP printer (JetDirect, port 9100) through pyserial's socket:// URL."""
    import socket
    import threading

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = bytearray()

    def accept() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    client, printer = agent(outbox, PrinterSettings(url=f"socket://127.0.0.1:{server.getsockname()[1]}"))
    with client:
        client.post("/v1/sales", json=make_sale())
        wait_for(lambda: printer.status()["printed"] == 1)
    thread.join(5)
    server.close()
    assert bytes(received).startswith(b"\x1b@") and b"TEMPORARY RECEIPT" in received


def test_receipts_waiting_for_a_printer_print_after_a_restart(tmp_path: Path, db_path: Path) -> None:
    """The printer is off when the agent stops: its queued receipts print once it is back after the
    restart, each once and none marked COPY."""
    device = tmp_path / "missing" / "lp0"
    settings = PrinterSettings(url=f"file:{device}", retry_interval_s=0.1)
    box = Outbox.open(db_path)
    try:
        client, printer = agent(box, settings)
        with client:
            for i in range(3):
                assert client.post("/v1/sales", json=make_sale(sale_id=f"S-{i}")).status_code == 201
            wait_for(lambda: PrintJobs(box, settings.url).count() == 3)
            assert printer.status()["state"] == "failing"
    finally:
        box.close()
    device.parent.mkdir()
    box = Outbox.open(db_path)
    try:
        client, printer = agent(box, settings)
        with client:
            wait_for(lambda: device.exists() and len(receipts(device.read_bytes())) == 3)
            wait_for(lambda: printer.status()["queued"] == 0)
    finally:
        box.close()
    printed = receipts(device.read_bytes())
    assert [f"S-{i}".encode() in r for i, r in enumerate(printed)] == [True] * 3
    assert not any(b"COPY" in r for r in printed)


def test_a_replayed_sale_is_printed_once_even_when_its_first_answer_was_lost(tmp_path: Path,
                                                                            outbox: Outbox) -> None:
    """A sale stored whose answer never reached the till (the agent stopped first) prints when the
    till sends it again; sent once more after that, it does not print again."""
    device = tmp_path / "lp0"
    accept(outbox, make_sale(sale_id="LOST"), RULES, system_clock())  # stored, never answered
    client, _ = agent(outbox, PrinterSettings(url=f"file:{device}", retry_interval_s=0.1))
    with client:
        assert client.post("/v1/sales", json=make_sale(sale_id="LOST")).status_code == 200
        wait_for(lambda: device.exists() and len(receipts(device.read_bytes())) == 1)
        assert client.post("/v1/sales", json=make_sale(sale_id="LOST")).status_code == 200
        assert client.post("/v1/sales", json=make_sale(sale_id="NEXT")).status_code == 201
        # The queue is first in, first out: a second print of LOST would come before NEXT's.
        wait_for(lambda: len(receipts(device.read_bytes())) == 2)
    first, second = receipts(device.read_bytes())
    assert b"LOST" in first and b"NEXT" in second and b"COPY" not in first + second


def test_a_sale_answered_signed_never_prints_as_temporary(tmp_path: Path, outbox: Outbox) -> None:
    """The KRA lane stores a signature a moment after the till's signed answer. A printer that reads
    the sale in between waits for it rather than print a temporary receipt."""
    device = tmp_path / "lp0"
    stored = accept(outbox, make_sale(sale_id="S-1"), RULES, system_clock()).record
    client, printer = agent(outbox, PrinterSettings(url=f"file:{device}", retry_interval_s=0.1))
    with client:
        printer.sale_answered(stored.id, "signed")  # the answer went out; the signature is not stored yet
        time.sleep(0.1)
        KraStore(outbox).signed(stored.id, {"rcptSign": "LVJ52Q83D1ADLZMO", "curRcptNo": 1, "totRcptNo": 1},
                                system_clock(), adopted=False)
        wait_for(lambda: device.exists() and len(receipts(device.read_bytes())) == 1)
    (printed,) = receipts(device.read_bytes())
    assert b"TAX INVOICE" in printed and b"TEMPORARY" not in printed


@pytest.mark.slow
def test_queued_receipts_survive_kill_9(tmp_path: Path) -> None:
    """A real agent, its printer off, is killed with SIGKILL while receipts wait; the next agent
    prints them once the printer is back."""
    device = tmp_path / "missing" / "lp0"
    with Agents(tmp_path) as agents:
        with agents.config.open("a", encoding="utf-8") as config:
            config.write(f'[[printers]]\nurl = "file:{device}"\nretry_interval_s = 0.1\n')
        first = agents.start()
        for i in range(3):
            response = httpx.post(f"{first.url}/v1/sales", json=make_sale(sale_id=f"K-{i}"), timeout=30)
            assert response.status_code == 201, response.text
        wait_for(lambda: queued_jobs(agents.outbox) == 3)
        first.kill()
        device.parent.mkdir()
        agents.start()
        wait_for(lambda: device.exists() and len(receipts(device.read_bytes())) == 3, timeout=30)
        wait_for(lambda: queued_jobs(agents.outbox) == 0)
    printed = receipts(device.read_bytes())
    assert [f"K-{i}".encode() in r for i, r in enumerate(printed)] == [True] * 3


def queued_jobs(outbox: Path) -> int:
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM print_jobs").fetchone()[0])
    finally:
        conn.close()
