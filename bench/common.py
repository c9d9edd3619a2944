"""What the benchmark scripts share: real agent and simulator processes, the load generator, the table.

Every script measures this checkout's agent (ROOT goes first on sys.path and into the children's
PYTHONPATH), in a temporary data directory, over loopback. A script's `measure(argv)` returns
`Row`s; `print_table` prints them, and bench/all.py prints all of them as one table.
"""

from __future__ import annotations

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
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: measure this tree's agent, not another

import httpx  # noqa: E402

T = TypeVar("T")
PYTHON_AGENT = (sys.executable, "-m", "agent")  # the source install, in this interpreter's venv
LISTENING = re.compile(r"\bevent=listening url=http://([^:/\s]+):(\d+)")
# No signing lane: the device is never initialised against this (closed) address.
NO_KRA = '[kra]\nbase_url = "http://127.0.0.1:9/etims-api"\n'
# No head-office lane (by default the agent would start a TSMS simulator in its own process).
NO_TSMS = '[tsms]\nenvironment = "off"\n'
INTAKE_ONLY = NO_KRA + NO_TSMS

# The README's example sale without its customer, as tests/conftest.py's BASE_SALE.
SALE: dict[str, Any] = {k: v for k, v in json.loads((ROOT / "installer" / "examples" / "sale.json").read_text(
    encoding="utf-8")).items() if k != "customer"}


def say(text: str) -> None:
    """Progress goes to standard error, so standard output holds only the tables."""
    print(text, file=sys.stderr, flush=True)


def make_sales(prefix: str, n: int, tills: int, start: int = 0) -> list[dict[str, Any]]:
    sales = []
    for i in range(start, start + n):
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


# --- processes -----------------------------------------------------------------------------


def child_env(command: Sequence[str] = PYTHON_AGENT, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This environment minus ETIMS_AGENT_* overrides; for the source install, this checkout importable
    first. `extra` sets variables (None removes one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETIMS_AGENT_")}
    if tuple(command) == PYTHON_AGENT:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def write_config(folder: Path, settings: str) -> Path:
    """agent.toml in `folder`: data in folder/data, an ephemeral loopback port, logfmt at info.

    `settings` is TOML appended to it (tables other than [http] and [log])."""
    config = folder / "agent.toml"
    config.write_text('data_dir = "data"\n[http]\nhost = "127.0.0.1"\nport = 0\n'
                      '[log]\nlevel = "info"\nformat = "logfmt"\n' + settings, encoding="utf-8")
    return config


def lane_settings(kra: SimulatorProcess, tsms: SimulatorProcess, kra_extra: str = "", tsms_extra: str = "") -> str:
    """Both lanes on simulator processes, keys in the file secret store (a headless box).

    Simulators in processes of their own, not the agent's built-in ones: their CPU and their
    growing state would otherwise count as the agent's."""
    return (f'[kra]\nbase_url = "{kra.api_url}"\n{kra_extra}'
            f'[tsms]\nbase_url = "{tsms.api_url}"\napi_key = "sim-api-key-0001"\n{tsms_extra}'
            '[secrets]\nbackend = "file"\n')


def initialise(config: Path, command: Sequence[str] = PYTHON_AGENT) -> None:
    """`etims-agent init`: the device initialised with KRA, its cmcKey in the secret store."""
    done = subprocess.run([*command, "init", "--config", str(config)], env=child_env(command), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"etims-agent init failed:\n{done.stdout}{done.stderr}")


class AgentProcess:
    """`etims-agent run` on the config in `folder`; its output goes to a file (a full pipe would block it).

    The constructor returns once the agent logs that it is listening (the log is polled every 5 ms)."""

    def __init__(self, folder: Path, settings: str | None = INTAKE_ONLY,
                 command: Sequence[str] = PYTHON_AGENT, log_name: str = "agent.log",
                 env: Mapping[str, str | None] | None = None) -> None:
        """`settings=None` keeps the agent.toml already in `folder`; `env`: as child_env's `extra`."""
        self.config = folder / "agent.toml" if settings is None else write_config(folder, settings)
        self.log_path = folder / log_name
        self.outbox = folder / "data" / "outbox.sqlite3"
        self.command = tuple(command)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*command, "run", "--config", str(self.config)], env=child_env(command, env),
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.host, self.port = self._wait_listening(120.0)
        except BaseException:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _wait_listening(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                return match.group(1), int(match.group(2))
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.005)
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
                [*PYTHON_AGENT, "simulate", kind, "--port", "0", "--control-port", "0", *extra],
                env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
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
        body: dict[str, Any] = httpx.get(f"{self.control_url}/_sim/state", timeout=120).json()
        return body

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def in_temp_dir(prefix: str, where: Path | None, body: Callable[[Path], T], keep: bool = False) -> T:
    """Run a benchmark in a fresh directory, removed afterwards (unless `keep`) whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    try:
        return body(folder)
    finally:
        if keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now (VmRSS in /proc/PID/status; Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


# --- the load generator --------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; reads only what it needs of each answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.head = b""  # the last answer's status line and headers

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        self.head = head = await self.reader.readuntil(b"\r\n\r\n")
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


def post_all(agent: AgentProcess, sales: Sequence[dict[str, Any]], clients: int) -> Run:
    """Post `sales` to the agent from `clients` keep-alive connections (closed loop)."""
    host = f"{agent.host}:{agent.port}"
    requests = [http_request(host, s) for s in sales]
    return run_async(lambda: closed_loop(agent.host, agent.port, requests, clients))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # Windows: the standard loop
        return None
    return uvloop.new_event_loop


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main())


# --- figures and the table -----------------------------------------------------------------

PASS, MISS, INFO = "PASS", "MISS", "INFO"


@dataclass(frozen=True)
class Row:
    """One line of the table. `check`: a correctness check of the run itself, not a performance figure."""

    measure: str
    value: str
    limit: str = ""
    verdict: str = INFO
    check: bool = False


def verdict(ok: bool | None) -> str:
    return INFO if ok is None else (PASS if ok else MISS)


def broken(rows: Iterable[Row]) -> bool:
    """Whether a correctness check failed: the run itself went wrong, its figures mean little."""
    return any(r.check and r.verdict == MISS for r in rows)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


HEADER = ("measure", "result", "limit / target", "verdict")


def cells(row: Row) -> tuple[str, str, str, str]:
    return row.measure, row.value, row.limit, row.verdict


def table_text(rows: Sequence[Row]) -> str:
    widths = [max(len(c) for c in col) for col in zip(HEADER, *map(cells, rows), strict=True)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(cells(r), widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def markdown_measure(measure: str) -> str:
    """Markdown drops leading spaces: a breakdown row is indented with em spaces, a heading is bold."""
    if measure.startswith("[") and measure.endswith("]"):
        return f"**{measure[1:-1]}**"
    stripped = measure.lstrip(" ")
    return "&emsp;" * ((len(measure) - len(stripped)) // 2) + stripped


def table_markdown(rows: Sequence[Row]) -> str:
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    body = (line([markdown_measure(r.measure), r.value, r.limit, r.verdict]) for r in rows)
    return "\n".join([line(HEADER), line(["---"] * len(HEADER)), *body])


def print_table(rows: Sequence[Row]) -> None:
    print(table_text(rows), flush=True)


# --- the machine ---------------------------------------------------------------------------


def _proc_field(path: str, name: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    return None


def _os_name() -> str:
    with contextlib.suppress(OSError):
        return f"{platform.freedesktop_os_release()['PRETTY_NAME']}, Linux {platform.release()}"
    return platform.platform()


def _filesystem(folder: Path) -> str:
    """The file system type the benchmark's data lives on (/proc/mounts: longest mount point prefix)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if (folder.as_posix() + "/").startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def machine() -> list[str]:
    """The machine in generic terms (no host names, no paths): CPU, cores, RAM, OS, Python, SQLite."""
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = _proc_field("/proc/meminfo", "MemTotal")
    ram_text = f"{int(ram.split()[0]) / 2**20:.1f} GiB RAM" if ram else "RAM unknown"
    loop = "uvloop" if loop_factory() else "asyncio"
    return [
        f"CPU: {cpu}, {os.cpu_count()} logical cores ({usable} usable), {ram_text}",
        f"OS: {_os_name()}; data on {_filesystem(Path(tempfile.gettempdir()).resolve())}",
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"SQLite {sqlite3.sqlite_version}, load generator event loop: {loop}",
    ]


def load_average(count: int = 3) -> str:
    """The 1-, 5- and 15-minute load averages (the first `count` of them)."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg()[:count]) if hasattr(os, "getloadavg") else "?"


def cpu_ticks() -> tuple[int, int]:
    """(all CPU time, time stolen by the hypervisor) so far, in clock ticks, from /proc/stat; (0, 0)
    where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def fixed_work_times(work_s: float, rounds: int = 500, gap_s: float = 0.02) -> list[float]:
    """How long one fixed piece of pure-Python work takes, timed `rounds` times with `gap_s` of sleep
    between (a sale's rhythm when KRA answers in 20 ms): the spread this machine gives any work of
    that size, whatever the code. Its p50 is `work_s`; its tail is the host's (descheduling, steal)."""
    n = 10_000
    while True:  # grow until one run is long enough to time well, then scale to work_s
        started = time.perf_counter()
        _spin(n)
        took = time.perf_counter() - started
        if took > 0.002:
            break
        n *= 2
    n = max(1, int(n * work_s / took))
    times = []
    for _ in range(rounds):
        time.sleep(gap_s)
        started = time.perf_counter()
        _spin(n)
        times.append(time.perf_counter() - started)
    # Rescale so that the p50 is work_s exactly: the calibration run may itself have been slowed.
    scale = work_s / percentile(times, 0.5)
    return [t * scale for t in times]


def stolen_since(before: tuple[int, int]) -> str:
    """The share of CPU time the host took from this (virtual) machine since `before`: on a shared
    host it lengthens every figure, the simulators' answers included."""
    total, steal = cpu_ticks()
    spent = total - before[0]
    return f"{(steal - before[1]) / spent:.1%}" if spent > 0 else "unknown"


def standalone(measure: Callable[[Sequence[str] | None], list[Row]], argv: Sequence[str] | None = None) -> int:
    """A script run on its own: the machine, then its table; exit 1 if the run itself went wrong."""
    for line in machine():
        print(line)
    before = cpu_ticks()
    rows = measure(argv)
    print()
    print_table(rows)
    print(f"\nCPU time taken by the host (steal) during the run: {stolen_since(before)}")
    return 1 if broken(rows) else 0
