"""`make chaos`: tills on HTTP and on a serial line post sales while the agent is killed with kill -9
at random moments, cycle after cycle, and both upstream simulators fail in every way they can.

At the end, with everything healthy again, the tills settle what the last kill cut off, the lanes
drain, and the run prints what it did and what it found. It fails (exit 1) unless every invariant
holds: no acknowledged sale lost or changed, none signed twice, no invoice number skipped, every
sale at head office exactly once, no 409, the journal verified.

    python tests/chaos.py --cycles 12            # the short form CI runs (make chaos)
    python tests/chaos.py --cycles 300 --seed 7  # the long form, by hand

Real processes throughout: `simulate kra`, `simulate tsms` and `run`, each its own process; the
serial till talks to the agent through a pty pair. The random choices are seeded (--seed) so a
failing run can be replayed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import sqlite3
import sys
import tempfile
import termios
import threading
import time
import traceback
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_process import AgentProcess, Agents, SimulatorProcess, run_cli
from test_crash import BRANCH, TSMS_API_KEY, Key, Ledger, Load, retry_plan, stored

# (name, faults): one of each is picked per cycle; `{}` is a healthy cycle.
KRA_FAULTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("healthy", {}),
    ("outage", {"outage": True}),
    ("timeout after commit", {"hang_after_commit": {"count": 3, "seconds": 1.5}}),
    ("5xx", {"http_status": {"status": 503, "count": 5}}),
    ("990 (retry later)", {"result_code": {"code": "990", "count": 3, "paths": ["saveTrnsSalesOsdc"]}}),
    ("999 after commit", {"result_code": {"code": "999", "count": 3, "paths": ["saveTrnsSalesOsdc"],
                                          "commit": True}}),
    ("slow", {"latency_ms": 40}),
)
TSMS_FAULTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("healthy", {}),
    ("429 storm", {"rate_limit": 1}),
    ("503", {"unavailable": {"count": 3, "retry_after": 1}}),
    ("5xx", {"http_status": {"status": 500, "count": 3}}),
    ("token revoked", {"revoke_tokens": True}),
    ("outage", {"outage": True}),
    ("answer lost", {"lose_response": {"count": 2}}),
)
KILL_AFTER_S = (0.3, 1.5)
SERIAL_TILL = "TILL-SERIAL"
ANSWER_TIMEOUT_S = 3.0
# A port opened after the till wrote drops what was waiting (pyserial clears the input on open), so
# the first copy of a sale sent while the agent starts can vanish; the till sends it again.
SEND_TRIES = 3
DRAIN_TIMEOUT_S = 180.0


def set_faults(sim: SimulatorProcess, faults: dict[str, Any], every: tuple[tuple[str, dict[str, Any]], ...]) -> None:
    cleared = {name: None for _, fault in every for name in fault}
    httpx.post(f"{sim.control_url}/_sim/faults", json={**cleared, **faults}, timeout=10).raise_for_status()


class SerialTill:
    """A till on the master side of a pty; the agent reads the slave side as its serial port (plain mode).

    The slave stays open here too, so the line survives the agent's death as a real cable would."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)

    def flush(self) -> None:
        """After a kill: drop what the dead agent left unread, and answers nobody read."""
        termios.tcflush(self.slave, termios.TCIFLUSH)
        while select.select([self.master], [], [], 0)[0]:
            os.read(self.master, 65536)

    def answer(self, key: Key, stopping: threading.Event) -> dict[str, Any] | None:
        """The answer line for this sale (a stale line for another sale is skipped), or None."""
        buffer = b""
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while time.monotonic() < deadline:
            if not select.select([self.master], [], [], 0.1)[0]:
                if stopping.is_set():
                    return None
                continue
            buffer += os.read(self.master, 65536)
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                body: dict[str, Any] = json.loads(line)
                if (body.get("till_id"), body.get("sale_id")) == key or "error" in body:
                    return body
        return None

    def run(self, ledger: Ledger, round_no: int, retries: dict[Key, int], new_sales: bool,
            stopping: threading.Event) -> None:
        pending, n = list(retries.items()), 0
        try:
            while not stopping.is_set():
                if pending:
                    key, expected = pending.pop()
                elif not new_sales:
                    return
                else:
                    key, expected = (SERIAL_TILL, f"S{round_no}-{n}"), 201
                    ledger.new_sale(key, n)
                    n += 1
                body, accepted = None, {expected}
                for _ in range(SEND_TRIES):  # as a real till does: no answer in time, send it again
                    os.write(self.master, json.dumps(ledger.sale(key), separators=(",", ":")).encode() + b"\n")
                    body = self.answer(key, stopping)
                    if body is not None or stopping.is_set():
                        break
                    accepted |= {200, 201}  # the first copy may have been stored after all
                if body is None:
                    if not stopping.is_set():
                        ledger.fail(f"{key}: no answer on the serial line in {SEND_TRIES} tries while the agent "
                                    "was up")
                    return
                status = body.pop("http_status", None)
                if status not in accepted:
                    ledger.fail(f"{key}: serial answer {status}, expected {expected}: {body}")
                    return
                ledger.ack(key, status, body)
        except BaseException:
            ledger.fail(f"serial till crashed:\n{traceback.format_exc()}")


@dataclass
class Run:
    cycles: int
    kills: int = 0
    faults: dict[str, int] = field(default_factory=dict)

    def injected(self, lane: str, name: str) -> None:
        if name != "healthy":
            self.faults[f"{lane} {name}"] = self.faults.get(f"{lane} {name}", 0) + 1


def cycle(agents: Agents, kra: SimulatorProcess, tsms: SimulatorProcess, serial: SerialTill, ledger: Ledger,
          run: Run, rng: random.Random, round_no: int, retries: dict[Key, int]) -> dict[Key, int]:
    kra_name, kra_faults = rng.choice(KRA_FAULTS)
    tsms_name, tsms_faults = rng.choice(TSMS_FAULTS)
    numbering = rng.choice(("lenient", "strict"))
    httpx.post(f"{kra.control_url}/_sim/config", json={"numbering": numbering}, timeout=10).raise_for_status()
    set_faults(kra, kra_faults, KRA_FAULTS)
    set_faults(tsms, tsms_faults, TSMS_FAULTS)
    run.injected("KRA", kra_name)
    run.injected("TSMS", tsms_name)
    run.injected("KRA", f"{numbering} numbering" if numbering == "strict" else "healthy")
    agent = agents.start()
    http_retries = {k: v for k, v in retries.items() if k[0] != SERIAL_TILL}
    serial_retries = {k: v for k, v in retries.items() if k[0] == SERIAL_TILL}
    load = Load(agent, ledger, round_no, rng, http_retries)
    serial_thread = threading.Thread(target=serial.run, args=(ledger, round_no, serial_retries, True,
                                                              load.stopping), daemon=True)
    serial_thread.start()
    time.sleep(rng.uniform(*KILL_AFTER_S))
    load.stopping.set()
    agent.kill()
    run.kills += 1
    load.finish()
    serial_thread.join(ANSWER_TIMEOUT_S * SEND_TRIES + 5)
    serial.flush()
    set_faults(kra, {}, KRA_FAULTS)
    set_faults(tsms, {}, TSMS_FAULTS)
    print(f"cycle {round_no + 1}/{run.cycles}: KRA {kra_name} ({numbering}), TSMS {tsms_name}: "
          f"{len(ledger.acked)} acknowledged so far", flush=True)
    return retry_plan(ledger, stored(agents.outbox))


def settle(agents: Agents, serial: SerialTill, ledger: Ledger, rng: random.Random, retries: dict[Key, int],
           round_no: int) -> AgentProcess:
    """With everything healthy, the tills send again what the last kill cut off."""
    agent = agents.start()
    http = {k: v for k, v in retries.items() if k[0] != SERIAL_TILL}
    load = Load(agent, ledger, round_no, rng, http, new_sales=False)
    serial.run(ledger, round_no, {k: v for k, v in retries.items() if k[0] == SERIAL_TILL}, False,
               threading.Event())
    load.join()
    load.finish()
    return agent


def drained(outbox: Path) -> tuple[int, int]:
    """(sales not yet signed, sales not yet at head office), waiting up to DRAIN_TIMEOUT_S for both to be 0."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=10)
        try:
            unsigned, unsynced = conn.execute(
                "SELECT SUM(kra_state != 'signed'), SUM(tsms_state != 'synced') FROM sales").fetchone()
        finally:
            conn.close()
        if (not unsigned and not unsynced) or time.monotonic() > deadline:
            return int(unsigned or 0), int(unsynced or 0)
        time.sleep(0.5)


def findings(agents: Agents, kra: SimulatorProcess, tsms: SimulatorProcess, ledger: Ledger) -> list[
        tuple[str, int, bool]]:
    """(measure, value, must be zero)."""
    rows = stored(agents.outbox)
    unsigned, unsynced = drained(agents.outbox)
    conn = sqlite3.connect(f"file:{agents.outbox}?mode=ro", uri=True, timeout=10)
    try:
        ours = {(t, s): (no, sign, tsms_id) for t, s, no, sign, tsms_id in conn.execute(
            "SELECT till_id, sale_id, kra_invc_no, json_extract(kra_signature, '$.rcptSign'), tsms_id FROM sales")}
    finally:
        conn.close()
    branch = httpx.get(f"{kra.control_url}/_sim/state", timeout=30).json()["branches"][BRANCH]
    at_kra = {int(no): (inv["trdInvcNo"], inv["rcptSign"]) for no, inv in branch["invoices"].items()}
    disagree = sum(1 for (_, sale_id), (no, sign, _) in ours.items() if at_kra.get(no or 0) != (sale_id, sign))
    numbering_gaps = len(branch["gaps"]) + (sorted(at_kra) != list(range(1, len(at_kra) + 1)))
    head = httpx.get(f"{tsms.control_url}/_sim/state", timeout=30).json()
    held = head["transactions"]
    not_once = sum(1 for _, _, tsms_id in ours.values() if held.get(tsms_id, {}).get("times_received") != 1)
    not_once += len(set(held) - {tsms_id for _, _, tsms_id in ours.values()}) + len(head["duplicates"])
    verify = run_cli("verify", "--config", str(agents.config))
    http_acked = sum(1 for k in ledger.acked if k[0] != SERIAL_TILL)
    return [
        ("sales acknowledged over HTTP", http_acked, False),
        ("sales acknowledged over serial", len(ledger.acked) - http_acked, False),
        ("sales signed by KRA", len(at_kra), False),
        ("sales held by head office", len(held), False),
        ("wrong answers to a till", len(ledger.failures), True),
        ("acknowledged sales lost", sum(1 for k in ledger.acked if k not in rows), True),
        ("receipt numbers changed", sum(1 for k, n in ledger.acked.items() if k in rows and rows[k][1] != n), True),
        ("sales stored twice", sum(1 for count, _ in rows.values() if count != 1), True),
        ("sales left unsigned", unsigned, True),
        ("sales signed twice", len(branch["trd_invc_no_signed_twice"]), True),
        ("invoice number gaps", numbering_gaps, True),
        ("agent and KRA disagree", disagree, True),
        ("sales not yet at head office", unsynced, True),
        ("sales at head office other than once", not_once, True),
        ("409 conflicts", len(head["conflicts"]), True),
        ("journal problems (verify)", 0 if verify.returncode == 0 else max(1, verify.stdout.count("PROBLEM")), True),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, outbox)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    folder = Path(tempfile.mkdtemp(prefix="etims-chaos-"))
    print(f"chaos: {args.cycles} cycles, seed {seed} (replay with --seed {seed}), working folder {folder}",
          flush=True)
    started = time.monotonic()
    kra = SimulatorProcess(folder, "kra")
    tsms = SimulatorProcess(folder, "tsms", "--rate-window", "2")
    serial = SerialTill()
    ledger, run = Ledger(), Run(args.cycles)
    try:
        with Agents(folder, kra_url=kra.api_url, tsms_url=tsms.api_url, sign_budget_s=0.3) as agents:
            text = agents.config.read_text()
            agents.config.write_text(text.replace("[kra]\n", "[kra]\nread_timeout_s = 1.0\n")
                                     + f'[[serial.ports]]\nurl = "{serial.path}"\nmode = "plain"\n')
            for command in (["init"], ["init", "tsms", "--api-key", TSMS_API_KEY]):
                done = run_cli(*command, "--config", str(agents.config))
                assert done.returncode == 0, done.stdout + done.stderr
            retries: dict[Key, int] = {}
            for round_no in range(args.cycles):
                retries = cycle(agents, kra, tsms, serial, ledger, run, rng, round_no, retries)
            agent = settle(agents, serial, ledger, rng, retries, args.cycles)
            table = findings(agents, kra, tsms, ledger)
            agent.terminate()
    finally:
        kra.close()
        tsms.close()
    print(f"\n{'kills (kill -9)':40} {run.kills:>8}")
    print(f"{'faults injected':40} {sum(run.faults.values()):>8}  "
          + ", ".join(f"{name} x{n}" for name, n in sorted(run.faults.items())))
    for measure, value, must_be_zero in table:
        verdict = ("PASS" if value == 0 else "FAIL") if must_be_zero else ""
        print(f"{measure:40} {value:>8}  {verdict}")
    failed = [m for m, v, zero in table if zero and v]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all invariants held'} "
          f"({time.monotonic() - started:.0f} s, seed {seed})")
    if ledger.failures:
        print("first wrong answers:\n  " + "\n  ".join(ledger.failures[:5]))
    if not args.keep and not failed:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
