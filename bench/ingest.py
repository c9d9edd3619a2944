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
not initialised, so no signing lane runs): every sale is answered with a temporary receipt and the
table measures intake alone. bench/drain.py measures signing. The load generator writes pre-built
requests on raw asyncio streams (uvloop when installed) and reads only the status line and
Content-Length, so it needs little CPU next to the agent; the table shows both processes' CPU per
sale to prove it. Exit code 0 even when a target is missed (the table says FAIL); 1 if the run
itself went wrong (an answer other than 201, a dead agent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import math
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: measure this tree's agent, not another

import httpx  # noqa: E402
from sqlite_utils import Database  # noqa: E402

from agent.intake import IntakeRules, prepare  # noqa: E402
from agent.queue.journal import GENESIS, entry_hash  # noqa: E402
from agent.queue.outbox import Outbox, timestamp  # noqa: E402
from agent.queue.schema import migrations  # noqa: E402
from agent.sales import DEFAULT_TAX_RATES  # noqa: E402

TARGET_SALES_PER_S = 1000.0
TARGET_CLIENTS = 8
TARGET_P99_MS = 20.0
TARGET_RATE = 100.0
LISTENING = re.compile(r"\bevent=listening url=http://([^:/\s]+):(\d+)")
RULES = IntakeRules(tax_rates=DEFAULT_TAX_RATES)

SALE: dict[str, Any] = {  # the shape of tests/conftest.py's BASE_SALE, as a till posts it
    "sale_id": "R-0001",
    "till_id": "TILL-1",
    "issued_at": "2026-11-21T14:05:00+03:00",
    "payment": "mobile_money",
    "lines": [
        {"item_code": "KE2NTU0000001", "item_class": "5059690800", "name": "Bread 400g",
         "qty": "2", "unit_price": "58.00", "tax_band": "B", "qty_unit": "U", "pkg_unit": "NT"},
        {"item_code": "KE2NTKG0000002", "item_class": "5010150000", "name": "Sukuma wiki",
         "qty": "1.5", "unit_price": "40.00", "discount": "5.00", "tax_band": "A",
         "qty_unit": "KG", "pkg_unit": "NT"},
    ],
}


def make_sales(prefix: str, n: int, tills: int) -> list[dict[str, Any]]:
    sales = []
    for i in range(n):
        sale = copy.deepcopy(SALE)
        sale["sale_id"] = f"{prefix}-{i}"
        sale["till_id"] = f"TILL-{i % tills + 1}"
        sale["lines"][0]["qty"] = str(1 + i % 9)
        sales.append(sale)
    return sales


def http_request(host: str, sale: dict[str, Any]) -> bytes:
    body = json.dumps(sale, separators=(",", ":")).encode()
    return (f"POST /v1/sales HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# --- the agent process ---------------------------------------------------------------------


# No signing lane: the device is never initialised against this (closed) address.
INTAKE_ONLY = '[kra]\nbase_url = "http://127.0.0.1:9/etims-api"\n'


class AgentProcess:
    """`python -m agent run` in `folder`; stderr goes to a file (a full pipe would block it).

    `settings` is TOML appended to the config (tables other than [http] and [log])."""

    def __init__(self, folder: Path, settings: str = INTAKE_ONLY) -> None:
        self.config = config = folder / "agent.toml"
        config.write_text('data_dir = "data"\n[http]\nhost = "127.0.0.1"\nport = 0\n'
                          '[log]\nlevel = "info"\nformat = "logfmt"\n' + settings, encoding="utf-8")
        self.log_path = folder / "agent.log"
        self.outbox = folder / "data" / "outbox.sqlite3"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETIMS_AGENT_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(config)], env=env,
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.host, self.port = self._wait_listening(30.0)
        except BaseException:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise

    def _wait_listening(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                return match.group(1), int(match.group(2))
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise TimeoutError(f"the agent was not listening after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def cpu_seconds(self) -> float | None:
        """User + system CPU the agent has used so far (Linux /proc only)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


class SimulatorProcess:
    """`python -m agent simulate kra|tsms` on ephemeral ports, with its control API at hand."""

    def __init__(self, folder: Path, kind: str, *extra: str) -> None:
        ready = re.compile(rf"{kind.upper()} simulator: (\S+) \(control (\S+)\)")
        self.log_path = folder / f"{kind}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "simulate", kind, "--port", "0", "--control-port", "0", *extra],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (match := ready.search(self.log_path.read_text(errors="replace"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {kind} simulator did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        self.api_url, self.control_url = match.group(1), match.group(2)

    def faults(self, **faults: Any) -> None:
        httpx.post(f"{self.control_url}/_sim/faults", json=faults, timeout=10).raise_for_status()

    def state(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.control_url}/_sim/state", timeout=60).json()
        return body

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def in_temp_dir(prefix: str, where: Path | None, body: Callable[[Path], int]) -> int:
    """Run a benchmark in a fresh directory, removed afterwards whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    try:
        return body(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- the load generator --------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; reads only what it needs of each answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if match is None:
            raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
        return status, await self.reader.readexactly(int(match.group(1)))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Run:
    latencies: list[float]  # seconds, in completion order
    seconds: float
    errors: list[str]
    temporary: int  # answers checked to carry a temporary receipt
    checked: int
    late: list[float] = field(default_factory=list)  # open loop: sent after the scheduled time

    def check(self, status: int, body: bytes, every: int) -> None:
        if status != 201:
            self.errors.append(f"{status} {body[:200]!r}")
        elif len(self.latencies) % every == 0:  # parse a sample only: JSON costs client CPU
            self.checked += 1
            self.temporary += json.loads(body)["receipt"]["kind"] == "temporary"


async def closed_loop(host: str, port: int, requests: Sequence[bytes], clients: int) -> Run:
    """`clients` connections, each sending its next request as soon as its answer is in."""
    conns = [await Connection.open(host, port) for _ in range(clients)]
    run = Run([], 0.0, [], 0, 0)
    todo = iter(requests)

    async def client(conn: Connection) -> None:
        for request in todo:  # one shared iterator: each request is sent once
            start = time.perf_counter()
            status, body = await conn.post(request)
            run.latencies.append(time.perf_counter() - start)
            run.check(status, body, 100)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in conns))
        run.seconds = time.perf_counter() - start
    finally:
        for conn in conns:
            await conn.close()
    return run


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


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # Windows: the standard loop
        return None
    return uvloop.new_event_loop


def run_async(main: Callable[[], Coroutine[Any, Any, Run]]) -> Run:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main())


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
               (i, at, "accepted", i, detail, prev, digest))
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
            conn.execute("INSERT INTO journal (seq, at, event, sale_ref, detail, prev_hash, hash) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", journal_row)
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


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    header = ("metric", "measured", "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "-+-".join("-" * w for w in widths)
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def machine_facts(folder: Path) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"machine: {os.cpu_count()} CPUs (usable: {affinity or '?'}), {platform.platform()}")
    loop = "uvloop" if loop_factory() else "asyncio"
    print(f"python {platform.python_version()} ({sys.executable}), "
          f"SQLite {sqlite3.sqlite_version}, event loop: {loop}")
    print(f"data on: {folder}")


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="etims-bench-", dir=args.dir)
    folder = Path(tmp)
    try:
        return bench(args, folder)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def bench(args: argparse.Namespace, folder: Path) -> int:
    machine_facts(folder)
    warm = make_sales("W", args.warmup, args.clients)
    sales = make_sales("T", args.sales, args.clients)
    paced = make_sales("L", max(1, round(args.rate * args.duration)), args.clients)

    agent = AgentProcess(folder)
    try:
        print(f"agent pid {agent.proc.pid} on http://{agent.host}:{agent.port}; intake only (no KRA "
              "lane), so every sale gets a temporary receipt")
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
        print(f"phase 1: {len(sales)} sales, {args.clients} clients, {load.seconds:.2f} s")

        paced_requests = [http_request(host, s) for s in paced]
        latency = run_async(lambda: open_loop(agent.host, agent.port, paced_requests, args.rate,
                                              args.clients))
        print(f"phase 2: {len(paced)} sales at {args.rate:g}/s, {latency.seconds:.2f} s")
    finally:
        code = agent.stop()
    conn = sqlite3.connect(f"file:{agent.outbox}?mode=ro", uri=True)
    try:
        stored = conn.execute("SELECT COUNT(*) FROM sales").fetchone()[0]
    finally:
        conn.close()

    bare = bare_inserts(folder / "bare.sqlite3", sales)
    accepts = outbox_accepts(folder / "inprocess.sqlite3", sales)
    checks = validations(sales)
    print(f"phase 3: {len(sales)} bare durable inserts, then Outbox.accept in-process")
    print()

    throughput = len(sales) / load.seconds
    p99_paced = percentile(latency.latencies, 0.99)
    errors = load.errors + latency.errors
    expected = len(warm) + len(sales) + len(paced)
    temporary = load.temporary + latency.temporary
    checked = load.checked + latency.checked
    at_target_clients = args.clients == TARGET_CLIENTS
    at_target_rate = args.rate == TARGET_RATE
    rows = [
        (f"throughput, {args.clients} clients", f"{throughput:.0f} sales/s",
         f">= {TARGET_SALES_PER_S:.0f}" if at_target_clients else "(for 8 clients)",
         verdict(throughput >= TARGET_SALES_PER_S if at_target_clients else None)),
        (f"latency p50 / p99 / max, {args.clients} clients",
         f"{ms(percentile(load.latencies, 0.5))} / {ms(percentile(load.latencies, 0.99))} / "
         f"{ms(max(load.latencies))}", "", ""),
        (f"p50 at {args.rate:g} sales/s (open loop)", ms(percentile(latency.latencies, 0.5)), "",
         ""),
        (f"p99 at {args.rate:g} sales/s (open loop)", ms(p99_paced),
         f"< {TARGET_P99_MS:.0f} ms" if at_target_rate else "(at 100 sales/s)",
         verdict(p99_paced < TARGET_P99_MS if at_target_rate else None)),
        ("  of which the load generator sent late, p99", ms(percentile(latency.late, 0.99)), "",
         ""),
        ("bare SQLite durable inserts, 1 txn per sale", f"{bare:.0f} rows/s", "(limit)", ""),
        ("agent / bare", f"{throughput / bare:.2f}", "", ""),
        ("Outbox.accept in-process, no HTTP", f"{accepts:.0f} sales/s", "", ""),
        ("validation alone (intake.prepare)", f"{checks:.0f} sales/s", "", ""),
    ]
    if cpu_agent is not None:
        rows.append(("agent CPU per sale (phase 1)", f"{cpu_agent / len(sales) * 1e6:.0f} us",
                     "", ""))
    rows += [
        ("load generator CPU per sale (phase 1)", f"{cpu_self / len(sales) * 1e6:.0f} us", "", ""),
        ("answers 201, stored once", f"{expected - len(errors)}/{expected} ({stored} stored)",
         "all", verdict(not errors and stored == expected)),
        ("temporary receipts (sampled)", f"{temporary}/{checked}", "all",
         verdict(temporary == checked)),
        ("agent stopped by SIGTERM", f"exit {code}", "exit 0", verdict(code == 0)),
    ]
    print_table(rows)
    for error in errors[:5]:
        print(f"error: {error}")
    broken = bool(errors) or stored != expected or temporary != checked or code != 0
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
