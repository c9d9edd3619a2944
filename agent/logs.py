"""Structured logs: one event name plus key=value fields per line (logfmt) or one JSON object.

Log state changes, not every retry. Never pass a secret as a field: Secret values render masked,
and the formatter refuses nothing else, so the rule is the caller's.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO


class EventLogger:
    """`log.info("listening", url=..., data_dir=...)` with fields kept apart from the message."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def _emit(self, level: int, event: str, exc: bool, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, event, extra={"fields": fields}, exc_info=exc)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, False, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, False, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, True, fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    out.update(getattr(record, "fields", {}))
    if record.exc_info:
        out["error"] = repr(record.exc_info[1])
    return out


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=False)


def configure(level: str = "info", fmt: str = "logfmt", stream: TextIO | None = None, *,
              file: Path | None = None, max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
    """Send every log line (ours and the libraries') to one stream in one format, and with `file`
    also to that file, rotated at `max_bytes` keeping `backups` old files (so a till's disk is never
    filled by logs; a service manager's journal gets the stream)."""
    formatter = JsonFormatter() if fmt == "json" else LogfmtFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups,
                                                             encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    # Library chatter (per-request lines) is not a state change; keep only its warnings.
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
