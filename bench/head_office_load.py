"""A till's latency while the agent signs head-office batches beside it.

    .venv/bin/python bench/head_office_load.py [--sales N] [--batch B]

In one process, as in the agent: a till stores a sale every 3 ms (Outbox.accept on a real SQLite
file, then three turns of the event loop, as a request takes), timed from the start of the store to
the end of the last turn. Beside it, head office's batches of B transactions are signed over and
over, in one of three ways:

- none: no head-office work (the floor);
- the agent's: `agent.sync.lane.signed_transactions`, one transaction at a time on the event loop
  with a pause after each;
- in a thread: the whole submission signed by `sign_submission` in `asyncio.to_thread`, as the agent
  did before. The event loop lets go of the GIL at every SQLite call and socket write, and each time
  waits up to the switch interval (5 ms) to get it back from the signing thread.

The checksums are the same in every case (tests/test_sync_checksum.py). No target is given; the
rows show what the signing costs a till. Exit code 1 if the run itself went wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from common import Row, make_sales, ms, percentile, standalone

from agent.intake import IntakeRules, accept, prepare
from agent.jsonwire import wire_json
from agent.queue.outbox import Outbox
from agent.sales import DEFAULT_TAX_RATES
from agent.sync.checksum import sign_submission
from agent.sync.lane import signed_transactions
from agent.sync.transaction import Terminal, tsms_transaction

RULES = IntakeRules(tax_rates=DEFAULT_TAX_RATES)
MODES = ("none", "the agent's", "in a thread")


def transaction_texts(count: int) -> list[str]:
    new = prepare(make_sales("H", 1, 1)[0], RULES)
    sale, amounts = json.loads(new.sale_json), json.loads(new.amounts_json)
    terminal = Terminal("BENCH-HW-1", "BENCH")
    return [wire_json(tsms_transaction(sale, amounts, n, str(uuid.uuid4()), terminal)) for n in range(count)]


async def till_latencies(mode: str, outbox: Outbox, sales: list[dict[str, object]], texts: list[str]) -> list[float]:
    done = False

    async def head_office() -> None:
        while not done:
            if mode == "the agent's":
                await signed_transactions(texts, "v2.1")
            elif mode == "in a thread":
                envelope = {"submission_uuid": str(uuid.uuid4()), "transaction_count": len(texts),
                            "transactions": [json.loads(t, parse_float=Decimal) for t in texts]}
                await asyncio.to_thread(sign_submission, envelope)
            await asyncio.sleep(0.05)  # the next batch: HEAD's answer, the rate limit

    worker = asyncio.create_task(head_office())
    times = []
    try:
        for sale in sales:
            started = time.perf_counter()
            accept(outbox, sale, RULES, datetime.now(UTC))
            for _ in range(3):
                await asyncio.sleep(0)
            times.append(time.perf_counter() - started)
            await asyncio.sleep(0.003)
    finally:
        done = True
        await worker
    return times


def measure(argv: Sequence[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sales", type=int, default=1000, help="sales the till stores in each mode")
    p.add_argument("--batch", type=int, default=50, help="transactions in a head-office batch")
    args = p.parse_args(argv)
    texts = transaction_texts(args.batch)
    rows = []
    with tempfile.TemporaryDirectory(prefix="etims-head-office-") as folder:
        for number, mode in enumerate(MODES):
            outbox = Outbox.open(Path(folder) / f"{number}.sqlite3")
            try:
                sales = make_sales(f"T{number}-", args.sales, 1)
                times = asyncio.run(till_latencies(mode, outbox, sales, texts))
            finally:
                outbox.close()
            rows.append(Row(f"till latency, head-office signing {mode}, p50 / p99 / max",
                            f"{ms(percentile(times, 0.5))} / {ms(percentile(times, 0.99))} / {ms(max(times))}"))
    return rows


if __name__ == "__main__":
    sys.exit(standalone(measure))
