"""Head-office sync benchmark: a backlog of sales synced to the TSMS simulator with its rate limit on.

    .venv/bin/python bench/sync.py [--sales N] [--batch B] [--limit L] [--window S]

Starts `python -m agent simulate tsms` (fairness limit L submissions per S seconds per terminal,
the real server's 50 per 60 s by default) and the agent (intake and TSMS lane only), queues N
sales while the server is down, brings it back, and measures the time until the agent has every
sale synced. The lower bound the limit allows: N sales need ceil(N / B) submissions, which need
ceil(submissions / L) windows, so at least (windows - 1) x S seconds; the target is to lose no
window to slowness or a late retry, so less than that bound + S. Also printed: the 429s the
agent received (it must wait for Retry-After, not hammer) and whether head office holds every sale
exactly once. Exit code 0 even when a target is missed (the table says MISS); 1 if the run failed.
bench/all.py calls `measure(argv)`.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common import (
    NO_KRA,
    AgentProcess,
    Row,
    SimulatorProcess,
    in_temp_dir,
    make_sales,
    post_all,
    say,
    standalone,
    verdict,
)


def synced(outbox: Path) -> int:
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=10)
    try:
        count: int = conn.execute("SELECT count(*) FROM sales WHERE tsms_state = 'synced'").fetchone()[0]
    finally:
        conn.close()
    return count


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sales", type=int, default=10_000, help="backlog size")
    p.add_argument("--batch", type=int, default=50, help="tsms.batch_size (the agent's default: 50)")
    p.add_argument("--limit", type=int, default=50, help="submissions per window per terminal (server: 50)")
    p.add_argument("--window", type=float, default=60.0, help="the limit's window in seconds (server: 60)")
    p.add_argument("--dir", type=Path, default=None, help="where the temporary data directory goes")
    args = p.parse_args(argv)
    if min(args.sales, args.batch, args.limit) < 1 or args.window <= 0 or args.batch > 500:
        p.error("--sales, --batch, --limit must be positive, --batch at most 500, --window positive")
    return args


def measure(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark with these command-line options and return its rows."""
    args = parse_args(argv)
    return in_temp_dir("etims-sync-", args.dir, lambda folder: bench(args, folder))


def bench(args: argparse.Namespace, folder: Path) -> list[Row]:
    tsms = SimulatorProcess(folder, "tsms", "--rate-limit", str(args.limit), "--rate-window", str(args.window))
    agent = None
    try:
        settings = (NO_KRA + f'[tsms]\nbase_url = "{tsms.api_url}"\napi_key = "sim-api-key-0001"\n'
                    f'batch_size = {args.batch}\nsync_interval_s = 1.0\n')
        tsms.faults(outage=True)
        agent = AgentProcess(folder, settings)
        load = post_all(agent, make_sales("Y", args.sales, 8), 8)
        if load.errors:
            raise RuntimeError(f"intake failed: {load.errors[:3]}")
        say(f"sync phase 1: {args.sales} sales queued while head office was down")
        started = time.monotonic()
        tsms.faults(outage=False)
        while (done := synced(agent.outbox)) < args.sales:
            time.sleep(0.2)
            if time.monotonic() - started > 3600:
                raise RuntimeError(f"only {done} of {args.sales} synced after an hour")
        seconds = time.monotonic() - started
        say(f"sync phase 2: all {args.sales} synced")
        state = tsms.state()
    finally:
        code = agent.stop() if agent is not None else None
        tsms.stop()
    submissions = math.ceil(args.sales / args.batch)
    bound = (math.ceil(submissions / args.limit) - 1) * args.window
    held = state["transactions"]
    once = len(held) == args.sales and all(t["times_received"] == 1 for t in held.values()) \
        and not state["duplicates"] and not state["conflicts"]
    return [
        Row(f"TSMS sync time, {args.sales} sales, batches of {args.batch}", f"{seconds:.1f} s",
            f"bound {bound:.0f} s ({submissions} submissions, {args.limit} per {args.window:g} s); "
            f"no window lost: < {bound + args.window:.0f} s", verdict(seconds < bound + args.window)),
        Row("  time beyond the bound", f"{seconds - bound:.1f} s"),
        Row("  429 answers received", str(state["rate_limited"]), "one per window at most",
            verdict(state["rate_limited"] <= math.ceil(submissions / args.limit))),
        Row("TSMS: held at head office once each, no 409", f"{len(held)}, {'yes' if once else 'NO'}",
            f"{args.sales}, yes", verdict(once), check=True),
        Row("TSMS: agent stopped by SIGTERM", f"exit {code}", "exit 0", verdict(code == 0), check=True),
    ]


if __name__ == "__main__":
    sys.exit(standalone(measure))
