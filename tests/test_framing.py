"""Serial framing: the CRC, both wire modes on hand-written byte fixtures, and properties over random
payloads, chunkings, garbage and single-byte damage.

Frames in the fixtures are written out as literal bytes (CRCs computed by `crc16` below, whose
check value and bit-by-bit reference are tested first), so a change to the wire format shows here.
"""

from __future__ import annotations

import json
from collections.abc import Set
from itertools import pairwise

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from agent.devices import framing
from agent.devices.framing import (
    ACK,
    ETX,
    LF,
    MODES,
    NAK,
    STX,
    BadFrame,
    Decoder,
    Event,
    Garbage,
    Message,
    TooLong,
    crc16,
    encode,
    reply_bytes,
)

A, B = b'{"a":1}', b'{"b":2}'
FRAME_A = b'\x02{"a":1}\x037299'  # the worked example in the module docstring
FRAME_B = b'\x02{"b":2}\x03C918'


def decode(mode: str, stream: bytes, cuts: Set[int] = frozenset(), max_bytes: int = 1_048_576) -> list[Event]:
    """Feed one new decoder the stream cut at the given offsets; all the events, in order."""
    decoder = Decoder(mode, max_bytes)
    bounds = [0, *sorted(cuts), len(stream)]
    return [event for start, end in pairwise(bounds) for event in decoder.feed(stream[start:end])]


def decode_both(mode: str, stream: bytes, max_bytes: int = 1_048_576) -> list[Event]:
    """The events for the stream fed whole, checked equal to feeding it one byte at a time."""
    whole = decode(mode, stream, max_bytes=max_bytes)
    assert decode(mode, stream, set(range(1, len(stream))), max_bytes) == whole
    return whole


def crc16_bitwise(data: bytes) -> int:
    """CRC-16/CCITT-FALSE straight from its definition, as the module docstring gives it to tills."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


# Compact JSON objects made from text without control characters (Cs: lone surrogates cannot be UTF-8).
_TEXT = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=12)
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), _TEXT)
payloads = st.dictionaries(_TEXT, _VALUES, max_size=4).map(
    lambda d: json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode())
# Garbage between frames: anything but STX, with the bytes that matter to the decoder drawn often.
garbage = st.lists(st.integers(0, 255).filter(lambda b: b != STX) | st.sampled_from([ETX, ACK, NAK, LF, ord("7")]),
                   max_size=12).map(bytes)


class TestCrc:
    def test_check_value(self) -> None:
        assert crc16(b"123456789") == 0x29B1
        assert crc16(b"") == 0xFFFF

    @given(st.binary(max_size=64))
    def test_matches_the_bitwise_definition(self, data: bytes) -> None:
        assert crc16(data) == crc16_bitwise(data)


class TestEncode:
    def test_worked_example_frame(self) -> None:
        """{"a":1} framed, byte for byte, and the README's hex for it says the same."""
        hex_text = "02 7B 22 61 22 3A 31 7D 03 37 32 39 39"
        assert encode(A, "framed") == FRAME_A == bytes.fromhex(hex_text)
        assert crc16(A) == 0x7299
        assert framing.__doc__ is not None and hex_text in framing.__doc__

    def test_plain_is_a_line(self) -> None:
        assert encode(A, "plain") == A + b"\n"

    @pytest.mark.parametrize("payload", [b'{"a":\n1}', b"{}\r"])
    def test_plain_refuses_what_would_not_come_back(self, payload: bytes) -> None:
        with pytest.raises(ValueError, match="LF"):
            encode(payload, "plain")

    @pytest.mark.parametrize("payload", [b"{\x02}", b"{\x03}"])
    def test_framed_refuses_stx_and_etx(self, payload: bytes) -> None:
        with pytest.raises(ValueError, match="STX"):
            encode(payload, "framed")

    def test_empty_frame(self) -> None:
        """An empty payload is a frame too; the caller's JSON parsing refuses it, not the framing."""
        assert encode(b"", "framed") == b"\x02\x03FFFF"
        assert decode_both("framed", b"\x02\x03FFFF") == [Message(b"")]

    def test_a_bad_mode_is_refused_naming_the_modes(self) -> None:
        for call in (lambda: encode(A, "line"), lambda: Decoder("line"), lambda: reply_bytes(Message(A), "line")):
            with pytest.raises(ValueError, match="'line': expected one of plain, framed"):
                call()
        with pytest.raises(ValueError, match="max_bytes"):
            Decoder("plain", max_bytes=0)


class TestReplyBytes:
    @pytest.mark.parametrize(("event", "framed"), [
        (Message(A), bytes([ACK])),
        (BadFrame("crc mismatch"), bytes([NAK])),
        (TooLong(10), bytes([NAK])),
        (Garbage(3), b""),
    ])
    def test_ack_nak_in_framed_mode_only(self, event: Event, framed: bytes) -> None:
        assert reply_bytes(event, "framed") == framed
        assert reply_bytes(event, "plain") == b""


class TestPlain:
    def test_crlf_and_blank_lines(self) -> None:
        """CR before LF is dropped, blank lines are skipped, and a line without its LF waits."""
        stream = b'{"a":1}\r\n\r\n\n \t\n{"b":2}\n{"c":'
        assert decode_both("plain", stream) == [Message(A), Message(B)]

    def test_too_long_line_then_recovery(self) -> None:
        stream = b'{"a":"123456789"}\r\n{"b":2}\n'
        assert decode_both("plain", stream, max_bytes=8) == [TooLong(17), Message(B)]

    def test_limit_excludes_cr_and_lf(self) -> None:
        assert decode_both("plain", b"12345678\r\n123456789\n", max_bytes=8) == [Message(b"12345678"), TooLong(9)]

    def test_reset_drops_a_partial_line(self) -> None:
        decoder = Decoder("plain")
        assert decoder.feed(b'{"a":') == []
        decoder.reset()
        assert decoder.feed(B + b"\n") == [Message(B)]


class TestFramed:
    def test_garbage_before_and_between_frames(self) -> None:
        stream = b"\x00\xff\x03" + FRAME_A + b"\x06\x15\r\nnoise" + FRAME_B
        assert decode_both("framed", stream) == [Garbage(3), Message(A), Garbage(9), Message(B)]

    def test_a_garbage_run_is_reported_once_when_the_next_stx_ends_it(self) -> None:
        decoder = Decoder("framed")
        assert decoder.feed(FRAME_A + b"xyz") == [Message(A)]
        assert decoder.feed(b"pq") == []
        assert decoder.feed(FRAME_B) == [Garbage(5), Message(B)]

    def test_wrong_crc_then_the_next_frame(self) -> None:
        stream = b'\x02{"a":1}\x030000' + FRAME_B
        assert decode_both("framed", stream) == [BadFrame("crc mismatch: got 0000, computed 7299"), Message(B)]

    def test_damaged_payload(self) -> None:
        stream = b'\x02{"a":2}\x037299' + FRAME_B
        assert decode_both("framed", stream) == [BadFrame("crc mismatch: got 7299, computed 27CA"), Message(B)]

    @pytest.mark.parametrize("digits", [b"72G9", b"72 9", b"c918", b"\x03\x03\x03\x03"])
    def test_crc_digits_not_upper_case_hex(self, digits: bytes) -> None:
        """Lower case is refused too: the CRC is sent as upper-case hex, and anything else is noise."""
        stream = b'\x02{"b":2}\x03' + digits + FRAME_A
        assert decode_both("framed", stream) == [
            BadFrame(f"crc is not 4 upper-case hex digits: {digits!r}"), Message(A)]

    def test_stx_in_the_payload_starts_a_new_frame(self) -> None:
        stream = b'\x02{"a"' + FRAME_A
        assert decode_both("framed", stream) == [Garbage(5), Message(A)]

    def test_stx_among_the_crc_digits_starts_a_new_frame(self) -> None:
        stream = b'\x02{"a":1}\x0372' + FRAME_B
        assert decode_both("framed", stream) == [Garbage(11), Message(B)]  # STX, 7 payload, ETX, 2 digits

    def test_too_long_frame_then_recovery(self) -> None:
        stream = FRAME_A + b'\x02{}\x036696'
        assert decode_both("framed", stream, max_bytes=6) == [TooLong(7), Message(b"{}")]
        assert decode_both("framed", stream, max_bytes=7) == [Message(A), Message(b"{}")]

    def test_too_long_frame_is_refused_whatever_its_crc(self) -> None:
        """Its bytes are counted, not kept, so its CRC cannot be checked: NAK either way."""
        assert decode_both("framed", b"\x02" + b"x" * 10 + b"\x03zzzz", max_bytes=4) == [TooLong(10)]

    def test_too_long_frame_abandoned_at_an_stx(self) -> None:
        stream = b"\x02" + b"x" * 10 + FRAME_A
        assert decode_both("framed", stream, max_bytes=4) == [Garbage(11), TooLong(7)]
        assert decode_both("framed", stream, max_bytes=7) == [Garbage(11), Message(A)]

    def test_reset_drops_a_partial_frame(self) -> None:
        decoder = Decoder("framed")
        assert decoder.feed(b'\x02{"a"') == []
        decoder.reset()
        assert decoder.feed(FRAME_B) == [Message(B)]

    def test_reset_among_the_crc_digits_leaves_the_rest_as_garbage(self) -> None:
        decoder = Decoder("framed")
        assert decoder.feed(FRAME_A[:-2]) == []
        decoder.reset()
        assert decoder.feed(FRAME_A[-2:] + FRAME_B) == [Garbage(2), Message(B)]

    def test_reset_forgets_a_garbage_run(self) -> None:
        decoder = Decoder("framed")
        assert decoder.feed(b"junk") == []
        decoder.reset()
        assert decoder.feed(FRAME_A) == [Message(A)]


class TestProperties:
    @given(st.lists(payloads, max_size=6), st.sampled_from(MODES), st.data())
    def test_any_chunking_gives_the_same_messages(self, sent: list[bytes], mode: str, data: st.DataObject) -> None:
        stream = b"".join(encode(p, mode) for p in sent)
        cuts = data.draw(st.sets(st.integers(0, len(stream))))
        assert decode(mode, stream, cuts) == [Message(p) for p in sent]

    @given(st.lists(st.one_of(payloads.map(lambda p: encode(p, "framed")), st.binary(max_size=8),
                              st.sampled_from([b"\x02", b"\x03", b"\n", b"\r\n", b"7299"]))),
           st.sampled_from(MODES), st.integers(1, 40), st.data())
    def test_every_event_is_independent_of_chunking(self, pieces: list[bytes], mode: str, max_bytes: int,
                                                    data: st.DataObject) -> None:
        """Not only Messages: Garbage, BadFrame and TooLong too, on any bytes, with small limits."""
        stream = b"".join(pieces)
        cuts = data.draw(st.sets(st.integers(0, len(stream))))
        assert decode(mode, stream, cuts, max_bytes) == decode(mode, stream, max_bytes=max_bytes)

    @given(st.lists(st.tuples(garbage, payloads), min_size=1, max_size=5), garbage, st.data())
    def test_garbage_between_frames_is_skipped(self, items: list[tuple[bytes, bytes]], tail: bytes,
                                               data: st.DataObject) -> None:
        """Each run of garbage (no STX) is one Garbage event before the frame that ends it; trailing
        garbage is reported when the next frame's STX arrives."""
        last = b'{"last":1}'
        stream = b"".join(junk + encode(p, "framed") for junk, p in items) + tail + encode(last, "framed")
        expected: list[Event] = []
        for junk, p in [*items, (tail, last)]:
            expected += [Garbage(len(junk))] if junk else []
            expected.append(Message(p))
        cuts = data.draw(st.sets(st.integers(0, len(stream))))
        assert decode("framed", stream, cuts) == expected

    @given(st.lists(payloads, min_size=1, max_size=4), st.data())
    def test_one_damaged_byte_never_gives_a_wrong_message(self, sent: list[bytes], data: st.DataObject) -> None:
        """One payload byte of frame k changed to any other value. Always: frames before and after
        k decode to exactly their Messages, and no other Message appears. Frame k itself gives:

        - any byte but STX/ETX: exactly one BadFrame (crc mismatch). Guaranteed: CRC-16 detects
          every error burst of up to 16 bits, so every single-byte error.
        - STX at offset i: Garbage(i + 1) for the STX and payload bytes before it, then the rest of
          the payload is read as a frame carrying the original CRC: a BadFrame.
        - ETX at offset i: the payload p[:i] is checked against the next 4 bytes read as its CRC (not
          hex, or a mismatch): a BadFrame; the len(p) - i bytes after those are garbage, reported
          as one Garbage when the next frame's STX arrives (so not at all after the last frame).

        In the STX and ETX cases only a 16-bit CRC stands between the re-cut frame and a wrong
        Message, so a CRC collision (1 in 65536) would give one; the test excludes exactly that case
        with assume().
        """
        k = data.draw(st.integers(0, len(sent) - 1))
        p = sent[k]
        i = data.draw(st.integers(0, len(p) - 1))
        new = data.draw(st.sampled_from([STX, ETX]) | st.integers(0, 255))
        assume(new != p[i])
        sent_crc = encode(p, "framed")[-4:]
        damaged = p[:i] + bytes([new]) + p[i + 1:]
        frames = [encode(q, "framed") for q in sent]
        frames[k] = bytes([STX]) + damaged + bytes([ETX]) + sent_crc

        middle: list[Event]
        if new == STX:
            rest = p[i + 1:]
            assume(crc16(rest) != crc16(p))
            middle = [Garbage(i + 1), BadFrame(f"crc mismatch: got {sent_crc.decode()}, computed {crc16(rest):04X}")]
        elif new == ETX:
            read_as_crc = (p[i + 1:] + bytes([ETX]) + sent_crc)[:4]
            assume(read_as_crc != b"%04X" % crc16(p[:i]))
            middle = [BadFrame("(either reason)")] + ([Garbage(len(p) - i)] if k < len(sent) - 1 else [])
        else:
            middle = [BadFrame(f"crc mismatch: got {sent_crc.decode()}, computed {crc16(damaged):04X}")]

        events = decode("framed", b"".join(frames))
        messages = [e for e in events if isinstance(e, Message)]
        assert messages == [Message(q) for j, q in enumerate(sent) if j != k]
        if new == ETX:  # which BadFrame reason depends on whether the 4 bytes happen to be hex
            events = [BadFrame("(either reason)") if isinstance(e, BadFrame) else e for e in events]
        assert events == [Message(q) for q in sent[:k]] + middle + [Message(q) for q in sent[k + 1:]]
