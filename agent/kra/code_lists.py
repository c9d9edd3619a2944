"""KRA's code lists and item classes: fetched, cached in the outbox database, refreshed on a schedule.

The lists change rarely, so each refresh asks only for what changed since the last one (`lastReqDt`)
and merges it into the cached copy. What the agent takes from them:

* the tax rates of bands A-E (class 04, rate in `userDfnCd1`, kra-oscu.md §3.6), used to compute
  every new sale's amounts; until KRA's list is known, or for a band it lacks, the configured
  defaults apply;
* the refund reasons (class 32) a credit note may give.

Merging and reading are pure functions; `CodeLists` holds the cache and does the fetching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.kra.client import KraClient, KraReply
from agent.kra.codes import Outcome, describe
from agent.kra.payloads import kra_datetime, parse_kra_datetime
from agent.logs import get_logger
from agent.queue.kra_store import KraStore
from agent.sales import TAX_BANDS

log = get_logger("agent.kra.code_lists")

CODES, ITEM_CLASSES = "codes", "item_classes"  # names in the kra_code_lists table
EPOCH = "20180101000000"  # lastReqDt for a first, full fetch


def merge_codes(cached: Mapping[str, Any], fetched: Any) -> dict[str, Any]:
    """Fold a selectCodeList answer (`clsList`) into the cache: {cdCls: {...class, "codes": {cd: {...}}}}."""
    merged = {cls: {**body, "codes": dict(body.get("codes", {}))} for cls, body in cached.items()}
    for cls in _list(fetched, "clsList"):
        key = str(cls.get("cdCls", ""))
        if not key:
            continue
        entry = merged.setdefault(key, {"codes": {}})
        entry.update({k: v for k, v in cls.items() if k not in ("dtlList", "codes")})  # "codes" is ours
        details = cls.get("dtlList")
        for detail in details if isinstance(details, list) else []:
            if isinstance(detail, dict) and detail.get("cd") is not None:
                entry["codes"][str(detail["cd"])] = detail
    return merged


def merge_item_classes(cached: Mapping[str, Any], fetched: Any) -> dict[str, Any]:
    """Fold a selectItemClsList answer (`itemClsList`) into the cache, keyed by itemClsCd."""
    merged = dict(cached)
    for item_class in _list(fetched, "itemClsList"):
        if item_class.get("itemClsCd") is not None:
            merged[str(item_class["itemClsCd"])] = item_class
    return merged


def tax_rates(codes: Mapping[str, Any], defaults: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """Bands A-E from class 04 where KRA lists a usable rate, else the configured default."""
    listed = codes.get("04", {}).get("codes", {})
    rates = {}
    for band in TAX_BANDS:
        entry = listed.get(band)
        rate = _rate(entry.get("userDfnCd1")) if isinstance(entry, dict) and entry.get("useYn", "Y") == "Y" else None
        rates[band] = defaults[band] if rate is None else rate
    return rates


def refund_reasons(codes: Mapping[str, Any]) -> dict[str, str]:
    """Class 32 as KRA lists it (code -> name), in use only; empty until fetched."""
    listed = codes.get("32", {}).get("codes", {})
    return {code: str(entry.get("cdNm") or code) for code, entry in sorted(listed.items())
            if isinstance(entry, dict) and entry.get("useYn", "Y") == "Y"}


def _rate(value: object) -> Decimal | None:
    try:
        rate = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None
    return rate if rate.is_finite() and 0 <= rate < 100 else None


def _list(data: Any, key: str) -> list[dict[str, Any]]:
    items = data.get(key) if isinstance(data, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


class CodeLists:
    """The cached lists for one device, and the refresh job the scheduler runs."""

    def __init__(self, store: KraStore, client: KraClient | None, clock: Callable[[], datetime],
                 default_rates: Mapping[str, Decimal]) -> None:
        self._store, self._client, self._clock = store, client, clock
        self._defaults = dict(default_rates)
        cached = store.code_list(CODES)
        self._codes: dict[str, Any] = cached[0] if cached else {}
        self._codes_at = cached[1] if cached else None
        classes = store.code_list(ITEM_CLASSES)
        self._classes: dict[str, Any] = classes[0] if classes else {}
        self._classes_at = classes[1] if classes else None
        self._rates = tax_rates(self._codes, self._defaults)
        self._failing = False

    def rates(self) -> Mapping[str, Decimal]:
        return self._rates

    def reasons(self) -> dict[str, str]:
        return refund_reasons(self._codes)

    def item_class(self, code: str) -> dict[str, Any] | None:
        found = self._classes.get(code)
        return found if isinstance(found, dict) else None

    @property
    def fetched_at(self) -> datetime | None:
        return self._codes_at

    async def refresh(self) -> bool:
        """Fetch what changed since the last refresh; True if both lists are now current."""
        if self._client is None:
            return False
        now = self._clock()
        codes = await self._client.code_list(self._since(self._codes_at))
        classes = await self._client.item_classes(self._since(self._classes_at))
        ok = self._take(codes, now, CODES) and self._take(classes, now, ITEM_CLASSES)
        if ok and self._failing:
            log.info("kra_code_lists_current", codes=len(self._codes), item_classes=len(self._classes))
        self._failing = not ok
        return ok

    def _take(self, reply: KraReply, now: datetime, name: str) -> bool:
        if reply.outcome is Outcome.EMPTY:  # nothing changed since lastReqDt
            return True
        if not reply.ok:
            if not self._failing:  # log the change to failing once, not every retry
                log.warning("kra_code_lists_stale", list=name, reason=describe(reply.code, reply.message),
                            detail="the cached lists (or the configured tax rates) stay in use")
            return False
        # The next refresh asks for changes since KRA's own time of this answer, so a wrong local
        # clock can neither skip a change nor fetch everything again.
        now = parse_kra_datetime(reply.result_dt) or now
        if name == CODES:
            self._codes, self._codes_at = merge_codes(self._codes, reply.data), now
            self._store.save_code_list(CODES, self._codes, now)
            rates = tax_rates(self._codes, self._defaults)
            if rates != self._rates:
                log.info("kra_tax_rates", **{band: str(rate) for band, rate in rates.items()})
                self._rates = rates
        else:
            self._classes, self._classes_at = merge_item_classes(self._classes, reply.data), now
            self._store.save_code_list(ITEM_CLASSES, self._classes, now)
        return True

    @staticmethod
    def _since(fetched_at: datetime | None) -> str:
        return EPOCH if fetched_at is None else kra_datetime(fetched_at)
