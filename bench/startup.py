"""Start-up benchmark: time from process start to the first accepted sale (HTTP 201).

    .venv/bin/python bench/startup.py [--runs N] [--binary PATH] [--build]

For the source install (`python -m agent run`, this checkout in the virtualenv's interpreter), with
its bytecode cached as an installed package has it and without (as where PYTHONDONTWRITEBYTECODE is
set), and for the PyInstaller one-file binary (dist/etims-agent; `--build` runs `make dist` first
when it is missing, otherwise the binary's rows say "not built"): one unmeasured warm-up start, then
N starts, each on a data directory initialised with a KRA simulator process (`etims-agent init`, key
in the file secret store, a TSMS simulator process beside it) as a service restart or a reboot finds
it, timed from just before the process is spawned to the 201 answering the first sale, signed by
KRA (the simulator answers in about a millisecond). Also shown: the part until the agent logs
`event=listening` (the log is polled every 5 ms, so that part errs up to 5 ms high). Reported: the
median and the range.

The design sets no start-up target; the figures are INFO. Exit code 1 if a run went wrong.
bench/all.py calls `measure(argv)`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import (
    PYTHON_AGENT,
    ROOT,
    AgentProcess,
    Row,
    SimulatorProcess,
    in_temp_dir,
    initialise,
    lane_settings,
    make_sales,
    say,
    standalone,
    verdict,
    write_config,
)

BINARY = ROOT / "dist" / "etims-agent"


@dataclass(frozen=True)
class Start:
    listening_s: float  # spawn -> the `event=listening` line seen in the log
    first_sale_s: float  # spawn -> 201 for the first sale
    status: str  # the first sale's status: signed, or pending with a temporary receipt
    exit_code: int


def first_sale(folder: Path, command: Sequence[str], sale_id: str, log_name: str,
               env: Mapping[str, str | None] | None = None) -> Start:
    """Start the agent on folder/agent.toml, post one sale, stop it; time spawn -> 201."""
    sale = make_sales(sale_id, 1, 1)[0]
    with httpx.Client(timeout=60) as http:  # built before the clock starts (its SSL context is slow)
        started = time.perf_counter()
        agent = AgentProcess(folder, settings=None, command=command, log_name=log_name, env=env)
        try:
            listening = time.perf_counter() - started
            response = http.post(f"{agent.url}/v1/sales", json=sale)
            elapsed = time.perf_counter() - started
        finally:
            code = agent.stop()
    if response.status_code != 201:
        raise RuntimeError(f"first sale answered {response.status_code}: {response.text[:300]}")
    return Start(listening, elapsed, response.json()["status"], code)


@dataclass(frozen=True)
class Install:
    label: str
    command: Sequence[str]
    env: Mapping[str, str | None] | None = None


def installs(folder: Path, binary: Path) -> list[Install]:
    """The source install with and without a bytecode cache, and the binary if it is there.

    A source install normally caches bytecode in __pycache__; this one does so in `folder`
    (PYTHONPYCACHEPREFIX), leaving the checkout untouched, even where PYTHONDONTWRITEBYTECODE is set.
    Without any cache every start compiles the agent's modules first."""
    cached = {"PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": str(folder / "pycache")}
    found = [Install("source (python -m agent)", PYTHON_AGENT, cached),
             Install("source, no bytecode cache", PYTHON_AGENT, {"PYTHONDONTWRITEBYTECODE": "1"})]
    if binary.exists():
        found.append(Install("PyInstaller binary", [str(binary.resolve())]))
    return found


def starts(folder: Path, install: Install, runs: int) -> list[Start]:
    """One unmeasured warm-up start (caches filled), then `runs` restarts of one initialised data
    directory, with simulators of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    kra = SimulatorProcess(folder, "kra")
    tsms = SimulatorProcess(folder, "tsms")
    try:
        initialise(write_config(folder, lane_settings(kra, tsms)), install.command)
        first_sale(folder, install.command, "WARM", "agent-warm-up.log", install.env)
        results = []
        for i in range(runs):
            results.append(first_sale(folder, install.command, f"S{i}", f"agent-{i + 1}.log", install.env))
            say(f"startup {install.label} run {i + 1}: first sale {results[-1].first_sale_s * 1000:.0f} ms")
        return results
    finally:
        tsms.stop()
        kra.stop()


def build_binary() -> None:
    say("startup: building dist/etims-agent with `make dist` (about a minute)")
    done = subprocess.run(["make", "dist"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"make dist failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def summary(label: str, results: Sequence[Start]) -> list[Row]:
    total = [r.first_sale_s for r in results]
    listening = [r.listening_s for r in results]
    signed = sum(r.status == "signed" for r in results)
    clean = all(r.exit_code == 0 for r in results)
    return [
        Row(f"start-up to first accepted sale, {label}, median of {len(results)}",
            f"{statistics.median(total) * 1000:.0f} ms (range {min(total) * 1000:.0f}-{max(total) * 1000:.0f})",
            "none in the design"),
        Row(f"  of which until listening, {label}", f"{statistics.median(listening) * 1000:.0f} ms"),
        Row(f"startup {label}: first sales signed, clean SIGTERM",
            f"{signed}/{len(results)}, {'yes' if clean else 'NO'}", f"{len(results)}/{len(results)}, yes",
            verdict(signed == len(results) and clean), check=True),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5, help="starts per install (the median is reported)")
    p.add_argument("--binary", type=Path, default=BINARY, help="the PyInstaller binary")
    p.add_argument("--build", action="store_true", help="run `make dist` first if the binary is missing")
    p.add_argument("--dir", type=Path, default=None, help="where the temporary data directory goes")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def measure(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark with these command-line options and return its rows."""
    args = parse_args(argv)
    return in_temp_dir("etims-startup-", args.dir, lambda folder: bench(args, folder))


def bench(args: argparse.Namespace, folder: Path) -> list[Row]:
    if not args.binary.exists() and args.build:
        build_binary()
    rows = []
    for i, install in enumerate(installs(folder, args.binary)):
        rows += summary(install.label, starts(folder / f"install-{i}", install, args.runs))
    if not args.binary.exists():
        rows.append(Row("start-up to first accepted sale, PyInstaller binary", "not built (make dist, or --build)",
                        "none in the design"))
    return rows


if __name__ == "__main__":
    sys.exit(standalone(measure))
