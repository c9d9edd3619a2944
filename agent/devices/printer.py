"""ESC/POS receipt printers: a queue and a thread per printer, so a printer that is off, out of
paper or unplugged never holds up a sale.

What prints by itself is configured per printer: the receipt a till was answered with (temporary
or signed), and the signed copy once KRA signs a sale whose temporary receipt was printed. A
replayed sale (the till sent it again, its first answer lost) is printed if nothing of it was. Every
print after the first of a receipt says COPY. The queue is kept in the outbox
(agent/queue/print_jobs.py), so receipts waiting for a printer that is off still print after a
restart. A job that fails stays at the head of the queue and is retried every `retry_interval_s`;
status shows the printer's state, the queue and the last error.

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
from agent.errors import StorageError
from agent.logs import get_logger
from agent.queue.outbox import Outbox
from agent.queue.print_jobs import PrintJobs, forget_other_printers
from agent.receipt_format import render_escpos

log = get_logger("agent.devices.printer")

QUEUE_WARN = 1000  # jobs waiting: say so in the log (they are never dropped)
SIGNATURE_WAIT_S = 0.5  # a job answered signed, its signature not stored yet: read again after this


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
        self._jobs = PrintJobs(outbox, settings.url)
        # Answers not yet in the outbox's queue: (sale id, receipt kind, replay). The event loop only
        # appends here (thread-safe, never blocks); the printer's thread stores them.
        self._arrived: collections.deque[tuple[int, str, bool]] = collections.deque()
        self._storing = threading.Lock()  # moving arrivals into the outbox, against status counting them
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"printer {settings.url}", daemon=True)
        self.state = "idle"  # idle, printing, failing
        self.last_error: str | None = None
        self.printed = 0

    def sale_answered(self, sale_ref: int, kind: str, replay: bool = False) -> None:
        """A till got its answer: queue the receipt it holds, if this printer prints that kind."""
        if (kind == "temporary" and self.settings.temporary) or (kind == "signed" and self.settings.signed):
            self._arrived.append((sale_ref, kind, replay))
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
        with self._storing:
            queued = len(self._arrived) + self._jobs.count()
        return {"printer": self.settings.url, "state": self.state, "queued": queued,
                "printed": self.printed, "last_error": self.last_error}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._next_job()
                if job is None:  # until a till is answered, or the next look for signed copies
                    self._wake.wait(self.settings.retry_interval_s)
                    self._wake.clear()
                    continue
                if self._print(*job):
                    continue
            except StorageError as exc:  # the outbox logs it; the receipts wait where they are
                self._set("failing", str(exc))
            self._stop.wait(self.settings.retry_interval_s)

    def _next_job(self) -> tuple[int, str] | None:
        with self._storing:
            arrived = list(self._arrived)
            # A replay is printed only if nothing of the sale was printed or queued before.
            self._jobs.add([(sale_ref, kind) for sale_ref, kind, replay in arrived
                            if not (replay and self._jobs.known(sale_ref))], self._clock())
            for _ in arrived:
                self._arrived.popleft()
        if arrived and (queued := self._jobs.count()) >= QUEUE_WARN > queued - len(arrived):
            log.warning("printer_queue_long", printer=self.settings.url, jobs=queued)
        if self.settings.signed_after_temporary:
            self._jobs.add([(sale_ref, "signed") for sale_ref in self._jobs.signed_since_temporary()], self._clock())
        first = self._jobs.waiting(1)
        return first[0] if first else None

    def _print(self, sale_ref: int, job_kind: str) -> bool:
        view = self._view(sale_ref)
        if view is None:  # retention pruned the sale while its receipt waited
            log.warning("printer_job_dropped", printer=self.settings.url, sale=sale_ref,
                        reason="the sale is no longer stored")
            self._jobs.dropped(sale_ref, job_kind)
            return True
        if job_kind == "signed" and view["receipt"]["kind"] != "signed":
            # The till was answered with KRA's signature, which the KRA lane stores a moment after the
            # answer: read it once more rather than print a temporary receipt for a signed sale.
            self._stop.wait(SIGNATURE_WAIT_S)
            view = self._view(sale_ref) or view
        kind = view["receipt"]["kind"]  # signed meanwhile: the signed receipt is what the customer needs
        copy = self._outbox.prints_of(sale_ref, kind) > 0
        data = render_escpos(view, self.settings.width, copy=copy)
        try:
            send_bytes(self.settings.url, data, baudrate=self.settings.baudrate)
        except OSError as exc:
            self._set("failing", f"{exc}")
            return False
        self._jobs.printed(sale_ref, job_kind, kind, self._clock())  # counted once it is on paper
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

        try:
            forgotten = forget_other_printers(desk.outbox, [p.settings.url for p in self.printers])
        except StorageError:  # the outbox logs it; those jobs are dropped at a later start
            forgotten = 0
        if forgotten:
            log.warning("printer_jobs_forgotten", receipts=forgotten,
                        reason="queued for a printer that is no longer configured",
                        hint="print them with `etims-agent receipt print SALE_ID`")
        for printer in self.printers:
            printer.start(view)

    def stop(self) -> None:
        for printer in self.printers:
            printer.stop()

    def status(self) -> list[dict[str, Any]]:
        return [p.status() for p in self.printers]

    def sale_answered(self, sale_ref: int, kind: str, replay: bool = False) -> None:
        for printer in self.printers:
            printer.sale_answered(sale_ref, kind, replay)
