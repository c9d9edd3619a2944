"""Helpers for the technician: which serial ports exist, and what a till sends on one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import serial  # type: ignore[import-untyped]
from serial.tools import list_ports as pyserial_ports  # type: ignore[import-untyped]

from agent.devices.framing import BadFrame, Decoder, Garbage, Message, TooLong, reply_bytes


def list_ports() -> list[dict[str, Any]]:
    return [{"device": p.device, "description": p.description or "", "hwid": p.hwid if p.hwid != "n/a" else ""}
            for p in sorted(pyserial_ports.comports(), key=lambda p: p.device)]


def listen(url: str, *, mode: str, baudrate: int, seconds: float, echo: Callable[[str], None]) -> int:
    """Print what arrives for `seconds` (answering ACK/NAK in framed mode); returns the messages seen."""
    decoder = Decoder(mode)
    try:
        port = serial.serial_for_url(url, baudrate=baudrate, timeout=0.2)
    except serial.SerialException as exc:
        raise OSError(str(exc)) from None
    messages = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for event in decoder.feed(port.read(max(1, port.in_waiting))):
                if reply := reply_bytes(event, mode):
                    port.write(reply)
                if isinstance(event, Message):
                    messages += 1
                    echo(f"message: {event.payload[:300].decode('utf-8', 'replace')}")
                elif isinstance(event, BadFrame):
                    echo(f"bad frame (NAK sent): {event.reason}")
                elif isinstance(event, TooLong):
                    echo(f"message too long: {event.size} bytes")
                elif isinstance(event, Garbage):
                    echo(f"noise: {event.count} byte(s) outside a frame (wrong mode or baud rate?)")
    except serial.SerialException as exc:
        raise OSError(str(exc)) from None
    finally:
        port.close()
    return messages
