"""No sale acknowledged to a till is ever lost, stored twice, signed twice or sent to head office
twice: real agents, kill -9.

Several tills post as fast as they can to a real agent process, which is killed with SIGKILL at a
random moment and restarted on the same data directory, round after round, while its KRA lane
signs the sales with a KRA simulator in its own process (so KRA's memory outlives every kill) that
is made to lose answers, stall and fail between rounds. Every sale that got a 2xx answer must then
be stored exactly once with the receipt number the till printed; a sale cut off by the kill may or
may not be stored, and posting it again must say which (200 stored, 201 new) and never store it
twice. At the end every sale must be signed by KRA exactly once, under invoice numbers 1..N with no
gap, and hold the signature KRA holds; and the TSMS simulator (faulted each round as well) must
hold every sale exactly once, without ever having answered 409. The random choices are seeded: set
CRASH_SEED to replay.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_process import AgentProcess, Agents, SimulatorProcess, run_cli
from conftest import make_sale

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

Key = tuple[str, str]  # (till_id, sale_id): the idempotency key

CLIENTS = 6
TILLS = ("TILL-1", "TILL-2", "TILL-3")  # clients share tills, so sale ids interleave per till
ROUNDS = 5
KILL_AFTER_S = (0.2, 1.0)
REPOST_SHARE = 0.1  # of posts that re-send an already acknowledged sale
HTTP_TIMEOUT = httpx.Timeout(10.0)
JOIN_TIMEOUT_S = 30.0
CHECKERS = 4
SIGN_BUDGET_S = 0.3  # some tills get KRA's signature, others a temporary receipt
DRAIN_TIMEOUT_S = 60.0
BRANCH = "P052112956W/00"
# What KRA does during a round (simulator faults); each round picks one.
KRA_FAULTS: tuple[dict[str, Any], ...] = (
    {},
    {"latency_ms": 30},
    {"hang_after_commit": {"count": 3, "seconds": 1.5}},
    {"result_code": {"code": "999", "count": 3, "paths": ["saveTrnsSalesOsdc"], "commit": True}},
    {"http_status": {"status": 503, "count": 5}},
    {"outage": True},
)
# What head office does during a round.
TSMS_FAULTS: tuple[dict[str, Any], ...] = (
    {},
    {"lose_response": {"count": 2}},
    {"unavailable": {"count": 3, "retry_after": 1}},
    {"http_status": {"status": 500, "count": 3}},
    {"revoke_tokens": True},
    {"outage": True},
    {"latency_ms": 30},
)
TSMS_API_KEY = "sim-api-key-0001"  # the simulator's default terminal


def seed() -> int:
    value = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash seed {value} (replay with CRASH_SEED={value})")
    return value


@pytest.fixture(name="agents")
def _agents(tmp_path: Path, kra: SimulatorProcess, tsms: SimulatorProcess) -> Iterator[Agents]:
    with Agents(tmp_path, kra_url=kra.api_url, tsms_url=tsms.api_url, sign_budget_s=SIGN_BUDGET_S) as agents:
        for command in (["init"], ["init", "tsms", "--api-key", TSMS_API_KEY]):
            init = run_cli(*command, "--config", str(agents.config))
            assert init.returncode == 0, init.stdout + init.stderr
        yield agents  # kills any agent a failing test left running


def set_faults(sim: SimulatorProcess, faults: dict[str, Any], every: tuple[dict[str, Any], ...]) -> None:
    cleared = {name: None for fault in every for name in fault}
    response = httpx.post(f"{sim.control_url}/_sim/faults", json={**cleared, **faults}, timeout=10)
    assert response.status_code == 200, response.text


@dataclass
class Ledger:
    """What the tills sent and what they were told; shared by the client threads."""

    sales: dict[Key, dict[str, Any]] = field(default_factory=dict)  # every sale ever posted
    acked: dict[Key, int] = field(default_factory=dict)  # the receipt number the till printed
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_sale(self, key: Key, n: int) -> None:
        till_id, sale_id = key
        sale = make_sale(till_id=till_id, sale_id=sale_id)
        sale["lines"][0]["qty"] = str(1 + n % 9)  # not every sale has the same content
        with self.lock:
            self.sales[key] = sale

    def sale(self, key: Key) -> dict[str, Any]:
        with self.lock:
            return self.sales[key]

    def ack(self, key: Key, status: int, body: dict[str, Any]) -> None:
        with self.lock:
            problem = describes(key, body)
            number = body.get("receipt_no")
            if problem:
                self.failures.append(f"{key}: {status} answer {problem}: {body}")
            elif key in self.acked and self.acked[key] != number:
                self.failures.append(f"{key}: answered {status} with receipt {number}, "
                                     f"but was acknowledged before with {self.acked[key]}")
            else:
                assert isinstance(number, int)
                self.acked[key] = number

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)

    def unacked(self) -> list[Key]:
        with self.lock:
            return sorted(set(self.sales) - set(self.acked))


def describes(key: Key, body: dict[str, Any]) -> str | None:
    """Why a 2xx body is not a proper answer for this sale, or None."""
    if (body.get("till_id"), body.get("sale_id")) != key:
        return "describes another sale"
    kind = body.get("receipt", {}).get("kind")
    if (body.get("status"), kind) not in (("pending", "temporary"), ("signed", "signed")):
        return f"has status {body.get('status')} with a {kind} receipt"
    return None


def till(url: str, client_no: int, round_no: int, retries: dict[Key, int], new_sales: bool,
         ledger: Ledger, rng: random.Random, stopping: threading.Event,
         stop: threading.Event) -> None:
    """One till: retry what an earlier crash cut off, then post new sales and some replays."""
    till_id = TILLS[client_no % len(TILLS)]
    mine: list[Key] = []
    pending = list(retries.items())
    n = 0
    try:
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as http:
            while not stop.is_set():
                replay = False
                if pending:
                    key, expected = pending.pop()
                elif not new_sales:
                    return
                elif mine and rng.random() < REPOST_SHARE:
                    key, expected, replay = rng.choice(mine), 200, True
                else:
                    key, expected = (till_id, f"R{round_no}-C{client_no}-{n}"), 201
                    ledger.new_sale(key, n)
                    n += 1
                try:
                    response = http.post("/v1/sales", json=ledger.sale(key))
                except httpx.TransportError as exc:
                    if not stopping.is_set():
                        ledger.fail(f"{key}: {exc!r} while the agent was meant to be up")
                    return  # the agent is gone; this sale is not acknowledged
                if response.status_code != expected:
                    ledger.fail(f"{key}: expected {expected}, got {response.status_code} "
                                f"{response.text[:300]}")
                    return
                ledger.ack(key, response.status_code, response.json())
                if not replay:
                    mine.append(key)
    except BaseException:  # a dying thread must fail the test, not vanish
        ledger.fail(f"client {client_no} crashed:\n{traceback.format_exc()}")


class Load:
    """CLIENTS till threads posting to one agent until told to stop."""

    def __init__(self, agent: AgentProcess, ledger: Ledger, round_no: int, rng: random.Random,
                 retries: dict[Key, int], *, new_sales: bool = True) -> None:
        self.stopping = threading.Event()  # set just before the agent is signalled
        self.stop = threading.Event()  # set once it has exited
        keys = sorted(retries)
        self.threads = [
            threading.Thread(
                target=till, name=f"till-{c}", daemon=True,
                args=(agent.url, c, round_no, {k: retries[k] for k in keys[c::CLIENTS]}, new_sales,
                      ledger, random.Random(rng.random()), self.stopping, self.stop))
            for c in range(CLIENTS)
        ]
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        """Wait for threads that end on their own (retries only, no new sales)."""
        for thread in self.threads:
            thread.join(JOIN_TIMEOUT_S)

    def finish(self) -> None:
        self.stopping.set()
        self.stop.set()
        for thread in self.threads:
            thread.join(JOIN_TIMEOUT_S)
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"


def stored(outbox: Path) -> dict[Key, tuple[int, int]]:
    """(till_id, sale_id) -> (row count, receipt number), read-only beside the running agent."""
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT till_id, sale_id, COUNT(*), MIN(receipt_no) FROM sales "
            "GROUP BY till_id, sale_id"
        ).fetchall()
    finally:
        conn.close()
    return {(t, s): (count, no) for t, s, count, no in rows}


def check_outbox(outbox: Path, ledger: Ledger, context: str) -> dict[Key, tuple[int, int]]:
    """Every acknowledged sale is stored once with its receipt; numbers run 1..N; nothing extra."""
    rows = stored(outbox)
    assert not ledger.failures, f"{context}: {ledger.failures[:5]}"
    twice = {k: c for k, (c, _) in rows.items() if c != 1}
    assert not twice, f"{context}: stored more than once: {twice}"
    lost = [k for k in ledger.acked if k not in rows]
    assert not lost, f"{context}: {len(lost)} acknowledged sales lost, e.g. {lost[:5]}"
    wrong = {k: (rows[k][1], number) for k, number in ledger.acked.items() if rows[k][1] != number}
    assert not wrong, f"{context}: receipt numbers changed (stored, printed): {wrong}"
    unknown = set(rows) - set(ledger.sales)
    assert not unknown, f"{context}: sales nobody posted: {unknown}"
    assert len(ledger.acked) <= len(rows) <= len(ledger.sales), context
    numbers = sorted(no for _, no in rows.values())
    assert numbers == list(range(1, len(numbers) + 1)), f"{context}: receipt numbers have a gap"
    return rows


def check_api(url: str, ledger: Ledger, context: str) -> None:
    """GET and a re-post of every acknowledged sale both answer 200 with the acknowledged receipt number."""

    def check(chunk: list[tuple[Key, int]]) -> list[str]:
        problems = []
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as http:
            for key, number in chunk:
                till_id, sale_id = key
                got = http.get(f"/v1/sales/{sale_id}", params={"till_id": till_id})
                again = http.post("/v1/sales", json=ledger.sales[key])
                for what, answer in (("GET", got), ("re-post", again)):
                    body = answer.json() if answer.status_code == 200 else {}
                    if describes(key, body) or body.get("receipt_no") != number:
                        problems.append(f"{what} {till_id}/{sale_id}: {answer.status_code} {answer.text[:200]}")
        return problems

    items = sorted(ledger.acked.items())
    with ThreadPoolExecutor(CHECKERS) as pool:
        chunks = pool.map(check, [items[i::CHECKERS] for i in range(CHECKERS)])
        problems = [p for chunk in chunks for p in chunk]
    assert not problems, f"{context}: {len(problems)} problems, e.g. {problems[:5]}"


def retry_plan(ledger: Ledger, rows: dict[Key, tuple[int, int]]) -> dict[Key, int]:
    """Sales cut off by a crash, with the answer a retry must get: 200 if stored, else 201."""
    return {k: 200 if k in rows else 201 for k in ledger.unacked()}


def signing_state(outbox: Path) -> dict[Key, tuple[str, int | None, str | None]]:
    """(till_id, sale_id) -> (KRA lane state, invcNo, rcptSign), read-only beside the running agent."""
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT till_id, sale_id, kra_state, kra_invc_no, "
                            "json_extract(kra_signature, '$.rcptSign') FROM sales").fetchall()
    finally:
        conn.close()
    return {(t, s): (state, no, sign) for t, s, state, no, sign in rows}


def check_kra(kra: SimulatorProcess, outbox: Path) -> int:
    """Once drained: every sale signed once by KRA, numbers 1..N, and the agent holds KRA's signature."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        ours = signing_state(outbox)
        left = {k: v for k, v in ours.items() if v[0] != "signed"}
        if not left:
            break
        assert time.monotonic() < deadline, f"not drained: {len(left)} unsigned, e.g. {list(left.items())[:5]}"
        time.sleep(0.2)
    branch = httpx.get(f"{kra.control_url}/_sim/state", timeout=10).json()["branches"][BRANCH]
    assert branch["gaps"] == [], f"invoice numbers skipped at KRA: {branch['gaps']}"
    assert branch["trd_invc_no_signed_twice"] == [], f"signed twice: {branch['trd_invc_no_signed_twice']}"
    at_kra = {int(no): (inv["trdInvcNo"], inv["rcptSign"]) for no, inv in branch["invoices"].items()}
    assert sorted(at_kra) == list(range(1, len(ours) + 1)), "KRA's numbers are not 1..N for N sales"
    mismatched = [(key, no, at_kra.get(no or 0)) for key, (_, no, sign) in ours.items()
                  if at_kra.get(no or 0) != (key[1], sign)]
    assert not mismatched, f"agent and KRA disagree: {mismatched[:5]}"
    return len(at_kra)


def check_tsms(tsms: SimulatorProcess, outbox: Path) -> int:
    """Once synced: head office holds every sale exactly once, and never answered 409."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT tsms_id, tsms_state FROM sales").fetchall()
        finally:
            conn.close()
        if all(state == "synced" for _, state in rows):
            break
        assert time.monotonic() < deadline, f"not synced: {[r for r in rows if r[1] != 'synced'][:5]}"
        time.sleep(0.2)
    state = httpx.get(f"{tsms.control_url}/_sim/state", timeout=30).json()
    assert state["conflicts"] == [], f"409 answered: {state['conflicts'][:3]}"
    assert state["duplicates"] == [], f"sent twice: {state['duplicates'][:3]}"
    assert set(state["transactions"]) == {tsms_id for tsms_id, _ in rows}
    twice = {k: v["times_received"] for k, v in state["transactions"].items() if v["times_received"] != 1}
    assert not twice, f"held more than once: {twice}"
    return len(rows)


def test_kill_9_loses_no_acknowledged_sale_and_stores_none_twice(agents: Agents, kra: SimulatorProcess,
                                                                 tsms: SimulatorProcess) -> None:
    """Across rounds of kill -9 under load and KRA faults, every acknowledged sale survives exactly once
    and is signed exactly once."""
    rng = random.Random(seed())
    ledger = Ledger()
    agent = agents.start()
    retries: dict[Key, int] = {}
    for round_no in range(ROUNDS):
        faults, tsms_faults = rng.choice(KRA_FAULTS), rng.choice(TSMS_FAULTS)
        set_faults(kra, faults, KRA_FAULTS)
        set_faults(tsms, tsms_faults, TSMS_FAULTS)
        load = Load(agent, ledger, round_no, rng, retries)
        delay = rng.uniform(*KILL_AFTER_S)
        time.sleep(delay)
        load.stopping.set()
        agent.kill()
        load.finish()
        # A round may end before any answer (a kill within the signing budget while KRA stalls);
        # the tills then repost in the next round, which is part of what is tested.
        context = f"round {round_no} (KRA {faults}, TSMS {tsms_faults}), killed after {delay:.2f} s"

        set_faults(kra, {}, KRA_FAULTS)
        set_faults(tsms, {}, TSMS_FAULTS)
        agent = agents.start()
        rows = check_outbox(agents.outbox, ledger, context)
        check_api(agent.url, ledger, context)
        retries = retry_plan(ledger, rows)
        print(f"{context}: {len(ledger.acked)} acknowledged, {len(rows)} stored, "
              f"{len(ledger.sales)} posted, {sum(c == 200 for c in retries.values())} stored "
              "but cut off before the answer")

    # Settle the sales the last kill cut off, as the tills would, then check once more.
    load = Load(agent, ledger, ROUNDS, rng, retries, new_sales=False)
    load.join()
    load.finish()
    check_outbox(agents.outbox, ledger, "after settling")
    assert not ledger.unacked()
    assert len(ledger.acked) > ROUNDS * CLIENTS, "too few sales to prove anything"
    started = time.monotonic()
    signed = check_kra(kra, agents.outbox)
    print(f"signed by KRA: {signed}, each once, invoice numbers 1..{signed} "
          f"(drained in {time.monotonic() - started:.1f} s)")
    held = check_tsms(tsms, agents.outbox)
    print(f"at head office: {held}, each once, no 409")

    assert agent.terminate() == 0, agent.log()
    verify = run_cli("verify", "--config", str(agents.config))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_second_agent_on_the_same_data_dir_refuses_to_start(agents: Agents) -> None:
    """A second agent on a data directory in use exits 3 saying so, and the first keeps serving."""
    first = agents.start()
    second = run_cli("run", "--config", str(agents.config), timeout=30)
    assert second.returncode == 3, second.stderr
    assert "already running" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert str(agents.data_dir.resolve()) in second.stderr
    assert "Traceback" not in second.stderr
    assert "event=listening" not in second.stderr
    with httpx.Client(base_url=first.url, timeout=HTTP_TIMEOUT) as http:
        assert http.get("/health").status_code == 200
        assert http.post("/v1/sales", json=make_sale()).status_code == 201
    assert first.running
    assert first.terminate() == 0, first.log()


def test_sigterm_under_load_stops_cleanly_and_keeps_every_acknowledged_sale(
        agents: Agents) -> None:
    """SIGTERM while tills post exits 0 with event=stopped, and every acknowledged sale survives."""
    rng = random.Random(seed())
    ledger = Ledger()
    agent = agents.start()
    load = Load(agent, ledger, 0, rng, {})
    time.sleep(rng.uniform(*KILL_AFTER_S))
    load.stopping.set()
    code = agent.terminate()
    load.finish()
    assert code == 0, agent.log()
    assert "event=stopped" in agent.log()
    assert ledger.acked

    agent = agents.start()
    check_outbox(agents.outbox, ledger, "after SIGTERM")
    check_api(agent.url, ledger, "after SIGTERM")
    assert agent.terminate() == 0, agent.log()
    verify = run_cli("verify", "--config", str(agents.config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
