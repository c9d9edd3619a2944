"""A full disk under a running agent: tills get a clear 507 at once, nothing stored is harmed, and
the agent goes on by itself once space returns.

The data directory lives on a real, small tmpfs mount; filling it with a ballast file fills the
disk as a shop's full SD card would. Mounting needs root (CAP_SYS_ADMIN): without it the test is
skipped, unless ETIMS_TEST_REQUIRE_MOUNT=1 (as in CI) turns the skip into a failure.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agent_process import Agents, run_cli
from conftest import make_sale


@pytest.fixture(name="small_disk")
def _small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = f"cannot mount a small tmpfs here ({done.stderr.strip()})"
        if os.environ.get("ETIMS_TEST_REQUIRE_MOUNT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write until the disk says no more, in ever smaller pieces, so not a block is left."""
    with path.open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError:
                    break


def post(url: str, sale_id: str) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/sales", json=make_sale(sale_id=sale_id), timeout=30)
    return response.status_code, response.json(), time.monotonic() - started


def test_a_full_disk_gives_a_clear_error_harms_nothing_and_passes(tmp_path: Path, small_disk: Path) -> None:
    with Agents(tmp_path, data_dir=str(small_disk / "data")) as agents:
        agent = agents.start()
        for n in range(5):
            status, _, _ = post(agent.url, f"before-{n}")
            assert status == 201
        ballast = small_disk / "ballast"
        fill(ballast)

        refused: list[str] = []
        for n in range(300):  # a few may still fit in the last partial page of the log
            status, body, seconds = post(agent.url, f"full-{n}")
            assert seconds < 5, "a full disk must not hold the till up"
            if status == 507:
                assert body["error"]["code"] == "disk_full", body  # type: ignore[index]
                assert "disk" in str(body["error"]["message"]) and "full" in str(body["error"]["message"])  # type: ignore[index]
                refused.append(f"full-{n}")
                if len(refused) == 5:
                    break
            else:
                assert status == 201, body
        assert len(refused) == 5, "the disk never filled"
        assert agent.running and httpx.get(f"{agent.url}/health", timeout=5).status_code == 200
        printed = httpx.get(f"{agent.url}/v1/sales/before-0/receipt", timeout=5)  # counting the print is a write
        assert printed.status_code == 507 and printed.json()["error"]["code"] == "disk_full", printed.text

        # What was stored is intact, read beside the running agent.
        conn = sqlite3.connect(f"file:{agents.outbox}?mode=ro", uri=True, timeout=10)
        try:
            assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            stored = {r[0] for r in conn.execute("SELECT sale_id FROM sales")}
        finally:
            conn.close()
        assert {f"before-{n}" for n in range(5)} <= stored and not stored & set(refused)

        ballast.unlink()
        for sale_id in refused:  # the till sends what was refused again, and it is taken
            status, body, _ = post(agent.url, sale_id)
            assert status == 201, body
        assert httpx.get(f"{agent.url}/v1/sales/before-0/receipt", timeout=5).status_code == 200
        deadline = time.monotonic() + 30
        while True:  # and the lanes catch up by themselves
            status_body = httpx.get(f"{agent.url}/v1/status", timeout=5).json()
            lanes = status_body["lanes"]
            if lanes["kra"]["backlog"] == 0 and lanes["tsms"]["backlog"] == 0:
                break
            assert time.monotonic() < deadline, status_body
            time.sleep(0.2)
        log = agent.log()
        assert log.count("event=disk_full") == 1 and "event=disk_space_back" in log
        assert agent.terminate() == 0
        verify = run_cli("verify", "--config", str(agents.config))
        assert verify.returncode == 0, verify.stdout + verify.stderr
