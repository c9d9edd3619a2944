"""The KRA signing lane: one worker per device, strictly in order, one request in flight.

The rules (kra-oscu.md §4.3): the invoice number is allocated and the exact request stored before
the first send; a request that never reached KRA is resent as is; when the outcome is unknown
(timeout, 5xx, 994/991/999) KRA is asked first (selectInvoiceDetails) and its signature adopted if
it has the sale, so no sale is ever signed twice; a permanent refusal hands the number back, parks
the sale and lets the next one through. The lane never overtakes the sale at its head.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from agent.clock import Clock
from agent.errors import StorageError
from agent.jsonwire import wire_json
from agent.kra.client import KraClient, KraReply
from agent.kra.codes import Outcome, describe, expected_invoice_number
from agent.kra.payloads import CreditNoteRef, Seller, item_request, parse_kra_datetime, sale_request
from agent.kra_window import KraWindow
from agent.logs import get_logger
from agent.policy import ClockGuard
from agent.signing import Handover, KraWork, Signed, backoff

log = get_logger("agent.kra.lane")


class LaneStore(Protocol):
    def recover(self, now: datetime) -> int: ...
    def next_work(self, *, skip: int | None = None) -> KraWork | None: ...
    def numbering_unverified(self) -> bool: ...
    def invoice_counter(self) -> int: ...
    def numbering_learned(self, last_held: int, probes: int, now: datetime) -> int: ...
    def backlog(self) -> int: ...
    def allocate(self, sale_ref: int, build: Callable[[int], str], now: datetime, *, items: Sequence[str],
                 after: Signed | None = None) -> tuple[int, str] | None: ...
    def renumber(self, sale_ref: int, invc_no: int, build: Callable[[int], str], now: datetime) -> str: ...
    def mark_sending(self, sale_ref: int) -> None: ...
    def signed(self, sale_ref: int, signature: dict[str, Any], now: datetime, *, adopted: bool) -> None: ...
    def defer(self, sale_ref: int, state: str, next_attempt_at: datetime, error: str) -> None: ...
    def park(self, sale_ref: int, code: str, message: str, now: datetime, *, release: bool) -> None: ...
    def registered_items(self, codes: list[str]) -> set[str]: ...
    def item_registered(self, item_code: str, request: str, now: datetime) -> None: ...


@dataclass(frozen=True, slots=True)
class LaneSettings:
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    origin_country: str = "KE"


STORAGE_PAUSE_S = 2.0  # how soon to try again after the outbox could not be written (a full disk)
SIGNATURE_FIELDS = ("curRcptNo", "totRcptNo", "intrlData", "rcptSign", "sdcDateTime")


@dataclass(frozen=True, slots=True)
class Behind:
    """The sale behind the one KRA is signing, ready to be numbered; `build` makes its request, made in
    advance for the number it will most likely get."""

    ahead: int
    work: KraWork
    build: Callable[[int], str]


@dataclass(frozen=True, slots=True)
class Numbered:
    """The sale behind one KRA has just signed, numbered in the transaction that stored that signature."""

    work: KraWork
    invc_no: int
    request: str


def signature_from(data: Any) -> dict[str, Any]:
    """The signature block, with sdcDateTime normalised to YYYYMMDDhhmmss (lookups send it dashed)."""
    if not isinstance(data, dict):  # a malformed answer must not stop the lane after the number is used
        data = {}
    sig = {k: data.get(k) for k in SIGNATURE_FIELDS}
    raw = str(sig.get("sdcDateTime") or "")
    digits = "".join(c for c in raw.split(".")[0] if c.isdigit())
    sig["sdcDateTime"] = digits[:14] if len(digits) >= 14 else raw
    return sig


class KraLane:
    def __init__(self, store: LaneStore, client: KraClient, seller: Seller, clock: Clock,
                 settings: LaneSettings = LaneSettings(), rand: random.Random | None = None,
                 timer: Callable[[], float] = time.perf_counter, clock_guard: ClockGuard | None = None,
                 on_round_trip: Callable[[float], None] | None = None, window: KraWindow | None = None) -> None:
        self._store = store
        self._client = client
        self._seller = seller
        self._clock = clock
        self._settings = settings
        self._rand = rand or random.Random()
        self._wake = asyncio.Event()
        self._settled: dict[int, asyncio.Event] = {}
        self._signatures: dict[int, Handover] = {}  # for a sale a till is waiting for, before it is stored
        self._behind: Behind | None = None  # found while KRA worked on the sale ahead of it
        self._timer = timer
        self._guard = clock_guard
        self._on_round_trip = on_round_trip  # the metrics histogram
        self._window = window  # told when a request is on the wire, for the head-office lane
        self.round_trip_s: float | None = None  # moving average of KRA's answer time to a sale
        self.online: bool | None = None  # None until the first answer (or failure) says
        self.last_error: str | None = None

    # --- what the intake uses ---------------------------------------------------------------

    async def close(self) -> None:
        """Close the lane's connection to KRA (when the agent stops)."""
        await self._client.aclose()

    def notify(self) -> None:
        """A new sale is in the outbox: wake the lane now instead of at its next timer."""
        self._wake.set()

    def worth_waiting(self, budget_s: float) -> bool:
        """Whether a new sale can expect KRA's signature within `budget_s`: not while KRA is known to
        be down, nor behind a backlog that takes longer than that to drain."""
        if self.online is False:
            return False
        return self._store.backlog() * (self.round_trip_s or 0.0) <= budget_s

    def signature_of(self, sale_ref: int) -> Handover | None:
        """KRA's invoice number and signature for a sale a till waited for (once): its answer is made
        from them, because the signature's commit comes just after (see _signed)."""
        return self._signatures.pop(sale_ref, None)

    async def wait_settled(self, sale_ref: int, timeout: float) -> bool:
        """Wait until the sale is signed or parked, at most `timeout` seconds."""
        event = self._settled.setdefault(sale_ref, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it makes a task for every sale
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            if self._settled.get(sale_ref) is event and not event.is_set():
                self._settled.pop(sale_ref, None)

    # --- the worker -------------------------------------------------------------------------

    async def run(self) -> None:
        recovered = self._store.recover(self._clock())
        if recovered:
            log.warning("kra_in_flight_recovered", sales=recovered,
                        detail="sent before a stop with no answer; KRA is asked before any resend")
        ahead: Numbered | None = None
        while True:
            work = ahead.work if ahead is not None else self._store.next_work()
            if work is None:
                # Idle: a new sale wakes the lane at once; a sale another process queued (a technician's
                # requeue or rescue) is found at the latest after this many seconds.
                await self._sleep(self._settings.backoff_max_s)
                continue
            now = self._clock()
            if ahead is None and work.next_attempt_at is not None and work.next_attempt_at > now:
                await self._sleep((work.next_attempt_at - now).total_seconds())
                continue
            try:
                ahead = await self._step(work, ahead)
            except asyncio.CancelledError:
                raise
            except StorageError:
                ahead = None
                # The disk is full (the outbox logs it): nothing was written, so the sale is where it
                # was. One that KRA signed meanwhile is still in flight, and the lane asks KRA for it.
                await asyncio.sleep(STORAGE_PAUSE_S)
            except Exception:  # a bug must not stop the lane for good; the sale is retried later
                ahead = None
                log.exception("kra_lane_error", sale=work.id)
                with contextlib.suppress(StorageError):
                    # Once the sale holds an invoice number KRA may have it: ask KRA before any resend.
                    head = self._store.next_work()
                    numbered = head is not None and head.id == work.id and head.invc_no is not None
                    self._store.defer(work.id, "unknown" if numbered else work.state,
                                      self._clock() + timedelta(seconds=30), "internal error")

    async def _sleep(self, timeout: float | None) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that lands as the
        # wake event fires, and the lane would outlive the shutdown that cancelled it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()

    async def _step(self, work: KraWork, ahead: Numbered | None) -> Numbered | None:
        """Move the sale at the head one step on; returns the sale behind it if that is numbered already."""
        if ahead is not None:
            return await self._send(work, ahead.invc_no, ahead.request)
        if work.state == "queued":
            stop = self._clock_stop()
            if stop is not None:  # a new invoice would carry a wrong time: wait until the clock is fixed
                self._store.defer(work.id, "queued", self._clock() + timedelta(seconds=5), stop)
                return None
            if self._original_refused(work):
                self._park(work, "original", "the sale this credit note refunds was refused by KRA and has no "
                           "invoice number; requeue the corrected sale first, then this credit note", release=False)
                return None
            if self._store.numbering_unverified() and not await self._learn_numbering(work):
                return None
            if not await self._register_items(work):
                return None
            allocated = self._store.allocate(work.id, self._builder(work), self._clock(), items=_items(work))
            if allocated is None:  # parked by a technician meanwhile: the next loop reads the head again
                return None
            return await self._send(work, *allocated)
        if work.state == "retry":
            assert work.invc_no is not None and work.request is not None
            self._store.mark_sending(work.id)
            return await self._send(work, work.invc_no, work.request)
        # unknown (or in_flight left by a crash that recover() has not seen)
        return await self._reconcile(work)

    @staticmethod
    def _original_refused(work: KraWork) -> bool:
        # A credit note whose original has no number: that sale is ahead in the lane, so KRA refused it.
        return work.kind == "credit_note" and work.original_invc_no is None

    def _ready(self, work: KraWork) -> bool:
        """Whether a queued sale can be numbered now: nothing to ask KRA first, nothing to wait for."""
        return (work.state == "queued" and (work.next_attempt_at is None or work.next_attempt_at <= self._clock())
                and self._clock_stop() is None and not self._original_refused(work)
                and not self._store.numbering_unverified() and not self._unregistered(work))

    def _find_behind(self, ahead: KraWork, guess: int | None) -> Behind | None:
        work = self._store.next_work(skip=ahead.id)
        if work is None or not self._ready(work):
            return None
        return Behind(ahead.id, work, self._builder(work, guess))

    def _on_sent(self, ahead: KraWork, invc_no: int) -> None:
        """While KRA works on `ahead` (its request is on the wire): find the sale behind it and build
        its request for the next number, so that once KRA signs, nothing is left to read or build
        before that sale is numbered and sent. Then open the window for the head-office lane."""
        try:
            self._behind = self._find_behind(ahead, guess=invc_no + 1)
        except Exception:  # only a head start: _signed looks again and meets (and reports) the same error
            self._behind = None
        if self._window is not None:
            self._window.sent()

    async def _signed(self, work: KraWork, invc_no: int, signature: dict[str, Any], *,
                      adopted: bool, took: float | None = None) -> Numbered | None:
        """Store KRA's signature. When the sale behind it is ready, number it in the same transaction: one
        commit and one fsync instead of two, the lane's largest cost between two requests to KRA.

        A till waiting for the sale gets its answer first, made from the signature in memory: that
        commit has no fsync of its own, so a power cut could lose it after the answer anyway, and
        after any stop before it the sale is in flight and the lane asks KRA and adopts the same
        signature. Nothing on the event loop reads the sale between the two: the lane commits in the
        very next step. `took`: how long KRA's request took, for the answer's Server-Timing."""
        if work.id in self._settled:
            self._signatures[work.id] = Handover(invc_no, signature, took)
            self._settle(work.id)
            await asyncio.sleep(0)  # the waiting request runs first, to its answer
            self._signatures.pop(work.id, None)  # not taken: it gave up waiting meanwhile
        done = Signed(work.id, signature, adopted)
        behind, self._behind = self._behind, None
        if behind is None or behind.ahead != work.id:
            behind = self._find_behind(work, guess=None)
        allocated = None
        if behind is not None:
            allocated = self._store.allocate(behind.work.id, behind.build, self._clock(), items=_items(behind.work),
                                             after=done)
        else:
            self._store.signed(work.id, signature, self._clock(), adopted=adopted)
        self._set_online(True)
        self._settle(work.id)
        return None if behind is None or allocated is None else Numbered(behind.work, *allocated)

    def _builder(self, work: KraWork, guess: int | None = None) -> Callable[[int], str]:
        """The sale's request for a given invoice number; the one for `guess` is made now (pure, and
        the same text whenever it is made)."""
        credit = None
        if work.kind == "credit_note":
            assert work.original_invc_no is not None and work.refund_reason is not None
            credit = CreditNoteRef(work.original_invc_no, work.refund_reason,
                                   datetime.fromisoformat(work.sale["issued_at"]))

        def build(n: int) -> str:
            return wire_json(sale_request(work.sale, work.amounts, n, self._seller, credit=credit))
        if guess is None:
            return build
        made = build(guess)
        return lambda n: made if n == guess else build(n)

    async def _learn_numbering(self, work: KraWork) -> bool:
        """Find the last invoice number KRA holds for this device before numbering a new one.

        Needed when this outbox may not know every number used (it replaced a damaged one, or the key
        was adopted). KRA's numbers run without gaps, so "held" is true up to some n and false after:
        probe the counter, gallop up or search down, then bisect (about 2 log2(n) questions).
        """
        probes = 0

        async def held(n: int) -> bool | None:
            nonlocal probes
            if n <= 0:
                return True
            probes += 1
            reply = await self._client.invoice(n)
            if reply.ok and _first_sale(reply.data) is not None:
                return True
            if reply.outcome is Outcome.EMPTY or reply.ok:
                return False
            self._defer(work, "queued", reply)  # KRA unreachable: the sale waits, as any sale does
            return None

        low, high = 0, self._store.invoice_counter()  # held(low) is True; high is still unknown
        answer = await held(high)
        if answer is None:
            return False
        if answer:
            low, step = high, 1
            while True:  # gallop up until a number KRA does not hold
                answer = await held(low + step)
                if answer is None:
                    return False
                if not answer:
                    high = low + step
                    break
                low, step = low + step, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            answer = await held(middle)
            if answer is None:
                return False
            low, high = (middle, high) if answer else (low, middle)
        was = self._store.numbering_learned(low, probes, self._clock())
        log.warning("kra_numbering_learned", last_held=low, counter_was=was, probes=probes)
        return True

    def _unregistered(self, work: KraWork) -> list[dict[str, Any]]:
        """The sale's lines whose items KRA does not have yet (saveItem before the sale)."""
        known = self._store.registered_items(_items(work))
        return [line for line in work.sale["lines"] if line["item_code"] not in known]

    async def _register_items(self, work: KraWork) -> bool:
        done: set[str] = set()
        for line in self._unregistered(work):
            code = line["item_code"]
            if code in done:  # the same item on two lines
                continue
            body = wire_json(item_request(line, self._seller, origin_country=self._settings.origin_country))
            reply = await self._client.save_item(body)
            if reply.ok or reply.code == "994":  # 994: KRA has the item already
                self._store.item_registered(code, body, self._clock())
                done.add(code)
            elif reply.outcome is Outcome.REJECTED:
                self._park(work, reply.code, f"item {code} was refused: {reply.message}", release=False)
                return False
            else:
                self._defer(work, "queued", reply)
                return False
        return True

    async def _send(self, work: KraWork, invc_no: int, request: str) -> Numbered | None:
        for _ in range(3):  # at most two renumberings in a row; then a person should look
            self._behind = None
            started = self._timer()
            try:
                reply = await self._client.save_sale(request, on_sent=functools.partial(self._on_sent, work, invc_no))
            finally:
                if self._window is not None:
                    self._window.answered()
            took = self._timer() - started
            if reply.code.isdigit():  # KRA answered; a refused connection says nothing of its speed
                self._note_round_trip(took)
                self._note_clock(reply.result_dt)
            if reply.ok:
                return await self._signed(work, invc_no, signature_from(reply.data or {}), adopted=False, took=took)
            if reply.outcome is Outcome.RETRY:
                self._defer(work, "retry", reply)
                return None
            if reply.outcome is Outcome.UNKNOWN:
                self._defer(work, "unknown", reply, immediately=work.state != "unknown")
                return None
            expected = expected_invoice_number(reply.message)
            if expected is None or expected == invc_no:
                self._park(work, reply.code, reply.message, release=True)
                return None
            # Strict numbering: KRA never accepted this number and names the one it expects.
            log.warning("kra_renumbered", sale=work.id, invc_no=invc_no, expected=expected)
            invc_no, request = expected, self._store.renumber(work.id, expected, self._builder(work), self._clock())
        self._park(work, reply.code, reply.message, release=True)
        return None

    async def _reconcile(self, work: KraWork) -> Numbered | None:
        assert work.invc_no is not None and work.request is not None
        reply = await self._client.invoice(work.invc_no)
        if reply.ok:
            found = _first_sale(reply.data)
            if found is not None and str(found.get("trdInvcNo")) == work.sale_id:
                log.info("kra_signature_adopted", sale=work.id, invc_no=work.invc_no)
                return await self._signed(work, work.invc_no, signature_from(found.get("receipt") or {}),
                                          adopted=True)
            other = None if found is None else found.get("trdInvcNo")
            self._park(work, "reconcile",
                       f"KRA holds invoice {work.invc_no} for another document ({other}); compare with KRA "
                       "before signing this sale again", release=False)
            return None
        if reply.outcome is Outcome.EMPTY:  # KRA never recorded it: the identical request goes again
            self._set_online(True)
            self._store.mark_sending(work.id)
            return await self._send(work, work.invc_no, work.request)
        self._defer(work, "unknown", reply)
        return None

    # --- bookkeeping ------------------------------------------------------------------------

    def _defer(self, work: KraWork, state: str, reply: KraReply, *, immediately: bool = False) -> None:
        delay = timedelta(0) if immediately else backoff(
            work.attempts, base_s=self._settings.backoff_base_s, cap_s=self._settings.backoff_max_s, rand=self._rand)
        self._store.defer(work.id, state, self._clock() + delay, describe(reply.code, reply.message))
        # An answer from KRA itself (a result code) means it is reachable, even if it said "later".
        self._set_online(reply.code.isdigit(), describe(reply.code, reply.message))

    def _park(self, work: KraWork, code: str, message: str, *, release: bool) -> None:
        self._store.park(work.id, code, message, self._clock(), release=release)
        log.warning("kra_sale_parked", sale=work.id, till_id=work.till_id, sale_id=work.sale_id,
                    code=code, message=message)
        self._settle(work.id)

    def _settle(self, sale_ref: int) -> None:
        event = self._settled.pop(sale_ref, None)
        if event is not None:
            event.set()

    def _note_clock(self, result_dt: str | None) -> None:
        server = parse_kra_datetime(result_dt)
        if self._guard is not None and server is not None:
            now = self._clock()
            self._guard.note("kra", (server - now).total_seconds(), now)

    def _clock_stop(self) -> str | None:
        if self._guard is None:
            return None
        level, message = self._guard.verdict()
        if level != "refuse":
            if self.last_error and self.last_error.startswith("clock:"):
                self.last_error = None
            return None
        if self.last_error != f"clock: {message}":
            log.error("kra_signing_stopped", reason=message)
        self.last_error = f"clock: {message}"
        return self.last_error

    def _note_round_trip(self, seconds: float) -> None:
        if self._on_round_trip is not None:
            self._on_round_trip(seconds)
        previous = self.round_trip_s
        self.round_trip_s = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def _set_online(self, online: bool, error: str | None = None) -> None:
        if online != self.online:
            backlog = self._store.backlog()
            if online:
                log.info("kra_online", backlog=backlog)
            else:
                log.warning("kra_offline", backlog=backlog, reason=error)
        self.online = online
        self.last_error = None if online else error


def _items(work: KraWork) -> list[str]:
    return [line["item_code"] for line in work.sale["lines"]]


def _first_sale(data: Any) -> dict[str, Any] | None:
    if isinstance(data, dict):
        sales = data.get("salesList")
        if isinstance(sales, list) and sales and isinstance(sales[0], dict):
            return sales[0]
    return None
