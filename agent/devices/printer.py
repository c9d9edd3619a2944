"""ESC/POS receipt printers: a queue and a thread per printer, so a printer that is off, out of
paper or unplugged never holds up a sale.

What prints by itself is configured per printer: the receipt a till was answered with (temporary
or signed), and the signed copy once KRA signs a sale whose temporary receipt was printed (found
from the print counts in the database, so it survives a restart). Every print after the first of
a receipt says COPY. A job that fails stays at the head of the queue and is retried every
`retry_interval_s`; status shows the printer's state, the queue and the last error.

Printers are reached through pyserial URLs (`socket://host:9100` for network printers, a serial
device or COM port) or `file:/path` for a device file such as /dev/usb/lp0. pyserial and OS errors
stay here.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import serial  # type: ignore[import-untyped]

from agent.config import PrinterSettings
from agent.desk import SaleDesk
from agent.logs import get_logger
from agent.queue.outbox import Outbox
from agent.receipt_format import render_escpos

log = get_logger("agent.devices.printer")

QUEUE_WARN = 1000  # jobs waiting: say so in the log (they are never dropped)


def send_bytes(url: str, data: bytes, *, baudrate: int = 9600, timeout: float = 10.0) -> None:
    """Write one receipt to the printer; raises OSError (pyserial's errors are translated here)."""
    if url.startswith("file:"):
        with open(url.removeprefix("file:"), "ab", buffering=0) as device:
            device.write(data)
        return
    try:
        port = serial.serial_for_url(url, baudrate=baudrate, timeout=timeout, write_timeout=timeout)
        try:
            port.write(data)
            port.flush()
        finally:
            port.close()
    except serial.SerialException as exc:
        raise OSError(str(exc)) from None


class Printer:
    """One printer's queue and thread."""

    def __init__(self, settings: PrinterSettings, outbox: Outbox, clock: Callable[[], datetime]) -> None:
        self.settings, self._outbox, self._clock = settings, outbox, clock
        self._view: Callable[[int], dict[str, Any] | None] = lambda sale_ref: None
        self._jobs: collections.deque[tuple[int, str]] = collections.deque()  # (sale id, receipt kind)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"printer {settings.url}", daemon=True)
        self.state = "idle"  # idle, printing, failing
        self.last_error: str | None = None
        self.printed = 0

    def sale_answered(self, sale_ref: int, kind: str) -> None:
        """A till got its answer: queue the receipt it holds, if this printer prints that kind."""
        if (kind == "temporary" and self.settings.temporary) or (kind == "signed" and self.settings.signed):
            self.enqueue(sale_ref, kind)

    def enqueue(self, sale_ref: int, kind: str) -> None:
        self._jobs.append((sale_ref, kind))  # deque.append is thread-safe; never blocks the caller
        if len(self._jobs) == QUEUE_WARN:
            log.warning("printer_queue_long", printer=self.settings.url, jobs=len(self._jobs))
        self._wake.set()

    def start(self, view: Callable[[int], dict[str, Any] | None]) -> None:
        """`view`: a sale's answer body by its id (the desk's), from which the receipt is printed."""
        self._view = view
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        return {"printer": self.settings.url, "state": self.state, "queued": len(self._jobs),
                "printed": self.printed, "last_error": self.last_error}

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.settings.signed_after_temporary:
                for sale_ref in self._outbox.signed_since_temporary():
                    if (sale_ref, "signed") not in self._jobs:
                        self._jobs.append((sale_ref, "signed"))
            if not self._jobs:
                self._wake.wait(self.settings.retry_interval_s)
                self._wake.clear()
                continue
            if self._print(*self._jobs[0]):
                self._jobs.popleft()
            else:
                self._stop.wait(self.settings.retry_interval_s)

    def _print(self, sale_ref: int, kind: str) -> bool:
        view = self._view(sale_ref)
        if view is None:
            return True
        kind = view["receipt"]["kind"]  # signed meanwhile: the signed receipt is what the customer needs
        copy = self._outbox.prints_of(sale_ref, kind) > 0
        data = render_escpos(view, self.settings.width, copy=copy)
        try:
            send_bytes(self.settings.url, data, baudrate=self.settings.baudrate)
        except OSError as exc:
            self._set("failing", f"{exc}")
            return False
        self._outbox.count_print(sale_ref, kind, self._clock())  # counted once it is on paper
        self.printed += 1
        self._set("idle", None)
        return True

    def _set(self, state: str, error: str | None) -> None:
        if state != self.state:
            if state == "failing":
                log.warning("printer_failing", printer=self.settings.url, reason=error,
                            detail=f"receipts wait in the queue; retrying every {self.settings.retry_interval_s:g} s")
            else:
                log.info("printer_ok", printer=self.settings.url)
        self.state, self.last_error = state, error


class Printers:
    """Every configured printer, as a device of the app."""

    name = "printers"

    def __init__(self, printers: list[Printer]) -> None:
        self.printers = printers

    def start(self, loop: asyncio.AbstractEventLoop, desk: SaleDesk) -> None:
        def view(sale_ref: int) -> dict[str, Any] | None:
            record = desk.outbox.by_id(sale_ref)
            return None if record is None else desk.view(record)

        for printer in self.printers:
            printer.start(view)

    def stop(self) -> None:
        for printer in self.printers:
            printer.stop()

    def status(self) -> list[dict[str, Any]]:
        return [p.status() for p in self.printers]

    def sale_answered(self, sale_ref: int, kind: str) -> None:
        for printer in self.printers:
            printer.sale_answered(sale_ref, kind)
