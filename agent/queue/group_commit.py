"""Group commit: the sales that reach the event loop together are stored in one transaction.

The fsync of a commit is most of what storing a sale costs. While it runs the event loop is blocked,
and the requests of the other tills wait in their sockets; on the next turn of the loop they are all
read at once. Each one's `accept` queues its sale and the first schedules one flush behind them, so
they share one transaction and one fsync. A till still gets its answer only after the commit that
holds its sale, and a lone sale is committed as soon as the loop comes round (no timer, no wait).
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from agent.queue.outbox import Accepted, NewSale, Outbox

MAX_BATCH = 64  # bounds the transaction, and so the time the loop spends in one flush


class GroupCommit:
    def __init__(self, outbox: Outbox) -> None:
        self._box = outbox
        self._waiting: list[tuple[NewSale, datetime, bool, asyncio.Future[tuple[Accepted, int]]]] = []

    async def accept(self, new: NewSale, now: datetime, *, flush: bool = True) -> tuple[Accepted, int]:
        """Outbox.accept, sharing its transaction with the sales that arrived in the same turn; also
        returns the number of the commit that holds the sale (for Outbox.make_durable).

        flush=False: the caller will make the commit durable before it answers, and hopes another
        commit's fsync does it first (a sale waiting for KRA: the invoice number's commit). A batch is
        flushed if any of its sales asks for it.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Accepted, int]] = loop.create_future()
        self._waiting.append((new, now, flush, future))
        if len(self._waiting) == 1:
            # Two turns of the ready queue: the requests read in this turn run up to here first (each
            # needs a step or two to get from its socket to this call). Measured with 8 tills: batches
            # of about 2.7 sales with one turn, 5 with two.
            loop.call_soon(loop.call_soon, self._flush)
        return await future

    def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                results: list[Accepted | Exception] = self._box.accept_many(
                    [(new, now) for new, now, _, _ in batch], flush=any(flush for _, _, flush, _ in batch))
            except Exception as exc:  # the transaction failed (a full disk): none of them is stored
                results = [exc] * len(batch)
            commit = self._box.commits
            for (_, _, _, future), result in zip(batch, results, strict=True):
                if future.done():  # the request was cancelled (the till hung up); its sale is stored
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result((result, commit))
