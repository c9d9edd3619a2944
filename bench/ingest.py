"""Durable intake benchmark: the real agent over loopback against bare SQLite on the same disk.

    .venv/bin/python bench/ingest.py [--sales N] [--clients C] [--rate R] [--duration S]

Starts `python -m agent run` on a temporary data directory (ephemeral port) and measures:

1. throughput: N sales posted by C concurrent clients, each one keep-alive HTTP/1.1 connection
   sending its next sale as soon as the previous answer is in (closed loop);
2. latency at a fixed rate: R sales/s for S seconds on an open-loop schedule (up to C connections),
   each latency measured from the scheduled send time, so a stall counts against every sale
   scheduled during it instead of quietly lowering the rate;
3. the limit: the same rows inserted into a fresh SQLite file (the agent's schema, WAL,
   synchronous=FULL) in the same directory, one transaction per sale, and the ratio between the two.
   Two rows show where the time in between goes: the agent's Outbox.accept called in-process (no
   HTTP) and the validation alone (intake.prepare).

KRA is out of the picture by construction (kra.base_url points at a closed port and the device is
not initialised, so no signing lane runs), and so is head office (tsms.environment = "off"; by
default the agent would sync every sale to a TSMS simulator running in its own process): every sale
is answered with a temporary receipt and the table measures intake alone. bench/drain.py measures
signing, bench/memory.py the whole path with both lanes. The load generator writes pre-built
requests on raw asyncio streams (uvloop when installed) and reads only the status line and
Content-Length, so it needs little CPU next to the agent; the table shows both processes' CPU per
sale to prove it. Exit code 0 even when a target is missed (the table says MISS); 1 if the run
itself went wrong (an answer other than 201, a dead agent). bench/all.py calls `measure(argv)`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    AgentProcess,
    Connection,
    Row,
    Run,
    closed_loop,
    http_request,
    in_temp_dir,
    make_sales,
    ms,
    percentile,
    run_async,
    say,
    standalone,
    verdict,
)
from sqlite_utils import Database

from agent.intake import IntakeRules, prepare
from agent.queue.journal import GENESIS, entry_hash
from agent.queue.outbox import Outbox, timestamp
from agent.queue.schema import migrations
from agent.sales import DEFAULT_TAX_RATES

TARGET_SALES_PER_S = 1000.0
TARGET_CLIENTS = 8
TARGET_P99_MS = 20.0
TARGET_RATE = 100.0
RULES = IntakeRules(tax_rates=DEFAULT_TAX_RATES)


# --- the load generator's open loop (closed_loop is in common.py) --------------------------


async def open_loop(host: str, port: int, requests: Sequence[bytes], rate: float,
                    connections: int) -> Run:
    """Send request i at start + i/rate whatever happened before; latency from that moment."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    conns = [await Connection.open(host, port) for _ in range(connections)]
    for conn in conns:
        pool.put_nowait(conn)
    run = Run([], 0.0, [], 0, 0)
    # perf_counter, not loop.time(): uvloop's clock is cached per loop iteration in whole ms.
    # Timer wake-ups run late by up to ~1 ms; that lateness counts as latency (errs high).

    async def send(request: bytes, due: float) -> None:
        conn = await pool.get()  # waiting for a free connection counts as latency
        run.late.append(time.perf_counter() - due)
        try:
            status, body = await conn.post(request)
        finally:
            pool.put_nowait(conn)
        run.latencies.append(time.perf_counter() - due)
        run.check(status, body, 10)

    tasks = []
    start = time.perf_counter() + 0.05
    try:
        for i, request in enumerate(requests):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(send(request, due)))
        await asyncio.gather(*tasks)
        run.seconds = time.perf_counter() - start
    finally:
        for conn in conns:
            await conn.close()
    return run


# --- bare SQLite: the limit ----------------------------------------------------------------


def bare_rows(sales: Sequence[dict[str, Any]], now: datetime) -> Iterator[tuple[tuple[Any, ...],
                                                                              tuple[Any, ...]]]:
    """The sales and journal rows the agent would store for these sales, precomputed."""
    prev, at = GENESIS, timestamp(now)
    for i, sale in enumerate(sales, start=1):
        new = prepare(sale, RULES)
        detail = json.dumps({"till_id": new.till_id, "sale_id": new.sale_id,
                             "content_hash": new.content_hash, "receipt_no": i,
                             "total": str(new.total)}, sort_keys=True, separators=(",", ":"))
        digest = entry_hash(prev, i, at, "accepted", i, detail)
        yield ((new.till_id, new.sale_id, new.content_hash, new.sale_json, new.amounts_json,
                str(new.total), i, at),
               (i, at, "accepted", i, detail, digest))
        prev = digest


def bare_inserts(path: Path, sales: Sequence[dict[str, Any]]) -> float:
    """Rows/s of one durable transaction per sale (sale row + journal row), nothing else."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        migrations.apply(Database(conn))
        rows = list(bare_rows(sales, datetime.now(UTC)))
        start = time.perf_counter()
        for sale_row, journal_row in rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO sales (till_id, sale_id, content_hash, sale, amounts, total, "
                         "receipt_no, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", sale_row)
            conn.execute("INSERT INTO journal (seq, at, event, sale_ref, detail, hash) VALUES (?, ?, ?, ?, ?, ?)",
                         journal_row)
            conn.execute("COMMIT")
        return len(rows) / (time.perf_counter() - start)
    finally:
        conn.close()


def outbox_accepts(path: Path, sales: Sequence[dict[str, Any]]) -> float:
    """Sales/s of the agent's own validation + Outbox.accept in one thread, no HTTP."""
    outbox = Outbox.open(path)
    try:
        start = time.perf_counter()
        for sale in sales:
            outbox.accept(prepare(sale, RULES), datetime.now(UTC))
        return len(sales) / (time.perf_counter() - start)
    finally:
        outbox.close()


def validations(sales: Sequence[dict[str, Any]]) -> float:
    start = time.perf_counter()
    for sale in sales:
        prepare(sale, RULES)
    return len(sales) / (time.perf_counter() - start)


# --- report --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sales", type=int, default=5000, help="sales in the throughput phase")
    p.add_argument("--clients", type=int, default=TARGET_CLIENTS, help="concurrent connections")
    p.add_argument("--rate", type=float, default=TARGET_RATE, help="sales/s in the latency phase")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of the latency phase")
    p.add_argument("--warmup", type=int, default=200, help="sales sent first and not measured")
    p.add_argument("--dir", type=Path, default=None,
                   help="where the temporary data directory goes (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the data directory afterwards")
    args = p.parse_args(argv)
    if min(args.sales, args.clients, args.rate, args.duration) <= 0 or args.warmup < 0:
        p.error("--sales, --clients, --rate and --duration must be positive")
    return args


def measure(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark with these command-line options and return its rows."""
    args = parse_args(argv)
    return in_temp_dir("etims-bench-", args.dir, lambda folder: bench(args, folder), keep=args.keep)


@dataclass
class Phases:
    warm: list[dict[str, Any]]
    sales: list[dict[str, Any]]
    paced: list[dict[str, Any]]
    load: Run
    latency: Run
    cpu_agent: float | None
    cpu_self: float
    code: int
    stored: int


def run_agent(args: argparse.Namespace, folder: Path) -> Phases:
    """Phases 1 and 2 against the agent process: closed-loop throughput, then open-loop latency."""
    warm = make_sales("W", args.warmup, args.clients)
    sales = make_sales("T", args.sales, args.clients)
    paced = make_sales("L", max(1, round(args.rate * args.duration)), args.clients)
    agent = AgentProcess(folder)
    try:
        say(f"ingest: agent pid {agent.proc.pid} on {agent.url}; intake only (no KRA lane), so every "
            "sale gets a temporary receipt")
        host = f"{agent.host}:{agent.port}"
        if warm:
            run_async(lambda: closed_loop(agent.host, agent.port,
                                          [http_request(host, s) for s in warm], args.clients))
        requests = [http_request(host, s) for s in sales]
        cpu_agent, cpu_self = agent.cpu_seconds(), time.process_time()
        load = run_async(lambda: closed_loop(agent.host, agent.port, requests, args.clients))
        cpu_self = time.process_time() - cpu_self
        after = agent.cpu_seconds()
        cpu_agent = None if cpu_agent is None or after is None else after - cpu_agent
        say(f"ingest phase 1: {len(sales)} sales, {args.clients} clients, {load.seconds:.2f} s")
        paced_requests = [http_request(host, s) for s in paced]
        latency = run_async(lambda: open_loop(agent.host, agent.port, paced_requests, args.rate,
                                              args.clients))
        say(f"ingest phase 2: {len(paced)} sales at {args.rate:g}/s, {latency.seconds:.2f} s")
    finally:
        code = agent.stop()
    conn = sqlite3.connect(f"file:{agent.outbox}?mode=ro", uri=True)
    try:
        stored = conn.execute("SELECT COUNT(*) FROM sales").fetchone()[0]
    finally:
        conn.close()
    return Phases(warm, sales, paced, load, latency, cpu_agent, cpu_self, code, stored)


def bench(args: argparse.Namespace, folder: Path) -> list[Row]:
    run = run_agent(args, folder)
    sales, load, latency = run.sales, run.load, run.latency
    bare = bare_inserts(folder / "bare.sqlite3", sales)
    accepts = outbox_accepts(folder / "inprocess.sqlite3", sales)
    checks = validations(sales)
    say(f"ingest phase 3: {len(sales)} bare durable inserts, then Outbox.accept in-process")

    throughput = len(sales) / load.seconds
    p99_paced = percentile(latency.latencies, 0.99)
    errors = load.errors + latency.errors
    expected = len(run.warm) + len(sales) + len(run.paced)
    temporary = load.temporary + latency.temporary
    checked = load.checked + latency.checked
    at_target_clients = args.clients == TARGET_CLIENTS
    at_target_rate = args.rate == TARGET_RATE
    rows = [
        Row(f"intake throughput, {args.clients} clients, {len(sales)} sales", f"{throughput:.0f} sales/s",
            f">= {TARGET_SALES_PER_S:.0f} sales/s" if at_target_clients else "(target at 8 clients)",
            verdict(throughput >= TARGET_SALES_PER_S if at_target_clients else None)),
        Row(f"  latency p50 / p99 / max, {args.clients} clients",
            f"{ms(percentile(load.latencies, 0.5))} / {ms(percentile(load.latencies, 0.99))} / "
            f"{ms(max(load.latencies))}"),
        Row(f"intake latency p50 at {args.rate:g} sales/s (open loop)", ms(percentile(latency.latencies, 0.5))),
        Row(f"intake latency p99 at {args.rate:g} sales/s (open loop)", ms(p99_paced),
            f"< {TARGET_P99_MS:.0f} ms" if at_target_rate else "(target at 100 sales/s)",
            verdict(p99_paced * 1000 < TARGET_P99_MS if at_target_rate else None)),
        Row("  of which the load generator sent late, p99", ms(percentile(latency.late, 0.99))),
        Row("bare SQLite durable inserts, same rows, 1 txn per sale", f"{bare:.0f} sales/s", "the limit"),
        Row("  agent throughput / bare SQLite", f"{throughput / bare:.2f}"),
        Row("  Outbox.accept in-process, no HTTP", f"{accepts:.0f} sales/s"),
        Row("  validation alone (intake.prepare)", f"{checks:.0f} sales/s"),
    ]
    if run.cpu_agent is not None:
        rows.append(Row("  agent CPU per sale (phase 1)", f"{run.cpu_agent / len(sales) * 1e6:.0f} us"))
    rows += [
        Row("  load generator CPU per sale (phase 1)", f"{run.cpu_self / len(sales) * 1e6:.0f} us"),
        Row("intake: answers 201, stored once", f"{expected - len(errors)}/{expected} ({run.stored} stored)",
            "all", verdict(not errors and run.stored == expected), check=True),
        Row("intake: temporary receipts (sampled)", f"{temporary}/{checked}", "all",
            verdict(temporary == checked), check=True),
        Row("intake: agent stopped by SIGTERM", f"exit {run.code}", "exit 0", verdict(run.code == 0), check=True),
    ]
    for error in errors[:5]:
        say(f"ingest error: {error}")
    return rows


if __name__ == "__main__":
    sys.exit(standalone(measure))
