"""Sales over serial lines: pty pairs stand in for RS-232 and USB adapters, `loop://` for pyserial's
own URL handlers. The till side is the pty's master end, written and read by the test."""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RULES, make_sale
from starlette.testclient import TestClient

from agent.api import create_app
from agent.config import SerialPortSettings
from agent.desk import ApiContext
from agent.devices.framing import ACK, NAK, Decoder, Message, encode
from agent.devices.serial_intake import SerialIntake
from agent.queue.outbox import Outbox

pytestmark = pytest.mark.timeout(60)


class Till:
    """The till's end of a pty pair, exposed to the agent under a stable path (a symlink, so an
    'unplugged' adapter can come back under the same name)."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        self.master, name = master, os.ttyname(slave)
        os.close(slave)  # the agent opens it by name
        self.link.unlink(missing_ok=True)
        self.link.symlink_to(name)

    def unplug(self) -> None:
        os.close(self.master)
        self.link.unlink()

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, done: Any, timeout: float = 10.0) -> bytes:
        out = b""
        deadline = time.monotonic() + timeout
        while not done(out):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; got {out!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                out += os.read(self.master, 65536)
        return out


def answers(data: bytes, mode: str) -> list[dict[str, Any]]:
    return [json.loads(e.payload) for e in Decoder(mode).feed(data) if isinstance(e, Message)]


def sale_bytes(sale_id: str, mode: str) -> bytes:
    return encode(json.dumps(make_sale(sale_id=sale_id), separators=(",", ":")).encode(), mode)


@pytest.fixture(name="till")
def _till(tmp_path: Path) -> Iterator[Till]:
    till = Till(tmp_path / "ttyTILL")
    yield till
    with contextlib.suppress(OSError):  # already closed by an unplug
        os.close(till.master)


def agent_with(outbox: Outbox, clock: Any, port: SerialPortSettings) -> TestClient:
    ctx = ApiContext(outbox=outbox, rules=RULES, clock=clock, max_body_bytes=1_048_576,
                     started_at=clock(), devices=(SerialIntake((port,)),))
    return TestClient(create_app(ctx))


@pytest.mark.parametrize("mode", ["plain", "framed"])
def test_a_sale_over_serial_gets_the_http_answer(till: Till, outbox: Outbox, clock: Any, mode: str) -> None:
    """The same sale JSON as POST /v1/sales, the same answer (with http_status): new, replay, conflict, invalid."""
    with agent_with(outbox, clock, SerialPortSettings(url=str(till.link), mode=mode)) as client:
        wait_open(client)
        till.send(sale_bytes("S-1", mode))
        first = till.read_until(lambda b: len(answers(b, mode)) == 1)
        till.send(sale_bytes("S-1", mode))
        again = till.read_until(lambda b: len(answers(b, mode)) == 1)
        changed = make_sale(sale_id="S-1")
        changed["payment"] = "cash"
        till.send(encode(json.dumps(changed).encode(), mode))
        conflict = till.read_until(lambda b: len(answers(b, mode)) == 1)
        till.send(encode(b'{"sale_id": "S-2"}', mode))
        invalid = till.read_until(lambda b: len(answers(b, mode)) == 1)
        over_http = client.get("/v1/sales/S-1").json()
    (a,), (b,), (c,), (d,) = (answers(x, mode) for x in (first, again, conflict, invalid))
    assert a.pop("http_status") == 201 and b.pop("http_status") == 200
    assert a == b == over_http
    assert (c["http_status"], c["error"]["code"]) == (409, "conflict")
    assert d["http_status"] == 422 and d["error"]["field"]
    if mode == "framed":
        assert first.startswith(bytes([ACK]))


def wait_open(client: TestClient, n: int = 1) -> None:
    deadline = time.monotonic() + 10
    while [p["state"] for p in client.get("/v1/status").json()["devices"]["serial"]] != ["open"] * n:
        assert time.monotonic() < deadline, client.get("/v1/status").json()["devices"]
        time.sleep(0.02)


def test_a_bad_frame_is_nakked_and_the_resend_accepted(till: Till, outbox: Outbox, clock: Any) -> None:
    with agent_with(outbox, clock, SerialPortSettings(url=str(till.link), mode="framed")) as client:
        wait_open(client)
        frame = bytearray(sale_bytes("S-1", "framed"))
        frame[10] ^= 0x01  # line noise
        till.send(b"\xff\x00garbage" + bytes(frame))
        assert till.read_until(lambda b: NAK in b) == bytes([NAK])
        till.send(sale_bytes("S-1", "framed"))
        (answer,) = answers(till.read_until(lambda b: len(answers(b, "framed")) == 1), "framed")
    assert answer["http_status"] == 201
    assert [s.sale_id for s in outbox.all_sales()] == ["S-1"]


def test_unplug_and_replug_loses_and_doubles_nothing(till: Till, outbox: Outbox, clock: Any) -> None:
    """The adapter goes away halfway through a message and comes back: the agent keeps running,
    drops the half message, reopens the port; the till resends what got no answer; every sale once."""
    port = SerialPortSettings(url=str(till.link), mode="framed", reopen_interval_s=0.1)
    with agent_with(outbox, clock, port) as client:
        wait_open(client)
        till.send(sale_bytes("S-1", "framed"))
        till.read_until(lambda b: len(answers(b, "framed")) == 1)
        half = sale_bytes("S-2", "framed")
        till.send(half[: len(half) // 2])
        time.sleep(0.2)
        till.unplug()
        deadline = time.monotonic() + 10
        while client.get("/v1/status").json()["devices"]["serial"][0]["state"] != "unavailable":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.post("/v1/sales", json=make_sale(sale_id="H-1")).status_code == 201  # HTTP carries on
        till.plug()
        wait_open(client)
        for sale_id in ("S-1", "S-2"):  # the till resends everything not known to be answered
            till.send(sale_bytes(sale_id, "framed"))
            till.read_until(lambda b: len(answers(b, "framed")) == 1)
    assert sorted(s.sale_id for s in outbox.all_sales()) == ["H-1", "S-1", "S-2"]
    assert outbox.verify() == []


def test_loop_url_and_several_ports(tmp_path: Path, outbox: Outbox, clock: Any) -> None:
    """pyserial URLs work (loop:// echoes what is written, so the agent reads its own answers: a
    good test that a line which is not a sale gets a clear error and nothing is stored)."""
    till = Till(tmp_path / "ttyA")
    ports = (SerialPortSettings(url="loop://", mode="plain"), SerialPortSettings(url=str(till.link)))
    ctx = ApiContext(outbox=outbox, rules=RULES, clock=clock, max_body_bytes=1_048_576,
                     started_at=clock(), devices=(SerialIntake(ports),))
    with TestClient(create_app(ctx)) as client:
        wait_open(client, 2)
        till.send(sale_bytes("S-1", "plain"))
        (answer,) = answers(till.read_until(lambda b: b.endswith(b"\n")), "plain")
    assert answer["http_status"] == 201
    assert [s.sale_id for s in outbox.all_sales()] == ["S-1"]
    os.close(till.master)
