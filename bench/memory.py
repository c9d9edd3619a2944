"""Memory and disk benchmark: the agent's resident size and database over 100,000 sales.

    .venv/bin/python bench/memory.py [--sales N] [--step S] [--clients C] [--slow-shop N]

Starts a KRA simulator and a TSMS simulator as processes of their own (so their growing state is
not counted in the agent's memory), initialises the agent against them (`etims-agent init`, keys in
the file secret store) and posts N sales from C keep-alive connections, S at a time, with both lanes
working as in a shop: each sale is signed by KRA before it is answered (the simulator adds no
latency) and synced to head office in batches (the simulator's rate limit lifted, or N sales would
take hours). After every S sales it reads the agent's VmRSS from /proc/PID/status, and times
`GET /v1/status` and `GET /metrics`, which count the outbox.

Reported: the RSS after N sales and its growth from the first sample (10,000 sales by default) to
N. The design gives no memory limit; the limit taken here is growth under 20 % from 10,000 to
100,000 sales: a leak-free agent holds a bounded working set (SQLite's page cache is bounded per
connection), so 90,000 more sales must not add more than noise, while a leak of a few hundred
bytes per sale shows plainly (200 B x 90,000 = 17 MiB). Then, once every sale is signed and
synced, the agent is stopped (SQLite checkpoints and removes the WAL) and the database is measured:
bytes per sale and per table (dbstat). The agent is then restarted on the full outbox and timed
to its first accepted sale (bench/startup.py times an almost empty one), beside the time of the
`PRAGMA quick_check` the agent runs on the outbox when it opens it. Last, the retention job runs on
a copy of the outbox as if 31 days had passed (keep_days = 30): every sale must go, `verify` must
pass, and the table gives the bytes each pruned sale still holds (its journal entries and
tombstone) and the pages freed, which SQLite reuses for new sales before the file grows.

The same database measure is then taken for a slow shop (`--slow-shop` sales, 5,000 by default): a
shop selling a sale every few seconds sends each sale to head office alone (the lane waits
`coalesce_s`, 2 s, for more), so each sale carries a whole submission's row and journal entry. The
agent is run with `tsms.batch_size = 1`, which gives the same database without the wait. The field
notes' sizing (2,000 sales a day) is such a shop, so this row is judged against it too.

Exit code 1 if the run itself went wrong. bench/all.py calls `measure(argv)`.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from common import (
    AgentProcess,
    Row,
    SimulatorProcess,
    in_temp_dir,
    initialise,
    lane_settings,
    make_sales,
    mib,
    ms,
    post_all,
    rss_bytes,
    say,
    standalone,
    verdict,
    write_config,
)
from startup import first_sale

from agent.queue.outbox import Outbox
from agent.queue.retention import Retention

GROWTH_LIMIT = 0.20
# docs field notes, storage sizing: 60-200 MB for a 30-day reserve at 2,000 sales a day.
SIZING_BYTES_PER_SALE = 200e6 / (30 * 2000)
# The TSMS simulator's rate limit (50 submissions per 60 s per terminal) lifted.
NO_RATE_LIMIT = ("--rate-limit", "1000000", "--rate-window", "1")


@dataclass(frozen=True)
class Sample:
    sales: int
    rss: int
    seconds: float  # to post this step's sales
    status_s: float  # GET /v1/status answer time
    metrics_s: float  # GET /metrics answer time


def timed_get(http: httpx.Client, path: str) -> float:
    started = time.perf_counter()
    http.get(path).raise_for_status()
    return time.perf_counter() - started


def backlog(outbox: Path) -> tuple[int, int]:
    """(sales not yet signed, sales not yet synced); parked or rejected ones never settle."""
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=30)
    try:  # each WHERE term verbatim that of a partial index (schema.py), so no table scan
        kra = conn.execute("SELECT count(*) FROM sales WHERE kra_state != 'signed'").fetchone()[0]
        tsms = conn.execute("SELECT count(*) FROM sales WHERE tsms_state != 'synced'").fetchone()[0]
        return int(kra), int(tsms)
    finally:
        conn.close()


def wait_settled(outbox: Path, timeout: float) -> float:
    """Wait until every sale is signed and synced; returns the seconds waited."""
    started = time.monotonic()
    while any(left := backlog(outbox)):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{left[0]} sales unsigned, {left[1]} unsynced after {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def load(agent: AgentProcess, args: argparse.Namespace) -> list[Sample]:
    """Post the sales step by step, sampling the agent after each step."""
    samples: list[Sample] = []
    with httpx.Client(base_url=agent.url, timeout=120) as http:
        for start in range(0, args.sales, args.step):
            n = min(args.step, args.sales - start)
            run = post_all(agent, make_sales("M", n, args.clients, start), args.clients)
            if run.errors:
                raise RuntimeError(f"sales refused: {run.errors[:3]}")
            samples.append(Sample(start + n, rss_bytes(agent.proc.pid), run.seconds,
                                  timed_get(http, "/v1/status"), timed_get(http, "/metrics")))
            say(f"memory: {start + n} sales, {n / run.seconds:.0f} sales/s, RSS {mib(samples[-1].rss)}, "
                f"temporary receipts {run.temporary} of {run.checked} sampled")
    return samples


# --- the database --------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    file_bytes: int  # outbox file + WAL (none after a clean stop)
    sales: int
    by_table: dict[str, int]  # bytes per table, its indexes included (dbstat)
    columns: dict[str, float]  # mean stored length of the sales row's payload columns
    submission_body: float  # TSMS submission bodies, bytes per sale
    quick_check_s: float  # PRAGMA quick_check, which the agent runs on the outbox at every start
    unsent: int  # rows of the outgoing table (texts kept until KRA or head office has them)


PAYLOAD_COLUMNS = ("sale", "amounts", "kra_signature")


def measure_disk(outbox: Path) -> Disk:
    size = outbox.stat().st_size
    wal = outbox.with_name(outbox.name + "-wal")
    size += wal.stat().st_size if wal.exists() else 0
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        sales = conn.execute("SELECT count(*) FROM sales").fetchone()[0]
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_schema WHERE type IN ('table', 'index')"))
        by_table: dict[str, int] = {}
        for name, pages in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            by_table[table] = by_table.get(table, 0) + pages
        means = ", ".join(f"avg(length({c}))" for c in PAYLOAD_COLUMNS)
        columns = dict(zip(PAYLOAD_COLUMNS, conn.execute(f"SELECT {means} FROM sales").fetchone(), strict=True))
        body = conn.execute("SELECT coalesce(sum(length(body)), 0) FROM tsms_submissions").fetchone()[0]
        # Texts still to send (KRA requests, head-office transactions): none once all is signed and synced.
        unsent = conn.execute("SELECT count(*) FROM outgoing").fetchone()[0]
        started = time.perf_counter()
        conn.execute("PRAGMA quick_check").fetchall()
        check_s = time.perf_counter() - started
    finally:
        conn.close()
    return Disk(size, sales, by_table, {k: v or 0.0 for k, v in columns.items()}, body / max(1, sales), check_s,
                unsent)


def slow_shop(folder: Path, sales: int) -> list[Row]:
    """Bytes per sale when every sale reaches head office in a submission of its own."""
    kra = SimulatorProcess(folder, "kra")
    tsms = SimulatorProcess(folder, "tsms", *NO_RATE_LIMIT)
    try:
        initialise(write_config(folder, lane_settings(kra, tsms, tsms_extra="batch_size = 1\n")))
        agent = AgentProcess(folder, settings=None)
        try:
            run = post_all(agent, make_sales("S", sales, 1), 1)
            if run.errors:
                raise RuntimeError(f"sales refused: {run.errors[:3]}")
            wait_settled(agent.outbox, timeout=600)
        finally:
            code = agent.stop()
        disk = measure_disk(agent.outbox)
        submissions = submission_count(agent.outbox)
    finally:
        tsms.stop()
        kra.stop()
    return [*disk_rows(disk, f"in {submissions} submissions of one (a slow shop)"),
            Row("slow shop: agent stopped by SIGTERM", f"exit {code}", "exit 0", verdict(code == 0), check=True)]


def submission_count(outbox: Path) -> int:
    """Submissions head office accepted (their rows are not kept; each leaves a journal entry)."""
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM journal WHERE event = 'tsms_synced'").fetchone()[0])
    finally:
        conn.close()


def disk_rows(disk: Disk, what: str = "signed + synced, after checkpoint") -> list[Row]:
    n = disk.sales
    per_sale = disk.file_bytes / n
    tables = sorted(disk.by_table.items(), key=lambda kv: -kv[1])
    major = [(t, b) for t, b in tables if b / n >= 5]
    minor = [b for _, b in tables if b / n < 5]
    columns = ", ".join(f"{c} {v:.0f}" for c, v in disk.columns.items())
    return [
        Row(f"database bytes per sale, {n} sales {what}",
            f"{per_sale:,.0f} B ({mib(disk.file_bytes)} in all)",
            f"<= {SIZING_BYTES_PER_SALE:,.0f} B (field notes: 200 MB per 30 days x 2,000 sales)",
            verdict(per_sale <= SIZING_BYTES_PER_SALE)),
        Row("  per table, indexes included, B/sale", ", ".join(
            [*(f"{t} {b / n:,.0f}" for t, b in major), f"the other {len(minor)} {sum(minor) / n:.0f}",
             # pages once used by texts sent and deleted since; SQLite reuses them before growing the file
             f"free pages {(disk.file_bytes - sum(disk.by_table.values())) / n:,.0f}"])),
        Row("  sales row payload, mean chars", f"{columns}; TSMS submission body {disk.submission_body:.0f}; "
            f"texts kept to send {disk.unsent}"),
    ]


@dataclass(frozen=True, slots=True)
class Pruned:
    sales: int  # pruned by the run
    seconds: float
    kept_bytes: int  # the file's pages still in use afterwards (journal, tombstones, the rest)
    free_bytes: int  # pages freed, which SQLite reuses for new sales before the file grows again
    verify_problems: int


def measure_retention(outbox: Path, copy: Path, keep_days: int = 30) -> Pruned:
    """The retention job's run on a copy of the outbox, as if `keep_days` and a day had passed."""
    shutil.copyfile(outbox, copy)
    box = Outbox.open(copy)
    try:
        later = datetime.now(UTC) + timedelta(days=keep_days + 1)
        started = time.perf_counter()
        report = Retention(box, lambda: later, keep_days).prune()
        seconds = time.perf_counter() - started
        problems = len(box.verify())
    finally:
        box.close()  # checkpoints the WAL into the file
    conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        page_size, pages, free = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                                  for p in ("page_size", "page_count", "freelist_count"))
    finally:
        conn.close()
    return Pruned(report.pruned, seconds, (pages - free) * page_size, free * page_size, problems)


def retention_rows(disk: Disk, pruned: Pruned) -> list[Row]:
    before = disk.file_bytes / disk.sales
    kept = pruned.kept_bytes / max(1, pruned.sales)
    return [
        Row("retention (30 days), run as if 31 days had passed: sales pruned, time",
            f"{pruned.sales} of {disk.sales}, {pruned.seconds:.1f} s", f"all {disk.sales}",
            verdict(pruned.sales == disk.sales), check=True),
        Row("  bytes kept per pruned sale (journal, tombstone)", f"{kept:,.0f} B of {before:,.0f} B "
            f"({1 - kept / before:.0%} reclaimed; {mib(pruned.free_bytes)} of free pages reused by new sales)"),
        Row("  verify after pruning: problems", str(pruned.verify_problems), "0",
            verdict(pruned.verify_problems == 0), check=True),
    ]


# --- the run -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sales", type=int, default=100_000, help="sales posted in all")
    p.add_argument("--step", type=int, default=10_000, help="sales between samples (the first sample is the base)")
    p.add_argument("--clients", type=int, default=8, help="concurrent keep-alive connections (and tills)")
    p.add_argument("--dir", type=Path, default=None, help="where the temporary data directory goes")
    p.add_argument("--keep", action="store_true", help="keep the data directory afterwards")
    p.add_argument("--slow-shop", type=int, default=5000,
                   help="sales for the slow shop's database, each sent to head office alone (0: skip)")
    args = p.parse_args(argv)
    if args.step < 1 or args.sales < 2 * args.step or args.clients < 1 or args.slow_shop < 0:
        p.error("--sales must be at least twice --step, both positive; --clients positive; --slow-shop not negative")
    return args


def measure(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark with these command-line options and return its rows."""
    args = parse_args(argv)
    return in_temp_dir("etims-memory-", args.dir, lambda folder: bench(args, folder), keep=args.keep)


def bench(args: argparse.Namespace, folder: Path) -> list[Row]:
    kra = SimulatorProcess(folder, "kra")
    tsms = SimulatorProcess(folder, "tsms", *NO_RATE_LIMIT)
    try:
        initialise(write_config(folder, lane_settings(kra, tsms)))
        agent = AgentProcess(folder, settings=None)
        try:
            idle = rss_bytes(agent.proc.pid)
            say(f"memory: agent pid {agent.proc.pid}, RSS at start {mib(idle)}")
            samples = load(agent, args)
            settle_s = wait_settled(agent.outbox, timeout=600)
            settled = rss_bytes(agent.proc.pid)
        finally:
            code = agent.stop()
        disk = measure_disk(agent.outbox)
        restart = first_sale(folder, agent.command, "RESTART", "agent-restart.log")
        pruned = measure_retention(agent.outbox, folder / "pruned.sqlite3")
    finally:
        tsms.stop()
        kra.stop()
    slow = in_temp_dir("etims-slow-shop-", args.dir, lambda f: slow_shop(f, args.slow_shop)) if args.slow_shop else []
    rows = memory_rows(idle, samples, settle_s, settled, code) + disk_rows(disk) + slow + retention_rows(disk, pruned)
    return [
        *rows,
        Row(f"start-up to first accepted sale on the {disk.sales}-sale outbox (source, no bytecode cache)",
            f"{ms(restart.first_sale_s)} (listening after {ms(restart.listening_s)})", "none in the design"),
        Row("  of which PRAGMA quick_check of the outbox (run at every start)", ms(disk.quick_check_s)),
    ]


def memory_rows(idle: int, samples: Sequence[Sample], settle_s: float, settled: int, code: int) -> list[Row]:
    base, last = samples[0], samples[-1]
    growth = (last.rss - base.rss) / base.rss
    per_sale = (last.rss - base.rss) / (last.sales - base.sales)
    rate = (last.sales - base.sales) / sum(s.seconds for s in samples[1:])
    return [
        Row(f"agent RSS after {last.sales} sales (both lanes on)", mib(last.rss), "none in the design"),
        Row(f"RSS growth {base.sales} -> {last.sales} sales",
            f"{(last.rss - base.rss) / 2**20:+.1f} MiB ({growth:+.1%}, {per_sale:+.0f} B/sale)",
            f"< {GROWTH_LIMIT:.0%} (chosen: no leak)", verdict(growth < GROWTH_LIMIT)),
        Row(f"  RSS at start, then every {base.sales} sales, MiB",
            " ".join(f"{r / 2**20:.0f}" for r in [idle, *(s.rss for s in samples)])),
        Row(f"  RSS once all signed + synced ({settle_s:.0f} s later)", mib(settled)),
        Row("  intake rate, signed online, first / last step",
            f"{base.sales / base.seconds:.0f} / {(last.sales - samples[-2].sales) / last.seconds:.0f} sales/s "
            f"(mean {rate:.0f})"),
        Row(f"  GET /v1/status, GET /metrics at {base.sales} / {last.sales} sales",
            f"{ms(base.status_s)}, {ms(base.metrics_s)} / {ms(last.status_s)}, {ms(last.metrics_s)}"),
        Row("memory: agent stopped by SIGTERM", f"exit {code}", "exit 0", verdict(code == 0), check=True),
    ]


if __name__ == "__main__":
    sys.exit(standalone(measure))
