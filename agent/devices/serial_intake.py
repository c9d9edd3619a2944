"""Sales from tills on serial lines: one reader thread per port, the sale desk on the event loop.

pyserial is blocking, so each port has its own thread. It opens the port with `serial_for_url`
(device paths, COM ports, `socket://`, `loop://`, ptys), decodes the byte stream in the port's
framing mode (`agent.devices.framing`) and hands every message to the same `SaleDesk` as HTTP, on
the event loop, so a till gets identical behaviour on either wire. The answer is the HTTP body
with the HTTP status added as `http_status`.

When the port goes away (a USB adapter unplugged) the thread logs it once, drops any half-read
message and tries to reopen it every `reopen_interval_s`, logging once when it is back. A message
is processed only when it is complete, and a repeated sale is a replay, so nothing is lost or
doubled across a reconnect: the till resends what got no answer. pyserial exceptions stay here.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any

import serial  # type: ignore[import-untyped]

from agent.config import SerialPortSettings
from agent.desk import Answer, SaleDesk, error_body
from agent.devices.framing import BadFrame, Decoder, Garbage, Message, TooLong, encode, reply_bytes
from agent.logs import get_logger

log = get_logger("agent.devices.serial")

Submit = Callable[[object], Coroutine[Any, Any, Answer]]


def answer_bytes(answer: Answer, mode: str) -> bytes:
    body = {"http_status": answer.status, **answer.body}
    return encode(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(), mode)


class PortReader:
    """One serial port: open, read, answer; reopen when it is lost. `state` is for status."""

    def __init__(self, settings: SerialPortSettings, submit: Submit, loop: asyncio.AbstractEventLoop) -> None:
        self._settings, self._submit, self._loop = settings, submit, loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"serial {settings.url}", daemon=True)
        self.url = settings.url
        self.state = "starting"  # open, unavailable
        self.detail: str | None = None
        self.messages = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            port = self._open()
            if port is None:
                self._stop.wait(self._settings.reopen_interval_s)
                continue
            try:
                self._serve(port)
            except (serial.SerialException, OSError) as exc:
                self._set("unavailable", f"lost: {exc}")
            finally:
                port.close()

    def _open(self) -> Any:
        s = self._settings
        try:
            port = serial.serial_for_url(s.url, baudrate=s.baudrate, bytesize=s.bytesize, parity=s.parity,
                                         stopbits=s.stopbits, timeout=s.read_timeout_s,
                                         write_timeout=max(1.0, s.read_timeout_s))
        except (serial.SerialException, OSError, ValueError) as exc:
            self._set("unavailable", f"cannot open: {exc}")
            return None
        self._set("open", None)
        return port

    def _serve(self, port: Any) -> None:
        decoder = Decoder(self._settings.mode, self._settings.max_bytes)  # a fresh one after every reopen
        while not self._stop.is_set():
            data = port.read(max(1, port.in_waiting))
            if not data:
                continue
            for event in decoder.feed(data):
                reply = reply_bytes(event, self._settings.mode)
                if reply:
                    port.write(reply)
                if isinstance(event, Message):
                    port.write(answer_bytes(self._handle(event.payload), self._settings.mode))
                elif isinstance(event, TooLong) and self._settings.mode == "plain":
                    port.write(answer_bytes(Answer(413, error_body(
                        "too_large", f"the line is longer than {self._settings.max_bytes} bytes; split the sale")),
                        "plain"))
                elif isinstance(event, BadFrame | Garbage):
                    log.debug("serial_noise", port=self._settings.url, what=repr(event))

    def _handle(self, payload: bytes) -> Answer:
        self.messages += 1
        try:
            data = json.loads(payload, parse_float=Decimal)
        except (ValueError, RecursionError):
            return Answer(422, error_body("invalid_json", "the message is not valid JSON; send one sale as a "
                                          "JSON object"))
        future = asyncio.run_coroutine_threadsafe(self._submit(data), self._loop)
        try:
            return future.result()
        except Exception:  # as the HTTP API answers 500: the port must keep serving the till
            log.exception("serial_sale_error", port=self._settings.url)
            return Answer(500, error_body("internal", "the agent hit an unexpected error; it is logged, send the "
                                          "sale again and report it if it persists"))

    def _set(self, state: str, detail: str | None) -> None:
        if state != self.state:  # state changes only: an unplugged port is not logged every retry
            if state == "open":
                log.info("serial_port_open", port=self._settings.url, mode=self._settings.mode)
            else:
                log.warning("serial_port_unavailable", port=self._settings.url, reason=detail,
                            detail=f"retrying every {self._settings.reopen_interval_s:g} s")
        self.state, self.detail = state, detail


class SerialIntake:
    """Every configured port; started and stopped with the app."""

    name = "serial"

    def __init__(self, ports: tuple[SerialPortSettings, ...]) -> None:
        self._ports = ports
        self.readers: list[PortReader] = []

    def start(self, loop: asyncio.AbstractEventLoop, desk: SaleDesk) -> None:
        self.readers = [PortReader(p, desk.sale, loop) for p in self._ports]
        for reader in self.readers:
            reader.start()

    def stop(self) -> None:
        for reader in self.readers:
            reader.stop()

    def status(self) -> list[dict[str, Any]]:
        return [{"port": r.url, "state": r.state, "detail": r.detail, "messages": r.messages} for r in self.readers]
