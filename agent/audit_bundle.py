"""Audit bundles (pure: no CLI, no config; the caller passes the time, the key and the receipt text).

A bundle is one zip file an auditor can take away and check without the agent:

* ``sales.jsonl``: one JSON object per sale accepted in the period [from, to), oldest first, with its
  KRA and head-office state and KRA's signature fields. Nothing from the secret store.
* ``receipts/<outbox id>.txt``: each sale's receipt as the till would print it now, 42 columns.
* ``journal.jsonl``: the contiguous run of journal entries that covers the period (and each sale's
  own entry), with the hash of the entry just before it (the anchor, in the manifest), so the chain
  can be checked inside the bundle.
* ``pruned.jsonl`` (only when retention pruned sales the bundle would otherwise miss): the `pruned`
  journal entries that name them, whole, so the bundle shows what went and when; the manifest says
  how many of the period's sales were pruned.
* ``manifest.json``: format, agent version, creation time, period, counts, the SHA-256 of every
  other file, and the agent's public key and key id.
* ``manifest.sig``: the Ed25519 signature (base64) of the exact manifest.json bytes, by the agent's
  key, the one that signs temporary receipts. A receipt's signed message starts with its own header
  line and a manifest with "{", so no signature can be passed off as the other.

Entries are written in a fixed order with the creation time as their zip date, so the same outbox,
period and time give the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import ConfigError, StorageError
from agent.files import fsync_dir, sha256_of
from agent.queue import pruning
from agent.queue.journal import GENESIS, JournalEntry, entry_hash, verify_chain
from agent.queue.outbox import Outbox, SaleRecord, timestamp
from agent.receipt_signing import key_id_of
from agent.sales import canonical_json
from agent.secret import Secret

FORMAT = "etims-agent audit bundle"
VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SALES = "sales.jsonl"
JOURNAL = "journal.jsonl"
PRUNED = "pruned.jsonl"
RECEIPTS = "receipts/"
RECEIPT_WIDTH = 42
# The journal entries that record a sale entering the outbox: taken from the till, or rescued
# from a damaged outbox (which keeps the sale's original accepted_at but is journalled later).
RECORDING_EVENTS = ("accepted", "rescued")

ReceiptText = Callable[[SaleRecord], str]
Progress = Callable[[int], None]


# --- the period -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Period:
    """[start, end) in UTC."""

    start: datetime
    end: datetime

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


def parse_moment(option: str, text: str) -> datetime:
    """YYYY-MM-DD (midnight UTC) or an ISO 8601 time (UTC if it names no offset)."""
    value = text.strip()
    try:
        if len(value) == 10:
            moment = datetime.combine(datetime.strptime(value, "%Y-%m-%d").date(), time(), UTC)
        else:
            moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(option, f"{text} is not a date",
                          "expected YYYY-MM-DD or an ISO time such as 2026-11-01T00:00:00+03:00") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_period(start: str, end: str) -> Period:
    period = Period(parse_moment("--from", start), parse_moment("--to", end))
    if period.end <= period.start:
        raise ConfigError("--to", f"{end} is not after --from {start}",
                          "give the first moment after the period (--to is exclusive)")
    return period


# --- export -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Selection:
    """What goes into a bundle, read from the outbox."""

    period: Period
    sales: list[SaleRecord]
    journal: list[JournalEntry]
    anchor: tuple[int, str] | None  # (seq, hash) of the entry before the first one; None if no entries
    held_outside: list[int]  # invoice numbers between the bundle's first and last held by other sales
    renumbered: list[int]  # invoice numbers in that range KRA told the agent to skip (`renumbered`)
    pruned: list[JournalEntry] = field(default_factory=list)  # `pruned` entries naming sales the bundle lacks
    pruned_sales: int = 0  # sales recorded in the period that retention has pruned


def select(outbox: Outbox, period: Period) -> Selection:
    """The period's sales and the journal run that covers them.

    The journal and the sales are read in one snapshot, so a sale the running agent accepts or prunes
    meanwhile cannot make them disagree; a sale is taken only if its recording entry is in that journal.
    """
    snap = outbox.snapshot()
    journal, everything = snap.journal, snap.sales
    recorded = {e.sale_ref: i for i, e in enumerate(journal) if e.event in RECORDING_EVENTS}
    sales = [s for s in everything if s.accepted_at in period and s.id in recorded]
    # Stored times are UTC text of one fixed form, so text order is time order.
    start, end = timestamp(period.start), timestamp(period.end)
    picked = [i for i, e in enumerate(journal) if start <= e.at < end] + [recorded[s.id] for s in sales]
    # A contiguous run, so the chain can be checked from its anchor; a clock that stepped back can put
    # an entry from outside the period inside the run, which is why sales are chosen by their own time.
    run = journal[min(picked):max(picked) + 1] if picked else []
    anchor = None
    if run:
        first = min(picked)
        anchor = (journal[first - 1].seq, journal[first - 1].hash) if first > 0 else (0, GENESIS)
    held = [s.kra_invc_no for s in sales if s.kra_invc_no is not None]
    held_outside: list[int] = []
    renumbered: list[int] = []
    if held:
        low, high = min(held), max(held)
        chosen = {s.id for s in sales}
        held_outside = sorted(s.kra_invc_no for s in everything
                              if s.id not in chosen and s.kra_invc_no is not None and low <= s.kra_invc_no <= high)
        renumbered = sorted(n for n in _skipped(journal) if low <= n <= high)
    gone, covering = _pruned_for(journal, run, start, end, (min(held), max(held)) if held else None)
    return Selection(period, sales, run, anchor, held_outside, renumbered, covering, gone)


def _pruned_for(journal: list[JournalEntry], run: list[JournalEntry], start: str, end: str,
                invoices: tuple[int, int] | None) -> tuple[int, list[JournalEntry]]:
    """How many sales recorded in the period retention pruned, and the `pruned` entries that account
    for them and for any invoice number in the bundle's range that a pruned sale held."""
    pruned = pruning.pruned_in(journal)
    if not pruned.batches:
        return 0, []
    gone = {e.sale_ref for e in run if e.event in RECORDING_EVENTS and start <= e.at < end
            and e.sale_ref in pruned.by_id}
    covering = {pruned.by_id[ref].entry.seq: pruned.by_id[ref].entry for ref in gone if ref is not None}
    if invoices is not None:
        low, high = invoices
        covering.update((b.entry.seq, b.entry) for b in pruned.batches if any(low <= n <= high for n in b.invc_nos))
    return len(gone), [covering[seq] for seq in sorted(covering)]


def signing_key(secret: Secret) -> Ed25519PrivateKey:
    """The agent's key as the secret store keeps it (base64 of the raw private key, see ReceiptSigner)."""
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(secret.reveal(), validate=True))


def public_key_of(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class Written:
    path: Path
    sha256: str
    sales: int
    journal_entries: int
    key_id: str
    public_key: str


def write(path: Path, selection: Selection, *, receipt_text: ReceiptText, key: Ed25519PrivateKey,
          created_at: datetime, agent_version: str, issuer: Mapping[str, str], replace: bool = False,
          progress: Progress | None = None) -> Written:
    """Write the bundle to `path` atomically (a temp file beside it, then a rename).

    Raises FileExistsError if `path` exists and `replace` is false, StorageError if it cannot be written.
    """
    if path.exists() and not replace:
        raise FileExistsError(path)
    public_raw = public_key_of(key)
    key_id, public_key = key_id_of(public_raw), base64.b64encode(public_raw).decode()
    stamp = created_at.astimezone(UTC)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                files = {
                    SALES: _put(zf, SALES, stamp, (_line(_sale_line(s)) for s in selection.sales)),
                    JOURNAL: _put(zf, JOURNAL, stamp, (_line(_entry_line(e)) for e in selection.journal)),
                }
                if selection.pruned:
                    files[PRUNED] = _put(zf, PRUNED, stamp, (_line(_entry_line(e)) for e in selection.pruned))
                for sale in selection.sales:
                    name = receipt_name(sale.id)
                    files[name] = _put(zf, name, stamp, [receipt_text(sale).encode("utf-8")])
                    if progress is not None:
                        progress(1)
                manifest = _manifest(selection, files, stamp, agent_version, issuer, key_id, public_key)
                _put(zf, MANIFEST, stamp, [manifest])
                _put(zf, SIGNATURE, stamp, [base64.b64encode(key.sign(manifest)) + b"\n"])
            raw.flush()
            os.fsync(raw.fileno())
        if path.exists() and not replace:  # appeared while we wrote
            raise FileExistsError(path)
        os.replace(partial, path)
        fsync_dir(path.parent)
        digest = sha256_of(path)
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            raise
        raise StorageError(f"cannot write the bundle {path}: {exc.strerror or exc}; check the folder, its "
                           "permissions and free space") from exc
    finally:
        partial.unlink(missing_ok=True)
    return Written(path, digest, len(selection.sales), len(selection.journal), key_id, public_key)


def receipt_name(sale_ref: int) -> str:
    return f"{RECEIPTS}{sale_ref}.txt"


def _sale_line(s: SaleRecord) -> dict[str, Any]:
    return {
        "id": s.id, "till_id": s.till_id, "sale_id": s.sale_id, "kind": s.kind, "receipt_no": s.receipt_no,
        "accepted_at": timestamp(s.accepted_at), "content_hash": s.content_hash, "total": str(s.total),
        "original_id": s.original_id, "refund_reason": s.refund_reason,
        "kra": {"state": s.kra_state, "invc_no": s.kra_invc_no, "error": s.kra_error,
                "signature": s.kra_signature, "signed_at": _iso(s.kra_signed_at)},
        "tsms": {"state": s.tsms_state, "synced_at": _iso(s.tsms_synced_at)},
        "sale": s.sale, "amounts": s.amounts,
    }


def _entry_line(e: JournalEntry) -> dict[str, Any]:
    # detail stays the stored text: the entry's hash covers exactly that text.
    return {"seq": e.seq, "at": e.at, "event": e.event, "sale_ref": e.sale_ref, "detail": e.detail,
            "prev_hash": e.prev_hash, "hash": e.hash}


def _manifest(selection: Selection, files: dict[str, str], stamp: datetime, agent_version: str,
              issuer: Mapping[str, str], key_id: str, public_key: str) -> bytes:
    held = [s.kra_invc_no for s in selection.sales if s.kra_invc_no is not None]
    journal = selection.journal
    body = {
        "format": FORMAT, "version": VERSION, "agent_version": agent_version,
        "created_at": stamp.isoformat(), "issuer": dict(issuer),
        "period": {"from": selection.period.start.isoformat(), "to": selection.period.end.isoformat()},
        "counts": {"sales": len(selection.sales), "receipts": len(selection.sales), "journal_entries": len(journal)},
        "journal": {
            "anchor": None if selection.anchor is None else {"seq": selection.anchor[0], "hash": selection.anchor[1]},
            "first_seq": journal[0].seq if journal else None, "last_seq": journal[-1].seq if journal else None,
        },
        "invoice_numbers": {
            "first": min(held, default=None), "last": max(held, default=None),
            "held_outside_period": selection.held_outside, "renumbered": selection.renumbered,
        },
        # Sales recorded in the period that retention removed after KRA and head office had them; the
        # `pruned` entries naming them are in pruned.jsonl.
        "pruned": {"sales": selection.pruned_sales, "entries": [e.seq for e in selection.pruned]},
        "files": files,
        "key": {"algorithm": "Ed25519", "key_id": key_id, "public_key": public_key},
    }
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def _put(zf: zipfile.ZipFile, name: str, stamp: datetime, chunks: Iterable[bytes]) -> str:
    """Stream one entry into the zip; returns its SHA-256."""
    info = zipfile.ZipInfo(name, date_time=stamp.timetuple()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    digest = hashlib.sha256()
    with zf.open(info, "w") as out:
        for chunk in chunks:
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _line(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else timestamp(moment)


def _skipped(entries: Iterable[JournalEntry]) -> Iterator[int]:
    """Invoice numbers a strict KRA told the agent to skip, as journalled by `renumbered` entries."""
    for entry in entries:
        if entry.event != "renumbered":
            continue
        try:
            moved = json.loads(entry.detail)
        except ValueError:
            continue  # an edited entry; its hash no longer matches and the chain check says so
        if isinstance(moved, dict) and isinstance(moved.get("from"), int) and isinstance(moved.get("to"), int):
            yield from range(moved["from"], moved["to"])


# --- verification -----------------------------------------------------------------------------

class _Unreadable(Exception):
    """The bundle cannot be read far enough to check anything more."""


@dataclass(slots=True)
class BundleCheck:
    """What `check` found; `problems` empty means the bundle is intact and consistent."""

    problems: list[str] = field(default_factory=list)
    signature_valid: bool = False
    key_id: str | None = None
    public_key: str | None = None
    created_at: str | None = None
    agent_version: str | None = None
    period: dict[str, str] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    pruned_sales: int = 0  # sales of the period retention pruned, as the manifest says

    @property
    def ok(self) -> bool:
        return not self.problems

    def matches_key(self, expected: str) -> bool:
        """Whether the bundle was signed by this key: a key id, or a public key in base64."""
        return expected in (self.key_id, self.public_key)


def check(path: Path) -> BundleCheck:
    """Check a bundle: its signature, every file's SHA-256, the journal chain from its anchor, that
    every sale has its journal entry and matches it, and the KRA invoice numbers for gaps."""
    result = BundleCheck()
    try:
        with zipfile.ZipFile(path) as zf:
            _check_open(zf, result)
    except _Unreadable as exc:
        result.problems.append(str(exc))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        result.problems.append(f"{path.name} is not a readable zip file ({exc}); it is damaged or not a bundle")
    except OSError as exc:
        raise StorageError(f"cannot read the bundle {path}: {exc.strerror or exc}; check the path") from exc
    return result


def _check_open(zf: zipfile.ZipFile, result: BundleCheck) -> None:
    problems = result.problems
    names = zf.namelist()
    problems.extend(f"{name} is in the bundle more than once"
                    for name, times in sorted(Counter(names).items()) if times > 1)
    contents = {}
    for required in (MANIFEST, SIGNATURE):
        data = _member(zf, names, required, problems)
        if data is None:
            raise _Unreadable(f"{required} is missing or unreadable; this is not a complete audit bundle")
        contents[required] = data
    manifest_bytes = contents[MANIFEST]
    try:
        manifest = json.loads(manifest_bytes)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError("not an audit bundle manifest")
        key = manifest["key"]
        result.key_id, result.public_key = str(key["key_id"]), str(key["public_key"])
        files = {str(k): str(v) for k, v in manifest["files"].items()}
        counts = {str(k): int(v) for k, v in manifest["counts"].items()}
        period = Period(_aware(manifest["period"]["from"]), _aware(manifest["period"]["to"]))
        anchor_info = manifest["journal"]["anchor"]
        anchor = None if anchor_info is None else (int(anchor_info["seq"]), str(anchor_info["hash"]))
        numbers = manifest["invoice_numbers"]
        accounted = {int(n) for n in [*numbers["held_outside_period"], *numbers["renumbered"]]}
        pruned_sales = int((manifest.get("pruned") or {}).get("sales", 0))  # bundles before retention: none
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _Unreadable(f"{MANIFEST} cannot be read ({type(exc).__name__}: {exc}); the bundle is damaged") from None
    if manifest.get("version") != VERSION:
        problems.append(f"{MANIFEST} is format version {manifest.get('version')}; this agent reads version "
                        f"{VERSION}: check the bundle with a matching etims-agent")
    result.created_at, result.agent_version = manifest.get("created_at"), manifest.get("agent_version")
    result.period = {"from": period.start.isoformat(), "to": period.end.isoformat()}
    result.counts = counts
    result.pruned_sales = pruned_sales

    result.signature_valid = _signature_valid(manifest_bytes, contents[SIGNATURE], result.public_key, result.key_id)
    if not result.signature_valid:
        problems.append(f"{SIGNATURE} is not a valid signature of {MANIFEST} by key {result.key_id}: the manifest "
                        "was edited or signed by another key")

    for name, digest in sorted(files.items()):
        if name not in names:
            problems.append(f"{name} is listed in the manifest but missing from the bundle")
            continue
        data = _member(zf, names, name, problems)
        if data is not None and hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{name} does not match its SHA-256 in the manifest: it was changed")
    problems.extend(f"{name} is in the bundle but not in the manifest"
                    for name in sorted(set(names) - set(files) - {MANIFEST, SIGNATURE}))

    entries = _read_journal(zf, names, problems)
    pruned = _read_pruned(zf, names, entries, problems)
    sales = _read_sales(zf, names, problems)
    found = {"sales": len(sales), "receipts": sum(n.startswith(RECEIPTS) for n in set(names)),
             "journal_entries": len(entries)}
    problems.extend(f"the manifest counts {counts.get(k)} {k.replace('_', ' ')} but the bundle holds {v}"
                    for k, v in found.items() if counts.get(k) != v)
    problems.extend(_chain_problems(entries, anchor))
    problems.extend(_sale_problems(sales, entries, period, set(names), pruned.ids))
    gone = _pruned_in_period(sales, entries, period, pruned.ids)
    if gone != pruned_sales:
        problems.append(f"the manifest says {pruned_sales} of the period's sales were pruned, but the bundle "
                        f"accounts for {gone}")
    problems.extend(_gaps(sales, entries, accounted | pruned.invc_nos()))


def _signature_valid(message: bytes, signature: bytes, public_key: str, key_id: str) -> bool:
    try:
        raw = base64.b64decode(public_key, validate=True)
        if key_id_of(raw) != key_id:
            return False
        Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(signature.strip(), validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _member(zf: zipfile.ZipFile, names: list[str], name: str, problems: list[str] | None) -> bytes | None:
    """A file's bytes, or None if it is missing or damaged (reported once, when `problems` is given)."""
    if name not in names:
        return None
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        if problems is not None:
            problems.append(f"{name} cannot be read from the zip ({exc}); the bundle is damaged")
        return None


def _jsonl(zf: zipfile.ZipFile, names: list[str], name: str, problems: list[str]) -> Iterator[tuple[int, Any]]:
    data = _member(zf, names, name, None)  # missing or damaged: already reported against the manifest
    if data is None:
        return
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            yield number, json.loads(line)
        except ValueError:
            problems.append(f"{name} line {number} is not JSON")


def _read_journal(zf: zipfile.ZipFile, names: list[str], problems: list[str],
                  name: str = JOURNAL) -> list[JournalEntry]:
    entries = []
    for number, obj in _jsonl(zf, names, name, problems):
        try:
            entry = JournalEntry(seq=obj["seq"], at=obj["at"], event=obj["event"], sale_ref=obj["sale_ref"],
                                 detail=obj["detail"], prev_hash=obj["prev_hash"], hash=obj["hash"])
            if not (isinstance(entry.seq, int) and isinstance(entry.detail, str)
                    and (entry.sale_ref is None or isinstance(entry.sale_ref, int))):
                raise TypeError("a field has the wrong type")
        except (KeyError, TypeError) as exc:
            problems.append(f"{name} line {number} is not a journal entry ({type(exc).__name__}: {exc})")
            continue
        entries.append(entry)
    return entries


def _read_pruned(zf: zipfile.ZipFile, names: list[str], journal: list[JournalEntry],
                 problems: list[str]) -> pruning.Pruned:
    """The `pruned` entries of pruned.jsonl and of the journal run. Those from pruned.jsonl lie outside the
    run, so each must at least match its own hash (and the signed manifest's SHA-256 of the file)."""
    in_run = {e.seq: e for e in journal}
    extra: dict[int, JournalEntry] = {}
    for e in _read_journal(zf, names, problems, PRUNED):
        if e.event != pruning.EVENT:
            problems.append(f"{PRUNED}: entry {e.seq} is a '{e.event}' entry, not '{pruning.EVENT}'")
        elif entry_hash(e.prev_hash, e.seq, e.at, e.event, e.sale_ref, e.detail) != e.hash:
            problems.append(f"{PRUNED}: entry {e.seq}: content does not match its hash; the entry was edited")
        elif e.seq in in_run and in_run[e.seq] != e:
            problems.append(f"{PRUNED}: entry {e.seq} differs from the same entry in {JOURNAL}")
        elif e.seq not in in_run:
            extra[e.seq] = e
    found = pruning.pruned_in(sorted([*journal, *extra.values()], key=lambda e: e.seq))
    problems.extend(f"{PRUNED}: {problem}" for problem in found.problems)
    return found


def _pruned_in_period(sales: list[_Sale], entries: list[JournalEntry], period: Period,
                      pruned: Collection[int]) -> int:
    """Sales recorded in the period that the bundle does not hold because retention pruned them."""
    held = {s.id for s in sales}
    return len({e.sale_ref for e in entries if e.event in RECORDING_EVENTS and e.sale_ref in pruned
                and e.sale_ref not in held and (at := _moment(e.at)) is not None and at in period})


@dataclass(frozen=True, slots=True)
class _Sale:
    id: int
    label: str  # till/sale id, for messages
    receipt_no: int
    accepted_at: datetime
    content_hash: str
    total: str
    invc_no: int | None
    sale: Any


def _read_sales(zf: zipfile.ZipFile, names: list[str], problems: list[str]) -> list[_Sale]:
    sales = []
    for number, obj in _jsonl(zf, names, SALES, problems):
        try:
            invc_no = obj["kra"]["invc_no"]
            sale = _Sale(id=int(obj["id"]), label=f"{obj['till_id']}/{obj['sale_id']}",
                         receipt_no=int(obj["receipt_no"]), accepted_at=_aware(obj["accepted_at"]),
                         content_hash=str(obj["content_hash"]), total=str(Decimal(obj["total"])),
                         invc_no=None if invc_no is None else int(invc_no), sale=obj["sale"])
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            problems.append(f"{SALES} line {number} is not a sale record ({type(exc).__name__}: {exc})")
            continue
        sales.append(sale)
    return sales


def _chain_problems(entries: list[JournalEntry], anchor: tuple[int, str] | None) -> list[str]:
    """The chain check of `verify_chain`, started from the bundle's anchor instead of the genesis."""
    if not entries:
        return []
    if anchor is None:
        return [f"{MANIFEST} names no journal anchor, so the chain in {JOURNAL} cannot be checked"]
    return [f"journal {problem}" for problem in verify_chain(entries, anchor)]


def _sale_problems(sales: list[_Sale], entries: list[JournalEntry], period: Period, names: set[str],
                   pruned: Collection[int]) -> list[str]:
    problems: list[str] = []
    recorded: dict[int, JournalEntry] = {}
    for e in entries:
        if e.event in RECORDING_EVENTS and e.sale_ref is not None:
            recorded[e.sale_ref] = e
    seen: set[int] = set()
    for s in sales:
        what = f"sale {s.id} ({s.label})"
        if s.id in seen:
            problems.append(f"{what} is in {SALES} more than once")
        seen.add(s.id)
        if s.id in pruned:
            problems.append(f"{what} is in {SALES} but a '{pruning.EVENT}' entry says it was pruned")
        if s.accepted_at not in period:
            problems.append(f"{what} was accepted at {s.accepted_at.isoformat()}, outside the bundle's period")
        if receipt_name(s.id) not in names:
            problems.append(f"{what} has no receipt ({receipt_name(s.id)})")
        if hashlib.sha256(canonical_json(s.sale).encode()).hexdigest() != s.content_hash:
            problems.append(f"{what}: the sale does not match its content hash; it was edited")
        entry = recorded.pop(s.id, None)
        if entry is None:
            problems.append(f"{what} has no 'accepted' entry in {JOURNAL}")
            continue
        try:
            detail = json.loads(entry.detail)
            agrees = (detail.get("content_hash"), detail.get("receipt_no"), str(Decimal(detail.get("total")))) == \
                (s.content_hash, s.receipt_no, s.total)
        except (ValueError, TypeError, AttributeError, ArithmeticError):
            agrees = False
        if not agrees or (entry.event == "accepted" and _moment(entry.at) != s.accepted_at):
            problems.append(f"{what} differs from its journal entry {entry.seq}")
    for ref, e in recorded.items():
        at = _moment(e.at)
        if ref in pruned:  # removed by retention once KRA and head office had it; its entry says so
            continue
        if e.event == "accepted" and (at is None or at in period):
            problems.append(f"journal entry {e.seq} records sale {ref} accepted in the period, but {SALES} "
                            "does not hold it")
    receipts = {receipt_name(s.id) for s in sales}
    problems.extend(f"{name} has no sale in {SALES}"
                    for name in sorted(names) if name.startswith(RECEIPTS) and name not in receipts)
    return problems


def _aware(text: Any) -> datetime:
    """A time from the bundle; it must name its offset (every time the agent writes does)."""
    moment = datetime.fromisoformat(str(text))
    if moment.tzinfo is None:
        raise ValueError(f"{text} has no UTC offset")
    return moment


def _moment(text: str) -> datetime | None:
    try:
        return _aware(text)
    except ValueError:
        return None  # an edited entry; its hash no longer matches and the chain check says so


def _gaps(sales: list[_Sale], entries: list[JournalEntry], accounted: set[int]) -> list[str]:
    """KRA invoice numbers between the bundle's first and last that nothing accounts for, and duplicates."""
    holders: dict[int, list[str]] = {}
    for s in sales:
        if s.invc_no is not None:
            holders.setdefault(s.invc_no, []).append(f"{s.id} ({s.label})")
    problems = [f"KRA invoice number {n} is held by several sales: {', '.join(who)}"
                for n, who in sorted(holders.items()) if len(who) > 1]
    if not holders:
        return problems
    explained = accounted | set(_skipped(entries))
    missing = sorted(set(range(min(holders), max(holders) + 1)) - set(holders) - explained)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        problems.append(f"KRA invoice numbers with no sale in the bundle: {shown} ({len(missing)}); compare with "
                        "KRA (selectInvoiceDetails)")
    return problems
