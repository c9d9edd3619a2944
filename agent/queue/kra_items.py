"""The items KRA holds for this device, as the outbox records them (`kra_items`), read for `etims-agent items`.

Rows are written only by `KraStore.item_registered`, by the signing lane and by `items register` alike,
so both see one record per item code: the exact saveItem body KRA accepted, and when.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from agent.queue.outbox import Outbox

_CHUNK = 500  # item codes per IN (...) query, well under SQLite's limit on bound variables


@dataclass(frozen=True, slots=True)
class RegisteredItem:
    code: str
    request: dict[str, Any]  # the saveItem body KRA accepted
    registered_at: datetime

    def to_json(self) -> dict[str, Any]:
        r = self.request
        return {"item_code": self.code, "name": r.get("itemNm"), "item_class": r.get("itemClsCd"),
                "tax_band": r.get("taxTyCd"), "unit_price": _text(r.get("dftPrc")),
                "qty_unit": r.get("qtyUnitCd"), "pkg_unit": r.get("pkgUnitCd"),
                "origin_country": r.get("orgnNatCd"), "item_type": r.get("itemTyCd"), "barcode": r.get("bcd"),
                "registered_at": self.registered_at.isoformat()}


def _text(value: object) -> str | None:
    return None if value is None else str(value)


class ItemStore:
    def __init__(self, outbox: Outbox) -> None:
        self._box = outbox

    def requests(self, codes: Iterable[str]) -> dict[str, str]:
        """The stored saveItem body of each of these codes that is registered."""
        wanted = list(dict.fromkeys(codes))
        found: dict[str, str] = {}
        with self._box._read() as conn:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start:start + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                found.update(conn.execute(
                    f"SELECT item_code, request FROM kra_items WHERE item_code IN ({marks})", chunk).fetchall())
        return found

    def list(self, *, search: str | None = None, tax_band: str | None = None, item_class: str | None = None,
             limit: int | None = None) -> list[RegisteredItem]:
        """Registered items by code; `search` matches code or name (case-insensitive substring)."""
        where: list[str] = []
        args: list[Any] = []
        if search:
            where.append("(instr(lower(item_code), ?) > 0 OR instr(lower(json_extract(request, '$.itemNm')), ?) > 0)")
            args += [search.lower(), search.lower()]
        if tax_band:
            where.append("json_extract(request, '$.taxTyCd') = ?")
            args.append(tax_band.upper())
        if item_class:
            where.append("json_extract(request, '$.itemClsCd') = ?")
            args.append(item_class)
        sql = ("SELECT item_code, request, registered_at FROM kra_items"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY item_code")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._box._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [RegisteredItem(code, _object(request), datetime.fromisoformat(at)) for code, request, at in rows]

    def count(self) -> int:
        with self._box._read() as conn:
            total: int = conn.execute("SELECT count(*) FROM kra_items").fetchone()[0]
        return total


def _object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_float=Decimal)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
