"""The sale desk: what happens to a sale or credit note a till sends, whatever the wire.

HTTP (`agent.api`) and serial intake (`agent.devices`) both hand the till's decoded JSON to a
`SaleDesk`, so a sale is validated, stored, offered to KRA within the signing budget and answered
the same way whichever wire it came on. An `Answer` is an HTTP-style status and the JSON body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from agent.clock import Clock
from agent.credit_notes import REFUND_REASONS, Original, credited_quantities, prepare_credit_note
from agent.errors import DiskFull, InvalidSale, SaleConflict, SalePruned, StorageError
from agent.intake import IntakeRules, prepare
from agent.metrics import Metrics
from agent.policy import Budget, BudgetSettings, ClockGuard, offline_budget
from agent.queue.group_commit import GroupCommit
from agent.queue.outbox import NewSale, Outbox, SaleRecord
from agent.queue.retention import Retention, tombstone
from agent.receipt_signing import ReceiptSigner
from agent.receipts import Seller, receipt_chain, sale_status, sale_view
from agent.scheduler import Job
from agent.signing import Handover


class Signer(Protocol):
    """The KRA lane as the intake sees it."""

    online: bool | None
    last_error: str | None
    round_trip_s: float | None

    def notify(self) -> None: ...
    def worth_waiting(self, budget_s: float) -> bool: ...
    async def wait_settled(self, sale_ref: int, timeout: float) -> bool: ...
    def signature_of(self, sale_ref: int) -> Handover | None: ...
    async def run(self) -> None: ...


class Syncer(Protocol):
    """The TSMS lane as the intake and status see it."""

    state: str
    detail: str | None
    last_sync_at: datetime | None
    clock_offset_s: float | None

    def notify(self) -> None: ...
    async def run(self) -> None: ...


class Device(Protocol):
    """Another way in for tills (serial lines): started with the app, given the desk's `sale`."""

    name: str

    def start(self, loop: asyncio.AbstractEventLoop, desk: SaleDesk) -> None: ...
    def stop(self) -> None: ...
    def status(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class ApiContext:
    outbox: Outbox
    rules: IntakeRules
    clock: Clock
    max_body_bytes: int
    started_at: datetime
    signer: Signer | None = None
    sign_budget_s: float = 0.0
    seller: Seller | None = None
    backlog: Callable[[], int] | None = None
    receipt_signer: ReceiptSigner | None = None  # signs temporary receipts
    tax_rates: Callable[[], Mapping[str, Decimal]] | None = None  # KRA's class 04 once known
    refund_reasons: Callable[[], Mapping[str, str]] | None = None  # KRA's class 32 once known
    jobs: tuple[Job, ...] = ()  # periodic work, run while the app serves
    syncer: Syncer | None = None  # the TSMS lane
    devices: tuple[Device, ...] = ()  # serial intake, printers
    budget: BudgetSettings | None = None  # the offline budget (None: no KRA lane, no budget)
    metrics: Metrics | None = None
    clock_guard: ClockGuard | None = None
    # (sale id, receipt kind, replay) once a till has its answer; replay: the sale was stored before
    on_answer: tuple[Callable[[int, str, bool], None], ...] = ()
    on_shutdown: tuple[Callable[[], Awaitable[None]], ...] = ()
    retention: Retention | None = None  # the pruning job, for status (None: not running)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # 201 stored, 200 replay, 409 conflict, 422 invalid (as over HTTP)
    body: dict[str, Any]
    # Seconds, by name, for the Server-Timing header: `store` (checked and in the outbox), `kra` (KRA's
    # time, when the till waited for its signature), `total` (the whole answer, from the decoded body).
    timings: tuple[tuple[str, float], ...] = ()


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


class SaleDesk:
    def __init__(self, ctx: ApiContext) -> None:
        self._ctx = ctx
        self.outbox = ctx.outbox
        self._rules = ctx.rules  # rebuilt only when the code-list refresh hands over new rates
        self._budget: tuple[datetime, Budget] | None = None  # computed at most once a second
        self._writer = GroupCommit(ctx.outbox)

    def budget(self) -> Budget | None:
        """The offline budget now (None without a KRA lane)."""
        ctx = self._ctx
        if ctx.budget is None:
            return None
        now = ctx.clock()
        if self._budget is None or (now - self._budget[0]).total_seconds() >= 1.0:
            unsigned, oldest = ctx.outbox.unsigned()
            self._budget = (now, offline_budget(ctx.budget, unsigned, oldest, now))
        return self._budget[1]

    async def sale(self, data: object) -> Answer:
        started = time.perf_counter()
        try:
            new = prepare(data, self._current_rules())
        except InvalidSale as exc:
            return Answer(422, error_body(exc.code, exc.message, exc.field))
        answer = self._refusal(new) or await self._store(new, started)
        if self._ctx.metrics is not None:
            self._ctx.metrics.intake_latency.observe(time.perf_counter() - started)
        return answer

    def _refusal(self, new: NewSale) -> Answer | None:
        """Once the offline budget is exhausted and the shop chose `refuse`: no new sale (a replay of
        one already taken is still answered)."""
        ctx = self._ctx
        budget = self.budget()
        if budget is None or budget.level != "exhausted" or ctx.budget is None or ctx.budget.action != "refuse":
            return None
        if ctx.outbox.get(new.till_id, new.sale_id) is not None:
            return None
        return Answer(503, error_body("offline_budget_exhausted", str(budget.message)))

    async def credit_note(self, original: SaleRecord, data: object) -> Answer:
        started = time.perf_counter()
        ctx = self._ctx
        if original.kind != "sale":
            return Answer(422, error_body("not_a_sale", f"{original.sale_id!r} is a credit note; credit the "
                                          "original sale", "sale_id"))
        try:
            new = prepare_credit_note(data, _original(ctx.outbox, original, data), ctx.clock(), self.refund_reasons())
        except InvalidSale as exc:
            return Answer(422, error_body(exc.code, exc.message, exc.field))
        return await self._store(new, started)

    def refund_reasons(self) -> Mapping[str, str]:
        """KRA's code class 32 once fetched, else the published list."""
        ctx = self._ctx
        return (ctx.refund_reasons() if ctx.refund_reasons else None) or REFUND_REASONS

    def view(self, record: SaleRecord, entry: tuple[str, str] | None = None) -> dict[str, Any]:
        """The body for a sale; `entry`: its journal entry when the caller has it (saves reading it back)."""
        ctx = self._ctx
        original = None if record.original_id is None else ctx.outbox.by_id(record.original_id)
        chain = None
        if record.kra_signature is None and ctx.receipt_signer is not None:
            entry = entry or ctx.outbox.accepted_entry(record.id)
            chain = None if entry is None else receipt_chain(record, entry, ctx.receipt_signer)
        view = sale_view(record, ctx.seller, original=original, chain=chain)
        budget = self.budget() if record.kra_signature is None else None
        if budget is not None and budget.message:
            view["receipt"]["offline_warning"] = budget.message  # printed on the temporary receipt
        return view

    async def _store(self, new: NewSale, started: float) -> Answer:
        """Commit a sale or credit note, then wait a short budget for KRA's signature. `started`: when
        the request reached the desk (time.perf_counter), for the answer's timings."""
        ctx = self._ctx
        # The commit runs on the event loop, shared with the sales that arrived in the same turn of it
        # (agent/queue/group_commit.py). Handing commits to a writer thread measured worse (774 vs
        # 1158 sales/s with 8 clients, bench/ingest.py): the thread spent as long winning the GIL back
        # after each SQLite call as it spent in SQLite. Reads use their own connection.
        signer = ctx.signer
        # A sale that will wait for KRA is committed without its own fsync: the commit of its invoice
        # number, made before the request goes to KRA, syncs the log with the sale in it; only if the
        # answer goes out before that (KRA slow or down) is the log synced for it here.
        waits = signer is not None and ctx.sign_budget_s > 0 and signer.worth_waiting(ctx.sign_budget_s)
        try:
            result, commit = await self._writer.accept(new, ctx.clock(), flush=not waits)
        except SaleConflict as exc:
            return Answer(409, error_body("conflict", str(exc), "sale_id"))
        except SalePruned as exc:  # a pruned sale posted again: the database's trigger (m007) refused it
            pruned = tombstone(ctx.outbox, new.till_id, new.sale_id)
            return Answer(409, error_body("pruned", str(exc) if pruned is None else pruned.refusal(), "sale_id"))
        except DiskFull as exc:  # nothing stored: the till keeps the sale and sends it again later
            return Answer(507, error_body("disk_full", str(exc)))
        except StorageError as exc:
            return Answer(503, error_body("storage", str(exc)))
        record = result.record
        timings = [("store", time.perf_counter() - started)]
        if result.created and ctx.syncer is not None:
            ctx.syncer.notify()
        if signer is not None and sale_status(record.kra_state) == "pending":
            if result.created:
                signer.notify()
            # Wait a short budget for KRA's signature, unless the lane knows it cannot come in time
            # (KRA down, or a backlog ahead): then the temporary receipt goes out at once.
            if ctx.sign_budget_s > 0 and signer.worth_waiting(ctx.sign_budget_s) and \
                    await signer.wait_settled(record.id, ctx.sign_budget_s):
                signed = signer.signature_of(record.id)
                if signed is None:  # parked: KRA refused it
                    record = ctx.outbox.by_id(record.id) or record
                else:  # signed, and stored by the lane a moment after this answer
                    record = dataclasses.replace(record, kra_state="signed", kra_invc_no=signed.invc_no,
                                                 kra_signature=signed.signature, kra_signed_at=ctx.clock(),
                                                 kra_error=None)
                    if signed.kra_s is not None:
                        timings.append(("kra", signed.kra_s))
        try:
            ctx.outbox.make_durable(commit)  # no till hears of a sale before it is on the disk
        except StorageError as exc:  # stored, maybe not durably: the till sends it again, a replay
            return Answer(503, error_body("storage", str(exc)))
        body = self.view(record, result.entry)
        for listener in ctx.on_answer:  # printers queue the receipt; they never hold up the answer
            listener(record.id, body["receipt"]["kind"], not result.created)
        timings.append(("total", time.perf_counter() - started))
        return Answer(201 if result.created else 200, body, tuple(timings))

    def _current_rules(self) -> IntakeRules:
        ctx = self._ctx
        if ctx.tax_rates is None:
            return ctx.rules
        rates = ctx.tax_rates()
        if self._rules.tax_rates is not rates:
            self._rules = dataclasses.replace(ctx.rules, tax_rates=rates)
        return self._rules


def _original(outbox: Outbox, record: SaleRecord, data: object) -> Original:
    """The original as a credit note sees it. A repeated request is checked as if it were new (its
    own earlier copy not counted as credited, its stored date assumed), so it replays or conflicts."""
    note_id = data.get("credit_note_id") if isinstance(data, dict) else None
    notes = [n for n in outbox.credit_notes_of(record.id) if n.kra_state != "parked"]
    earlier = next((n for n in notes if n.sale_id == note_id), None)
    if earlier is not None and isinstance(data, dict) and "issued_at" not in data:
        data["issued_at"] = earlier.sale["issued_at"]
    return Original(id=record.id, till_id=record.till_id, sale_id=record.sale_id, kra_state=record.kra_state,
                    sale=record.sale, amounts=record.amounts,
                    credited=credited_quantities([n.sale for n in notes if n is not earlier]))


