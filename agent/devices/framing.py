r"""Serial framing: the byte protocol a till speaks on an RS-232/USB serial port (pure: no I/O, no clock).

The `Decoder` turns the bytes read from a port into events; `encode` and `reply_bytes` give the
bytes to write back. The text from "## Serial tills" down is the protocol as a till programmer
needs it (it is copied into the README).

## Serial tills

A till on an RS-232 or USB serial port sends the same sale JSON it would POST over HTTP and gets
the same JSON answer back, as UTF-8 text. The port runs in one of two modes, plain or framed; both
sides must use the same one. A request may be at most 1,048,576 bytes of JSON (the agent's
default limit).

### Plain mode: one JSON object per line

- Send each request as one line: the JSON text followed by LF (0x0A). A CR (0x0D) just before the
  LF is dropped, so CR LF works too. Empty lines, and lines of only spaces and tabs, are ignored.
- The whole JSON text must be on that one line. Compact JSON always is: JSON writes a line break
  inside a string as the escape `\n`, never as a raw LF.
- Each answer is one line: compact JSON followed by LF.
- A line over the limit (not counting its CR and LF) is refused: the agent discards it up to the
  next LF and answers with an error line instead.
- Plain mode has no acknowledgement and no error detection. On a noisy line use framed mode.

### Framed mode: checked frames, for noisy lines

Every request and every answer is one frame:

    STX (0x02) | payload | ETX (0x03) | CRC (4 bytes)

- payload: the JSON text in UTF-8. It never contains the bytes 0x02 or 0x03, because JSON writes
  control characters inside strings as escapes (`\u0002`), so no byte stuffing is needed.
- CRC: CRC-16/CCITT-FALSE of the payload bytes only (not STX, not ETX), sent as 4 ASCII hex
  digits, upper case (0-9, A-F), most significant first. CRC-16/CCITT-FALSE is: polynomial
  0x1021, initial value 0xFFFF, no reflection of input or output, no final XOR. Check value: the
  9 ASCII bytes `123456789` give 0x29B1. Bit by bit:

      crc = 0xFFFF
      for each payload byte b:
          crc = crc XOR (b << 8)
          repeat 8 times:
              if crc AND 0x8000: crc = ((crc << 1) XOR 0x1021) AND 0xFFFF
              else:              crc = (crc << 1) AND 0xFFFF

- Worked example: the payload `{"a":1}` (7 bytes: 7B 22 61 22 3A 31 7D) has CRC 0x7299, so its
  frame is these 13 bytes, the last four being the ASCII text "7299":

      02 7B 22 61 22 3A 31 7D 03 37 32 39 39

What the agent does with the bytes it receives:

- Bytes before an STX are line noise and are skipped.
- When the 4th CRC byte of a frame arrives, the agent answers at once with one byte:
  ACK (0x06) if the CRC is right; it then processes the request and sends the answer as a frame.
  NAK (0x15) if the CRC is wrong, the 4 CRC bytes are not upper-case hex digits, or the payload is
  over the limit; the frame was discarded.
- An STX inside a frame (in the payload or among the CRC bytes) abandons the frame so far,
  without an answer, and starts a new frame at that STX. A frame whose ETX or CRC never arrives
  gets no answer either.
- The agent does not wait for an ACK of its answers, and ignores ACK or NAK bytes from the till
  (they arrive outside a frame, so they are skipped like noise).

What the till should do:

- Send the frame, then wait for ACK or NAK. On NAK, or when neither arrives within your timeout,
  send the same request again. Give up after a few attempts: a payload over the limit is refused
  every time.
- After ACK, read the answer frame and check its CRC. If it is damaged or does not come, send the
  same request again. The agent treats it as a replay of the same sale (same `sale_id`) and
  answers with the same receipt; it never makes a second sale.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import TypeAlias

STX, ETX, ACK, NAK = 0x02, 0x03, 0x06, 0x15
LF, CR = 0x0A, 0x0D
MODES: tuple[str, ...] = ("plain", "framed")

_STX_OR_ETX = re.compile(b"[\x02\x03]")
_CRC_DIGITS = re.compile(b"[0-9A-F]{4}")  # strict: upper case only, exactly as we send
_IDLE, _PAYLOAD, _CRC = "idle", "payload", "crc"


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor (check 0x29B1)."""
    # binascii.crc_hqx is exactly this CRC given init 0xFFFF, and runs in C (payloads reach 1 MiB).
    return binascii.crc_hqx(data, 0xFFFF)


def encode(payload: bytes, mode: str) -> bytes:
    """The bytes to write for one message: a line in plain mode, a frame in framed mode."""
    _check_mode(mode)
    if mode == "plain":
        # A trailing CR would be dropped by the receiver, so it could not round-trip either.
        if b"\n" in payload or payload.endswith(b"\r"):
            raise ValueError("a plain-mode payload must not contain LF or end with CR")
        return payload + b"\n"
    if _STX_OR_ETX.search(payload):
        raise ValueError("a framed payload must not contain STX (0x02) or ETX (0x03)")
    return bytes([STX]) + payload + bytes([ETX]) + b"%04X" % crc16(payload)


@dataclass(frozen=True)
class Message:
    """A complete message to process (framed: its CRC was right, so answer ACK)."""

    payload: bytes


@dataclass(frozen=True)
class BadFrame:
    """Framed only: a complete frame whose CRC is wrong or not hex; answer NAK."""

    reason: str


@dataclass(frozen=True)
class TooLong:
    """A message over max_bytes, discarded (plain: answer an error line; framed: NAK)."""

    size: int


@dataclass(frozen=True)
class Garbage:
    """Framed only: bytes skipped outside frames, or a frame abandoned at an STX (for logging)."""

    count: int


Event: TypeAlias = Message | BadFrame | TooLong | Garbage


def reply_bytes(event: Event, mode: str) -> bytes:
    """The immediate line-level answer to an event: ACK/NAK in framed mode, nothing in plain mode."""
    _check_mode(mode)
    if mode == "plain":
        return b""  # plain has no ACK/NAK; the caller answers TooLong with an error line itself
    if isinstance(event, Message):
        return bytes([ACK])
    if isinstance(event, BadFrame | TooLong):
        return bytes([NAK])
    return b""


class Decoder:
    """Turns the bytes read from a port, in chunks of any size, into events.

    Events depend only on the bytes, never on how they were chunked: a message is reported at its
    LF (plain) or 4th CRC byte (framed), and a run of garbage when the STX that ends it arrives.
    Memory stays under about max_bytes: the bytes of an over-long message are counted, not kept.
    """

    def __init__(self, mode: str, max_bytes: int = 1_048_576) -> None:
        _check_mode(mode)
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.mode = mode
        self.max_bytes = max_bytes
        self._buf = bytearray()  # the message so far, while it is within the limit
        self.reset()

    def reset(self) -> None:
        """Drop partial input, e.g. after the port reconnects (the till will resend)."""
        self._buf.clear()
        self._size = 0  # bytes of the message so far, kept or not
        self._last_cr = False  # plain: whether the line so far ends with CR
        self._state = _IDLE  # framed
        self._garbage = 0  # framed: length of the current run of skipped bytes
        self._digits = bytearray()  # framed: CRC bytes so far

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by these bytes, in order; partial input is kept for the next call."""
        return self._feed_plain(data) if self.mode == "plain" else self._feed_framed(data)

    def _take(self, chunk: bytes, limit: int) -> None:
        self._size += len(chunk)
        if self._size <= limit:
            self._buf += chunk

    def _feed_plain(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        i = 0
        while i < len(data):
            lf = data.find(b"\n", i)
            chunk = data[i:] if lf < 0 else data[i:lf]
            if chunk:
                self._last_cr = chunk[-1] == CR
            self._take(chunk, self.max_bytes + 1)  # + 1: room for a CR that will be dropped
            if lf < 0:
                break
            size = self._size - self._last_cr
            if size > self.max_bytes:
                events.append(TooLong(size))
            else:
                line = bytes(self._buf[:size])
                if line.strip():  # blank lines are ignored
                    events.append(Message(line))
            self._buf.clear()
            self._size, self._last_cr = 0, False
            i = lf + 1
        return events

    def _feed_framed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        i = 0
        while i < len(data):
            if self._state == _IDLE:
                stx = data.find(STX, i)
                self._garbage += (len(data) if stx < 0 else stx) - i
                if stx < 0:
                    break  # the run may go on in the next chunk: report it once, when it ends
                if self._garbage:
                    events.append(Garbage(self._garbage))
                    self._garbage = 0
                self._start_frame()
                i = stx + 1
            elif self._state == _PAYLOAD:
                found = _STX_OR_ETX.search(data, i)
                end = len(data) if found is None else found.start()
                self._take(data[i:end], self.max_bytes)
                if found is None:
                    break
                if data[end] == STX:
                    events.append(self._abandon())
                else:
                    self._state = _CRC
                i = end + 1
            else:
                byte = data[i]
                i += 1
                if byte == STX:  # hex digits are never STX, so this is a new frame
                    events.append(self._abandon())
                    continue
                self._digits.append(byte)
                if len(self._digits) == 4:
                    events.append(self._finish())
        return events

    def _start_frame(self) -> None:
        self._buf.clear()
        self._digits.clear()
        self._size = 0
        self._state = _PAYLOAD

    def _abandon(self) -> Garbage:
        """An STX inside a frame: report the frame so far as garbage and start the new frame."""
        count = 1 + self._size + (self._state == _CRC) + len(self._digits)  # STX, payload, ETX, digits
        self._start_frame()
        return Garbage(count)

    def _finish(self) -> Event:
        digits, size = bytes(self._digits), self._size
        payload = bytes(self._buf)
        self._buf.clear()
        self._digits.clear()
        self._state = _IDLE
        if size > self.max_bytes:
            return TooLong(size)  # its bytes were not kept, so its CRC cannot be checked
        if not _CRC_DIGITS.fullmatch(digits):
            return BadFrame(f"crc is not 4 upper-case hex digits: {digits!r}")
        got, computed = int(digits, 16), crc16(payload)
        if got != computed:
            return BadFrame(f"crc mismatch: got {got:04X}, computed {computed:04X}")
        return Message(payload)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown serial mode {mode!r}: expected one of {', '.join(MODES)}")
