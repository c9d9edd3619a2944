"""The TSMS sync lane: every sale to head office exactly once, in batches, never waiting on KRA.

One submission in flight. Its exact body is stored before the first send and sent byte for byte
until the server answers it for good, so a resend after a timeout, a crash or a 429 is a replay
(202), never a conflict (tsms-api.md §3.1 notes). What the answers do:

* 202/200: the sales are synced. 401: authenticate again once, then resend the same bytes.
* 413 or BATCH_LIMIT_EXCEEDED: the server never took it; its sales go back and travel in halves.
* 422 on a batch: one bad sale spoils it; halves again, until the bad sale is alone; a single
  sale's 422 sets it aside (`rejected`) with the server's messages (an integrity failure shows the
  hash the server computed).
* 429/503: wait for Retry-After. Network errors and other 5xx: exponential backoff with jitter;
  after `BREAKER_FAILURES` in a row the lane says the server is down once and probes at the
  backoff ceiling instead of hammering it.
* 403 (HARDWARE_ID_MISMATCH, missing ability): a configuration error, shown in status.
* 409: must never happen (the body never changes under a uuid); reported loudly, the sales set aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid as uuids
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from agent.errors import StorageError
from agent.jsonwire import wire_json
from agent.kra_window import KraWindow
from agent.logs import get_logger
from agent.policy import ClockGuard
from agent.queue.tsms_store import PendingVoid, Submission, TsmsStore
from agent.secret import Secret
from agent.signing import backoff
from agent.sync.checksum import SignedTransaction, sign_envelope, sign_transaction, void_checksum
from agent.sync.client import Outcome, TsmsClient, TsmsReply, server_time
from agent.sync.transaction import Terminal, tsms_transaction, utc_z

log = get_logger("agent.sync.lane")

STORAGE_PAUSE_S = 2.0  # how soon to try again after the outbox could not be written (a full disk)
BREAKER_FAILURES = 5


class Credentials(Protocol):
    """Where the terminal's API key and bearer token live (the secret store)."""

    def api_key(self) -> Secret | None: ...
    def token(self) -> Secret | None: ...
    def save_token(self, token: Secret | None) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncSettings:
    tenant_id: int
    terminal_id: int
    serial_number: str
    batch_size: int = 50
    max_body_bytes: int = 2 * 1024 * 1024
    interval_s: float = 10.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 600.0
    coalesce_s: float = 2.0  # a trickle of sales makes at most 30 submissions a minute (the server allows 50)


PARTIAL_NOTE = ("a partial credit note: TSMS has no partial refund (only a void of the whole transaction), "
                "so head office keeps the sale whole; the credit note is in the agent's journal and export")


def covers_whole_sale(note: PendingVoid) -> bool:
    """Whether the credit note refunds every item of the sale in full (and is its only credit note)."""
    return note.earlier_notes == 0 and _quantities(note.lines) == _quantities(note.original_lines)


def _quantities(lines: list[dict[str, Any]]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for line in lines:
        out[line["item_code"]] = out.get(line["item_code"], Decimal(0)) + Decimal(line["qty"])
    return out


def head_office_builder(terminal: Terminal, new_id: Callable[[], str] = lambda: str(uuids.uuid4())
                        ) -> Callable[[Mapping[str, Any], Mapping[str, Any], int], tuple[str, str]]:
    """For the intake: builds a sale's transaction (with a fresh UUID v4) once its receipt number is known."""
    def build(sale: Mapping[str, Any], amounts: Mapping[str, Any], receipt_no: int) -> tuple[str, str]:
        transaction_id = new_id()
        return transaction_id, wire_json(tsms_transaction(sale, amounts, receipt_no, transaction_id, terminal))
    return build


# From this many batches behind, head office stops waiting for KRA's window (see _turn). Coalescing
# alone (a batch that is not full waits up to 2 s for more) lets 80-130 sales gather at 40 a second.
CATCH_UP_BATCHES = 4
BACKGROUND_PAUSE_S = 0.001  # after each transaction signed: the lane takes at most about a quarter of the loop


async def signed_transactions(texts: list[str], version: str,
                              pause_s: float = BACKGROUND_PAUSE_S) -> list[SignedTransaction]:
    """Each stored transaction text with its checksum, made on the event loop one at a time.

    The checksums are pure Python over every value: about 0.3 ms a transaction. A pause after each
    lets the tills' sales and the KRA lane, which take turns with them, meet few of them. In a thread
    they held up every sale meanwhile (bench/head_office_load.py: till latency p99 27 ms against
    6 ms): the event loop lets go of the GIL at each SQLite call and then waits up to 5 ms to get it
    back, many times per sale. Head office's rate limit leaves time for the pauses: 50 transactions
    take about 65 ms, and a batch goes about once a second."""
    signed = []
    for text in texts:
        signed.append(sign_transaction(json.loads(text, parse_float=Decimal), version))
        await asyncio.sleep(pause_s)
    return signed


class TsmsLane:
    def __init__(self, store: TsmsStore, client: TsmsClient, credentials: Credentials, terminal: Terminal,
                 settings: SyncSettings, clock: Callable[[], datetime], rand: random.Random | None = None,
                 clock_guard: ClockGuard | None = None, window: KraWindow | None = None) -> None:
        self._store, self._client, self._credentials = store, client, credentials
        self._window = window  # KRA's window (agent/kra_window.py), see _turn
        self._up_to_date = True  # fewer than CATCH_UP_BATCHES wait: steps wait for the window
        self._terminal, self._settings, self._clock = terminal, settings, clock
        self._rand = rand or random.Random()
        self._guard = clock_guard
        self._build = head_office_builder(terminal)
        self._wake = asyncio.Event()
        self._limit = settings.batch_size  # lowered after a 413/422 on a batch, grows back on success
        self._failures = 0
        self.state = "starting"  # online, offline, waiting, config_error
        self.detail: str | None = None
        self.last_sync_at: datetime | None = None
        self.clock_offset_s: float | None = None  # server time minus ours, from heartbeats

    def notify(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        """Close the lane's connection to head office (when the agent stops)."""
        await self._client.aclose()

    async def run(self) -> None:
        while True:
            try:
                pause = await self.step()
            except asyncio.CancelledError:
                raise
            except StorageError:  # a full disk (the outbox logs it): a stored body is resent as it is
                pause = STORAGE_PAUSE_S
            except Exception:  # a bug must not stop the lane for good
                log.exception("tsms_lane_error")
                pause = 30.0
            if pause is None:  # idle: until a new sale wakes the lane, or the next sync round
                await self._sleep(self._settings.interval_s)
                await self._coalesce(self._store.backlog(at_most=self._limit))
            elif pause > 0:  # Retry-After or backoff: new sales must not cut it short
                await asyncio.sleep(pause)
                self._wake.clear()
            elif backlog := self._store.backlog(at_most=self._limit):  # sent: the next batch at once if full
                await self._coalesce(backlog)

    async def _coalesce(self, backlog: int) -> None:
        """Let a few more sales arrive when fewer than a batch wait, so that a steady trickle makes
        batches rather than a submission each (the server allows a terminal 50 a minute), also right
        after a batch went: each submission costs a request, a row and its journal entries."""
        if backlog < self._limit:
            await asyncio.sleep(self._settings.coalesce_s)

    async def _sleep(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that lands as the
        # wake event fires, and the lane would outlive the shutdown that cancelled it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    async def step(self) -> float | None:
        """Send one submission (stored first if new); returns how long to wait before the next step
        (0: go on at once; None: nothing to send, wait until woken or the sync interval)."""
        if self._window is not None:
            behind = CATCH_UP_BATCHES * self._limit
            self._up_to_date = self._store.backlog(at_most=behind) < behind
        await self._turn()
        submission = self._store.open_submission() or await self._new_submission()
        if submission is None:
            return await self._void_step()
        token = await self._token()
        if token is None:
            return self._pause_for_failure()
        reply = await self._client.submit(submission.body, token, submission.uuid)
        if reply.outcome is Outcome.UNAUTHORIZED:  # revoked or expired: one new token, same bytes
            self._credentials.save_token(None)
            token = await self._token()
            if token is None:
                return self._pause_for_failure()
            reply = await self._client.submit(submission.body, token, submission.uuid)
        await self._turn()
        return self._settle(submission, reply)

    async def _turn(self) -> None:
        """Before a step that holds the event loop (reading a batch, storing it, settling the answer):
        wait for KRA's window while head office is nearly up to date. Further behind, catching up comes
        first: with a few steps per KRA request, head office would fall ever further behind in a rush,
        and each sale waiting for it keeps its transaction text in the outbox meanwhile."""
        if self._window is not None and self._up_to_date:
            await self._window.wait()

    async def _void_step(self) -> float | None:
        """Settle the oldest credit note whose original head office holds: a whole-sale credit note
        voids the transaction; a partial one is not sent (TSMS has no partial refund), and says so."""
        for note in self._store.pending_voids():
            now = self._clock()
            if not covers_whole_sale(note):
                self._store.void_settled(note.id, "synced", {"sent": False, "why": PARTIAL_NOTE}, now)
                return 0.0
            if note.original_tsms_state != "synced" or not note.original_tsms_id:
                continue  # the sale itself has not reached head office yet
            token = await self._token()
            if token is None:
                return self._pause_for_failure()
            reason = f"Credit note, KRA refund reason {note.refund_reason or '-'}"
            body = wire_json({"transaction_id": note.original_tsms_id, "void_reason": reason,
                              "payload_checksum": void_checksum(note.original_tsms_id, reason)}).encode()
            reply = await self._client.void(note.original_tsms_id, body, token)
            if reply.outcome is Outcome.UNAUTHORIZED:
                self._credentials.save_token(None)
                return 0.0
            done = reply.status == 200 or (reply.status == 409 and "already voided" in reply.message)
            if done:  # a second void's 409 means head office has it voided: done as well
                self._store.void_settled(note.id, "synced", {"voided": note.original_tsms_id, "status": reply.status},
                                         now)
                return 0.0
            if reply.status == 422:
                self._store.void_settled(note.id, "rejected", {"voided": note.original_tsms_id,
                                                               "error": _describe(reply)[:500]}, now)
                log.error("tsms_void_rejected", sale=note.id, reason=_describe(reply))
                return 0.0
            if reply.outcome is Outcome.WAIT:
                return reply.retry_after_s
            return self._pause_for_failure(_describe(reply))  # 404 not yet processed, 409 busy, 5xx, network
        return None

    async def _new_submission(self) -> Submission | None:
        rows = self._store.unsynced(self._limit)
        if not rows:
            return None
        built = {r.id: self._build(*r.source(), r.receipt_no) for r in rows if r.transaction is None}
        texts = [built[r.id][1] if r.id in built else str(r.transaction) for r in rows]
        submission_uuid = str(uuids.uuid4())
        body, count = await self._body(submission_uuid, texts)
        ids = [r.id for r in rows[:count]]
        self._store.create_submission(submission_uuid, body, ids, {k: v for k, v in built.items() if k in ids},
                                      self._clock())
        return Submission(submission_uuid, body.encode(), len(ids), 0)

    async def _body(self, submission_uuid: str, texts: list[str]) -> tuple[str, int]:
        """The signed submission body for the first of these transactions that fit under the server's
        size limit, and how many went in."""
        transactions = await signed_transactions(texts, self._terminal.protocol)
        await self._turn()
        while True:
            body = self._envelope(submission_uuid, transactions)
            if len(body.encode()) <= self._settings.max_body_bytes or len(transactions) == 1:
                return body, len(transactions)
            transactions = transactions[: len(transactions) // 2]  # keep under the server's 2 MiB

    def _envelope(self, submission_uuid: str, transactions: list[SignedTransaction]) -> str:
        envelope: dict[str, Any] = {
            "submission_uuid": submission_uuid,
            "tenant_id": self._settings.tenant_id,
            "terminal_id": self._settings.terminal_id,
            "submission_timestamp": utc_z(self._clock()),
            "transaction_count": len(transactions),
        }
        key = "transaction" if len(transactions) == 1 else "transactions"
        return wire_json(sign_envelope(envelope, key, transactions, self._terminal.protocol))

    async def _token(self) -> Secret | None:
        token = self._credentials.token()
        if token is not None:
            return token
        api_key = self._credentials.api_key()
        if api_key is None:
            self._set("config_error", "no TSMS API key: run `etims-agent init tsms` (or set tsms.api_key)")
            return None
        reply, token = await self._client.authenticate(self._settings.serial_number, api_key)
        if token is None:
            if reply.outcome in (Outcome.UNAUTHORIZED, Outcome.REJECTED, Outcome.CONFIG):
                self._set("config_error", f"TSMS refused the terminal ({reply.status} {reply.message}); check "
                                          "tsms.hardware_id and the API key (`etims-agent init tsms`)")
            else:
                self._set("offline", f"TSMS authentication failed: {reply.message}")
            return None
        self._credentials.save_token(token)
        log.info("tsms_authenticated", serial_number=self._settings.serial_number)
        return token

    def _settle(self, submission: Submission, reply: TsmsReply) -> float | None:
        now = self._clock()
        what = _describe(reply)
        if reply.outcome is Outcome.ACCEPTED:
            count = self._store.accepted(submission.uuid, now)
            self._failures = 0
            self._limit = min(self._settings.batch_size, self._limit * 2)
            self.last_sync_at = now
            self._set("online", None)
            log.debug("tsms_submission_accepted", submission_uuid=submission.uuid, sales=count, status=reply.status)
            return 0.0
        if reply.outcome is Outcome.TOO_LARGE or (reply.outcome is Outcome.REJECTED and submission.sales > 1):
            self._store.split(submission.uuid, reply.status, what, now)
            self._limit = max(1, submission.sales // 2)
            log.warning("tsms_submission_split", submission_uuid=submission.uuid, sales=submission.sales,
                        status=reply.status, reason=what)
            return 0.0
        if reply.outcome in (Outcome.REJECTED, Outcome.CONFLICT):
            self._store.rejected(submission.uuid, reply.status, what, now)
            log.error("tsms_submission_rejected", submission_uuid=submission.uuid, status=reply.status,
                      error_code=reply.error_code, reason=what,
                      **({"detail": "409 must never happen: the stored body never changes"}
                         if reply.outcome is Outcome.CONFLICT else {}))
            return 0.0
        self._store.attempted(submission.uuid, reply.status, what, now)
        if reply.outcome is Outcome.WAIT:
            self._set("waiting", what)
            return reply.retry_after_s
        if reply.outcome is Outcome.CONFIG:
            self._set("config_error", what)
            return self._settings.backoff_max_s
        return self._pause_for_failure(what)

    def _pause_for_failure(self, what: str | None = None) -> float:
        self._failures += 1
        if what is not None and self.state != "config_error":
            self._set("offline", what)
        if self._failures == BREAKER_FAILURES:
            log.warning("tsms_breaker_open", failures=self._failures,
                        detail=f"probing every {self._settings.backoff_max_s:g} s at most")
        delay = backoff(self._failures, base_s=self._settings.backoff_base_s, cap_s=self._settings.backoff_max_s,
                        rand=self._rand)
        return delay.total_seconds()

    async def rotate_token(self) -> None:
        """POST /api/v1/auth/refresh: a fresh token, and every older one revoked by the server, so a
        token that leaked stops working within a day."""
        token = self._credentials.token()
        if token is None:
            return
        reply, fresh = await self._client.refresh(token)
        if fresh is not None:
            self._credentials.save_token(fresh)
            log.info("tsms_token_rotated")
        elif reply.outcome is Outcome.UNAUTHORIZED:
            self._credentials.save_token(None)  # the next submission authenticates again

    async def heartbeat(self) -> None:
        """POST /api/v1/heartbeat; its server_time gives the clock offset."""
        token = self._credentials.token()
        if token is None:
            return
        sent = self._clock()
        reply = await self._client.heartbeat(token)
        received = self._clock()
        server = server_time(reply)
        if server is not None:
            midpoint = sent + (received - sent) / 2
            self.clock_offset_s = round((server - midpoint) / timedelta(seconds=1), 3)
            if self._guard is not None:
                self._guard.note("tsms", self.clock_offset_s, received)

    def _set(self, state: str, detail: str | None) -> None:
        if state != self.state:
            backlog = self._store.backlog()
            if state == "online":
                log.info("tsms_online", backlog=backlog)
            else:
                log.warning(f"tsms_{state}", backlog=backlog, reason=detail)
        self.state, self.detail = state, detail


def _describe(reply: TsmsReply) -> str:
    text = f"TSMS {reply.status or 'no answer'}"
    if reply.error_code:
        text += f" {reply.error_code}"
    text += f": {reply.message}"
    if reply.errors:
        text += f" {json.dumps(reply.errors, ensure_ascii=False)[:1000]}"
    return text

