"""One agent process per data directory.

Two agents on one outbox would each think they own the KRA lane and could number invoices twice.
The lock is an OS file lock (released by the kernel if the process dies, even by kill -9), so a
crash never leaves a stale lock behind; the pid beside it only makes the error message useful.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from agent.errors import DataDirLocked, StorageError


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._lock = FileLock(data_dir / "agent.lock", timeout=0)
        self._pid_file = data_dir / "agent.pid"

    def __enter__(self) -> DataDirLock:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
            try:
                owner = f" (pid {self._pid_file.read_text().strip()})"
            except OSError:
                owner = ""
            raise DataDirLocked(
                f"another etims-agent{owner} is already running on {self.data_dir}; "
                "stop it first (e.g. `systemctl stop etims-agent`) or give this one another data_dir"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot use the data directory {self.data_dir} ({exc.strerror or exc}); make it a "
                "folder the agent's user can write, or set data_dir to one"
            ) from None
        self._pid_file.write_text(f"{os.getpid()}\n")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._pid_file.unlink(missing_ok=True)
        self._lock.release()
