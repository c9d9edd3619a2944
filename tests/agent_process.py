"""Real `python -m agent` processes for tests: start, wait until listening, SIGTERM, kill -9.

Each process's stderr goes to its own log file, not a pipe: a pipe nobody drains fills up and
blocks the agent mid-request, and a file is still there to read when a test fails. Every wait has
a timeout, and `Agents.close()` kills whatever is still running, so a failing test never leaves an
agent behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"\bevent=listening url=(\S+)")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def write_config(folder: Path, *, data_dir: str = "data", name: str = "agent.toml",
                 http_extra: str = "", kra_url: str = "", tsms_url: str = "", sign_budget_s: float = 3.0) -> Path:
    """A config on an ephemeral loopback port, logfmt at info (the listening line is parsed).

    With `kra_url` the agent signs with that simulator (initialise it with `etims-agent init`), with
    `tsms_url` it syncs to that one (store its key with `etims-agent init tsms`), keeping keys in the
    file-backed secret store as on a headless box; without them it starts its own simulators.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    kra = f'base_url = "{kra_url}"\nbackoff_base_s = 0.05\nbackoff_max_s = 0.5\n' if kra_url else ""
    tsms = (f'[tsms]\nbase_url = "{tsms_url}"\nsync_interval_s = 0.2\nbackoff_base_s = 0.05\n'
            'backoff_max_s = 0.5\n') if tsms_url else ""
    secrets = '[secrets]\nbackend = "file"\n' if kra_url or tsms_url else ""
    path.write_text(
        f'data_dir = "{data_dir}"\n'
        '[http]\nhost = "127.0.0.1"\nport = 0\n' + http_extra
        + f'[kra]\nsign_budget_s = {sign_budget_s}\n' + kra + tsms + secrets
        + '[log]\nlevel = "info"\nformat = "logfmt"\n',
        encoding="utf-8",
    )
    return path


def agent_env() -> dict[str, str]:
    """This environment minus ETIMS_AGENT_* overrides, with the tree under test importable first.

    A developer's ETIMS_AGENT_DATA_DIR would silently move the data directory away from the test's.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETIMS_AGENT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def agent_command(*args: str) -> list[str]:
    # sys.executable: the test's interpreter, hence its virtualenv.
    return [sys.executable, "-m", "agent", *args]


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one `python -m agent ...` command to completion and capture its output."""
    return subprocess.run(agent_command(*args), env=agent_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


class AgentProcess:
    """One `python -m agent run --config FILE` process."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.url = ""
        with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                agent_command("run", "--config", str(config)), env=agent_env(), cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> str:
        """Wait for the `event=listening` line and return the URL it names."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                self.url = match.group(1)
                return self.url
            if not self.running:
                raise RuntimeError(f"agent exited with {self.proc.returncode} before listening:\n"
                                   f"{self.log()}")
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"agent not listening after {timeout} s:\n{self.log()}")

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """kill -9: no handler runs, nothing is flushed or closed by the agent itself."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, as a service manager stops the agent; returns the exit code."""
        if self.running:
            os.kill(self.pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Make sure the process is gone (teardown); a no-op once it has exited."""
        if self.running:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # immune to SIGKILL: give up
            self.proc.wait(timeout=STOP_TIMEOUT_S)


class SimulatorProcess:
    """`python -m agent simulate kra|tsms` on ephemeral ports: its state outlives the agents under test."""

    def __init__(self, folder: Path, kind: str, *extra: str) -> None:
        ready = re.compile(rf"{kind.upper()} simulator: (\S+) \(control (\S+)\)")
        self.log_path = folder / f"{kind}-simulator.log"
        folder.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                agent_command("simulate", kind, "--port", "0", "--control-port", "0", *extra),
                env=agent_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (match := ready.search(self.log_path.read_text(errors="replace"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{kind} simulator did not start:\n{self.log_path.read_text(errors='replace')}")
            time.sleep(0.02)
        self.api_url, self.control_url = match.group(1), match.group(2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)


class Agents:
    """Starts agents on one config, numbering their logs, and kills the survivors on close."""

    def __init__(self, folder: Path, *, data_dir: str = "data", kra_url: str = "", tsms_url: str = "",
                 sign_budget_s: float = 3.0) -> None:
        self.folder = folder
        self.config = write_config(folder, data_dir=data_dir, kra_url=kra_url, tsms_url=tsms_url,
                                   sign_budget_s=sign_budget_s)
        self.data_dir = folder / data_dir
        self.outbox = self.data_dir / "outbox.sqlite3"
        self.started: list[AgentProcess] = []

    def spawn(self) -> AgentProcess:
        """Start a process without waiting for it (e.g. one that is expected to refuse to start)."""
        agent = AgentProcess(self.config, self.folder / f"agent-{len(self.started) + 1}.log")
        self.started.append(agent)
        return agent

    def start(self, timeout: float = START_TIMEOUT_S) -> AgentProcess:
        """Start an agent and return it once it is listening."""
        agent = self.spawn()
        agent.wait_listening(timeout)
        return agent

    def close(self) -> None:
        for agent in self.started:
            agent.close()

    def __enter__(self) -> Agents:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
